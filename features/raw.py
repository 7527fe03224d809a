"""Load raw tables, validate them against the contract, and stage them as Parquet without PII.

Validation is set-based SQL in DuckDB so that tens of millions of transactions are checked without
loading them into pandas. A table is either staged whole or not at all: on any violation a
`ContractError` names the table, column, rule and example rows, and nothing is written.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from features.contract import CUSTOMERS, TableSpec
from features.warehouse import quote, sql_literal, staged_path, write_parquet_atomically

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Violation:
    table: str
    column: str | None
    rule: str
    detail: str
    n_rows: int = 0
    examples: tuple[dict[str, Any], ...] = ()

    def __str__(self) -> str:
        where = f"{self.table}.{self.column}" if self.column else self.table
        text = f"[{where}] {self.rule}: {self.detail}"
        if self.n_rows:
            text += f" ({self.n_rows} rows)"
        if self.examples:
            text += "; e.g. " + "; ".join(str(e) for e in self.examples)
        return text


class ContractError(ValueError):
    """Raw data violates the contract. `violations` lists every problem found."""

    def __init__(self, violations: list[Violation]):
        self.violations = violations
        super().__init__("raw data contract violated:\n  " + "\n  ".join(str(v) for v in violations))


@dataclass(frozen=True)
class StagedTable:
    table: str
    path: Path
    rows: int
    source: str
    dropped_pii: tuple[str, ...] = ()
    ignored_columns: tuple[str, ...] = ()
    stats: dict[str, Any] = field(default_factory=dict)


def find_source(raw_dir: Path, table: str) -> tuple[str, str] | None:
    """Locate a table in the raw directory: `<t>.parquet`, `<t>/*.parquet` or `<t>.csv`."""
    single = raw_dir / f"{table}.parquet"
    parts = raw_dir / table
    csv = raw_dir / f"{table}.csv"
    if single.is_file():
        return "parquet", str(single)
    if parts.is_dir() and any(parts.glob("*.parquet")):
        return "parquet", str(parts / "*.parquet")
    if csv.is_file():
        return "csv", str(csv)
    return None


def _fail(spec: TableSpec, column: str | None, rule: str, detail: str, **kw: Any) -> ContractError:
    return ContractError([Violation(spec.name, column, rule, detail, **kw)])


def _read_source(con: duckdb.DuckDBPyConnection, spec: TableSpec, kind: str, location: str) -> str:
    view = f"src_{spec.name}_{kind}"  # a view over Parquet, a temporary table for CSV
    # skip = 0: the header is the first line. Left to the sniffer, a malformed last row can be taken
    # for the header, and its values (names, phone numbers) would be reported as column names.
    # a directory of parts is listed here, not globbed by DuckDB: its glob reads '[', '*', '?' and
    # '\\' in the directory's own path as pattern characters and then finds no files
    parts = sorted(Path(location).parent.glob("*.parquet")) if kind == "parquet" and location.endswith("*.parquet") else [location]
    reader = (
        f"read_parquet([{', '.join(sql_literal(part) for part in parts)}])"
        if kind == "parquet"
        else f"read_csv({sql_literal(location)}, header = true, all_varchar = true, skip = 0)"
    )
    # A CSV is parsed once, in full, into a temporary table: a malformed row anywhere is a contract
    # error, and the checks that follow do not re-sniff and re-parse the text file each time.
    create = (
        f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM {reader}"
        if kind == "parquet"
        else f"CREATE OR REPLACE TEMP TABLE {view} AS SELECT * FROM {reader}"
    )
    try:
        con.execute(create)
        con.execute(f"SELECT * FROM {view} LIMIT 1").fetchall()
    except duckdb.Error as exc:
        # Only the first line of DuckDB's message: CSV errors go on to quote the offending row (PII).
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(spec, None, "readable", f"cannot read {location}: {reason}") from exc
    return view


def _example_rows(con: duckdb.DuckDBPyConnection, spec: TableSpec, relation: str, predicate: str, column: str | None) -> tuple[dict, ...]:
    """A few offending rows, showing the key and the offending column but never PII."""
    shown = [c for c in dict.fromkeys((*spec.key, column)) if c and not spec.column(c).pii]
    shown = shown or [c.name for c in spec.columns if not c.pii][:3]
    cols = ", ".join(quote(c) for c in shown)
    rows = con.execute(f"SELECT {cols} FROM {relation} WHERE {predicate} LIMIT {MAX_EXAMPLES}").fetchall()
    return tuple({n: (v.isoformat() if hasattr(v, "isoformat") else v) for n, v in zip(shown, row)} for row in rows)


def _checks(spec: TableSpec, typed_columns: set[str]) -> list[tuple[str | None, str, str, str]]:
    """(column, rule, bad-row predicate, description) for every row-level rule of the table."""
    checks: list[tuple[str | None, str, str, str]] = []
    for col in spec.columns:
        if col.name not in typed_columns:
            continue
        q = quote(col.name)
        if not col.nullable:
            checks.append((col.name, "not_null", f"{q} IS NULL", "value is missing"))
        if col.allowed:
            allowed = ", ".join(sql_literal(v) for v in col.allowed)
            checks.append((col.name, "allowed_values", f"{q} NOT IN ({allowed})", f"value not in {list(col.allowed)}"))
        for bound, op in ((col.min, "<"), (col.max, ">")):
            if bound is None:
                continue
            literal = f"DATE {sql_literal(bound)}" if col.type == "date" else str(bound)
            name = "min" if op == "<" else "max"
            checks.append((col.name, name, f"{q} {op} {literal}", f"value {op} {bound}"))
    for rule in spec.rules:
        checks.append((rule.column, rule.name, f"NOT ({rule.sql})", rule.description))
    return checks


def validate_and_stage(
    con: duckdb.DuckDBPyConnection,
    spec: TableSpec,
    raw_dir: Path,
    staged_dir: Path,
) -> StagedTable:
    """Validate one raw table and write it, PII dropped and types cast, to `staged_dir/<table>.parquet`.

    Tables that reference customers are checked against the already staged customers table.
    """
    source = find_source(raw_dir, spec.name)
    target = staged_path(staged_dir, spec.name)
    if source is None:
        if not spec.optional:
            raise _fail(spec, None, "table_present", f"no {spec.name}.parquet, {spec.name}/ or {spec.name}.csv in {raw_dir}")
        empty = ", ".join(f"CAST(NULL AS {c.sql_type}) AS {quote(c.name)}" for c in spec.staged_columns)
        rows = write_parquet_atomically(con, f"SELECT {empty} LIMIT 0", target)
        return StagedTable(spec.name, target, rows, source="absent (optional table)")
    kind, location = source
    src = _read_source(con, spec, kind, location)
    present = {row[0]: row[1] for row in con.execute(f"DESCRIBE {src}").fetchall()}

    missing = [c.name for c in spec.columns if c.required and c.name not in present]
    if missing:
        raise ContractError(
            [Violation(spec.name, m, "missing_column", f"required column is absent (found: {sorted(present)})") for m in missing]
        )
    ignored = tuple(sorted(set(present) - {c.name for c in spec.columns}))

    # Cast every contract column; a value that fails the cast is a type violation.
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
            violations.append(
                Violation(spec.name, col.name, "type", f"source type {present[col.name]} cannot be read as {col.type}")
            )
            continue
        select_parts.append(f"{expr} AS {quote(col.name)}")
        bad = f"{quote(col.name)} IS NOT NULL AND {expr} IS NULL"
        if col.type == "int":  # the cast rounds: 1.5 children would silently become 2
            bad = f"{quote(col.name)} IS NOT NULL AND ({expr} IS NULL OR TRY_CAST({quote(col.name)} AS DOUBLE) <> {expr})"
        cast_checks.append((col, bad))
    if violations:
        raise ContractError(violations)
    if cast_checks:
        counts = con.execute(
            "SELECT " + ", ".join(f"count(*) FILTER (WHERE {bad})" for _, bad in cast_checks) + f" FROM {src}"
        ).fetchall()[0]
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

    checks = _checks(spec, {c.name for c in spec.columns})
    counts_sql = ", ".join([f"count(*) FILTER (WHERE {pred})" for _, _, pred, _ in checks] + ["count(*)"])
    counts = con.execute(f"SELECT {counts_sql} FROM {typed}").fetchall()[0]
    total = int(counts[-1])
    if total == 0:
        raise _fail(spec, None, "non_empty", f"{location} has no rows")
    for (column, rule, predicate, description), n_bad in zip(checks, counts[:-1]):
        if n_bad:
            violations.append(
                Violation(spec.name, column, rule, description, int(n_bad), _example_rows(con, spec, typed, predicate, column))
            )

    if spec.key:
        key = ", ".join(quote(k) for k in spec.key)
        dup_sql = f"SELECT {key}, count(*) AS n FROM {typed} GROUP BY ALL HAVING count(*) > 1"
        n_dup = con.execute(f"SELECT count(*) FROM ({dup_sql})").fetchall()[0][0]
        if n_dup:
            rows = con.execute(f"{dup_sql} LIMIT {MAX_EXAMPLES}").fetchall()
            examples = tuple(dict(zip([*spec.key, "copies"], r)) for r in rows)
            violations.append(
                Violation(spec.name, ",".join(spec.key), "unique_key", "key appears more than once", int(n_dup), examples)
            )

    if spec.references_customers:
        customers = staged_path(staged_dir, CUSTOMERS.name)
        if not customers.exists():
            raise _fail(spec, "customer_id", "customers_staged_first", f"stage customers before {spec.name}")
        orphan = f"customer_id NOT IN (SELECT customer_id FROM read_parquet({sql_literal(customers)}))"
        n_orphan = con.execute(f"SELECT count(*) FROM {typed} WHERE {orphan}").fetchall()[0][0]
        if n_orphan:
            violations.append(
                Violation(
                    spec.name, "customer_id", "known_customer", "customer_id not in customers", int(n_orphan),
                    _example_rows(con, spec, typed, orphan, "customer_id"),
                )
            )
    if violations:
        raise ContractError(violations)

    staged_cols = ", ".join(quote(c.name) for c in spec.staged_columns)
    rows = write_parquet_atomically(con, f"SELECT {staged_cols} FROM {typed}", target)
    return StagedTable(
        table=spec.name,
        path=target,
        rows=rows,
        source=location,
        dropped_pii=tuple(c for c in spec.pii_columns if c in present),
        ignored_columns=ignored,
    )
