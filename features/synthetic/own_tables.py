"""A bank's own tables, as its first try at tagml looks: a customer wide table and labels files.

Derived from a generated synthetic bank (its raw directory), with the same customer ids as the raw
contract, so that tags trained on these tables sit next to the contract tags in one tag store:

* `crm_wide.parquet`: one row per customer as of the newest month end, bank-style column names
  (CamelCase and snake_case mixed), numeric category codes (`BranchCode`, `SegmentCode`), noisy
  aggregates with NULLs, a DATE column, text categoricals, and PII: by name in English and Chinese
  and by content under innocuous names (`contact` holds mobile numbers, `ref_no` card numbers,
  `memo` emails);
* `crm_monthly/`: the same table as one Parquet file per month end, with an `as_of` column;
* `credit_risk_labels.csv` (`good`/`bad`) and `credit_grade_labels.csv` (`A`..`E`): labels for some
  customers only, dated over the months, drawn from latent outcomes that depend on the wide table's
  values plus noise, so that a model can learn them but not perfectly;
* `crm_wide_leaky.parquet`: the wide table plus columns that leak the credit_risk label.

The aggregates are computed by DuckDB over the raw Parquet; every random draw comes from one
generator seeded by `seed`, in a fixed order, so a seed and a raw bank always give the same tables.
"""

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tagml.core.storage import connect, glob_literal

CREDIT_RISK_CLASSES = ("good", "bad")
CREDIT_GRADES = ("A", "B", "C", "D", "E")
CREDIT_GRADE_SHARES = (0.20, 0.25, 0.25, 0.20, 0.10)  # A (best) .. E
BAD_SHARE = 0.07
ID_COLUMN = "CustNo"
PII_BY_NAME = ("CustomerName", "PhoneNumber", "EmailAddress", "客户名称", "身份证号", "手机号")
PII_BY_CONTENT = ("contact", "ref_no", "memo")
LEAKY_COLUMNS = ("bad_flag", "risk_score_final", "label_date")

_SURNAMES = (("Wang", "王"), ("Li", "李"), ("Zhang", "张"), ("Liu", "刘"), ("Chen", "陈"), ("Yang", "杨"), ("Huang", "黄"), ("Zhao", "赵"))
_GIVEN = (("Wei", "伟"), ("Fang", "芳"), ("Na", "娜"), ("Min", "敏"), ("Jing", "静"), ("Lei", "磊"), ("Qiang", "强"), ("Yan", "燕"), ("Tao", "涛"))
_MAIL_DOMAINS = ("qq.com", "163.com", "126.com", "outlook.com", "sina.com")
_MOBILE_PREFIXES = (130, 131, 132, 135, 136, 138, 139, 150, 152, 158, 159, 177, 181, 186, 188, 189, 198, 199)
_ID_REGIONS = (110101, 310104, 440305, 330106, 510107, 420102, 320102, 610113)  # issuing areas of 18-digit ids
_ID_WEIGHTS = np.array([7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2])
_REGION_CODES = {"north": 11, "northeast": 21, "east": 31, "central": 41, "south": 44, "southwest": 51, "northwest": 61}

_MONTHLY_SQL = """
WITH ends AS (SELECT DISTINCT month_end FROM {balances}),
bal AS (
    SELECT customer_id, month_end,
        sum(balance) FILTER (WHERE product <> 'credit_card') AS aum,
        sum(balance) FILTER (WHERE product IN ('current_deposit', 'time_deposit')) AS deposits,
        sum(balance) FILTER (WHERE product IN ('wealth_management', 'mutual_fund', 'equity', 'bond')) AS investments,
        sum(balance) FILTER (WHERE product = 'credit_card') AS card_debt,
        count(*) FILTER (WHERE balance > 0) AS products
    FROM {balances} GROUP BY ALL),
txn AS (
    SELECT customer_id, last_day(txn_ts::DATE) AS month_end, count(*) AS txn_count,
        sum(amount) FILTER (WHERE direction = 'credit') AS credits, sum(amount) FILTER (WHERE direction = 'debit') AS debits,
        sum(amount) FILTER (WHERE category IN ('salary', 'pension')) AS income
    FROM {transactions} GROUP BY ALL),
loan AS (
    SELECT l.customer_id, e.month_end, count(*) AS loans, sum(l.principal) AS principal, sum(l.monthly_payment) AS repayment
    FROM {loans} l JOIN ends e ON l.open_date <= e.month_end AND (l.close_date IS NULL OR l.close_date > e.month_end) GROUP BY ALL),
app AS (SELECT customer_id, last_day(event_ts::DATE) AS month_end, count(*) AS logins FROM {digital_events} WHERE event_type = 'login' GROUP BY ALL)
SELECT c.customer_id, e.month_end AS as_of, c.birth_date, c.gender, c.marital_status, c.education, c.occupation, c.region, c.city_tier,
    c.onboarding_date, c.acquisition_channel,
    coalesce(b.aum, 0) AS aum, coalesce(b.deposits, 0) AS deposits, coalesce(b.investments, 0) AS investments,
    coalesce(b.card_debt, 0) AS card_debt, coalesce(b.products, 0) AS products,
    coalesce(t.txn_count, 0) AS txn_count, coalesce(t.credits, 0) AS credits, coalesce(t.debits, 0) AS debits, coalesce(t.income, 0) AS income,
    coalesce(l.loans, 0) AS loans, coalesce(l.principal, 0) AS principal, coalesce(l.repayment, 0) AS repayment, coalesce(a.logins, 0) AS logins
FROM {customers} c JOIN ends e ON c.onboarding_date <= e.month_end
LEFT JOIN bal b ON b.customer_id = c.customer_id AND b.month_end = e.month_end
LEFT JOIN txn t ON t.customer_id = c.customer_id AND t.month_end = e.month_end
LEFT JOIN loan l ON l.customer_id = c.customer_id AND l.month_end = e.month_end
LEFT JOIN app a ON a.customer_id = c.customer_id AND a.month_end = e.month_end
ORDER BY as_of, c.customer_id
"""


def own_tables_beside(raw_dir: Path) -> Path:
    """Where `tagml generate --own-tables` and the demo write them: beside the raw directory, not inside it
    (they are not raw contract tables)."""
    return Path(raw_dir).parent / "own_tables"


def generate_own_tables(raw_dir: Path, out: Path, seed: int = 42) -> dict:
    """Write the own tables of the synthetic bank in `raw_dir` under `out`; returns their paths, row counts and seconds."""
    started = time.perf_counter()
    raw_dir, out = Path(raw_dir), Path(out)
    monthly = _monthly_aggregates(raw_dir)
    rng = np.random.default_rng([seed, 1010])
    customers = np.sort(monthly["customer_id"].unique())
    people = _people(rng, customers, monthly.drop_duplicates("customer_id").set_index("customer_id").loc[customers, "birth_date"])
    snapshots = _bank_columns(rng, monthly, people)
    outcomes = _outcomes(rng, monthly, customers)
    ends = np.sort(monthly["as_of"].unique())
    risk_labels = _labels(rng, outcomes, "bad", ends, share=0.55, with_known_date=True)
    grade_labels = _labels(rng, outcomes, "grade", ends, share=0.45, with_known_date=False)
    wide = snapshots[snapshots["as_of"] == snapshots["as_of"].max()].drop(columns="as_of").reset_index(drop=True)
    paths = _write(out, wide, snapshots, risk_labels, grade_labels, _leaky(rng, wide, outcomes, risk_labels))
    return {
        "out": str(out),
        "paths": {name: str(path) for name, path in paths.items()},
        "rows": {"crm_wide": len(wide), "crm_monthly": len(snapshots), "credit_risk_labels": len(risk_labels), "credit_grade_labels": len(grade_labels)},
        "months": [str(pd.Timestamp(d).date()) for d in ends],
        "bad_share": round(float((risk_labels["label"] == "bad").mean()), 4),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _monthly_aggregates(raw_dir: Path) -> pd.DataFrame:
    """Per customer and month end: the raw bank's balances, transactions, loans and logins (DuckDB over the Parquet parts)."""
    tables = ("customers", "balances", "loans", "transactions", "digital_events")
    relations = {t: f"read_parquet({glob_literal(raw_dir / t, '*.parquet')})" for t in tables}
    con = connect(threads=2)
    try:
        return con.execute(_MONTHLY_SQL.format(**relations)).df()
    finally:
        con.close()


def _people(rng: np.random.Generator, customers: np.ndarray, birth_dates: pd.Series) -> pd.DataFrame:
    """Fake but well-formed PII per customer: names (pinyin and Chinese), mobiles, emails, 18-digit ids, card numbers."""
    n = len(customers)
    surname, given = rng.integers(0, len(_SURNAMES), n), rng.integers(0, len(_GIVEN), n)
    english = [f"{_GIVEN[g][0]} {_SURNAMES[s][0]}" for s, g in zip(surname, given, strict=True)]
    chinese = [_SURNAMES[s][1] + _GIVEN[g][1] for s, g in zip(surname, given, strict=True)]
    mobiles = [_mobiles(rng, n) for _ in range(2)]
    handle = [f"{_GIVEN[g][0].lower()}.{_SURNAMES[s][0].lower()}{k}" for s, g, k in zip(surname, given, rng.integers(1, 999, n), strict=True)]
    emails = [f"{h}@{_MAIL_DOMAINS[d]}" for h, d in zip(handle, rng.integers(0, len(_MAIL_DOMAINS), n), strict=True)]
    memo = np.where(rng.random(n) < 0.85, [f"{h}@{_MAIL_DOMAINS[-1 - d]}" for h, d in zip(handle, rng.integers(0, 3, n), strict=True)], None)
    return pd.DataFrame(
        {
            "CustomerName": english,
            "客户名称": chinese,
            "PhoneNumber": [f"+86-{m[:3]}-{m[3:7]}-{m[7:]}" for m in mobiles[0]],
            "手机号": mobiles[0],
            "EmailAddress": emails,
            "身份证号": national_ids(rng, pd.to_datetime(birth_dates).dt.strftime("%Y%m%d").to_numpy()),
            "contact": mobiles[1],
            "ref_no": card_numbers(rng, n),
            "memo": memo,
        },
        index=pd.Index(customers, name="customer_id"),
    )


def _mobiles(rng: np.random.Generator, n: int) -> list[str]:
    prefixes = np.array(_MOBILE_PREFIXES)[rng.integers(0, len(_MOBILE_PREFIXES), n)]
    return [f"{p}{r:08d}" for p, r in zip(prefixes, rng.integers(0, 100_000_000, n), strict=True)]


def national_ids(rng: np.random.Generator, birth_yyyymmdd: np.ndarray) -> list[str]:
    """18-character resident ids: area code, birth date, sequence and the ISO 7064 MOD 11-2 check character."""
    areas = np.array(_ID_REGIONS)[rng.integers(0, len(_ID_REGIONS), len(birth_yyyymmdd))]
    bodies = [f"{a}{b}{s:03d}" for a, b, s in zip(areas, birth_yyyymmdd, rng.integers(0, 1000, len(birth_yyyymmdd)), strict=True)]
    return [body + id_check_character(body) for body in bodies]


def id_check_character(body: str) -> str:
    """The check character of the first 17 digits of a resident id."""
    return "10X98765432"[int(np.dot(_ID_WEIGHTS, [int(c) for c in body])) % 11]


def card_numbers(rng: np.random.Generator, n: int) -> list[str]:
    """16-digit UnionPay-style card numbers (prefix 62) with a valid Luhn check digit."""
    bodies = [f"62{r:013d}" for r in rng.integers(0, 10**13, n)]
    return [body + str((10 - luhn_sum(body + "0")) % 10) for body in bodies]


def luhn_sum(number: str) -> int:
    """The Luhn sum mod 10 of `number` (0 for a valid card number)."""
    total = 0
    for position, char in enumerate(reversed(number)):
        digit = int(char) * (2 if position % 2 else 1)
        total += digit - 9 if digit > 9 else digit
    return total % 10


def _noisy(rng: np.random.Generator, values: pd.Series, sigma: float, null_share: float) -> np.ndarray:
    """Measured values as a bank's table has them: multiplicative noise, rounded to cents, some NULL."""
    noisy = np.round(values.to_numpy(float) * rng.lognormal(0.0, sigma, len(values)), 2)
    return np.where(rng.random(len(values)) < null_share, np.nan, noisy)


def _bank_columns(rng: np.random.Generator, monthly: pd.DataFrame, people: pd.DataFrame) -> pd.DataFrame:
    """The wide table for every month end, in the bank's own column names and codes."""
    as_of = pd.to_datetime(monthly["as_of"])
    opened = pd.to_datetime(monthly["onboarding_date"])
    aum_tier = np.digitize(monthly["aum"].to_numpy(), [20_000, 100_000, 500_000, 2_000_000]) + 1
    frame = pd.DataFrame(
        {
            ID_COLUMN: monthly["customer_id"].to_numpy(),
            "as_of": as_of.dt.date.to_numpy(),
            "Gender": monthly["gender"].to_numpy(),
            "age": ((as_of - pd.to_datetime(monthly["birth_date"])).dt.days // 365).astype("int64").to_numpy(),
            "EduLevel": monthly["education"].to_numpy(),
            "occupation_type": monthly["occupation"].to_numpy(),
            "MaritalStatus": monthly["marital_status"].to_numpy(),
            "BranchCode": (monthly["region"].map(_REGION_CODES).to_numpy() * 100 + monthly["city_tier"].to_numpy() * 10).astype("int64"),
            "SegmentCode": aum_tier.astype("int64"),
            "AcqChannel": monthly["acquisition_channel"].to_numpy(),
            "OpenDate": opened.dt.date.to_numpy(),
            "tenure_months": ((as_of - opened).dt.days // 30).astype("int64").to_numpy(),
            "MonthlyIncome": _noisy(rng, monthly["income"], 0.05, 0.08),
            "TotalAUM": _noisy(rng, monthly["aum"], 0.01, 0.02),
            "DepositBal": _noisy(rng, monthly["deposits"], 0.01, 0.03),
            "invest_bal": _noisy(rng, monthly["investments"], 0.02, 0.05),
            "CardDebt": _noisy(rng, monthly["card_debt"], 0.02, 0.04),
            "LoanCount": monthly["loans"].astype("int64").to_numpy(),
            "loan_principal": _noisy(rng, monthly["principal"], 0.0, 0.03),
            "MonthlyRepayment": _noisy(rng, monthly["repayment"], 0.0, 0.05),
            "TxnCount": monthly["txn_count"].astype("int64").to_numpy(),
            "txn_credit_amt": _noisy(rng, monthly["credits"], 0.03, 0.03),
            "TxnDebitAmt": _noisy(rng, monthly["debits"], 0.03, 0.03),
            "ProductCount": monthly["products"].astype("int64").to_numpy(),
            "app_logins": monthly["logins"].astype("int64").to_numpy(),
        }
    )
    # a bank's table puts its identifying columns first; the PII is the same every month
    pii = people.loc[frame[ID_COLUMN]].reset_index(drop=True)
    return pd.concat([frame[[ID_COLUMN, "as_of"]], pii, frame.drop(columns=[ID_COLUMN, "as_of"])], axis=1)


def _standard(values: pd.Series) -> pd.Series:
    return (values - values.mean()) / (values.std() or 1.0)


def _outcomes(rng: np.random.Generator, monthly: pd.DataFrame, customers: np.ndarray) -> pd.DataFrame:
    """Latent credit outcomes per customer: a function of the customer's (true) monthly averages plus noise.

    `bad` marks the worst BAD_SHARE of a latent credit score; `grade` cuts a second, correlated
    score into A..E. The noise keeps any model's ROC AUC well below 1 (the generator's test measures it)."""
    means = monthly.groupby("customer_id")[["aum", "card_debt", "income", "repayment", "logins", "loans"]].mean().loc[customers]
    first = monthly.groupby("customer_id")[["birth_date", "onboarding_date", "occupation"]].first().loc[customers]
    age = (pd.Timestamp(monthly["as_of"].max()) - pd.to_datetime(first["birth_date"])).dt.days / 365.25
    tenure = (pd.Timestamp(monthly["as_of"].max()) - pd.to_datetime(first["onboarding_date"])).dt.days / 365.25
    burden = np.log1p((means["repayment"] + 0.05 * means["card_debt"]) / (means["income"] + 1000.0))
    signal = (
        1.0 * _standard(burden)
        - 0.8 * _standard(np.log1p(means["aum"]))
        - 0.35 * _standard(np.log1p(means["income"]))
        - 0.3 * _standard(age.clip(18, 70))
        - 0.3 * _standard(np.log1p(tenure.clip(0)))
        + 0.6 * (first["occupation"] == "unemployed").to_numpy()
    ).to_numpy()
    risk = signal + rng.normal(0.0, 2.8, len(customers))
    grade_score = 0.8 * signal - 0.3 * _standard(np.log1p(means["logins"])).to_numpy() + rng.normal(0.0, 1.1, len(customers))
    cuts = np.quantile(grade_score, np.cumsum(CREDIT_GRADE_SHARES)[:-1])
    return pd.DataFrame(
        {
            "customer_id": customers,
            "bad": np.where(risk > np.quantile(risk, 1 - BAD_SHARE), "bad", "good"),
            "grade": np.array(CREDIT_GRADES)[np.digitize(grade_score, cuts)],
            "onboarding_date": pd.to_datetime(first["onboarding_date"]).to_numpy(),
        }
    )


def _labels(rng: np.random.Generator, outcomes: pd.DataFrame, column: str, ends: np.ndarray, share: float, with_known_date: bool) -> pd.DataFrame:
    """Labels for a random `share` of the customers, dated uniformly from the first month end to the last but one
    (a month after the customer was onboarded at the earliest); credit risk outcomes become known up to a month later."""
    first, last = pd.Timestamp(ends[0]), pd.Timestamp(ends[-2] if len(ends) > 1 else ends[-1])
    label_date = first + pd.to_timedelta(rng.integers(0, (last - first).days + 1, len(outcomes)), unit="D")
    label_date = np.maximum(label_date, pd.to_datetime(outcomes["onboarding_date"]) + pd.Timedelta(days=31))
    chosen = (rng.random(len(outcomes)) < share) & (label_date <= last)
    labels = pd.DataFrame({ID_COLUMN: outcomes["customer_id"], "label": outcomes[column], "label_date": pd.Series(label_date).dt.date})[chosen]
    if with_known_date:
        delay = pd.to_timedelta(rng.integers(0, 31, len(labels)), unit="D")
        labels["known_date"] = (pd.to_datetime(labels["label_date"]) + delay).clip(upper=pd.Timestamp(ends[-1])).dt.date
        labels["source"] = np.where(rng.random(len(labels)) < 0.9, "observed_outcome", "relationship_manager")
    return labels.reset_index(drop=True)


def _leaky(rng: np.random.Generator, wide: pd.DataFrame, outcomes: pd.DataFrame, risk_labels: pd.DataFrame) -> pd.DataFrame:
    """The wide table plus what leaks the credit_risk label: the label as a flag, a final score that is the outcome, its date."""
    known = risk_labels.set_index(ID_COLUMN).reindex(wide[ID_COLUMN])
    outcome = outcomes.set_index("customer_id")["bad"].reindex(wide[ID_COLUMN]).to_numpy() == "bad"
    leaky = wide.copy()
    leaky["bad_flag"] = pd.array(np.where(known["label"].isna(), None, known["label"].to_numpy() == "bad"), dtype="Int64")
    leaky["risk_score_final"] = np.round(outcome + rng.normal(0.0, 0.01, len(wide)), 4)
    leaky["label_date"] = known["label_date"].to_numpy()
    return leaky


def _write(out: Path, wide: pd.DataFrame, snapshots: pd.DataFrame, risk: pd.DataFrame, grade: pd.DataFrame, leaky: pd.DataFrame) -> dict[str, Path]:
    monthly_dir = out / "crm_monthly"
    monthly_dir.mkdir(parents=True, exist_ok=True)
    for old in monthly_dir.glob("*.parquet"):
        old.unlink()
    paths = {
        "crm_wide": out / "crm_wide.parquet",
        "crm_monthly": monthly_dir,
        "credit_risk_labels": out / "credit_risk_labels.csv",
        "credit_grade_labels": out / "credit_grade_labels.csv",
        "crm_wide_leaky": out / "crm_wide_leaky.parquet",
    }
    pq.write_table(pa.Table.from_pandas(wide, preserve_index=False), paths["crm_wide"], compression="zstd")
    pq.write_table(pa.Table.from_pandas(leaky, preserve_index=False), paths["crm_wide_leaky"], compression="zstd")
    for as_of, month in snapshots.groupby("as_of", sort=True):
        pq.write_table(pa.Table.from_pandas(month, preserve_index=False), monthly_dir / f"crm_{as_of:%Y-%m-%d}.parquet", compression="zstd")
    risk.to_csv(paths["credit_risk_labels"], index=False)
    grade.to_csv(paths["credit_grade_labels"], index=False)
    return paths
