"""Load raw tables, validate them against the contract, and stage them as Parquet without PII.

Validation is set-based SQL in DuckDB so that tens of millions of transactions are checked without
loading them into pandas. On any violation a `ContractError` names the table, column, rule and
example rows (keys and the offending non-PII value), and nothing is written.

A delivery (every contract table of one raw directory) is staged as one unit by `stage_delivery`:
all tables are validated into a new *generation* directory, the cross-table rules run against the
delivered customers, and only then one atomic rename of a symlink (`<staged_dir>` ->
`.<staged_dir>.generations/<id>`) makes the new generation current. A crash at any point leaves the
previous generation current and complete; readers that resolve the link once (`current_generation`)
never mix two deliveries.
"""

import csv
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb
from filelock import FileLock

from features.contract import CUSTOMERS, RAW_TABLES, TableSpec
from tagml.core.settings import DEFAULT_TIMEZONE
from tagml.core.storage import quote, sql_literal, staged_path, write_parquet_atomically

MAX_EXAMPLES = 5
MAX_LINES_REPORTED = 10
# The current generation and the one before it: a reader that resolved the old link just before a
# swap can finish reading it.
KEEP_GENERATIONS = 2
STALE_BUILD_SECONDS = 6 * 3600


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


@dataclass(frozen=True)
class StagedDelivery:
    """Every table of one delivery, staged together into `generation`."""

    delivery_date: date
    generation: Path
    tables: dict[str, StagedTable]


def bank_today(timezone: str = DEFAULT_TIMEZONE) -> date:
    """Today's date in the bank's timezone (the default delivery date)."""
    return datetime.now(ZoneInfo(timezone)).date()


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


def _line_list(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:MAX_LINES_REPORTED])
    return shown + (f" and {len(lines) - MAX_LINES_REPORTED} more" if len(lines) > MAX_LINES_REPORTED else "")


def _csv_header(spec: TableSpec, location: str) -> tuple[list[str], str]:
    """The header's field names and the delimiter, read from the first line only.

    The header is parsed here rather than left to DuckDB's sniffer: a ragged row made the sniffer
    read the whole file as a single column, and every contract column was then reported missing
    (with the first line -- data, possibly names and phone numbers -- quoted as 'found columns').
    """
    try:
        with open(location, newline="", encoding="utf-8-sig") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(spec, None, "readable", f"cannot read the header line of {location} ({type(exc).__name__})") from exc
    try:
        delimiter = csv.Sniffer().sniff(first, delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = ","
    names = [n.strip() for n in next(csv.reader([first], delimiter=delimiter), [])]
    contract_names = {c.name for c in spec.columns}
    if not contract_names & set(names):
        raise _fail(spec, None, "header", f"the first line of {location} is not a header naming the contract's columns")
    duplicated = sorted({n for n in names if n in contract_names and names.count(n) > 1})
    if duplicated:
        raise _fail(spec, None, "header", f"{location}: columns {duplicated} appear more than once in the header")
    return names, delimiter


def _read_csv(con: duckdb.DuckDBPyConnection, spec: TableSpec, location: str, view: str) -> tuple[str, list[str]]:
    """Parse a CSV in full into a temporary table of text columns named after the contract.

    Columns are given to DuckDB by position (`c0`, `c1`, ...), so no text from the file is ever
    part of the SQL; rows whose field count differs from the header's are collected in a rejects
    table and reported by line number, never by content.
    """
    names, delimiter = _csv_header(spec, location)
    positional = ", ".join(f"'c{i}': 'VARCHAR'" for i in range(len(names)))
    rejects, scan = f"rej_{view}", f"rejscan_{view}"
    for table in (rejects, scan):
        con.execute(f"DROP TABLE IF EXISTS {table}")
    reader = (
        f"read_csv({sql_literal(location)}, header = true, skip = 0, auto_detect = false, "
        f"delim = {sql_literal(delimiter)}, quote = '\"', escape = '\"', columns = {{{positional}}}, "
        f"store_rejects = true, rejects_table = {sql_literal(rejects)}, rejects_scan = {sql_literal(scan)})"
    )
    contract_names = {c.name for c in spec.columns}
    select = ", ".join(f"c{i} AS {quote(n)}" for i, n in enumerate(names) if n in contract_names) or "NULL AS _none"
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE {view} AS SELECT {select} FROM {reader}")
        bad = con.execute(f"SELECT error_type::VARCHAR, list(DISTINCT line ORDER BY line) FROM {rejects} GROUP BY 1 ORDER BY 1").fetchall()
    except duckdb.Error as exc:
        # Only the first line of DuckDB's message: CSV errors go on to quote the offending row (PII).
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(spec, None, "readable", f"cannot read {location}: {reason}") from exc
    if bad:
        violations = []
        for error_type, lines in bad:
            lines = [int(n) for n in lines]
            if error_type in ("TOO MANY COLUMNS", "MISSING COLUMNS"):
                rule = "field_count"
                detail = f"{location}: lines {_line_list(lines)} do not have the header's {len(names)} fields ({error_type.lower()})"
            else:
                rule = "malformed_row"
                detail = f"{location}: lines {_line_list(lines)} cannot be parsed ({error_type.lower()})"
            violations.append(Violation(spec.name, None, rule, detail, len(lines)))
        raise ContractError(violations)
    ignored = [n for n in names if n not in contract_names]
    return view, ignored


def _read_source(con: duckdb.DuckDBPyConnection, spec: TableSpec, kind: str, location: str) -> tuple[str, list[str]]:
    """A relation over the raw table, and the names of columns the contract does not know."""
    view = f"src_{spec.name}_{kind}"  # a view over Parquet, a temporary table for CSV
    if kind == "csv":
        # A CSV is parsed once, in full, into a temporary table: a malformed row anywhere is a
        # contract error, and the checks that follow do not re-parse the text file each time.
        return _read_csv(con, spec, location, view)
    # a directory of parts is listed here, not globbed by DuckDB: its glob reads '[', '*', '?' and
    # '\\' in the directory's own path as pattern characters and then finds no files
    parts = sorted(Path(location).parent.glob("*.parquet")) if location.endswith("*.parquet") else [location]
    try:
        con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM read_parquet([{', '.join(sql_literal(part) for part in parts)}])")
        con.execute(f"SELECT * FROM {view} LIMIT 1").fetchall()
        names = [row[0] for row in con.execute(f"DESCRIBE {view}").fetchall()]
    except duckdb.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise _fail(spec, None, "readable", f"cannot read {location}: {reason}") from exc
    return view, [n for n in names if n not in {c.name for c in spec.columns}]


def _example_rows(con: duckdb.DuckDBPyConnection, spec: TableSpec, relation: str, predicate: str, column: str | None) -> tuple[dict, ...]:
    """A few offending rows, showing the key and the offending column but never PII."""
    shown = [c for c in dict.fromkeys((*spec.key, column)) if c and not spec.column(c).pii]
    shown = shown or [c.name for c in spec.columns if not c.pii][:3]
    cols = ", ".join(quote(c) for c in shown)
    rows = con.execute(f"SELECT {cols} FROM {relation} WHERE {predicate} LIMIT {MAX_EXAMPLES}").fetchall()
    return tuple({n: (v.isoformat() if hasattr(v, "isoformat") else v) for n, v in zip(shown, row)} for row in rows)


def _checks(spec: TableSpec, typed_columns: set[str], delivery_date: date) -> list[tuple[str | None, str, str, str]]:
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


@dataclass(frozen=True)
class _Validated:
    """A table that passed every rule: the SELECT of its staged columns and what to report."""

    spec: TableSpec
    select_sql: str
    source: str
    dropped_pii: tuple[str, ...]
    ignored_columns: tuple[str, ...]


def _validate(
    con: duckdb.DuckDBPyConnection,
    spec: TableSpec,
    raw_dir: Path,
    delivery_date: date,
    customers: str | None,
) -> _Validated:
    """Check one raw table against the contract; `customers` is the relation known customer ids come
    from (None: the known-customer rule is not evaluated)."""
    source = find_source(raw_dir, spec.name)
    if source is None:
        if not spec.optional:
            raise _fail(spec, None, "table_present", f"no {spec.name}.parquet, {spec.name}/ or {spec.name}.csv in {raw_dir}")
        empty = ", ".join(f"CAST(NULL AS {c.sql_type}) AS {quote(c.name)}" for c in spec.staged_columns)
        return _Validated(spec, f"SELECT {empty} LIMIT 0", "absent (optional table)", (), ())
    kind, location = source
    src, ignored = _read_source(con, spec, kind, location)
    present = {row[0]: row[1] for row in con.execute(f"DESCRIBE {src}").fetchall() if row[0] in {c.name for c in spec.columns}}

    missing = [c.name for c in spec.columns if c.required and c.name not in present]
    if missing:
        # The names found are not listed: in a file without a header they are a row of data.
        raise ContractError(
            [Violation(spec.name, m, "missing_column", f"required column is absent from {location} ({len(present)} contract columns found)") for m in missing]
        )

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

    checks = _checks(spec, {c.name for c in spec.columns}, delivery_date)
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

    if spec.references_customers and customers is not None:
        orphan = f"customer_id NOT IN (SELECT customer_id FROM {customers})"
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
    return _Validated(
        spec,
        f"SELECT {staged_cols} FROM {typed}",
        location,
        tuple(c for c in spec.pii_columns if c in present),
        tuple(sorted(ignored)),
    )


def _write(con: duckdb.DuckDBPyConnection, valid: _Validated, target: Path) -> StagedTable:
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
            raise _fail(spec, "customer_id", "customers_staged_first", f"stage customers before {spec.name}")
        customers = f"read_parquet({sql_literal(path)})"
    valid = _validate(con, spec, raw_dir, delivery_date, customers)
    return _write(con, valid, staged_path(staged_dir, spec.name))


# ---- deliveries: all tables or none ------------------------------------------------------------


def generations_dir(staged_dir: Path) -> Path:
    return staged_dir.parent / f".{staged_dir.name}.generations"


def current_generation(staged_dir: Path) -> Path:
    """The directory the staged tables are read from now.

    A reader that opens several staged tables should resolve this once and read every table from
    it: paths through `staged_dir` follow the link at each open, so a delivery swapped in between
    two opens would otherwise mix two deliveries.
    """
    return Path(staged_dir).resolve()


def _point(staged_dir: Path, generation: Path) -> None:
    """Make `staged_dir` a symlink to `generation` in one atomic rename."""
    link = staged_dir.parent / f".{staged_dir.name}.{uuid.uuid4().hex}.link"
    os.symlink(os.path.relpath(generation, staged_dir.parent), link, target_is_directory=True)
    try:
        os.replace(link, staged_dir)
    finally:
        if os.path.lexists(link):
            os.unlink(link)


def _complete_generations(gens: Path) -> list[Path]:
    return sorted(p for p in gens.iterdir() if p.is_dir() and not p.name.startswith(".")) if gens.exists() else []


def _new_generation_id() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _recover(staged_dir: Path) -> None:
    """Bring `staged_dir` to the generation layout (a symlink), whatever a crash left behind."""
    gens = generations_dir(staged_dir)
    if staged_dir.is_symlink():
        if staged_dir.exists():
            return
        staged_dir.unlink()  # a link to a generation someone deleted: fall back to the newest
    if staged_dir.is_dir():
        # tables staged before generations existed (or by `validate_and_stage` into a plain
        # directory): adopt them as the first generation
        gens.mkdir(parents=True, exist_ok=True)
        adopted = gens / _new_generation_id()
        os.rename(staged_dir, adopted)
        _point(staged_dir, adopted)
        return
    complete = _complete_generations(gens)
    if complete:  # a crash between adopting a plain directory and linking it
        _point(staged_dir, complete[-1])


def _prune(staged_dir: Path) -> None:
    gens = generations_dir(staged_dir)
    current = current_generation(staged_dir)
    complete = _complete_generations(gens)
    keep = {current, *complete[-KEEP_GENERATIONS:]}
    for old in complete:
        if old.resolve() not in {k.resolve() for k in keep}:
            shutil.rmtree(old, ignore_errors=True)
    now = time.time()
    for building in gens.glob(".building-*"):
        try:
            if now - building.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(building, ignore_errors=True)
        except FileNotFoundError:
            pass


def stage_delivery(
    con: duckdb.DuckDBPyConnection,
    raw_dir: Path,
    staged_dir: Path,
    delivery_date: date | None = None,
    timezone: str = DEFAULT_TIMEZONE,
) -> StagedDelivery:
    """Validate every contract table of `raw_dir` and stage them all together, or none of them.

    Each table is validated and written into a new generation directory; the known-customer rule
    runs against the *delivered* customers; violations of every table are reported together. Only
    when all tables are valid does one atomic rename make the new generation current, so what was
    staged before stays byte-identical on any failure. `delivery_date` (default: today in
    `timezone`) bounds every date: nothing may happen after the data was delivered.
    """
    delivery_date = delivery_date or bank_today(timezone)
    staged_dir = Path(staged_dir)
    gens = generations_dir(staged_dir)
    gens.mkdir(parents=True, exist_ok=True)
    with FileLock(str(gens / ".lock")):
        _recover(staged_dir)
        gen_id = _new_generation_id()
        building = gens / f".building-{gen_id}"
        building.mkdir()
        try:
            violations: list[Violation] = []
            tables: dict[str, StagedTable] = {}
            customers: str | None = None
            for spec in RAW_TABLES:  # customers first: the others are checked against it
                try:
                    valid = _validate(con, spec, raw_dir, delivery_date, customers)
                except ContractError as err:
                    violations.extend(err.violations)
                    continue
                tables[spec.name] = _write(con, valid, staged_path(building, spec.name))
                if spec is CUSTOMERS:
                    customers = f"read_parquet({sql_literal(tables[spec.name].path)})"
            if CUSTOMERS.name not in tables and violations:
                checked = ", ".join(s.name for s in RAW_TABLES if s.references_customers)
                violations.append(
                    Violation(CUSTOMERS.name, None, "known_customer_not_checked", f"customers are invalid, so {checked} were not checked against them")
                )
            if violations:
                raise ContractError(violations)
            generation = gens / gen_id
            os.rename(building, generation)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        # The one step that publishes the delivery: before it the old generation is current,
        # after it the new one; no reader ever sees part of each.
        _point(staged_dir, generation)
        _prune(staged_dir)
    staged = {name: StagedTable(t.table, staged_path(staged_dir, name), t.rows, t.source, t.dropped_pii, t.ignored_columns) for name, t in tables.items()}
    return StagedDelivery(delivery_date, generation, staged)
