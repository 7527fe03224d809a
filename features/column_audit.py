"""The column audit of a bank's own table: every column is used (as numeric or categorical, and why) or
excluded (and why). Names and reasons only: no value of the table ever appears in the audit.

A column's name is hostile input: it reaches SQL only through `quote()`.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import duckdb

from tagml.core.storage import quote
from tagml.features.pii import pii_by_content, pii_by_name

NUMERIC = "numeric"
CATEGORICAL = "categorical"
EXCLUDED = "excluded"
Use = Literal["numeric", "categorical", "excluded"]

NUMERIC_SQL_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "FLOAT", "DOUBLE", "DECIMAL")
INTEGER_SQL_TYPES = NUMERIC_SQL_TYPES[:9]
CATEGORICAL_SQL_TYPES = ("VARCHAR", "BOOLEAN", "ENUM")
AS_OF_COLUMN = "as_of"
# the training set's own columns: a table column of the same name (in any case) would collide with them
RESERVED_NAMES = ("customer_id", "as_of", "label", "split")


class ColumnAuditError(ValueError):
    """The catalog's column choices do not fit the table (names the table and the column)."""


@dataclass(frozen=True)
class ColumnDecision:
    column: str
    use: Use
    reason: str
    single_feature_auc: float | None = None  # how well the column alone predicts the label (the leakage guard)


@dataclass(frozen=True)
class ColumnAudit:
    decisions: tuple[ColumnDecision, ...]

    def used(self, use: Use) -> tuple[str, ...]:
        return tuple(d.column for d in self.decisions if d.use == use)

    @property
    def features(self) -> tuple[str, ...]:
        return tuple(d.column for d in self.decisions if d.use != EXCLUDED)

    def counts(self) -> dict[str, int]:
        return {use: len(self.used(use)) for use in (NUMERIC, CATEGORICAL, EXCLUDED)}

    def as_dict(self) -> dict[str, dict[str, str | float]]:
        """column -> {use, reason[, single_feature_auc]}: what MLflow and Dagster record."""
        return {
            d.column: {"use": d.use, "reason": d.reason, **({"single_feature_auc": round(d.single_feature_auc, 4)} if d.single_feature_auc is not None else {})}
            for d in self.decisions
        }

    @classmethod
    def from_dict(cls, recorded: dict[str, dict]) -> "ColumnAudit":
        return cls(tuple(ColumnDecision(c, d["use"], d["reason"], d.get("single_feature_auc")) for c, d in recorded.items()))

    def markdown(self) -> str:
        def auc(d: ColumnDecision) -> str:
            return "" if d.single_feature_auc is None else f"{d.single_feature_auc:.3f}"

        rows = [f"| {_cell(d.column)} | {d.use} | {_cell(d.reason)} | {auc(d)} |" for d in self.decisions]
        return "\n".join(["| column | use | reason | single-feature AUC |", "| --- | --- | --- | --- |", *rows])

    def scored(self, scores: dict[str, float]) -> "ColumnAudit":
        """The audit with each used column's single-feature AUC."""
        return ColumnAudit(tuple(ColumnDecision(d.column, d.use, d.reason, scores.get(d.column, d.single_feature_auc)) for d in self.decisions))


def _cell(text: str) -> str:
    """Text for a markdown table cell: a column name may hold '|' or a line break."""
    return " ".join(text.replace("|", "&#124;").split())


@dataclass(frozen=True)
class ColumnChoices:
    """What the catalog says about a table's columns (all by name)."""

    id_column: str
    categorical: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()  # acknowledged by the catalog: not excluded by `leak_by_name`


def _base_type(sql_type: str) -> str:
    return sql_type.split("(")[0]


def audit_columns(
    con: duckdb.DuckDBPyConnection,
    relation: str,
    table: str,
    types: dict[str, str],
    choices: ColumnChoices,
    leak_by_name: Callable[[str], str | None] = lambda column: None,
) -> ColumnAudit:
    """Decide every column of `relation` (column -> DuckDB type in `types`); `table` names it in errors.

    In order: id and as_of columns, reserved names, PII by name, leakage by name, the catalog's exclude and
    include lists, unsupported types, the catalog's declared kind or the inferred one, PII by content
    (sampled, text and integer columns only).
    """
    _check_named(table, types, choices)
    decisions = []
    for column, sql_type in types.items():
        reason = _excluded_by_name(column, choices, leak_by_name) or _excluded_by_catalog(column, choices)
        use: Use = EXCLUDED
        if reason is None:
            use, reason = _kind(column, sql_type, choices, table)
        # personal data is text or whole numbers (phone numbers, ids): other types are not sampled
        if use != EXCLUDED and _base_type(sql_type) in INTEGER_SQL_TYPES + ("VARCHAR", "ENUM"):
            found = pii_by_content(con, relation, column)
            if found:
                use, reason = EXCLUDED, f"PII by content ({found[0]}: {found[1]:.0%} of sampled values)"
        if use != EXCLUDED and column in choices.allow:
            reason += "; acknowledged in leakage.allow"
        decisions.append(ColumnDecision(column, use, reason))
    return ColumnAudit(tuple(decisions))


def _check_named(table: str, types: dict[str, str], choices: ColumnChoices) -> None:
    """Every column the catalog names exists in the table: a typo would silently use or keep a column."""
    for field, names in (
        ("label.feature_source.categorical", choices.categorical),
        ("label.feature_source.numeric", choices.numeric),
        ("features.include", choices.include),
        ("features.exclude", choices.exclude),
        ("leakage.allow", choices.allow),
    ):
        missing = [n for n in names if n not in types]
        if missing:
            raise ColumnAuditError(f"{field} names column(s) {missing} that {table} does not have")


def _excluded_by_name(column: str, choices: ColumnChoices, leak_by_name: Callable[[str], str | None]) -> str | None:
    if column == choices.id_column:
        return "id column"
    if column == AS_OF_COLUMN:
        return "as_of column (the snapshot date)"
    if column.lower() in RESERVED_NAMES:
        return f"reserved name ({column.lower()!r} is a column of the training set)"
    pii = pii_by_name(column)
    if pii:
        return f"PII by name ({pii})"
    leak = None if column in choices.allow else leak_by_name(column)
    return f"leakage by name ({leak})" if leak else None


def _excluded_by_catalog(column: str, choices: ColumnChoices) -> str | None:
    if column in choices.exclude:
        return "excluded by the catalog (features.exclude)"
    if choices.include and column not in choices.include:
        return "not in the catalog's features.include"
    return None


def _kind(column: str, sql_type: str, choices: ColumnChoices, table: str) -> tuple[Use, str]:
    base = _base_type(sql_type)
    supported = base in NUMERIC_SQL_TYPES + CATEGORICAL_SQL_TYPES
    declared = NUMERIC if column in choices.numeric else CATEGORICAL if column in choices.categorical else None
    if declared and not supported:
        raise ColumnAuditError(f"label.feature_source.{declared} declares column {column!r} of {table}, whose type {sql_type} cannot be used as {declared}")
    if not supported:
        return EXCLUDED, f"unsupported type {sql_type}"
    if declared:
        return declared, f"declared {declared} (catalog), type {sql_type}"
    return (NUMERIC if base in NUMERIC_SQL_TYPES else CATEGORICAL), f"inferred from type {sql_type}"


def check_numeric(con: duckdb.DuckDBPyConnection, relation: str, table: str, columns: Iterable[str], types: dict[str, str]) -> None:
    """Text columns declared numeric hold numbers, or a `ColumnAuditError` counting the values that are not (never showing them)."""
    text = [c for c in columns if _base_type(types[c]) not in NUMERIC_SQL_TYPES]
    if not text:
        return
    counts = ", ".join(f"count_if({quote(c)} IS NOT NULL AND TRY_CAST({quote(c)} AS DOUBLE) IS NULL)" for c in text)
    bad = {c: n for c, n in zip(text, con.execute(f"SELECT {counts} FROM {relation}").fetchone()) if n}
    if bad:
        detail = ", ".join(f"{c!r}: {n} value(s)" for c, n in bad.items())
        raise ColumnAuditError(f"label.feature_source.numeric: columns of {table} declared numeric hold values that are not numbers ({detail})")
