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

Generation is vectorised per chunk of customers, each chunk seeded from (seed, chunk index) and
written straight to Parquet parts, so memory is bounded by the chunk size.
"""

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.contract import DIGITAL_EVENT_TYPES, PRODUCTS, TXN_CATEGORIES

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
EDUCATION = ("primary", "secondary", "bachelor", "postgraduate")
OCCUPATIONS = ("employee", "civil_servant", "professional", "self_employed", "retired", "student", "unemployed")
REGION_P = {"east": 0.30, "south": 0.18, "north": 0.15, "central": 0.14, "southwest": 0.10, "northeast": 0.07, "northwest": 0.06}
RISK_CUTPOINTS = np.array([-1.3, -0.45, 0.45, 1.3])
RISK_LABEL_SCALE = 0.4  # questionnaires are noisy self-reports
LIFE_STAGE_RECORD_ERROR = 0.08
CHURN_HORIZON_MONTHS = 3
MAX_BUY_THE_DIP = 0.15  # log of the largest extra risky allocation an aggressive customer buys after a fall

_SURNAMES = np.array(["Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun", "Ma", "Zhu", "Hu", "Guo"])
_GIVEN = np.array(["Wei", "Fang", "Na", "Min", "Jing", "Lei", "Qiang", "Yan", "Jie", "Tao", "Ming", "Chao", "Xiu", "Hui", "Jun", "Ping"])


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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


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


def life_stage_of(age: np.ndarray, married: np.ndarray, n_children: np.ndarray, youngest_age: np.ndarray) -> np.ndarray:
    """Index into LIFE_STAGES from the latent family facts at one date."""
    has_minor = (n_children > 0) & (youngest_age >= 0) & (youngest_age < 18)
    stage = np.where(married, 1, 0)
    stage = np.where(age >= 50, 4, stage)
    stage = np.where(has_minor & (youngest_age >= 6), 3, stage)
    stage = np.where(has_minor & (youngest_age < 6), 2, stage)
    return np.where(age >= 63, 5, stage)


def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers, pa.int64()), pa.string()), width, "0")
    return pc.binary_join_element_wise(pa.scalar(prefix), digits, "")


def _days(dates: np.ndarray) -> np.ndarray:
    return dates.astype("datetime64[D]").astype(np.int64)


class _Chunk:
    """One chunk of customers: latents, then each contract table as a pyarrow Table."""

    def __init__(self, config: BankConfig, chunk: int, start: int, size: int, index: np.ndarray):
        self.config, self.chunk, self.n = config, chunk, size
        self.rng = np.random.default_rng([config.seed, chunk])
        self.ends = month_ends(config.end_month, config.months)
        self.starts = self.ends.astype("datetime64[M]").astype("datetime64[D]")
        self.end_day = _days(self.ends[-1:])[0]
        self.index = index
        self.shock = drift_month_index(config)
        self.ids = _ids("C", np.arange(start, start + size), 9)
        self._latents()
        self.loans_table = self._build_loans()

    # ---- customers and latents -------------------------------------------------------------
    def _latents(self) -> None:
        rng, n, cfg = self.rng, self.n, self.config
        M = cfg.months
        campaign = np.zeros(n, bool)
        if cfg.drift == "youth_campaign":
            campaign = rng.random(n) < 0.15
        age = np.clip(rng.normal(43, 15, n), 18, 90)
        age = np.where(campaign, rng.uniform(20, 32, n), age)
        self.age_end = age
        birth_offset = (age * 365.25).astype(np.int64) + rng.integers(0, 365, n)
        self.birth_day = self.end_day - birth_offset
        self.male = rng.random(n) < 0.5
        edu_score = rng.normal(0.4 - 0.02 * (age - 40), 1.0, n)
        self.edu = np.digitize(edu_score, [-0.9, 0.35, 1.6])  # 0..3
        # occupation
        occ = rng.choice(7, n, p=[0.52, 0.10, 0.12, 0.14, 0.0, 0.0, 0.12])
        occ = np.where((age < 23) & (rng.random(n) < 0.6), 5, occ)
        retired = (age >= 60) & (rng.random(n) < np.clip((age - 57) / 8, 0, 1))
        occ = np.where(retired, 4, occ)
        self.occ = occ
        self.retired = retired
        region_names = np.array(list(REGION_P))
        self.region = region_names[rng.choice(len(REGION_P), n, p=list(REGION_P.values()))]
        coastal = np.isin(self.region, ["east", "south", "north"])
        tier = rng.choice(4, n, p=[0.18, 0.34, 0.31, 0.17]) + 1
        self.tier = np.where(coastal & (rng.random(n) < 0.25), np.maximum(tier - 1, 1), tier)
        # family latents
        married = rng.random(n) < _sigmoid((age - 28) / 3.5) * 0.85
        married = np.where(campaign, rng.random(n) < 0.2, married)
        self.married = married
        want_kids = married & (rng.random(n) < 0.82)
        n_kids = np.where(want_kids, rng.choice([1, 2, 3], n, p=[0.6, 0.33, 0.07]), 0)
        parent_age_at_youngest = rng.normal(32, 4, n)
        youngest = age - parent_age_at_youngest
        n_kids = np.where(youngest < 0, 0, n_kids)
        self.n_kids, self.youngest_end = n_kids, youngest
        divorced = married & (rng.random(n) < 0.07)
        widowed = (age > 60) & married & (rng.random(n) < (age - 60) / 60)
        status = np.where(married, "married", "single").astype(object)
        status[divorced] = "divorced"
        status[widowed] = "widowed"
        self.marital = status
        # income (monthly CNY) and wealth
        age_curve = -((age - 47) / 18) ** 2
        occ_effect = np.array([0.0, 0.15, 0.45, 0.3, -0.35, -1.4, -0.9])[occ]
        log_income = 8.55 + 0.32 * self.edu + 0.25 * (4 - self.tier) * 0.5 + 0.35 * age_curve + occ_effect + rng.normal(0, 0.45, n)
        log_income = np.where(campaign, log_income - 0.3, log_income)
        self.income = np.exp(log_income)
        years_saving = np.clip(age - 22, 0.5, None)
        self.aum = self.income * np.clip(years_saving, 0, 35) * 0.35 * rng.lognormal(0, 1.1, n)
        self.income_z = (log_income - 8.55) / 0.6
        # risk appetite latent: part demographic, part idiosyncratic (seen only through behaviour)
        self.risk = (
            -0.35 - 0.03 * (age - 43) + 0.35 * self.income_z + 0.2 * (self.edu - 1.5) + 0.15 * self.male + 0.15 * (self.tier == 1)
            + rng.normal(0, 0.75, n)
        )
        # tenure / onboarding
        tenure_days = (rng.gamma(1.4, 4.5, n) * 365.25).astype(np.int64)
        max_tenure = ((age - 18) * 365.25).astype(np.int64)
        tenure_days = np.minimum(tenure_days, max_tenure)
        onboard = self.end_day - tenure_days
        if cfg.drift == "youth_campaign":
            first = _days(self.starts[self.shock : self.shock + 1])[0]
            onboard = np.where(campaign, rng.integers(first, self.end_day - 5, n), onboard)
        self.onboard_day = onboard
        self.campaign = campaign
        start_day = _days(self.starts)  # (M,)
        end_days = _days(self.ends)
        self.onboard_month = np.searchsorted(end_days, onboard, side="left")  # first month with data
        # engagement and churn
        self.digital = _sigmoid(2.2 - 0.07 * (age - 30) + 0.3 * (self.tier <= 2)) * np.where(campaign, 1.3, 1.0)
        z0 = rng.normal(0, 1, n) - 0.4 * np.clip(tenure_days / 365.25 - 3, 0, 5) / 5
        drifting = rng.random(n) < 0.2
        slope = np.where(drifting, rng.uniform(0.15, 0.5, n), 0.0)
        self.z0, self.slope = z0, slope
        months = np.arange(M + CHURN_HORIZON_MONTHS)
        self.z = z0[:, None] + slope[:, None] * months[None, :]  # (n, M+H)
        self.hazard = _sigmoid(-5.2 + 0.9 * self.z + 0.4 * (age < 25)[:, None])
        draws = rng.random((n, M))
        churn_now = (draws < self.hazard[:, :M]) & (months[None, :M] >= self.onboard_month[:, None])
        churn_now[:, 0] = False
        self.churn_month = np.where(churn_now.any(axis=1), churn_now.argmax(axis=1), M + 99)
        churn_first = start_day[np.minimum(self.churn_month, M - 1)]
        self.churn_day = np.where(self.churn_month < M, churn_first + rng.integers(0, 28, n), self.end_day + 10_000)
        m = months[None, :M]
        self.active = (m >= self.onboard_month[:, None]) & (m <= self.churn_month[:, None])  # (n, M)
        self.activity = _sigmoid(1.6 - 0.8 * self.z[:, :M]) * self.active
        # products: loans
        fam = np.isin(life_stage_of(age, married, n_kids, youngest), [1, 2, 3])
        self.has_mortgage = (age > 27) & (age < 62) & (rng.random(n) < np.where(fam, 0.42, 0.12) * _sigmoid(self.income_z))
        self.renter = ~self.has_mortgage & (age < 38) & (rng.random(n) < 0.6)
        self.has_card = rng.random(n) < _sigmoid(0.5 + 0.6 * self.income_z - 0.03 * (age - 40))
        self.card_limit = np.round(self.income * rng.uniform(1.5, 5, n), -2)
        self.card_util = rng.beta(2, 5, n) * np.where(np.isin(self.stage_end, [2, 3]), 1.4, 1.0)

    def customers(self) -> pa.Table:
        rng, n = self.rng, self.n
        observed_marital = rng.random(n) < 0.65
        observed_kids = rng.random(n) < 0.45
        n_kids_now = self.n_kids
        names = np.char.add(np.char.add(_SURNAMES[rng.integers(0, len(_SURNAMES), n)], " "), _GIVEN[rng.integers(0, len(_GIVEN), n)])
        phone = np.char.add("1", rng.integers(3_000_000_000, 9_999_999_999, n).astype(str))
        birth = (self.birth_day).astype("datetime64[D]")
        nid = np.char.add(
            np.char.add(rng.integers(110_000, 659_999, n).astype(str), np.datetime_as_string(birth).astype("U10")),
            rng.integers(1000, 9999, n).astype(str),
        )
        street = np.char.add(rng.integers(1, 999, n).astype(str), " Renmin Road")
        gender = np.where(self.male, "M", "F").astype(object)
        gender[rng.random(n) < 0.02] = None
        marital = np.where(observed_marital, self.marital, None)
        kids = pa.array(np.where(observed_kids, n_kids_now, 0), mask=~observed_kids, type=pa.int64())
        occ = np.array(OCCUPATIONS, dtype=object)[self.occ]
        occ[rng.random(n) < 0.05] = None
        channel = np.array(["branch", "online", "referral", "payroll"], dtype=object)[
            rng.choice(4, n, p=[0.45, 0.25, 0.12, 0.18])
        ]
        channel[self.campaign] = "campaign"
        return pa.table(
            {
                "customer_id": self.ids,
                "full_name": pa.array(names),
                "phone": pa.array(phone),
                "national_id": pa.array(nid),
                "address": pa.array(street),
                "birth_date": pa.array(birth),
                "gender": pa.array(gender, pa.string()),
                "marital_status": pa.array(marital, pa.string()),
                "num_children": kids,
                "education": pa.array(np.array(EDUCATION, dtype=object)[self.edu], pa.string()),
                "occupation": pa.array(occ, pa.string()),
                "region": pa.array(self.region, pa.string()),
                "city_tier": pa.array(self.tier, pa.int64()),
                "onboarding_date": pa.array(self.onboard_day.astype("datetime64[D]")),
                "acquisition_channel": pa.array(channel, pa.string()),
            }
        )

    # ---- balances -------------------------------------------------------------------------
    def _risky_multiplier(self) -> np.ndarray:
        """How much of the normal risky allocation each customer holds in each month (n, M), before
        market moves (those are applied separately: a price fall is a loss, not a sale)."""
        market = market_index(self.config)
        returns = np.r_[0.0, market[1:] / market[:-1] - 1]
        # After a drawdown conservative customers de-risk and aggressive ones add; the reaction decays.
        reaction = np.zeros((self.n, self.config.months))
        level = np.zeros(self.n)
        for m, ret in enumerate(returns):
            level = level * 0.75
            if ret < -0.03:
                level = level + (-ret * 6) * np.tanh(self.risk - 0.3)
            reaction[:, m] = level
        return np.exp(np.clip(reaction, -2.5, MAX_BUY_THE_DIP))

    def balances(self) -> pa.Table:
        rng, n, M = self.rng, self.n, self.config.months
        r = self.risk
        # product -> (base log-weight, sensitivity to risk appetite)
        weights = {
            "current_deposit": (1.2, -0.3),
            "time_deposit": (0.8, -0.9),
            "wealth_management": (0.2, 0.3),
            "mutual_fund": (-0.6, 1.1),
            "equity": (-1.6, 1.7),
            "bond": (-0.9, 0.2),
            "insurance": (-1.2, -0.2),
        }
        logw = np.stack([a + b * r + rng.normal(0, 0.25, n) for a, b in weights.values()], axis=1)
        share = np.exp(logw)
        share /= share.sum(axis=1, keepdims=True)
        # small savers do not spread their money across products
        min_holding = 5_000.0
        holding = share * self.aum[:, None]
        holding[:, 1:] = np.where(holding[:, 1:] < min_holding, 0.0, holding[:, 1:])
        holding[:, 0] = self.aum - holding[:, 1:].sum(axis=1)
        growth = np.exp(rng.normal(0.004, 0.004, n))[:, None] ** (np.arange(M) - (M - 1))[None, :]
        values = holding[:, :, None] * growth[:, None, :] * rng.lognormal(0, 0.04, (n, 7, M))  # (n, P, M)
        risky = np.array([p in ("mutual_fund", "equity") for p in weights])
        mult = self._risky_multiplier()
        moved = (values[:, risky, :] * (1 - mult[:, None, :])).sum(axis=1)  # > 0 sold, < 0 bought
        values[:, risky, :] *= mult[:, None, :] * market_index(self.config)[None, None, :]
        # de-risked money lands in time deposits; dip purchases are paid from time, then current deposits
        values[:, 1, :] += moved
        short = np.clip(-values[:, 1, :], 0, None)
        values[:, 1, :] += short
        values[:, 0, :] = np.maximum(values[:, 0, :] - short, 0)
        card_limit = np.where(self.has_card, self.card_limit, 0.0)
        util = np.clip(self.card_util[:, None] * rng.lognormal(0, 0.25, (n, M)), 0, 1.0)
        card = card_limit[:, None] * util * self.activity
        values = np.concatenate([values, card[:, None, :]], axis=1)  # (n, 8, M)
        values *= np.where(self.active, 1.0, 0.0)[:, None, :]
        held = values > 1.0
        cust, prod, month = np.nonzero(held)
        return pa.table(
            {
                "customer_id": self.ids.take(pa.array(cust)),
                "month_end": pa.array(self.ends[month]),
                "product": pa.DictionaryArray.from_arrays(pa.array(prod, pa.int32()), pa.array(list(PRODUCTS))).cast(pa.string()),
                "balance": pa.array(np.round(values[cust, prod, month], 2)),
            }
        )

    # ---- loans ----------------------------------------------------------------------------
    def _build_loans(self) -> pa.Table:
        rng, n = self.rng, self.n
        kinds = {
            "mortgage": self.has_mortgage,
            "auto": (self.age_end > 25) & (rng.random(n) < 0.1 * _sigmoid(self.income_z + 1)),
            "personal": rng.random(n) < 0.06 + 0.06 * (self.income_z < 0),
            "business": (self.occ == 3) & (rng.random(n) < 0.35),
            "credit_card": self.has_card,
        }
        terms = {"mortgage": (240, 360), "auto": (36, 60), "personal": (12, 36), "business": (12, 60)}
        rates = {"mortgage": 0.038, "auto": 0.055, "personal": 0.09, "business": 0.06, "credit_card": 0.18}
        size = {"mortgage": (60, 140), "auto": (6, 18), "personal": (1, 6), "business": (8, 40)}
        parts = []
        for kind, has in kinds.items():
            idx = np.nonzero(has)[0]
            k = idx.size
            if kind == "credit_card":
                principal, term, payment = self.card_limit[idx], np.full(k, -1), np.zeros(k)
            else:
                lo, hi = terms[kind]
                term = rng.integers(lo // 12, hi // 12 + 1, k) * 12
                principal = np.round(self.income[idx] * rng.uniform(*size[kind], k), -2)
                i = rates[kind] / 12
                payment = np.round(principal * i / (1 - (1 + i) ** -term), 2)
            latest_open = self.end_day - 30
            earliest_open = np.maximum(self.onboard_day[idx], self.birth_day[idx] + int(21 * 365.25))
            span = np.maximum(latest_open - earliest_open, 1)
            open_day = earliest_open + (rng.random(k) ** 0.7 * span).astype(np.int64)
            open_day = np.minimum(open_day, latest_open)
            close = np.full(k, -1, np.int64)
            if kind != "credit_card":
                matures = open_day + (term * 30.44).astype(np.int64)
                early = rng.random(k) < 0.15
                close = np.where(early, open_day + (rng.random(k) * (matures - open_day)).astype(np.int64), matures)
                close = np.where(close <= self.end_day, close, -1)
            parts.append((idx, kind, open_day, close, principal, term, rates[kind], payment))
        idx = np.concatenate([p[0] for p in parts])
        kind = np.concatenate([np.full(p[0].size, p[1], dtype=object) for p in parts])
        open_day = np.concatenate([p[2] for p in parts])
        close = np.concatenate([p[3] for p in parts])
        term = np.concatenate([p[5] for p in parts])
        self.loan_rows = (idx, kind, open_day, close, np.concatenate([p[7] for p in parts]))
        number = self.index[idx] * 10 + np.concatenate([np.full(p[0].size, j) for j, p in enumerate(parts)])
        return pa.table(
            {
                "loan_id": _ids("L", number, 11),
                "customer_id": self.ids.take(pa.array(idx)),
                "loan_type": pa.array(kind, pa.string()),
                "open_date": pa.array(open_day.astype("datetime64[D]")),
                "close_date": pa.array(close.astype("datetime64[D]"), mask=close < 0),
                "principal": pa.array(np.concatenate([p[4] for p in parts]).astype(float)),
                "term_months": pa.array(term, mask=term < 0, type=pa.int64()),
                "interest_rate": pa.array(np.concatenate([np.full(p[0].size, p[6]) for p in parts])),
                "monthly_payment": pa.array(np.concatenate([p[7] for p in parts])),
            }
        )

    # ---- transactions ---------------------------------------------------------------------
    def _loan_active(self, kind: str) -> np.ndarray:
        """(n, M) whether the customer has an open loan of this kind (not credit card) in each month."""
        idx, kinds, open_day, close, _ = self.loan_rows
        sel = kinds == kind if kind != "other" else np.isin(kinds, ["auto", "personal", "business"])
        out = np.zeros((self.n, self.config.months), bool)
        end_days = _days(self.ends)
        close_eff = np.where(close < 0, np.iinfo(np.int64).max, close)
        active = (open_day[sel, None] <= end_days[None, :]) & (close_eff[sel, None] > end_days[None, :])
        np.logical_or.at(out, idx[sel], active)
        return out

    def transactions(self) -> pa.Table:
        rng, n, M = self.rng, self.n, self.config.months
        stage = self.stage_end
        single, couple, young, mature, nest, ret = (stage == k for k in range(6))
        inc = np.clip(self.income / 9000, 0.2, 8)
        trade = 0.25 * np.exp(0.9 * self.risk) * (self.aum > 20_000)
        shock_boost = np.ones(M)
        if self.config.drift == "market_shock":
            shock_boost[self.shock : self.shock + 2] = 3.0
        payroll = np.isin(self.occ, [0, 1, 2]) & (self.rng.random(n) < 0.6)
        # category -> (monthly rate per customer (n,) or (n, M), log-mean amount (n,))
        cats = {
            "salary": (payroll * 1.0, np.log(self.income)),
            "pension": ((self.occ == 4) * 0.9, np.log(self.income * 0.6)),
            "transfer_in": (0.35 + 0.4 * (self.occ == 3), np.log(2000 * inc)),
            "transfer_out": (0.45 + 0.0 * inc, np.log(1800 * inc)),
            "groceries": (0.8 + 0.4 * (young | mature), np.log(180 * inc**0.3)),
            "dining": (0.35 + 0.4 * single + 0.3 * couple, np.log(160 * inc**0.4)),
            "shopping": (0.4 + 0.1 * inc, np.log(350 * inc**0.5)),
            "luxury": (0.02 * inc**1.5, np.log(6000 * inc**0.5)),
            "travel": ((0.06 + 0.12 * (couple | nest | ret) + 0.04 * single - 0.04 * young) * inc**0.5, np.log(3500 * inc**0.5)),
            "entertainment": (0.15 + 0.35 * single + 0.1 * couple, np.log(200 * inc**0.3)),
            "utilities": (0.45 + 0.0 * inc, np.log(300 * inc**0.2)),
            "rent": (self.renter * 0.9, np.log(2500 * inc**0.5)),
            "childcare": (young * 1.2, np.log(1800 * inc**0.4)),
            "education": (mature * 0.9 + young * 0.15, np.log(2500 * inc**0.5)),
            "medical": (0.06 + 0.4 * ret + 0.25 * nest + 0.2 * young, np.log(600 + 0 * inc)),
            "insurance_premium": (0.1 + 0.15 * (young | mature) + 0.2 * (self.risk < -0.5), np.log(1500 * inc**0.5)),
            "mortgage_payment": (self._loan_active("mortgage") * 1.0, None),
            "loan_payment": (self._loan_active("other") * 1.0, None),
            "investment_buy": (trade[:, None] * shock_boost[None, :] * np.where(self.risk > 0.3, 1.3, 0.7)[:, None], np.log(np.maximum(self.aum, 1e3) * 0.05)),
            "investment_sell": (trade[:, None] * shock_boost[None, :] * np.where(self.risk > 0.3, 0.5, 1.4)[:, None], np.log(np.maximum(self.aum, 1e3) * 0.06)),
            "cash_withdrawal": (0.1 + 0.3 * (self.age_end > 55) + 0.1 * (self.tier >= 3), np.log(800 + 0 * inc)),
        }
        assert set(cats) == set(TXN_CATEGORIES)
        names = list(cats)
        fixed = np.isin(names, ["salary", "pension", "mortgage_payment", "loan_payment"])
        rate = np.empty((n, M, len(names)))
        for j, name in enumerate(names):
            base = np.asarray(cats[name][0], dtype=float)
            rate[:, :, j] = base if base.ndim == 2 else base[:, None]
        # fixed payments flow at most once a month while the customer is active, whatever their
        # engagement; everything else scales with engagement
        rate *= np.where(fixed[None, None, :], self.active[:, :, None], self.activity[:, :, None])
        counts = np.where(fixed[None, None, :], rng.random(rate.shape) < rate, rng.poisson(rate))
        flat = counts.ravel()
        rows = np.repeat(np.arange(flat.size), flat)
        cust, rem = np.divmod(rows, M * len(names))
        month, cat = np.divmod(rem, len(names))
        # amounts
        log_mu = np.zeros((n, len(names)))
        for j, name in enumerate(names):
            if cats[name][1] is not None:
                log_mu[:, j] = cats[name][1]
        mortgage_pay, other_pay = self._monthly_payments()
        log_mu[:, names.index("mortgage_payment")] = np.log(np.maximum(mortgage_pay, 1))
        log_mu[:, names.index("loan_payment")] = np.log(np.maximum(other_pay, 1))
        sigma = np.where(fixed, 0.02, 0.7)
        amount = np.round(np.exp(log_mu[cust, cat] + sigma[cat] * rng.standard_normal(rows.size)), 2)
        amount = np.maximum(amount, 1.0)
        # timestamps within the month, never before onboarding or after churn
        month_start = _days(self.starts)[month] * 86_400
        month_end = (_days(self.ends)[month] + 1) * 86_400
        lo = np.maximum(month_start, self.onboard_day[cust] * 86_400)
        hi = np.minimum(month_end, (self.churn_day[cust] + 1) * 86_400)
        hi = np.maximum(hi, lo + 1)
        ts = lo + (rng.random(rows.size) * (hi - lo)).astype(np.int64)
        credit = np.isin(np.array(names), ["salary", "pension", "transfer_in", "investment_sell"])
        # channels: digital customers use the app, others the branch / ATM; card spend at POS
        digital = self.digital[cust]
        u = rng.random(rows.size)
        channel = np.where(u < digital * 0.8, 0, np.where(u < digital * 0.8 + 0.1, 1, 2))  # mobile, online, branch
        card_spend = np.isin(np.array(names), ["groceries", "dining", "shopping", "luxury", "travel", "entertainment"])[cat]
        channel = np.where(card_spend & (rng.random(rows.size) < 0.55), 4, channel)
        channel = np.where(np.array(names)[cat] == "cash_withdrawal", 3, channel)
        channel = np.where(np.isin(np.array(names)[cat], ["salary", "pension"]), 1, channel)
        order = np.lexsort((ts, cust))
        cust, cat, amount, ts, channel = cust[order], cat[order], amount[order], ts[order], channel[order]
        return pa.table(
            {
                "txn_id": _ids("T", self.chunk * 100_000_000 + np.arange(rows.size), 12),
                "customer_id": self.ids.take(pa.array(cust)),
                "txn_ts": pa.array(ts.astype("datetime64[s]")),
                "amount": pa.array(amount),
                "direction": pa.array(np.where(credit[cat], "credit", "debit")),
                "category": pa.array(np.array(names)[cat]),
                "channel": pa.array(np.array(["mobile", "online", "branch", "atm", "pos"])[channel]),
            }
        )

    def _monthly_payments(self) -> tuple[np.ndarray, np.ndarray]:
        idx, kinds, _, _, payment = self.loan_rows
        mortgage = np.zeros(self.n)
        other = np.zeros(self.n)
        np.add.at(mortgage, idx[kinds == "mortgage"], payment[kinds == "mortgage"])
        sel = np.isin(kinds, ["auto", "personal", "business"])
        np.add.at(other, idx[sel], payment[sel])
        return mortgage, other

    # ---- digital events -------------------------------------------------------------------
    def digital_events(self) -> pa.Table:
        rng, n, M = self.rng, self.n, self.config.months
        d = self.digital[:, None] * self.activity
        shock = np.ones(M)
        if self.config.drift == "market_shock":
            shock[self.shock : self.shock + 2] = 2.5
        young_or_loan = (self.stage_end == 2) | self.has_mortgage
        rates = {
            "login": d * 1.6,
            "view_deposit": d * 0.15 * np.exp(-0.4 * self.risk)[:, None],
            "view_wealth": d * 0.15 * np.clip(np.log10(np.maximum(self.aum, 10)) - 3, 0.2, 3)[:, None],
            "view_fund": d * 0.22 * np.exp(0.6 * self.risk)[:, None] * shock[None, :],
            "view_equity": d * 0.10 * np.exp(1.0 * self.risk)[:, None] * shock[None, :],
            "view_loan": d * (0.04 + 0.12 * young_or_loan)[:, None],
            "view_insurance": d * (0.04 + 0.1 * np.isin(self.stage_end, [2, 3]))[:, None],
            "trade": d * 0.12 * np.exp(0.9 * self.risk)[:, None] * (self.aum > 20_000)[:, None] * shock[None, :],
            "support_chat": d * 0.03 * (1 + np.clip(self.z[:, :M], 0, None)),
        }
        assert tuple(rates) == DIGITAL_EVENT_TYPES
        lam = np.stack([np.broadcast_to(v, (n, M)) for v in rates.values()], axis=2)
        flat = rng.poisson(lam).ravel()
        rows = np.repeat(np.arange(flat.size), flat)
        cust, rem = np.divmod(rows, M * len(rates))
        month, etype = np.divmod(rem, len(rates))
        lo = np.maximum(_days(self.starts)[month] * 86_400, self.onboard_day[cust] * 86_400)
        hi = np.maximum(np.minimum((_days(self.ends)[month] + 1) * 86_400, (self.churn_day[cust] + 1) * 86_400), lo + 1)
        ts = lo + (rng.random(rows.size) * (hi - lo)).astype(np.int64)
        web = rng.random(rows.size) < np.clip((self.age_end[cust] - 25) / 80, 0.05, 0.6)
        order = np.lexsort((ts, cust))
        return pa.table(
            {
                "customer_id": self.ids.take(pa.array(cust[order])),
                "event_ts": pa.array(ts[order].astype("datetime64[s]")),
                "event_type": pa.array(np.array(DIGITAL_EVENT_TYPES)[etype[order]]),
                "channel": pa.array(np.where(web[order], "web", "app")),
            }
        )

    # ---- labels and their true probabilities ---------------------------------------------
    def labels(self) -> tuple[pa.Table, dict[str, pa.Table]]:
        rng, n, M = self.rng, self.n, self.config.months
        end_days = _days(self.ends)
        first_label_month = min(3, M - 1)
        cols: dict[str, list] = {k: [] for k in ("customer_id", "tag", "label", "label_date", "known_date", "source")}
        truth: dict[str, pa.Table] = {}

        def add(idx, tag, labels, label_day, known_day, source):
            cols["customer_id"].append(self.ids.take(pa.array(idx)))
            cols["tag"].append(pa.array(np.full(idx.size, tag)))
            cols["label"].append(pa.array(labels))
            cols["label_date"].append(pa.array(label_day.astype("datetime64[D]")))
            cols["known_date"].append(pa.array(known_day.astype("datetime64[D]")))
            cols["source"].append(pa.array(np.asarray(source, dtype=object), pa.string()))

        def truth_table(idx, label_day, probs, classes):
            table = {"customer_id": self.ids.take(pa.array(idx)), "label_date": pa.array(label_day.astype("datetime64[D]"))}
            table.update({f"p_{c}": pa.array(probs[:, k]) for k, c in enumerate(classes)})
            return pa.table(table)

        def label_days(idx):
            lo = np.maximum(end_days[first_label_month - 1] + 1, self.onboard_day[idx] + 30)
            hi = np.minimum(end_days[-1], self.churn_day[idx] - 1)
            ok = hi > lo
            return idx[ok], (lo[ok] + rng.random(ok.sum()) * (hi[ok] - lo[ok])).astype(np.int64)

        # risk questionnaire: mandatory before buying investment products, so mostly investors answer it
        invests = self.aum > 20_000
        asked = np.nonzero(rng.random(n) < np.where(invests, 0.38, 0.05))[0]
        idx, day = label_days(asked)
        cdf = _sigmoid((RISK_CUTPOINTS[None, :] - self.risk[idx, None]) / RISK_LABEL_SCALE)
        cdf = np.concatenate([np.zeros((idx.size, 1)), cdf, np.ones((idx.size, 1))], axis=1)
        probs = np.diff(cdf, axis=1)
        drawn = (rng.random(idx.size)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
        add(idx, "risk_appetite", np.array(RISK_CLASSES)[np.minimum(drawn, 4)], day, day, np.full(idx.size, "risk_questionnaire"))
        truth["risk_appetite"] = truth_table(idx, day, probs, RISK_CLASSES)

        # life stage from KYC / relationship managers, with recording errors
        recorded = np.nonzero(rng.random(n) < 0.18)[0]
        idx, day = label_days(recorded)
        years_before_end = (self.end_day - day) / 365.25
        stage = life_stage_of(
            self.age_end[idx] - years_before_end, self.married[idx], self.n_kids[idx], self.youngest_end[idx] - years_before_end
        )
        K = len(LIFE_STAGES)
        probs = np.full((idx.size, K), LIFE_STAGE_RECORD_ERROR / (K - 1))
        probs[np.arange(idx.size), stage] = 1 - LIFE_STAGE_RECORD_ERROR
        drawn = (rng.random(idx.size)[:, None] > np.cumsum(probs, axis=1)).sum(axis=1)
        source = np.where(rng.random(idx.size) < 0.7, "kyc", "relationship_manager")
        add(idx, "life_stage", np.array(LIFE_STAGES)[np.minimum(drawn, K - 1)], day, day, source)
        truth["life_stage"] = truth_table(idx, day, probs, LIFE_STAGES)

        # churn in the next three months, observed at quarter ends, known 90 days later
        obs_months = [t for t in range(M - 1 - CHURN_HORIZON_MONTHS, 0, -CHURN_HORIZON_MONTHS)]
        all_idx, all_day, all_p, all_lab = [], [], [], []
        for t in obs_months:
            alive = np.nonzero((self.onboard_month <= t) & (self.churn_month > t) & (self.onboard_day <= end_days[t]))[0]
            h = self.hazard[alive, t + 1 : t + 1 + CHURN_HORIZON_MONTHS]
            p = 1 - np.prod(1 - h, axis=1)
            churned = self.churn_month[alive] <= t + CHURN_HORIZON_MONTHS
            all_idx.append(alive), all_p.append(p), all_lab.append(churned)
            all_day.append(np.full(alive.size, end_days[t]))
        if obs_months:
            idx, day, p, lab = (np.concatenate(x) for x in (all_idx, all_day, all_p, all_lab))
            add(idx, "churn_90d", np.array(CHURN_CLASSES)[lab.astype(int)], day, day + 90, np.full(idx.size, "observed_outcome"))
            truth["churn_90d"] = truth_table(idx, day, np.stack([1 - p, p], axis=1), CHURN_CLASSES)
        table = pa.table({k: pa.concat_arrays(v) if v else pa.array([]) for k, v in cols.items()})
        return table, truth

    @property
    def stage_end(self) -> np.ndarray:
        return life_stage_of(self.age_end, self.married, self.n_kids, self.youngest_end)


def generate_bank(config: BankConfig, out: Path) -> dict:
    """Write the contract tables for `config` under `out` (one Parquet part per chunk and table).

    Returns a summary (row counts, label shares, Bayes accuracy per tag), also written to
    `out/_truth/manifest.json`.
    """
    out = Path(out)
    tables = ("customers", "balances", "loans", "transactions", "digital_events", "tag_labels")
    for name in (*tables, "_truth"):
        target = out / name
        if target.exists():
            for old in target.glob("*.parquet"):
                old.unlink()
        target.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(tables, 0)
    truth_parts: dict[str, list[pa.Table]] = {}
    n_chunks = math.ceil(config.customers / CHUNK_SIZE)
    for chunk in range(n_chunks):
        start = chunk * CHUNK_SIZE
        size = min(CHUNK_SIZE, config.customers - start)
        c = _Chunk(config, chunk, start, size, np.arange(start, start + size))
        produced = {"customers": c.customers(), "loans": c.loans_table, "balances": c.balances(), "transactions": c.transactions(), "digital_events": c.digital_events()}
        produced["tag_labels"], truth = c.labels()
        for name, table in produced.items():
            pq.write_table(table, out / name / f"part-{chunk:05d}.parquet", compression="zstd")
            counts[name] += table.num_rows
        for tag, table in truth.items():
            truth_parts.setdefault(tag, []).append(table)
    summary = {"config": asdict(config), "rows": counts, "bayes_accuracy": {}, "label_counts": {}}
    for tag, parts in truth_parts.items():
        table = pa.concat_tables(parts)
        pq.write_table(table, out / "_truth" / f"{tag}.parquet", compression="zstd")
        probs = np.stack([table.column(c).to_numpy() for c in table.column_names if c.startswith("p_")], axis=1)
        summary["bayes_accuracy"][tag] = float(probs.max(axis=1).mean())
        summary["label_counts"][tag] = table.num_rows
    summary["drift"] = {"scenario": config.drift, "month_index": drift_month_index(config), "description": DRIFT_SCENARIOS.get(config.drift or "")}
    (out / "_truth" / "manifest.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
