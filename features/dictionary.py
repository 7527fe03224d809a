"""The feature dictionary: every customer feature declared once, as a `Feature` (its SQL, meaning,
window, type and fill), and the dictionary generated from them (`feature_dictionary()`, docs/FEATURES.md).

How the declarations become one point-in-time query is tagml.features.customer_features. The module
is long because it is a table (79 entries of data, no logic); it stays one list so each feature is read in one place.
"""

import re
from dataclasses import dataclass

from tagml.core.storage import sql_literal
from tagml.features.contract import CUSTOMERS, INVESTMENT_PRODUCTS, PRODUCTS, SPEND_CATEGORIES

SOURCES = ("customer", "balances", "transactions", "loans", "digital", "derived")


def _customer_columns(sql: str) -> list[str]:
    """The customers columns (`c.<name>`) a demographic feature's SQL reads."""
    return [c.name for c in CUSTOMERS.columns if f"c.{c.name}" in sql]


@dataclass(frozen=True)
class Feature:
    name: str
    source: str
    sql: str
    description: str
    window: str
    kind: str = "numeric"  # numeric | categorical
    group: str = ""
    fill: float | None = None  # value when the customer has no rows in the source (counts, sums)
    # Months of source history before as_of the feature needs: until the staged source reaches that
    # far back it is null for everyone, legitimately (a bank's first months in tagml).
    history_months: int = 0

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"feature {self.name}: unknown source {self.source}")

    @property
    def may_be_null(self) -> bool:
        """Whether a null is a legitimate value (see `null_when`); if not, any null is a defect."""
        if self.fill is not None:
            return False
        if self.source == "customer":
            # demographics are null exactly where the contract lets the raw column be empty
            return any(CUSTOMERS.column(c).nullable for c in _customer_columns(self.sql))
        return True

    @property
    def null_when(self) -> str:
        """When the feature is legitimately null, for the feature dictionary."""
        if not self.may_be_null:
            return "never" + (f" ({self.fill:g} without rows)" if self.fill is not None else "")
        if self.source == "customer":
            return "not recorded"
        text = "no rows in the window, or a zero denominator"
        if self.history_months:
            text = f"always while the staged {self.source} do not reach {self.history_months} months before as_of; else " + text
        return text


def _latest(col: str) -> str:
    return f"sum({col}) FILTER (WHERE month_end = snap)"


def _months_ago(col: str, months: int) -> str:
    return f"sum({col}) FILTER (WHERE month_end = last_day(snap - INTERVAL {months} MONTH))"


def _share(num: str, den: str) -> str:
    # a filtered sum over no rows is NULL, but with a denominator the share is 0, not unknown
    return f"CAST(coalesce({num}, 0) AS DOUBLE) / nullif({den}, 0)"


_SPEND = "direction = 'debit' AND category IN (" + ", ".join(sql_literal(c) for c in SPEND_CATEGORIES) + ")"
_RISKY = "(p_mutual_fund + p_equity)"
_INVEST = "(" + " + ".join(f"p_{p}" for p in INVESTMENT_PRODUCTS) + ")"


# ---- measures: what the transactions and digital features are computed from -------------------------

WINDOWS = (1, 3, 12)  # months; a window of k months ending on as_of is [as_of - k months + 1 day, as_of]
MEASURE_AGGS = ("sum", "count", "max", "bit_or")
# Money is summed as DECIMAL(18,2) (cents, exact): DuckDB's parallel aggregation adds DOUBLEs in no fixed
# order, so a 12-month sum taken row by row and one taken as a sum of monthly sums would differ in the last
# bits. In cents they are the same number, whichever way and order they are added; DOUBLE only in the feature.
MONEY = "amount_cents"
# The row columns the measures read, computed once per event row (`event_rows`): the amount in cents, and each
# distinct row predicate as a boolean flag, so the ~40 FILTERs test a boolean instead of comparing strings again.
EVENT_ROW_COLUMNS = {"transactions": ("txn_ts", "CAST(amount AS DECIMAL(18,2)) AS amount_cents"), "digital": ("event_ts",)}


@dataclass(frozen=True)
class Measure:
    """A per-customer quantity of an event table that merges exactly: its value over a window is `agg`
    (sum, count, max, bit_or) of its values over any split of the window's rows (e.g. calendar months)."""

    name: str
    source: str  # transactions | digital
    agg: str
    where: str = "true"  # the rows it counts
    value: str = ""  # the row value summed, maxed or or-ed (none for count)

    def __post_init__(self) -> None:
        if self.agg not in MEASURE_AGGS or (self.agg == "count") != (not self.value):
            raise ValueError(f"measure {self.name}: aggregate {self.agg} with value {self.value!r}")

    def over_rows(self, rows: str = "true") -> str:
        """The measure over the event rows (`event_rows`: flagged) where `rows` (a boolean SQL expression, e.g. a
        window flag) holds."""
        flag = row_flags(self.source).get(self.where, "true")
        cond = " AND ".join(c for c in (rows, flag) if c != "true") or "true"
        return f"count(*) FILTER (WHERE {cond})" if self.agg == "count" else f"{self.agg}({self.value}) FILTER (WHERE {cond})"

    def merged(self, column: str, parts: str) -> str:
        """The measure merged from its values over parts of the rows (column `column`) where `parts` holds:
        the same value and type as `over_rows` over those rows (a count over no rows is 0, not NULL)."""
        if self.agg == "count":
            return f"CAST(coalesce(sum({column}) FILTER (WHERE {parts}), 0) AS BIGINT)"
        return f"{self.agg}({column}) FILTER (WHERE {parts})"


def row_flags(source: str) -> dict[str, str]:
    """Each distinct row predicate of the source's measures -> the flag column `event_rows` computes it into."""
    flags: dict[str, str] = {}
    for x in MEASURES:
        if x.source == source and x.where != "true":
            flags.setdefault(x.where, f"f_{x.name}")
    return flags


def event_rows(source: str) -> list[str]:
    """The projection of an event row the measures read (unqualified column names of the staged table)."""
    return [*EVENT_ROW_COLUMNS[source], *(f"({where}) AS {flag}" for where, flag in row_flags(source).items())]


def _cents(name: str, where: str) -> Measure:
    return Measure(name, "transactions", "sum", where, MONEY)


def _txns(name: str, where: str) -> Measure:
    return Measure(name, "transactions", "count", where)


def _events(name: str, where: str) -> Measure:
    return Measure(name, "digital", "count", where)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} = {sql_literal(values[0])}" if len(values) == 1 else f"{column} IN ({', '.join(sql_literal(v) for v in values)})"


_SHARE_CATEGORIES = ("groceries", "dining", "shopping", "luxury", "travel", "entertainment", "rent", "childcare", "education", "medical", "insurance_premium")
_INVEST_TRADES = ("investment_buy", "investment_sell")

MEASURES: tuple[Measure, ...] = (
    _cents("salary", _in("category", ("salary", "pension"))),
    _cents("inflow", "direction = 'credit'"),
    _cents("outflow", "direction = 'debit'"),
    _cents("spend", _SPEND),
    # debits only: a refund booked as a credit in a spending category is not spending
    *(_cents(f"spend_{c}", f"direction = 'debit' AND category = {sql_literal(c)}") for c in _SHARE_CATEGORIES),
    _cents("invest_bought", "category = 'investment_buy'"),
    _cents("invest_sold", "category = 'investment_sell'"),
    _cents("invest_traded", _in("category", _INVEST_TRADES)),
    _txns("txns", "true"),
    _txns("mortgage_payments", "category = 'mortgage_payment'"),
    _txns("digital_txns", _in("channel", ("mobile", "online"))),
    _txns("branch_txns", _in("channel", ("branch", "atm"))),
    _txns("invest_buys", "category = 'investment_buy'"),
    _txns("invest_sells", "category = 'investment_sell'"),
    _txns("invest_trades", _in("category", _INVEST_TRADES)),
    Measure("last_txn", "transactions", "max", "true", "txn_ts"),
    # a bitmask of calendar months (unique within any 13-month window): count(DISTINCT ...) made
    # DuckDB copy the whole joined transaction set first, and a bitmask merges across months by bit_or.
    # Signed BIGINT because Spark has no unsigned types, and % 60 because DuckDB rejects a shift into
    # the sign bit (any modulus >= 13 keeps the months of a window apart).
    Measure("active_months", "transactions", "bit_or", "true", "CAST(1 AS BIGINT) << ((year(txn_ts) * 12 + month(txn_ts)) % 60)"),
    _events("logins", "event_type = 'login'"),
    _events("fund_equity_views", _in("event_type", ("view_fund", "view_equity"))),
    _events("deposit_views", "event_type = 'view_deposit'"),
    _events("app_trades", "event_type = 'trade'"),
    _events("loan_insurance_views", _in("event_type", ("view_loan", "view_insurance"))),
    _events("support_chats", "event_type = 'support_chat'"),
    Measure("last_login", "digital", "max", "event_type = 'login'", "event_ts"),
)
MEASURES_BY_NAME = {x.name: x for x in MEASURES}
_MEASURE_REF = re.compile(r"\bm_([a-z0-9_]+?)_w(\d+)\b")


def m(measure: str, months: int) -> str:
    """The column of `measure` over the window of the last `months` months (in a feature's SQL)."""
    if measure not in MEASURES_BY_NAME or months not in WINDOWS:
        raise ValueError(f"no measure {measure} over {months} months")
    return f"m_{measure}_w{months}"


def _money(measure: str, months: int) -> str:
    return f"CAST({m(measure, months)} AS DOUBLE)"


def measures_of(sql: str) -> list[tuple[Measure, int]]:
    """The (measure, window months) a feature's SQL reads, in order of appearance."""
    return [(MEASURES_BY_NAME[name], int(k)) for name, k in dict.fromkeys(_MEASURE_REF.findall(sql))]


FEATURES: tuple[Feature, ...] = (
    # ---- demographics (customers table; PII never selected) ----
    Feature("age", "customer", "CAST(date_diff('day', c.birth_date, s.as_of) AS DOUBLE) / 365.25", "Age in years at as_of.", "as_of", group="demographics"),
    Feature("gender", "customer", "c.gender", "Recorded gender.", "static", "categorical", "demographics"),
    Feature("marital_status", "customer", "c.marital_status", "KYC marital status (often missing).", "static", "categorical", "demographics"),
    Feature("num_children", "customer", "c.num_children", "KYC number of children (often missing).", "static", group="demographics"),
    Feature("education", "customer", "c.education", "Highest education.", "static", "categorical", "demographics"),
    Feature("occupation", "customer", "c.occupation", "Occupation group.", "static", "categorical", "demographics"),
    Feature("region", "customer", "c.region", "Home-branch region.", "static", "categorical", "demographics"),
    Feature("city_tier", "customer", "c.city_tier", "Home-branch city tier (1 = largest).", "static", group="demographics"),
    Feature("acquisition_channel", "customer", "c.acquisition_channel", "How the customer was acquired.", "static", "categorical", "tenure"),
    Feature(
        "tenure_months", "customer", "CAST(date_diff('day', c.onboarding_date, s.as_of) AS DOUBLE) / 30.44", "Months since onboarding.", "as_of", group="tenure"
    ),
    # ---- assets under management and product mix (balances) ----
    Feature(
        "aum_total",
        "balances",
        f"CAST({_latest('aum')} AS DOUBLE)",
        "Assets under management at the latest month end (excl. credit card).",
        "month end",
        group="aum",
        fill=0.0,
    ),
    Feature(
        "aum_avg_3m",
        "balances",
        "CAST(sum(aum) FILTER (WHERE month_end > last_day(snap - INTERVAL 3 MONTH)) AS DOUBLE) / 3",
        "Average month-end AUM over 3 months.",
        "3m",
        group="aum",
        fill=0.0,
    ),
    Feature("aum_avg_12m", "balances", "CAST(sum(aum) AS DOUBLE) / 12", "Average month-end AUM over 12 months.", "12m", group="aum", fill=0.0),
    Feature(
        "aum_growth_3m",
        "balances",
        f"CAST({_latest('aum')} AS DOUBLE) / nullif({_months_ago('aum', 3)}, 0) - 1",
        "Relative AUM change over 3 months.",
        "3m",
        group="aum",
        history_months=3,
    ),
    *(
        Feature(
            f"share_{p}", "balances", _share(_latest(f"p_{p}"), _latest("aum")), f"Share of AUM in {p.replace('_', ' ')}.", "month end", group="product_mix"
        )
        for p in PRODUCTS
        if p != "credit_card"
    ),
    Feature(
        "investment_share",
        "balances",
        _share(_latest(_INVEST), _latest("aum")),
        "Share of AUM in wealth, fund, equity and bond products.",
        "month end",
        group="product_mix",
    ),
    Feature("risky_share", "balances", _share(_latest(_RISKY), _latest("aum")), "Share of AUM in mutual funds and equity.", "month end", group="investment"),
    Feature(
        "risky_share_change_3m",
        "balances",
        f"{_share(_latest(_RISKY), _latest('aum'))} - {_share(_months_ago(_RISKY, 3), _months_ago('aum', 3))}",
        "Change of the risky share over 3 months (de-risking after drawdowns is negative).",
        "3m",
        group="investment",
        history_months=3,
    ),
    Feature(
        "n_products_held",
        "balances",
        "max(n_products) FILTER (WHERE month_end = snap)",
        "Number of products held at the latest month end (incl. credit card).",
        "month end",
        group="product_mix",
        fill=0,
    ),
    Feature(
        "months_with_balance_12m",
        "balances",
        "count(*) FILTER (WHERE aum > 0)",
        "Month ends with a positive AUM in 12 months.",
        "12m",
        group="activity",
        fill=0,
    ),
    Feature(
        "credit_card_balance",
        "balances",
        f"CAST({_latest('p_credit_card')} AS DOUBLE)",
        "Credit card amount owed at the latest month end.",
        "month end",
        group="credit",
        fill=0.0,
    ),
    # ---- income and cash flow (transactions) ----
    # Every transactions/digital feature is an expression over measures `m_<measure>_w<months>` (see
    # `MEASURES`): the full query and the monthly aggregates both compute the measures, exactly.
    Feature(
        "salary_income_3m",
        "transactions",
        f"{_money('salary', 3)} / 3",
        "Monthly salary and pension credited, 3-month average.",
        "3m",
        group="income",
        fill=0.0,
    ),
    Feature("inflow_3m", "transactions", f"{_money('inflow', 3)} / 3", "Monthly money in, 3-month average.", "3m", group="income", fill=0.0),
    Feature("outflow_3m", "transactions", f"{_money('outflow', 3)} / 3", "Monthly money out, 3-month average.", "3m", group="income", fill=0.0),
    Feature("spend_1m", "transactions", _money("spend", 1), "Consumer spending in the last month.", "1m", group="spending", fill=0.0),
    Feature("spend_3m", "transactions", _money("spend", 3), "Consumer spending over 3 months.", "3m", group="spending", fill=0.0),
    Feature("spend_12m", "transactions", _money("spend", 12), "Consumer spending over 12 months.", "12m", group="spending", fill=0.0),
    *(
        Feature(
            f"spend_share_{c}_12m",
            "transactions",
            _share(m(f"spend_{c}", 12), m("spend", 12)),
            f"Share of 12-month spending on {c.replace('_', ' ')}.",
            "12m",
            group="spending",
        )
        for c in _SHARE_CATEGORIES
    ),
    *(
        Feature(f"spend_{c}_3m", "transactions", _money(f"spend_{c}", 3), f"Spending on {c} over 3 months.", "3m", group="spending", fill=0.0)
        for c in ("childcare", "education", "medical", "travel")
    ),
    Feature(
        "has_mortgage_payment_3m",
        "transactions",
        f"({m('mortgage_payments', 3)} > 0)::INT",
        "Paid a mortgage instalment in 3 months.",
        "3m",
        group="credit",
        fill=0,
    ),
    # ---- recency and frequency ----
    Feature("txn_count_1m", "transactions", m("txns", 1), "Transactions in the last month.", "1m", group="activity", fill=0),
    Feature("txn_count_3m", "transactions", m("txns", 3), "Transactions over 3 months.", "3m", group="activity", fill=0),
    Feature("txn_count_12m", "transactions", m("txns", 12), "Transactions over 12 months.", "12m", group="activity", fill=0),
    Feature(
        "days_since_last_txn",
        "transactions",
        f"date_diff('day', CAST({m('last_txn', 12)} AS DATE), as_of)",
        "Days since the last transaction (empty if none in 12 months).",
        "12m",
        group="activity",
    ),
    Feature(
        "active_months_12m",
        "transactions",
        f"bit_count({m('active_months', 12)})",
        "Months with at least one transaction in 12 months.",
        "12m",
        group="activity",
        fill=0,
    ),
    Feature(
        "digital_txn_share_3m",
        "transactions",
        _share(m("digital_txns", 3), m("txns", 3)),
        "Share of transactions in mobile/online channels over 3 months.",
        "3m",
        group="digital",
    ),
    Feature(
        "branch_txn_share_12m",
        "transactions",
        _share(m("branch_txns", 12), m("txns", 12)),
        "Share of transactions at branches and ATMs over 12 months.",
        "12m",
        group="activity",
    ),
    # ---- investment behaviour ----
    Feature("invest_buy_count_3m", "transactions", m("invest_buys", 3), "Investment purchases over 3 months.", "3m", group="investment", fill=0),
    Feature("invest_sell_count_3m", "transactions", m("invest_sells", 3), "Investment redemptions over 3 months.", "3m", group="investment", fill=0),
    Feature("invest_trade_count_12m", "transactions", m("invest_trades", 12), "Investment trades over 12 months.", "12m", group="investment", fill=0),
    Feature("invest_buy_amount_3m", "transactions", _money("invest_bought", 3), "Amount invested over 3 months.", "3m", group="investment", fill=0.0),
    Feature(
        "invest_sell_ratio_3m",
        "transactions",
        _share(m("invest_sold", 3), m("invest_traded", 3)),
        "Redemptions as a share of traded amount over 3 months.",
        "3m",
        group="investment",
    ),
    # ---- loans and credit ----
    Feature(
        "n_active_loans",
        "loans",
        "count(*) FILTER (WHERE loan_type <> 'credit_card')",
        "Open loans (excl. credit cards) at as_of.",
        "as_of",
        group="credit",
        fill=0,
    ),
    Feature("has_mortgage", "loans", "(count(*) FILTER (WHERE loan_type = 'mortgage') > 0)::INT", "Has an open mortgage.", "as_of", group="credit", fill=0),
    Feature(
        "loan_outstanding",
        "loans",
        "sum(outstanding) FILTER (WHERE loan_type <> 'credit_card')",
        "Outstanding loan principal (annuity schedule).",
        "as_of",
        group="credit",
        fill=0.0,
    ),
    Feature(
        "monthly_debt_payment",
        "loans",
        "sum(monthly_payment) FILTER (WHERE loan_type <> 'credit_card')",
        "Scheduled monthly loan payments.",
        "as_of",
        group="credit",
        fill=0.0,
    ),
    Feature("credit_limit", "loans", "sum(principal) FILTER (WHERE loan_type = 'credit_card')", "Total credit card limit.", "as_of", group="credit", fill=0.0),
    Feature(
        "months_since_last_loan",
        "loans",
        "CAST(date_diff('day', max(open_date), any_value(as_of)) AS DOUBLE) / 30.44",
        "Months since the newest open loan or card.",
        "as_of",
        group="credit",
    ),
    # ---- digital engagement ----
    Feature("logins_1m", "digital", m("logins", 1), "App/web logins in the last month.", "1m", group="digital", fill=0),
    Feature("logins_3m", "digital", m("logins", 3), "App/web logins over 3 months.", "3m", group="digital", fill=0),
    Feature("fund_equity_views_3m", "digital", m("fund_equity_views", 3), "Fund and equity page views over 3 months.", "3m", group="investment", fill=0),
    Feature("deposit_views_3m", "digital", m("deposit_views", 3), "Deposit product page views over 3 months.", "3m", group="digital", fill=0),
    Feature("app_trades_3m", "digital", m("app_trades", 3), "Trades placed in the app over 3 months.", "3m", group="investment", fill=0),
    Feature("loan_insurance_views_3m", "digital", m("loan_insurance_views", 3), "Loan and insurance page views over 3 months.", "3m", group="digital", fill=0),
    Feature("support_chats_3m", "digital", m("support_chats", 3), "Support chats over 3 months.", "3m", group="digital", fill=0),
    Feature(
        "days_since_last_login",
        "digital",
        f"date_diff('day', CAST({m('last_login', 12)} AS DATE), as_of)",
        "Days since the last login (empty if none in 12 months).",
        "12m",
        group="digital",
    ),
    # ---- derived from the features above ----
    Feature(
        "debt_to_income",
        "derived",
        "CAST(monthly_debt_payment AS DOUBLE) / nullif(salary_income_3m, 0)",
        "Scheduled loan payments over salary income.",
        "3m",
        group="credit",
    ),
    Feature(
        "card_utilisation",
        "derived",
        "CAST(credit_card_balance AS DOUBLE) / nullif(credit_limit, 0)",
        "Credit card balance over limit.",
        "month end",
        group="credit",
    ),
    Feature(
        "txn_trend_1m_vs_3m",
        "derived",
        "CAST(txn_count_1m AS DOUBLE) / nullif(CAST(txn_count_3m AS DOUBLE) / 3, 0)",
        "Last month's transactions relative to the 3-month average (falling engagement < 1).",
        "1m/3m",
        group="activity",
    ),
    Feature(
        "spend_to_income_3m", "derived", "CAST(spend_3m AS DOUBLE) / 3 / nullif(inflow_3m, 0)", "Monthly spending over monthly inflow.", "3m", group="spending"
    ),
)


def _check_measure_features() -> None:
    """A transactions/digital feature reads its source only through measures of that source (so the
    full query and the monthly aggregates compute the same thing); other features read no measure."""
    for f in FEATURES:
        used = measures_of(f.sql)
        if f.source in ("transactions", "digital") and (not used or any(x.source != f.source for x, _ in used)):
            raise ValueError(f"feature {f.name}: must be an expression over {f.source} measures (m(...))")
        if f.source not in ("transactions", "digital") and used:
            raise ValueError(f"feature {f.name}: a {f.source} feature cannot read measures")


_check_measure_features()


def source_measures(source: str) -> list[tuple[Measure, int]]:
    """Every (measure, window months) the features of `source` read, in dictionary order."""
    return list(dict.fromkeys(pair for f in FEATURES if f.source == source for pair in measures_of(f.sql)))


FEATURE_NAMES = tuple(f.name for f in FEATURES)
CATEGORICAL_FEATURES = tuple(f.name for f in FEATURES if f.kind == "categorical")
KEY_COLUMNS = ("customer_id", "as_of")


def feature_dictionary() -> list[dict[str, str]]:
    """Name, meaning, window, type and group of every feature (generated from `FEATURES`)."""
    return [
        {"name": f.name, "group": f.group, "kind": f.kind, "window": f.window, "source": f.source, "null_when": f.null_when, "description": f.description}
        for f in FEATURES
    ]


def feature_dictionary_markdown() -> str:
    lines = [
        "# Feature dictionary",
        "",
        f"Generated from `features/dictionary.py` by `tagml features`; do not edit by hand. {len(FEATURES)} features,",
        "one row per customer and `as_of`; windows end on as_of (inclusive) and only use data dated on or before it.",
        "",
        "`null when` says when a feature is legitimately empty; a null anywhere else fails the snapshot's quality check.",
        "",
        "Each feature's SQL is DuckDB SQL inside a portable subset (`features/portable_sql.py`: explicit columns, signed types,",
        "`CAST(... AS DOUBLE)` on every division, month differences as `year * 12 + month` arithmetic), so with",
        "`TAGML_ENGINE=spark` the same text runs on Spark and writes the same snapshot.",
        "",
        "Money (amounts, balances) is added exactly, in cents (`DECIMAL(18,2)`: a raw value with more decimals is rounded to",
        "the cent), and becomes DOUBLE only in the feature's final expression: the transactions and digital features are",
        "expressions over mergeable measures (sums, counts, maxima, bit-ors over a window of 1, 3 or 12 months), so a snapshot",
        "from monthly aggregates plus the days at the windows' edges (`features/aggregates.py`) equals the full recompute exactly.",
        "",
        "| feature | group | type | window | source | null when | meaning |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| `{d['name']}` | {d['group']} | {d['kind']} | {d['window']} | {d['source']} | {d['null_when']} | {d['description']} |" for d in feature_dictionary()
    ]
    return "\n".join(lines) + "\n"
