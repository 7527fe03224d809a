"""Validate one raw table against the contract, and stage it as Parquet without PII.

Validation is set-based SQL in DuckDB so that tens of millions of transactions are checked without
loading them into pandas. The steps, each raising a `ContractError` naming the table, column, rule
and example rows (keys and the offending non-PII value) before anything is written: read the source
(`tagml.features.raw`), cast every column to its contract type, then the plausibility rules (row rules,
unique key, known customers).
"""

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from tagml.core.storage import quote, sql_literal, staged_path, write_parquet_atomically
from tagml.features.contract import CUSTOMERS, TableSpec
from tagml.features.raw import ContractError, Violation, bank_today, contract_error, find_source, open_source

MAX_EXAMPLES = 5


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


def _example_rows(con: duckdb.DuckDBPyConnection, spec: TableSpec, relation: str, predicate: str, column: str | None) -> tuple[dict, ...]:
    """A few offending rows, showing the key and the offending column but never PII."""
    shown = [c for c in dict.fromkeys((*spec.key, column)) if c and not spec.column(c).pii]
    shown = shown or [c.name for c in spec.columns if not c.pii][:3]
    cols = ", ".join(quote(c) for c in shown)
    rows = con.execute(f"SELECT {cols} FROM {relation} WHERE {predicate} LIMIT {MAX_EXAMPLES}").fetchall()
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
            # NaN compares greater than every number in DuckDB: min/max bounds would not all catch it
            checks.append((col.name, "finite", f"NOT isfinite({q})", "value is NaN or infinite"))
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
) -> ValidatedTable:
    """Check one raw table against the contract; `customers` is the relation known customer ids come
    from (None: the known-customer rule is not evaluated)."""
    source = open_source(con, spec, raw_dir)
    if source is None:  # an optional table that was not delivered
        empty = ", ".join(f"CAST(NULL AS {c.sql_type}) AS {quote(c.name)}" for c in spec.staged_columns)
        return ValidatedTable(spec, f"SELECT {empty} LIMIT 0", "absent (optional table)", (), ())
    typed = _cast_to_contract(con, spec, source.relation, source.column_types)
    violations = _row_rule_violations(con, spec, typed, source.location, delivery_date)
    violations += _key_violations(con, spec, typed)
    violations += _unknown_customer_violations(con, spec, typed, customers)
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


def _cast_to_contract(con: duckdb.DuckDBPyConnection, spec: TableSpec, src: str, present: dict[str, str]) -> str:
    """A view of `src` with every contract column cast to its type (absent optional columns null);
    a column or value that cannot be cast is a type violation."""
    violations: list[Violation] = []
    select_parts, cast_checks = [], []
    for col in spec.columns:
        if col.name not in present:
            select_parts.append(f"CAST(NULL AS {col.sql_type}) AS {quote(col.name)}")
            continue
        expr = f"TRY_CAST({quote(col.name)} AS {col.sql_type})"
        try:
            con.execute(f"SELECT {expr} FROM {src} LIMIT 0")
        except duckdb.Error:
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
        counts = con.execute("SELECT " + ", ".join(f"count(*) FILTER (WHERE {bad})" for _, bad in cast_checks) + f" FROM {src}").fetchall()[0]
        for (col, bad), n_bad in zip(cast_checks, counts):
            if not n_bad:
                continue
            # the offending rows by key, plus the bad value unless the column is PII
            examples = _example_rows(con, spec, src, bad, col.name)
            violations.append(Violation(spec.name, col.name, "type", f"values are not valid {col.type}", int(n_bad), examples))
    if violations:
        raise ContractError(violations)
    typed = f"typed_{spec.name}"
    con.execute(f"CREATE OR REPLACE TEMP VIEW {typed} AS SELECT {', '.join(select_parts)} FROM {src}")
    return typed


def _row_rule_violations(con: duckdb.DuckDBPyConnection, spec: TableSpec, typed: str, location: str, delivery_date: date) -> list[Violation]:
    """Every row-level rule, counted in one scan; an empty table is an error of its own."""
    checks = _row_rules(spec, {c.name for c in spec.columns}, delivery_date)
    counts_sql = ", ".join([f"count(*) FILTER (WHERE {pred})" for _, _, pred, _ in checks] + ["count(*)"])
    counts = con.execute(f"SELECT {counts_sql} FROM {typed}").fetchall()[0]
    total = int(counts[-1])
    if total == 0:
        raise contract_error(spec, None, "non_empty", f"{location} has no rows")
    violations = []
    for (column, rule, predicate, description), n_bad in zip(checks, counts[:-1]):
        if n_bad:
            violations.append(Violation(spec.name, column, rule, description, int(n_bad), _example_rows(con, spec, typed, predicate, column)))
    return violations


def _key_violations(con: duckdb.DuckDBPyConnection, spec: TableSpec, typed: str) -> list[Violation]:
    if not spec.key:
        return []
    key = ", ".join(quote(k) for k in spec.key)
    dup_sql = f"SELECT {key}, count(*) AS n FROM {typed} GROUP BY ALL HAVING count(*) > 1"
    n_dup = con.execute(f"SELECT count(*) FROM ({dup_sql})").fetchall()[0][0]
    if not n_dup:
        return []
    rows = con.execute(f"{dup_sql} LIMIT {MAX_EXAMPLES}").fetchall()
    examples = tuple(dict(zip([*spec.key, "copies"], r)) for r in rows)
    return [Violation(spec.name, ",".join(spec.key), "unique_key", "key appears more than once", int(n_dup), examples)]


def _unknown_customer_violations(con: duckdb.DuckDBPyConnection, spec: TableSpec, typed: str, customers: str | None) -> list[Violation]:
    if not spec.references_customers or customers is None:
        return []
    orphan = f"customer_id NOT IN (SELECT customer_id FROM {customers})"
    n_orphan = con.execute(f"SELECT count(*) FROM {typed} WHERE {orphan}").fetchall()[0][0]
    if not n_orphan:
        return []
    examples = _example_rows(con, spec, typed, orphan, "customer_id")
    return [Violation(spec.name, "customer_id", "known_customer", "customer_id not in customers", int(n_orphan), examples)]


def write_staged(con: duckdb.DuckDBPyConnection, valid: ValidatedTable, target: Path) -> StagedTable:
    """Write a validated table (PII dropped, types cast) to `target`, atomically."""
    rows = write_parquet_atomically(con, valid.select_sql, target)
    return StagedTable(valid.spec.name, target, rows, valid.source, valid.dropped_pii, valid.ignored_columns)


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
    customers = None
    if spec.references_customers and find_source(raw_dir, spec.name) is not None:
        path = staged_path(staged_dir, CUSTOMERS.name)
        if not path.exists():
            raise contract_error(spec, "customer_id", "customers_staged_first", f"stage customers before {spec.name}")
        customers = f"read_parquet({sql_literal(path)})"
    valid = validate_table(con, spec, raw_dir, delivery_date, customers)
    return write_staged(con, valid, staged_path(staged_dir, spec.name))
