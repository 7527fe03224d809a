"""A chunk of customers: their latent facts (demographics, family, income and wealth, risk appetite,
tenure, engagement and churn, product holdings) and the customers table drawn from them.

Every random draw comes from the chunk's one generator in a fixed order (the latents here, then
the tables in the order `generate_bank` asks for them), so a seed always gives the same bank.
"""

import numpy as np
import pyarrow as pa

from tagml.features.synthetic.config import CHURN_HORIZON_MONTHS, BankConfig, days, drift_month_index, ids, life_stage_of, month_ends, sigmoid

EDUCATION = ("primary", "secondary", "bachelor", "postgraduate")
OCCUPATIONS = ("employee", "civil_servant", "professional", "self_employed", "retired", "student", "unemployed")
REGION_P = {"east": 0.30, "south": 0.18, "north": 0.15, "central": 0.14, "southwest": 0.10, "northeast": 0.07, "northwest": 0.06}

_SURNAMES = np.array(["Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu", "Sun", "Ma", "Zhu", "Hu", "Guo"])
_GIVEN = np.array(["Wei", "Fang", "Na", "Min", "Jing", "Lei", "Qiang", "Yan", "Jie", "Tao", "Ming", "Chao", "Xiu", "Hui", "Jun", "Ping"])


class Chunk:
    """One chunk of customers: its generator, calendar and latents (the tables are drawn from it)."""

    def __init__(self, config: BankConfig, chunk: int, start: int, size: int, index: np.ndarray):
        self.config, self.chunk, self.n = config, chunk, size
        self.rng = np.random.default_rng([config.seed, chunk])
        self.ends = month_ends(config.end_month, config.months)
        self.starts = self.ends.astype("datetime64[M]").astype("datetime64[D]")
        self.end_day = days(self.ends[-1:])[0]
        self.index = index
        self.shock = drift_month_index(config)
        self.ids = ids("C", np.arange(start, start + size), 9)
        # the order of these steps is the order of the draws: changing it changes every bank
        self.campaign = np.zeros(size, bool)
        if config.drift == "youth_campaign":
            self.campaign = self.rng.random(size) < 0.15
        self._demographics()
        self._family()
        self._income_and_wealth()
        tenure_days = self._onboarding()
        self._engagement_and_churn(tenure_days)
        self._products()

    @property
    def stage_end(self) -> np.ndarray:
        return life_stage_of(self.age_end, self.married, self.n_kids, self.youngest_end)

    def _demographics(self) -> None:
        rng, n, campaign = self.rng, self.n, self.campaign
        age = np.clip(rng.normal(43, 15, n), 18, 90)
        age = np.where(campaign, rng.uniform(20, 32, n), age)
        self.age_end = age
        birth_offset = (age * 365.25).astype(np.int64) + rng.integers(0, 365, n)
        self.birth_day = self.end_day - birth_offset
        self.male = rng.random(n) < 0.5
        edu_score = rng.normal(0.4 - 0.02 * (age - 40), 1.0, n)
        self.edu = np.digitize(edu_score, [-0.9, 0.35, 1.6])  # 0..3
        occ = rng.choice(7, n, p=[0.52, 0.10, 0.12, 0.14, 0.0, 0.0, 0.12])
        occ = np.where((age < 23) & (rng.random(n) < 0.6), 5, occ)
        retired = (age >= 60) & (rng.random(n) < np.clip((age - 57) / 8, 0, 1))
        self.occ = np.where(retired, 4, occ)
        self.retired = retired
        region_names = np.array(list(REGION_P))
        self.region = region_names[rng.choice(len(REGION_P), n, p=list(REGION_P.values()))]
        coastal = np.isin(self.region, ["east", "south", "north"])
        tier = rng.choice(4, n, p=[0.18, 0.34, 0.31, 0.17]) + 1
        self.tier = np.where(coastal & (rng.random(n) < 0.25), np.maximum(tier - 1, 1), tier)

    def _family(self) -> None:
        rng, n, age = self.rng, self.n, self.age_end
        married = rng.random(n) < sigmoid((age - 28) / 3.5) * 0.85
        married = np.where(self.campaign, rng.random(n) < 0.2, married)
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

    def _income_and_wealth(self) -> None:
        """Income (monthly CNY), wealth, and the latent risk appetite: part demographic, part
        idiosyncratic (seen only through behaviour)."""
        rng, n, age = self.rng, self.n, self.age_end
        age_curve = -(((age - 47) / 18) ** 2)
        occ_effect = np.array([0.0, 0.15, 0.45, 0.3, -0.35, -1.4, -0.9])[self.occ]
        log_income = 8.55 + 0.32 * self.edu + 0.25 * (4 - self.tier) * 0.5 + 0.35 * age_curve + occ_effect + rng.normal(0, 0.45, n)
        log_income = np.where(self.campaign, log_income - 0.3, log_income)
        self.income = np.exp(log_income)
        years_saving = np.clip(age - 22, 0.5, None)
        self.aum = self.income * np.clip(years_saving, 0, 35) * 0.35 * rng.lognormal(0, 1.1, n)
        self.income_z = (log_income - 8.55) / 0.6
        self.risk = (
            -0.35 - 0.03 * (age - 43) + 0.35 * self.income_z + 0.2 * (self.edu - 1.5) + 0.15 * self.male + 0.15 * (self.tier == 1) + rng.normal(0, 0.75, n)
        )

    def _onboarding(self) -> np.ndarray:
        """Onboarding day and first month with data; returns each customer's tenure in days."""
        rng, n, age = self.rng, self.n, self.age_end
        tenure_days = (rng.gamma(1.4, 4.5, n) * 365.25).astype(np.int64)
        max_tenure = ((age - 18) * 365.25).astype(np.int64)
        tenure_days = np.minimum(tenure_days, max_tenure)
        onboard = self.end_day - tenure_days
        if self.config.drift == "youth_campaign":
            first = days(self.starts[self.shock : self.shock + 1])[0]
            onboard = np.where(self.campaign, rng.integers(first, self.end_day - 5, n), onboard)
        self.onboard_day = onboard
        self.onboard_month = np.searchsorted(days(self.ends), onboard, side="left")  # first month with data
        return tenure_days

    def _engagement_and_churn(self, tenure_days: np.ndarray) -> None:
        """Digital affinity, a latent disengagement that drifts for some customers, and the monthly
        churn hazard it drives."""
        rng, n, age, M = self.rng, self.n, self.age_end, self.config.months
        self.digital = sigmoid(2.2 - 0.07 * (age - 30) + 0.3 * (self.tier <= 2)) * np.where(self.campaign, 1.3, 1.0)
        z0 = rng.normal(0, 1, n) - 0.4 * np.clip(tenure_days / 365.25 - 3, 0, 5) / 5
        drifting = rng.random(n) < 0.2
        slope = np.where(drifting, rng.uniform(0.15, 0.5, n), 0.0)
        self.z0, self.slope = z0, slope
        months = np.arange(M + CHURN_HORIZON_MONTHS)
        self.z = z0[:, None] + slope[:, None] * months[None, :]  # (n, M+H)
        self.hazard = sigmoid(-5.2 + 0.9 * self.z + 0.4 * (age < 25)[:, None])
        draws = rng.random((n, M))
        churn_now = (draws < self.hazard[:, :M]) & (months[None, :M] >= self.onboard_month[:, None])
        churn_now[:, 0] = False
        self.churn_month = np.where(churn_now.any(axis=1), churn_now.argmax(axis=1), M + 99)
        churn_first = days(self.starts)[np.minimum(self.churn_month, M - 1)]
        self.churn_day = np.where(self.churn_month < M, churn_first + rng.integers(0, 28, n), self.end_day + 10_000)
        m = months[None, :M]
        self.active = (m >= self.onboard_month[:, None]) & (m <= self.churn_month[:, None])  # (n, M)
        self.activity = sigmoid(1.6 - 0.8 * self.z[:, :M]) * self.active

    def _products(self) -> None:
        """Who has a mortgage, rents, holds a credit card (and its limit and utilisation)."""
        rng, n, age = self.rng, self.n, self.age_end
        fam = np.isin(life_stage_of(age, self.married, self.n_kids, self.youngest_end), [1, 2, 3])
        self.has_mortgage = (age > 27) & (age < 62) & (rng.random(n) < np.where(fam, 0.42, 0.12) * sigmoid(self.income_z))
        self.renter = ~self.has_mortgage & (age < 38) & (rng.random(n) < 0.6)
        self.has_card = rng.random(n) < sigmoid(0.5 + 0.6 * self.income_z - 0.03 * (age - 40))
        self.card_limit = np.round(self.income * rng.uniform(1.5, 5, n), -2)
        self.card_util = rng.beta(2, 5, n) * np.where(np.isin(self.stage_end, [2, 3]), 1.4, 1.0)


def customers_table(c: Chunk) -> pa.Table:
    """The customers table of the chunk: demographics as recorded (partly missing), PII included."""
    rng, n = c.rng, c.n
    observed_marital = rng.random(n) < 0.65
    observed_kids = rng.random(n) < 0.45
    names = np.char.add(np.char.add(_SURNAMES[rng.integers(0, len(_SURNAMES), n)], " "), _GIVEN[rng.integers(0, len(_GIVEN), n)])
    phone = np.char.add("1", rng.integers(3_000_000_000, 9_999_999_999, n).astype(str))
    birth = (c.birth_day).astype("datetime64[D]")
    nid = np.char.add(
        np.char.add(rng.integers(110_000, 659_999, n).astype(str), np.datetime_as_string(birth).astype("U10")),
        rng.integers(1000, 9999, n).astype(str),
    )
    street = np.char.add(rng.integers(1, 999, n).astype(str), " Renmin Road")
    gender = np.where(c.male, "M", "F").astype(object)
    gender[rng.random(n) < 0.02] = None
    marital = np.where(observed_marital, c.marital, None)
    kids = pa.array(np.where(observed_kids, c.n_kids, 0), mask=~observed_kids, type=pa.int64())
    occ = np.array(OCCUPATIONS, dtype=object)[c.occ]
    occ[rng.random(n) < 0.05] = None
    channel = np.array(["branch", "online", "referral", "payroll"], dtype=object)[rng.choice(4, n, p=[0.45, 0.25, 0.12, 0.18])]
    channel[c.campaign] = "campaign"
    return pa.table(
        {
            "customer_id": c.ids,
            "full_name": pa.array(names),
            "phone": pa.array(phone),
            "national_id": pa.array(nid),
            "address": pa.array(street),
            "birth_date": pa.array(birth),
            "gender": pa.array(gender, pa.string()),
            "marital_status": pa.array(marital, pa.string()),
            "num_children": kids,
            "education": pa.array(np.array(EDUCATION, dtype=object)[c.edu], pa.string()),
            "occupation": pa.array(occ, pa.string()),
            "region": pa.array(c.region, pa.string()),
            "city_tier": pa.array(c.tier, pa.int64()),
            "onboarding_date": pa.array(c.onboard_day.astype("datetime64[D]")),
            "acquisition_channel": pa.array(channel, pa.string()),
        }
    )
