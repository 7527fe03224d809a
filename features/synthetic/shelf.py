"""The bank's rated product shelf, what each customer holds of it, and their consent decisions.

Drawn from generators of their own (seeded by the bank's seed and the chunk), *after* every other
table: adding them left every existing table of every bank unchanged.
"""

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagml.features.contract import CONSENT_PURPOSES
from tagml.features.synthetic.customers import Chunk
from tagml.features.synthetic.labels import RISK_CUTPOINTS

# (product_id, product_line, risk_level, product_name): a realistic retail shelf. Deposits are not
# rated investment products and are not on it.
SHELF: tuple[tuple[str, str, str, str], ...] = (
    ("WM-CASH-01", "wealth_management", "R1", "Daily cash management"),
    ("WM-FI-180", "wealth_management", "R2", "Fixed income plus 180 days"),
    ("WM-BAL-1Y", "wealth_management", "R3", "Balanced wealth plan 1 year"),
    ("BD-GOV-3Y", "bond", "R1", "Government bond 3 years"),
    ("BD-POL-5Y", "bond", "R2", "Policy bank bond 5 years"),
    ("BD-CORP-3Y", "bond", "R3", "Corporate bond 3 years"),
    ("MF-MMF", "mutual_fund", "R1", "Money market fund"),
    ("MF-BOND", "mutual_fund", "R2", "Bond fund"),
    ("MF-BAL", "mutual_fund", "R3", "Balanced fund"),
    ("MF-EQ", "mutual_fund", "R4", "Equity fund"),
    ("MF-QDII", "mutual_fund", "R5", "Overseas sector fund (QDII)"),
    ("EQ-MAIN", "equity", "R4", "Main-board equities"),
    ("EQ-GROWTH", "equity", "R5", "Growth-board equities"),
)
SHELF_SEED = 9_191_919
CONSENT_SEED = 5_050_505
# share of customers who granted each purpose at onboarding, and of those who withdrew it later
CONSENT_GRANTED = {"marketing": 0.85, "personalisation": 0.9, "profiling": 0.95}
CONSENT_WITHDRAWN = {"marketing": 0.08, "personalisation": 0.04, "profiling": 0.02}
CHOICE_NOISE = 0.7  # how loosely product choice follows appetite: some customers hold more risk than assessed
SPLIT_ABOVE = 50_000.0  # a fund position above this is spread over two funds


def products_table() -> pa.Table:
    """The shelf as the `products` contract table."""
    cols = list(zip(*SHELF, strict=True))
    return pa.table(
        {name: pa.array(list(values), pa.string()) for name, values in zip(("product_id", "product_line", "risk_level", "product_name"), cols, strict=True)}
    )


def _level(risk: np.ndarray) -> np.ndarray:
    """The C level (1..5) a latent risk appetite falls into."""
    return 1 + (risk[:, None] > RISK_CUTPOINTS[None, :]).sum(axis=1)


def holdings_table(c: Chunk, balances: pa.Table) -> pa.Table:
    """Each investment balance line split into the shelf's products: the product's rating follows the customer's
    appetite loosely, so some customers hold products above it (what suitability checks find)."""
    rng = np.random.default_rng([c.config.seed, SHELF_SEED, c.chunk])
    index = pc.subtract(pc.cast(pc.utf8_slice_codeunits(balances.column("customer_id"), 1), pa.int64()), int(c.index[0])).to_numpy()
    lines = balances.column("product").to_numpy(zero_copy_only=False)
    values = balances.column("balance").to_numpy()
    ends = balances.column("month_end")
    wanted = _level(c.risk + rng.normal(0, CHOICE_NOISE, c.n))  # one choice per customer, kept every month
    out_index, out_end, out_product, out_value = [], [], [], []
    for line in sorted({p[1] for p in SHELF}):
        shelf = [(pid, int(level[1])) for pid, ln, level, _ in SHELF if ln == line]
        levels = np.array([lv for _, lv in shelf])
        rows = np.nonzero(lines == line)[0]
        if rows.size == 0:
            continue
        target = wanted[index[rows]]
        # the highest-rated product at or below the wanted level, else the line's lowest
        pick = np.array([np.nonzero(levels <= t)[0].max() if (levels <= t).any() else 0 for t in target])
        split = (values[rows] > SPLIT_ABOVE) & (pick > 0) & (line == "mutual_fund")
        share = np.where(split, 0.6, 1.0)
        out_index.append(rows)
        out_end.append(rows)
        out_product.append(np.array([shelf[k][0] for k in pick], dtype=object))
        out_value.append(values[rows] * share)
        second = rows[split]
        out_index.append(second)
        out_end.append(second)
        out_product.append(np.array([shelf[k - 1][0] for k in pick[split]], dtype=object))
        out_value.append(values[second] * 0.4)
    rows = np.concatenate(out_index) if out_index else np.array([], np.int64)
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    return pa.table(
        {
            "customer_id": balances.column("customer_id").take(pa.array(rows)),
            "month_end": ends.take(pa.array(rows)),
            "product_id": pa.array(np.concatenate(out_product)[order] if out_product else [], pa.string()),
            "market_value": pa.array(np.round(np.concatenate(out_value)[order], 2) if out_value else [], pa.float64()),
        }
    )


def consents_table(c: Chunk) -> pa.Table:
    """Per customer and purpose: a grant at onboarding for most, and a later withdrawal for some."""
    rng = np.random.default_rng([c.config.seed, CONSENT_SEED, c.chunk])
    onboard = np.maximum(c.onboard_day, c.end_day - 20 * 365)  # consent records start with the 2005-era systems
    cust, purpose, when, status = [], [], [], []
    for name in CONSENT_PURPOSES:
        granted = rng.random(c.n) < CONSENT_GRANTED[name]
        withdrawn = granted & (rng.random(c.n) < CONSENT_WITHDRAWN[name])
        grant_day = np.minimum(onboard + rng.integers(0, 2, c.n), c.end_day - 1)
        grant_sec = grant_day * 86_400 + rng.integers(9 * 3600, 18 * 3600, c.n)
        idx = np.nonzero(granted)[0]
        cust.append(idx)
        purpose.append(np.full(idx.size, name, dtype=object))
        when.append(grant_sec[idx])
        status.append(np.full(idx.size, "granted", dtype=object))
        idx = np.nonzero(withdrawn)[0]
        later = grant_sec[idx] + ((c.end_day * 86_400 - grant_sec[idx]) * rng.random(idx.size)).astype(np.int64)
        cust.append(idx)
        purpose.append(np.full(idx.size, name, dtype=object))
        when.append(np.maximum(later, grant_sec[idx] + 1))
        status.append(np.full(idx.size, "withdrawn", dtype=object))
    cust_all = np.concatenate(cust)
    order = np.lexsort((np.concatenate(when), cust_all))
    return pa.table(
        {
            "customer_id": c.ids.take(pa.array(cust_all[order])),
            "purpose": pa.array(np.concatenate(purpose)[order], pa.string()),
            "status": pa.array(np.concatenate(status)[order], pa.string()),
            "recorded_at": pa.array(np.concatenate(when)[order].astype("datetime64[s]"), pa.timestamp("us")),
            "channel": pa.array(rng.choice(np.array(["branch", "app", "web", "call_centre"], dtype=object), cust_all.size)[order], pa.string()),
        }
    )
