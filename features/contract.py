"""The raw data contract: the tables a bank provides to tagml, declared once.

The synthetic bank writes exactly these tables, the loader validates against them, and the
markdown in docs/DATA_CONTRACT.md is generated from them (`tagml contract`).
"""

from dataclasses import dataclass, field

# DuckDB type names per contract type.
SQL_TYPES = {
    "string": "VARCHAR",
    "int": "BIGINT",
    "double": "DOUBLE",
    "date": "DATE",
    "timestamp": "TIMESTAMP",
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    description: str
    nullable: bool = False
    required: bool = True
    pii: bool = False
    allowed: tuple[str, ...] | None = None
    min: float | str | None = None
    max: float | str | None = None
    # Dates and timestamps describe the past: a value after the delivery date is implausible (a
    # transaction in 2099, a customer born in 2090). A column that may legitimately lie in the
    # future (a contractual end date) says so here.
    future_allowed: bool = False

    def __post_init__(self) -> None:
        if self.type not in SQL_TYPES:
            raise ValueError(f"column {self.name}: unknown contract type {self.type!r}")

    @property
    def sql_type(self) -> str:
        return SQL_TYPES[self.type]

    @property
    def not_after_delivery(self) -> bool:
        """Values must not be later than the delivery date."""
        return self.type in ("date", "timestamp") and not self.future_allowed

    @property
    def finite(self) -> bool:
        """NaN and +-inf are rejected (every double column)."""
        return self.type == "double"


@dataclass(frozen=True)
class RowRule:
    """A predicate every row must satisfy, as a DuckDB SQL expression over the table's columns."""

    name: str
    column: str
    sql: str
    description: str


@dataclass(frozen=True)
class TableSpec:
    name: str
    description: str
    columns: tuple[Column, ...]
    key: tuple[str, ...] = ()
    event_time: str | None = None
    references_customers: bool = True
    optional: bool = False
    rules: tuple[RowRule, ...] = field(default_factory=tuple)

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @property
    def pii_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.pii)

    @property
    def staged_columns(self) -> tuple[Column, ...]:
        """The columns that leave the loader: everything but PII."""
        return tuple(c for c in self.columns if not c.pii)


REGIONS = ("north", "northeast", "east", "central", "south", "southwest", "northwest")
PRODUCTS = (
    "current_deposit",
    "time_deposit",
    "wealth_management",
    "mutual_fund",
    "equity",
    "bond",
    "insurance",
    "credit_card",
)
INVESTMENT_PRODUCTS = ("wealth_management", "mutual_fund", "equity", "bond")
LOAN_TYPES = ("mortgage", "auto", "personal", "business", "credit_card")
SPEND_CATEGORIES = (
    "groceries",
    "dining",
    "shopping",
    "luxury",
    "travel",
    "entertainment",
    "utilities",
    "rent",
    "childcare",
    "education",
    "medical",
    "insurance_premium",
)
TXN_CATEGORIES = SPEND_CATEGORIES + (
    "salary",
    "pension",
    "transfer_in",
    "transfer_out",
    "mortgage_payment",
    "loan_payment",
    "investment_buy",
    "investment_sell",
    "cash_withdrawal",
)
TXN_CHANNELS = ("mobile", "online", "branch", "atm", "pos")
DIGITAL_EVENT_TYPES = (
    "login",
    "view_deposit",
    "view_wealth",
    "view_fund",
    "view_equity",
    "view_loan",
    "view_insurance",
    "trade",
    "support_chat",
)
LABEL_SOURCES = ("risk_questionnaire", "kyc", "relationship_manager", "observed_outcome")
# The regulator's product risk ratings (R1 lowest to R5 highest); a C<k> investor may be sold R1..R<k> only.
PRODUCT_RISK_LEVELS = ("R1", "R2", "R3", "R4", "R5")
# What a customer may consent to (or refuse) the bank using their data for (PIPL Art. 13/24, PBOC rules).
CONSENT_PURPOSES = ("marketing", "personalisation", "profiling")
CONSENT_STATUSES = ("granted", "withdrawn")

_CUSTOMER_ID = Column("customer_id", "string", "Bank customer identifier (joins to customers).")

CUSTOMERS = TableSpec(
    name="customers",
    description="One row per customer: demographics and onboarding. Treated as a current "
    "snapshot; only attributes that do not change (birth date, onboarding date) or change "
    "slowly are used as features.",
    key=("customer_id",),
    event_time="onboarding_date",
    references_customers=False,
    columns=(
        Column("customer_id", "string", "Bank customer identifier."),
        Column("full_name", "string", "Name.", nullable=True, required=False, pii=True),
        Column("phone", "string", "Mobile number.", nullable=True, required=False, pii=True),
        Column("national_id", "string", "National ID number.", nullable=True, required=False, pii=True),
        Column("address", "string", "Home address.", nullable=True, required=False, pii=True),
        Column("birth_date", "date", "Date of birth.", min="1900-01-01"),
        Column("gender", "string", "Recorded gender.", nullable=True, allowed=("F", "M")),
        Column(
            "marital_status",
            "string",
            "Marital status from KYC; often missing.",
            nullable=True,
            allowed=("single", "married", "divorced", "widowed"),
        ),
        Column("num_children", "int", "Number of children from KYC; often missing.", nullable=True, min=0, max=15),
        Column(
            "education",
            "string",
            "Highest education.",
            nullable=True,
            allowed=("primary", "secondary", "bachelor", "postgraduate"),
        ),
        Column(
            "occupation",
            "string",
            "Occupation group.",
            nullable=True,
            allowed=("employee", "civil_servant", "professional", "self_employed", "retired", "student", "unemployed"),
        ),
        Column("region", "string", "Region of the home branch.", allowed=REGIONS),
        Column("city_tier", "int", "City tier of the home branch (1 = largest cities).", min=1, max=4),
        Column("onboarding_date", "date", "Date the customer relationship started.", min="1950-01-01"),
        Column(
            "acquisition_channel",
            "string",
            "How the customer was acquired.",
            nullable=True,
            allowed=("branch", "online", "referral", "campaign", "payroll"),
        ),
    ),
    rules=(
        RowRule(
            "born_before_onboarding",
            "onboarding_date",
            "onboarding_date >= birth_date",
            "A customer cannot be onboarded before birth.",
        ),
    ),
)

BALANCES = TableSpec(
    name="balances",
    description="Month-end balance of each product a customer holds (long format; products not held have no row). Investment products are at market value.",
    key=("customer_id", "month_end", "product"),
    event_time="month_end",
    columns=(
        _CUSTOMER_ID,
        Column("month_end", "date", "Last day of the month the balance is for."),
        Column("product", "string", "Product line.", allowed=PRODUCTS),
        Column("balance", "double", "Balance in CNY (credit_card: amount owed).", min=0),
    ),
    rules=(RowRule("is_month_end", "month_end", "month_end = last_day(month_end)", "month_end must be the last day of a month."),),
)

LOANS = TableSpec(
    name="loans",
    description="Loans and credit lines, one row per contract.",
    key=("loan_id",),
    event_time="open_date",
    columns=(
        Column("loan_id", "string", "Contract identifier."),
        _CUSTOMER_ID,
        Column("loan_type", "string", "Kind of credit.", allowed=LOAN_TYPES),
        Column("open_date", "date", "Date the contract started."),
        Column("close_date", "date", "Date it was repaid or closed; empty while open.", nullable=True),
        Column("principal", "double", "Amount lent (credit_card: credit limit), CNY.", min=0),
        Column("term_months", "int", "Contractual term; empty for revolving credit.", nullable=True, min=1, max=480),
        Column("interest_rate", "double", "Annual interest rate as a fraction.", min=0, max=0.5),
        Column("monthly_payment", "double", "Scheduled monthly payment, CNY.", min=0),
    ),
    rules=(RowRule("closed_after_open", "close_date", "close_date IS NULL OR close_date >= open_date", "close_date must not precede open_date."),),
)

TRANSACTIONS = TableSpec(
    name="transactions",
    description="Account transactions.",
    key=("txn_id",),
    event_time="txn_ts",
    columns=(
        Column("txn_id", "string", "Transaction identifier."),
        _CUSTOMER_ID,
        Column("txn_ts", "timestamp", "When the transaction was booked."),
        Column("amount", "double", "Absolute amount in CNY.", min=0),
        Column("direction", "string", "Money in (credit) or out (debit).", allowed=("debit", "credit")),
        Column("category", "string", "Transaction category.", allowed=TXN_CATEGORIES),
        Column("channel", "string", "Channel used.", allowed=TXN_CHANNELS),
    ),
)

DIGITAL_EVENTS = TableSpec(
    name="digital_events",
    description="App and web events (optional table; features are empty without it).",
    event_time="event_ts",
    optional=True,
    columns=(
        _CUSTOMER_ID,
        Column("event_ts", "timestamp", "When the event happened."),
        Column("event_type", "string", "What the customer did.", allowed=DIGITAL_EVENT_TYPES),
        Column("channel", "string", "App or web.", allowed=("app", "web")),
    ),
)

TAG_LABELS = TableSpec(
    name="tag_labels",
    description="Observed tag values for some customers: risk questionnaires, KYC and relationship-manager records, observed outcomes such as churn.",
    key=("customer_id", "tag", "label_date"),
    event_time="known_date",
    columns=(
        _CUSTOMER_ID,
        Column("tag", "string", "Tag name as in the tag catalog."),
        Column("label", "string", "The observed class."),
        Column("label_date", "date", "Date the label describes: features are taken as of this date."),
        Column(
            "known_date",
            "date",
            "Date the label became known (later than label_date for outcomes, e.g. churn in the next 90 days).",
        ),
        Column("source", "string", "Where the label comes from.", allowed=LABEL_SOURCES),
    ),
    rules=(RowRule("known_after_label_date", "known_date", "known_date >= label_date", "A label cannot be known before the date it describes."),),
)

PRODUCTS_TABLE = TableSpec(
    name="products",
    description="The bank's shelf of rated investment products (optional table; suitability needs it): one row per product with the "
    "regulator's risk rating R1 (lowest) to R5 (highest).",
    key=("product_id",),
    references_customers=False,
    optional=True,
    columns=(
        Column("product_id", "string", "Product code (joins to holdings)."),
        Column("product_line", "string", "The balance line the product is reported under.", allowed=PRODUCTS),
        Column("risk_level", "string", "Product risk rating.", allowed=PRODUCT_RISK_LEVELS),
        Column("product_name", "string", "Display name.", nullable=True, required=False),
    ),
)

HOLDINGS = TableSpec(
    name="holdings",
    description="Month-end market value of each rated product a customer holds (optional table; suitability needs it). "
    "The values of one product line add up to that line's balance in `balances`.",
    key=("customer_id", "month_end", "product_id"),
    event_time="month_end",
    optional=True,
    columns=(
        _CUSTOMER_ID,
        Column("month_end", "date", "Last day of the month the value is for."),
        Column("product_id", "string", "Product code; must be in the delivered `products` (rule known_product: suitability reads its rating)."),
        Column("market_value", "double", "Market value in CNY.", min=0),
    ),
    rules=(RowRule("is_month_end", "month_end", "month_end = last_day(month_end)", "month_end must be the last day of a month."),),
)

CONSENTS = TableSpec(
    name="consents",
    description="Consent events per customer and purpose (optional table): a grant or a withdrawal with when it was recorded. "
    "The newest event on or before a date decides; a customer with no event for a purpose has not consented to it.",
    key=("customer_id", "purpose", "recorded_at"),
    event_time="recorded_at",
    optional=True,
    columns=(
        _CUSTOMER_ID,
        Column("purpose", "string", "What the data may be used for.", allowed=CONSENT_PURPOSES),
        Column("status", "string", "Granted or withdrawn.", allowed=CONSENT_STATUSES),
        Column("recorded_at", "timestamp", "When the bank recorded the decision."),
        Column("channel", "string", "Where the customer decided.", nullable=True, required=False, allowed=("branch", "app", "web", "call_centre")),
    ),
)

RAW_TABLES: tuple[TableSpec, ...] = (CUSTOMERS, BALANCES, LOANS, TRANSACTIONS, DIGITAL_EVENTS, TAG_LABELS, PRODUCTS_TABLE, HOLDINGS, CONSENTS)
TABLES_BY_NAME = {t.name: t for t in RAW_TABLES}


def contract_markdown() -> str:
    """The contract as a markdown document."""
    lines = [
        "# Raw data contract",
        "",
        "Generated from `features/contract.py` by `tagml contract`; do not edit by hand.",
        (
            "Each table is a Parquet file `<table>.parquet`, a directory `<table>/` of Parquet parts, "
            "or a CSV file `<table>.csv` (header row) in the raw directory: a *whole* delivery of the table. "
            "The event tables may instead be delivered as *dated files*, one per period of their event time: "
            "`transactions/YYYY-MM-DD.parquet|csv` (a day of `txn_ts`), `digital_events/YYYY-MM-DD.*` (a day of `event_ts`), "
            "`balances/YYYY-MM-DD.*` and `holdings/YYYY-MM-DD.*` (a month end); every row of a dated file must fall in its period. "
            "Columns not listed are ignored. "
            "PII columns are accepted, validated as text and dropped before anything downstream sees them."
        ),
        "",
        (
            "A delivery is staged as one unit: what is new or changed is validated (including that each `customer_id` "
            "exists in the staged or newly delivered customers) before any staged table is replaced, and then all are "
            "replaced together. Each delivery has a delivery date (by default today in the bank's timezone): "
            "dates and timestamps after it are rejected, as are NaN and infinite numbers. A CSV row with more "
            "or fewer fields than the header is reported by file and line number, never by its content. "
            "How incremental deliveries, restatements and the manifest work: docs/RAW_DELIVERIES.md."
        ),
        "",
    ]
    for table in RAW_TABLES:
        lines += [f"## {table.name}{' (optional)' if table.optional else ''}", "", table.description, ""]
        if table.key:
            lines.append(f"Key: `{', '.join(table.key)}`. ")
        if table.event_time:
            lines.append(f"Point-in-time column: `{table.event_time}`. ")
        if table.references_customers:
            lines.append("Every `customer_id` must exist in `customers`.")
        lines += ["", "| column | type | null | PII | rule | meaning |", "| --- | --- | --- | --- | --- | --- |"]
        for c in table.columns:
            rule = []
            if c.allowed:
                rule.append("one of " + ", ".join(f"`{v}`" for v in c.allowed))
            if c.min is not None:
                rule.append(f">= {c.min}")
            if c.max is not None:
                rule.append(f"<= {c.max}")
            if c.not_after_delivery:
                rule.append("<= delivery date")
            if c.finite:
                rule.append("finite")
            null = "optional column" if not c.required else ("yes" if c.nullable else "no")
            lines.append(f"| `{c.name}` | {c.type} | {null} | {'PII' if c.pii else ''} | {'; '.join(rule)} | {c.description} |")
        for r in table.rules:
            lines.append(f"\nRule `{r.name}`: {r.description} (`{r.sql}`)")
        lines.append("")
    return "\n".join(lines)
