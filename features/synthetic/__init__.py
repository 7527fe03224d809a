"""A synthetic retail bank that writes exactly the raw data contract.

The data has a causal structure the tags can be learned from:

* demographics: age -> marital status -> children -> family life stage; education, occupation,
  city tier and age -> income -> assets under management (AUM) and product mix;
* a latent risk appetite (from age, income, education plus an idiosyncratic part) -> share of funds,
  equity and wealth products, trading frequency, fund/equity app views, and how the customer reacts
  to market drawdowns (conservative customers sell, aggressive ones buy the dip);
* life stage -> spending categories (childcare, education, rent, medical, travel, dining);
* a latent disengagement that drifts for some customers -> falling activity -> monthly churn hazard.

Labels exist only for some customers and are drawn *last*, from probabilities that depend only on
the latents: a risk questionnaire (ordinal-logit around the latent appetite, ~a quarter of
customers), KYC / relationship-manager life stage (with recording errors, a smaller share) and churn
in the next three months, known 90 days after the observation date. Those probabilities are written
to `_truth/<tag>.parquet` beside the contract tables; since the observed data is a noisy function of
the same latents, E[max_k p_k] is an upper bound on any model's expected accuracy.

`generate_own_tables` then derives from a generated bank what a bank's own tables look like (a customer
wide table with PII, monthly snapshots, labels files, a leaky variant), on the same customer ids.

Generation is vectorised per chunk of customers, each chunk seeded from (seed, chunk index) and
written straight to Parquet parts, so memory is bounded by the chunk size.
"""

from tagml.features.synthetic.config import (
    CHUNK_SIZE,
    CHURN_CLASSES,
    DEFAULT_END_MONTH,
    DRIFT_SCENARIOS,
    LIFE_STAGES,
    RISK_CLASSES,
    BankConfig,
    month_ends,
)
from tagml.features.synthetic.generate import generate_bank
from tagml.features.synthetic.own_tables import generate_own_tables, own_tables_beside

__all__ = [
    "CHUNK_SIZE",
    "CHURN_CLASSES",
    "DEFAULT_END_MONTH",
    "DRIFT_SCENARIOS",
    "LIFE_STAGES",
    "RISK_CLASSES",
    "BankConfig",
    "generate_bank",
    "generate_own_tables",
    "month_ends",
    "own_tables_beside",
]
