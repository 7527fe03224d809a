"""What the synthetic bank generates: its size, calendar and drift scenarios, the classes of each tag,
and the small array helpers every table of a chunk shares."""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

CHUNK_SIZE = 50_000
DEFAULT_END_MONTH = "2026-10"
RISK_CLASSES = ("C1", "C2", "C3", "C4", "C5")
LIFE_STAGES = ("single", "couple", "young_family", "mature_family", "empty_nest", "retired")
CHURN_CLASSES = ("retained", "churned")
DRIFT_SCENARIOS = {
    "market_shock": "equity markets fall ~30% over two months; conservative customers sell risky "
    "products, aggressive ones buy, trading and fund/equity app views jump",
    "youth_campaign": "a campaign onboards many young, digital, mostly single customers from the start month",
}
CHURN_HORIZON_MONTHS = 3


@dataclass(frozen=True)
class BankConfig:
    customers: int = 20_000
    months: int = 12
    seed: int = 42
    end_month: str = DEFAULT_END_MONTH
    drift: str | None = None
    drift_month: str | None = None  # YYYY-MM; default: three months before the end

    def __post_init__(self) -> None:
        if self.customers < 1 or self.months < 2:
            raise ValueError("need at least 1 customer and 2 months")
        if self.drift is not None and self.drift not in DRIFT_SCENARIOS:
            raise ValueError(f"unknown drift scenario {self.drift!r}; choose from {sorted(DRIFT_SCENARIOS)}")


def month_ends(end_month: str, months: int) -> np.ndarray:
    end = np.datetime64(end_month, "M")
    firsts = np.arange(end - months + 1, end + 1, dtype="datetime64[M]")
    return (firsts + 1).astype("datetime64[D]") - 1


def drift_month_index(config: BankConfig) -> int | None:
    if config.drift is None:
        return None
    if config.drift_month is None:
        return max(1, config.months - 3)
    index = int((np.datetime64(config.drift_month, "M") - (np.datetime64(config.end_month, "M") - config.months + 1)).astype(int))
    if not 1 <= index < config.months:
        raise ValueError(f"drift month {config.drift_month} must fall inside the generated months (after the first)")
    return index


def market_index(config: BankConfig) -> np.ndarray:
    """Equity/fund value index per month (1.0 = first month), shared by every chunk."""
    rng = np.random.default_rng([config.seed, 7_777_777])
    returns = rng.normal(0.006, 0.035, config.months)
    returns[0] = 0.0
    shock = drift_month_index(config) if config.drift == "market_shock" else None
    if shock is not None:
        returns[shock] = -0.20
        if shock + 1 < config.months:
            returns[shock + 1] = -0.12
    return np.cumprod(1.0 + returns)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def life_stage_of(age: np.ndarray, married: np.ndarray, n_children: np.ndarray, youngest_age: np.ndarray) -> np.ndarray:
    """Index into LIFE_STAGES from the latent family facts at one date."""
    has_minor = (n_children > 0) & (youngest_age >= 0) & (youngest_age < 18)
    stage = np.where(married, 1, 0)
    stage = np.where(age >= 50, 4, stage)
    stage = np.where(has_minor & (youngest_age >= 6), 3, stage)
    stage = np.where(has_minor & (youngest_age < 6), 2, stage)
    return np.where(age >= 63, 5, stage)


def ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers, pa.int64()), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def days(dates: np.ndarray) -> np.ndarray:
    return dates.astype("datetime64[D]").astype(np.int64)
