"""Validate one raw table against the contract, and stage it as Parquet without PII.

Validation is set-based SQL so that tens of millions of transactions are checked without loading
them into pandas. The steps, each raising a `ContractError` naming the table, column, rule and example
rows (keys and the offending non-PII value) before anything is written: read the source
(`tagml.features.raw`), cast every column to its contract type, then the plausibility rules (row rules,
unique key, known customers, and for holdings known products: every held product needs its risk rating).

The SQL is written once, in DuckDB's dialect and inside the portable subset, and run through an
`SqlRunner`: DuckDB here, Spark (`tagml.features.spark_staging`) through `to_spark_sql`. Both engines
therefore check the same rules and raise the same errors.
"""

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Protocol

import duckdb

from tagml.core.storage import quote, sql_literal, staged_path, write_parquet_atomically
from tagml.features.contract import CUSTOMERS, HOLDINGS, PRODUCTS_TABLE, TableSpec
from tagml.features.raw import ContractError, RawSource, Violation, bank_today, contract_error, find_source, open_source

MAX_EXAMPLES = 5
# tables whose product_id must be a product of the delivered `products` (suitability reads its risk rating)
RATED_BY_PRODUCTS = frozenset({HOLDINGS.name})


class SqlRunner(Protocol):
    """Where validation's (DuckDB-dialect, portable) SQL runs."""

    def rows(self, sql: str) -> list[tuple]:
        """The query's rows."""

    def binds(self, sql: str) -> bool:
        """Whether the query compiles (its casts fit the source's types), without reading data."""

    def create_view(self, name: str, select_sql: str) -> None:
        """A temporary view `name` over the query, for the steps that follow."""


@dataclass(frozen=True)
class DuckDBRunner:
    con: duckdb.DuckDBPyConnection

    def rows(self, sql: str) -> list[tuple]:
        return self.con.execute(sql).fetchall()

    def binds(self, sql: str) -> bool:
        try:
            self.con.execute(sql)
        except duckdb.Error:
            return False
        return True

    def create_view(self, name: str, select_sql: str) -> None:
        self.con.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS {select_sql}")


@dataclass(frozen=True)
class StagedTable:
    table: str
    path: Path
    rows: int
    source: str
    dropped_pii: tuple[str, ...] = ()
    ignored_columns: tuple[str, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ValidatedTable:
    """A table that passed every rule: the SELECT of its staged columns and what to report."""

    spec: TableSpec
    select_sql: str
    source: str
    dropped_pii: tuple[str, ...]
    ignored_columns: tuple[str, ...]


def _example_rows(runner: SqlRunner, spec: TableSpec, relation: str, predicate: str, column: str | None) -> tuple[dict, ...]:
    """A few offending rows, showing the key and the offending column but never PII."""
    shown = [c for c in dict.fromkeys((*spec.key, column)) if c and not spec.column(c).pii]
    shown = shown or [c.name for c in spec.columns if not c.pii][:3]
    cols = ", ".join(quote(c) for c in shown)
    rows = runner.rows(f"SELECT {cols} FROM {relation} WHERE {predicate} LIMIT {MAX_EXAMPLES}")
    return tuple({n: (v.isoformat() if hasattr(v, "isoformat") else v) for n, v in zip(shown, row)} for row in rows)


def _row_rules(spec: TableSpec, typed_columns: set[str], delivery_date: date) -> list[tuple[str | None, str, str, str]]:
    """(column, rule, bad-row predicate, description) for every row-level rule of the table."""
    checks: list[tuple[str | None, str, str, str]] = []
    delivered = f"DATE {sql_literal(delivery_date.isoformat())}"
    for col in spec.columns:
        if col.name not in typed_columns:
            continue
        q = quote(col.name)
        if not col.nullable:
            checks.append((col.name, "not_null", f"{q} IS NULL", "value is missing"))
        if col.allowed:
            allowed = ", ".join(sql_literal(v) for v in col.allowed)
            checks.append((col.name, "allowed_values", f"{q} NOT IN ({allowed})", f"value not in {list(col.allowed)}"))
        if col.finite:
            # NaN compares greater than every number (DuckDB and Spark): min/max bounds would not all catch
            # it, and the comparison is false for NaN and +-inf alike (isfinite() has no Spark form)
            checks.append((col.name, "finite", f"NOT (abs({q}) < CAST('Infinity' AS DOUBLE))", "value is NaN or infinite"))
        for bound, op in ((col.min, "<"), (col.max, ">")):
            if bound is None:
                continue
            literal = f"DATE {sql_literal(bound)}" if col.type == "date" else str(bound)
            name = "min" if op == "<" else "max"
            checks.append((col.name, name, f"{q} {op} {literal}", f"value {op} {bound}"))
        if col.not_after_delivery:
            after = f"{q} > {delivered}" if col.type == "date" else f"{q} >= {delivered} + INTERVAL 1 DAY"
            checks.append((col.name, "not_after_delivery", after, f"date is after the delivery date {delivery_date.isoformat()}"))
    for rule in spec.rules:
        checks.append((rule.column, rule.name, f"NOT ({rule.sql})", rule.description))
    return checks


def validate_table(
    con: duckdb.DuckDBPyConnection,
    spec: TableSpec,
    raw_dir: Path,
    delivery_date: date,
    customers: str | None,
    products: str | None = None,
) -> ValidatedTable:
    """Check one raw table against the contract; `customers` (`products`) is the relation known customer
    (product) ids come from (None: the known-customer (known-product) rule is not evaluated)."""
    return validate_source(DuckDBRunner(con), spec, open_source(con, spec, raw_dir), delivery_date, customers, products)


def validate_source(
    runner: SqlRunner, spec: TableSpec, source: RawSource | None, delivery_date: date, customers: str | None, products: str | None = None
) -> ValidatedTable:
    """Check an opened raw table (None: an optional table that was not delivered) on `runner`'s engine;
    the returned `select_sql` (DuckDB dialect) selects the staged columns."""
    if source is None:
        empty = ", ".join(f"CAST(NULL AS {c.sql_type}) AS {quote(c.name)}" for c in spec.staged_columns)
        return ValidatedTable(spec, f"SELECT {empty} LIMIT 0", "absent (optional table)", (), ())
    typed = _cast_to_contract(runner, spec, source.relation, source.column_types)
    violations = _row_rule_violations(runner, spec, typed, source.location, delivery_date)
    violations += _key_violations(runner, spec, typed)
    if spec.references_customers:
        violations += _unknown_key_violations(runner, spec, typed, "customer_id", customers, CUSTOMERS.name, "known_customer")
    if spec.name in RATED_BY_PRODUCTS:
        violations += _unknown_key_violations(runner, spec, typed, "product_id", products, PRODUCTS_TABLE.name, "known_product")
    if violations:
        raise ContractError(violations)
    staged_cols = ", ".join(quote(c.name) for c in spec.staged_columns)
    return ValidatedTable(
        spec,
        f"SELECT {staged_cols} FROM {typed}",
        source.location,
        tuple(c for c in spec.pii_columns if c in source.column_types),
        tuple(sorted(source.ignored_columns)),
    )


def _cast_to_contract(runner: SqlRunner, spec: TableSpec, src: str, present: dict[str, str]) -> str:
    """A view of `src` with every contract column cast to its type (absent optional columns null);
    a column or value that cannot be cast is a type violation."""
    violations: list[Violation] = []
    select_parts, cast_checks = [], []
    casts = {c.name: f"TRY_CAST({quote(c.name)} AS {c.sql_type})" for c in spec.columns if c.name in present}
    # one probe for the whole table (each costs a query plan on Spark); column by column only to name the ones that fail
    all_bind = runner.binds(f"SELECT {', '.join(casts.values())} FROM {src} LIMIT 0") if casts else True
    for col in spec.columns:
        if col.name not in present:
            select_parts.append(f"CAST(NULL AS {col.sql_type}) AS {quote(col.name)}")
            continue
        expr = casts[col.name]
        if not all_bind and not runner.binds(f"SELECT {expr} FROM {src} LIMIT 0"):
            violations.append(Violation(spec.name, col.name, "type", f"source type {present[col.name]} cannot be read as {col.type}"))
            continue
        select_parts.append(f"{expr} AS {quote(col.name)}")
        bad = f"{quote(col.name)} IS NOT NULL AND {expr} IS NULL"
        if col.type == "int":  # the cast rounds: 1.5 children would silently become 2
            bad = f"{quote(col.name)} IS NOT NULL AND ({expr} IS NULL OR TRY_CAST({quote(col.name)} AS DOUBLE) <> {expr})"
        cast_checks.append((col, bad))
    if violations:
        raise ContractError(violations)
    if cast_checks:
        counts = runner.rows("SELECT " + ", ".join(f"count(*) FILTER (WHERE {bad})" for _, bad in cast_checks) + f" FROM {src}")[0]
        for (col, bad), n_bad in zip(cast_checks, counts):
            if not n_bad:
                continue
            # the offending rows by key, plus the bad value unless the column is PII
            examples = _example_rows(runner, spec, src, bad, col.name)
            violations.append(Violation(spec.name, col.name, "type", f"values are not valid {col.type}", int(n_bad), examples))
    if violations:
        raise ContractError(violations)
    typed = f"typed_{spec.name}"
    runner.create_view(typed, f"SELECT {', '.join(select_parts)} FROM {src}")
    return typed


def _row_rule_violations(runner: SqlRunner, spec: TableSpec, typed: str, location: str, delivery_date: date) -> list[Violation]:
    """Every row-level rule, counted in one scan; an empty table is an error of its own."""
    checks = _row_rules(spec, {c.name for c in spec.columns}, delivery_date)
    counts_sql = ", ".join([f"count(*) FILTER (WHERE {pred})" for _, _, pred, _ in checks] + ["count(*)"])
    counts = runner.rows(f"SELECT {counts_sql} FROM {typed}")[0]
    total = int(counts[-1])
    if total == 0:
        raise contract_error(spec, None, "non_empty", f"{location} has no rows")
    violations = []
    for (column, rule, predicate, description), n_bad in zip(checks, counts[:-1]):
        if n_bad:
            violations.append(Violation(spec.name, column, rule, description, int(n_bad), _example_rows(runner, spec, typed, predicate, column)))
    return violations


def _key_violations(runner: SqlRunner, spec: TableSpec, typed: str) -> list[Violation]:
    if not spec.key:
        return []
    key = ", ".join(quote(k) for k in spec.key)
    dup_sql = f"SELECT {key}, count(*) AS n FROM {typed} GROUP BY {key} HAVING count(*) > 1"
    n_dup = runner.rows(f"SELECT count(*) FROM ({dup_sql}) AS duplicates")[0][0]
    if not n_dup:
        return []
    rows = runner.rows(f"{dup_sql} LIMIT {MAX_EXAMPLES}")
    examples = tuple(dict(zip([*spec.key, "copies"], r)) for r in rows)
    return [Violation(spec.name, ",".join(spec.key), "unique_key", "key appears more than once", int(n_dup), examples)]


def _unknown_key_violations(runner: SqlRunner, spec: TableSpec, typed: str, column: str, known: str | None, table: str, rule: str) -> list[Violation]:
    """Rows whose `column` is not in the relation `known` of the delivered `table` (None: not evaluated)."""
    if known is None:
        return []
    orphan = f"{quote(column)} NOT IN (SELECT {quote(column)} FROM {known})"
    n_orphan = runner.rows(f"SELECT count(*) FROM {typed} WHERE {orphan}")[0][0]
    if not n_orphan:
        return []
    examples = _example_rows(runner, spec, typed, orphan, column)
    return [Violation(spec.name, column, rule, f"{column} not in {table}", int(n_orphan), examples)]


def write_staged(con: duckdb.DuckDBPyConnection, valid: ValidatedTable, target: Path) -> StagedTable:
    """Write a validated table (PII dropped, types cast) to `target`, atomically."""
    rows = write_parquet_atomically(con, valid.select_sql, target)
    return StagedTable(valid.spec.name, target, rows, valid.source, valid.dropped_pii, valid.ignored_columns)


def _staged_first(spec: TableSpec, staged_dir: Path, first: TableSpec, column: str) -> str:
    path = staged_path(staged_dir, first.name)
    if not path.exists():
        raise contract_error(spec, column, f"{first.name}_staged_first", f"stage {first.name} before {spec.name}")
    return f"read_parquet({sql_literal(path)})"


def validate_and_stage(
    con: duckdb.DuckDBPyConnection,
    spec: TableSpec,
    raw_dir: Path,
    staged_dir: Path,
    delivery_date: date | None = None,
) -> StagedTable:
    """Validate one raw table and write it, PII dropped and types cast, to `staged_dir/<table>.parquet`.

    Tables that reference customers are checked against the already staged customers table. This
    replaces one table on its own; a whole delivery is staged with `stage_delivery`, which keeps
    the tables consistent with each other.
    """
    delivery_date = delivery_date or bank_today()
    delivered = find_source(raw_dir, spec.name) is not None
    customers = _staged_first(spec, staged_dir, CUSTOMERS, "customer_id") if spec.references_customers and delivered else None
    products = _staged_first(spec, staged_dir, PRODUCTS_TABLE, "product_id") if spec.name in RATED_BY_PRODUCTS and delivered else None
    valid = validate_table(con, spec, raw_dir, delivery_date, customers, products)
    return write_staged(con, valid, staged_path(staged_dir, spec.name))


def known_key_violations(runner: SqlRunner, spec: TableSpec, relation: str, customers: str | None, products: str | None) -> list[Violation]:
    """The known-customer (known-product) rule alone, for a staged table carried over while customers (products) changed."""
    violations = (
        _unknown_key_violations(runner, spec, relation, "customer_id", customers, CUSTOMERS.name, "known_customer") if spec.references_customers else []
    )
    if spec.name in RATED_BY_PRODUCTS:
        violations += _unknown_key_violations(runner, spec, relation, "product_id", products, PRODUCTS_TABLE.name, "known_product")
    return violations
