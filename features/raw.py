"""Read a raw table as the contract names it, and the errors that say how raw data breaks the contract.

A table is found as `<t>.parquet`, `<t>/*.parquet` or `<t>.csv` in the raw directory; a CSV is
parsed in full with columns given by position, so no text from the file is ever part of the SQL.
Validation against the contract is `tagml.features.validation`; staging a whole delivery all or nothing
is `tagml.features.delivery`.
"""

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import duckdb

from tagml.core.settings import DEFAULT_TIMEZONE
from tagml.core.storage import quote, sql_literal
from tagml.features.checks import QualityCheck
from tagml.features.contract import TableSpec

MAX_LINES_REPORTED = 10
# what the raw_* assets' one check reports: a ContractError fails it
CONTRACT_CHECK = QualityCheck("contract", "Every column, type, allowed value, key and rule of the contract holds.")


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


def contract_error(spec: TableSpec, column: str | None, rule: str, detail: str, **kw: Any) -> ContractError:
    """The error of one violation of `spec`."""
    return ContractError([Violation(spec.name, column, rule, detail, **kw)])


def _unreadable(spec: TableSpec, location: str, exc: duckdb.Error) -> ContractError:
    # Only the first line of DuckDB's message: CSV errors go on to quote the offending row (PII).
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return contract_error(spec, None, "readable", f"cannot read {location}: {reason}")


def _line_list(lines: list[int]) -> str:
    shown = ", ".join(str(n) for n in lines[:MAX_LINES_REPORTED])
    return shown + (f" and {len(lines) - MAX_LINES_REPORTED} more" if len(lines) > MAX_LINES_REPORTED else "")


def csv_header(spec: TableSpec, location: str) -> tuple[list[str], str]:
    """The header's field names and the delimiter, read from the first line only.

    The header is parsed here rather than left to DuckDB's sniffer: a ragged row made the sniffer
    read the whole file as a single column, and every contract column was then reported missing
    (with the first line -- data, possibly names and phone numbers -- quoted as 'found columns').
    """
    try:
        with open(location, newline="", encoding="utf-8-sig") as fh:
            first = fh.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise contract_error(spec, None, "readable", f"cannot read the header line of {location} ({type(exc).__name__})") from exc
    try:
        delimiter = csv.Sniffer().sniff(first, delimiters=",;\t|").delimiter
    except csv.Error:
        delimiter = ","
    names = [n.strip() for n in next(csv.reader([first], delimiter=delimiter), [])]
    contract_names = {c.name for c in spec.columns}
    if not contract_names & set(names):
        raise contract_error(spec, None, "header", f"the first line of {location} is not a header naming the contract's columns")
    duplicated = sorted({n for n in names if n in contract_names and names.count(n) > 1})
    if duplicated:
        raise contract_error(spec, None, "header", f"{location}: columns {duplicated} appear more than once in the header")
    return names, delimiter


def _read_csv(con: duckdb.DuckDBPyConnection, spec: TableSpec, location: str, view: str) -> tuple[str, list[str]]:
    """Parse a CSV in full into a temporary table of text columns named after the contract.

    Columns are given to DuckDB by position (`c0`, `c1`, ...), so no text from the file is ever
    part of the SQL; rows whose field count differs from the header's are collected in a rejects
    table and reported by line number, never by content.
    """
    names, delimiter = csv_header(spec, location)
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
        raise _unreadable(spec, location, exc) from exc
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
        raise _unreadable(spec, location, exc) from exc
    return view, [n for n in names if n not in {c.name for c in spec.columns}]


@dataclass(frozen=True)
class RawSource:
    """A raw table opened for validation: the relation over it and what its columns are."""

    relation: str
    location: str
    column_types: dict[str, str]  # contract columns present -> the source's type
    ignored_columns: list[str]  # columns the contract does not know


def locate_source(spec: TableSpec, raw_dir: Path) -> tuple[str, str] | None:
    """(kind, location) of the table's raw files (`find_source`); None for an optional table that was not delivered."""
    source = find_source(raw_dir, spec.name)
    if source is None and not spec.optional:
        raise contract_error(spec, None, "table_present", f"no {spec.name}.parquet, {spec.name}/ or {spec.name}.csv in {raw_dir}")
    return source


def open_source(con: duckdb.DuckDBPyConnection, spec: TableSpec, raw_dir: Path) -> RawSource | None:
    """The raw table of `spec` in `raw_dir` with every required column present, or None for an
    optional table that was not delivered."""
    source = locate_source(spec, raw_dir)
    if source is None:
        return None
    kind, location = source
    src, ignored = _read_source(con, spec, kind, location)
    present = {row[0]: row[1] for row in con.execute(f"DESCRIBE {src}").fetchall() if row[0] in {c.name for c in spec.columns}}
    return required_columns_present(spec, RawSource(src, location, present, ignored))


def required_columns_present(spec: TableSpec, source: RawSource) -> RawSource:
    """`source`, if it has every required column of `spec`; else a `missing_column` violation per absent column."""
    missing = [c.name for c in spec.columns if c.required and c.name not in source.column_types]
    if missing:
        # The names found are not listed: in a file without a header they are a row of data.
        raise ContractError(
            [
                Violation(
                    spec.name, m, "missing_column", f"required column is absent from {source.location} ({len(source.column_types)} contract columns found)"
                )
                for m in missing
            ]
        )
    return source


def open_dated_source(con: duckdb.DuckDBPyConnection, spec: TableSpec, inputs: Sequence[Any], period_sql: str) -> RawSource:
    """The dated raw files `inputs` (tagml.features.manifest.RawInput: path, relpath, kind, period) of one event
    table as one relation, with every required column present, after checking that every row of each file falls
    in the file's period (`period_sql`: a row's period in SQL, NULL when unreadable; the type rule reports those).

    Parquet files are read together (by name); each CSV is parsed in full as in `open_source`.
    """
    parquet = [item for item in inputs if item.kind == "parquet"]
    selects = []
    if parquet:
        view = f"src_{spec.name}_dated_parquet"
        files = ", ".join(sql_literal(item.path) for item in parquet)
        try:
            con.execute(f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM read_parquet([{files}], union_by_name = true, filename = '__tagml_file')")
            con.execute(f"SELECT * FROM {view} LIMIT 1").fetchall()
        except duckdb.Error as exc:
            raise _unreadable(spec, f"{spec.name}/ ({len(parquet)} dated Parquet files)", exc) from exc
        selects.append(f"SELECT * FROM {view}")
    for i, item in enumerate(item for item in inputs if item.kind == "csv"):
        table, _ = _read_csv(con, spec, str(item.path), f"src_{spec.name}_dated_csv{i}")
        selects.append(f"SELECT *, {sql_literal(item.path)} AS __tagml_file FROM {table}")
    union = f"src_{spec.name}_dated"
    con.execute(f"CREATE OR REPLACE TEMP VIEW {union} AS {' UNION ALL BY NAME '.join(selects)}")
    names = [row[0] for row in con.execute(f"DESCRIBE {union}").fetchall()]
    column = spec.event_time
    if column in names:
        periods = ", ".join(f"({sql_literal(item.path)}, DATE {sql_literal(item.period.isoformat())}, {sql_literal(item.relpath)})" for item in inputs)
        outside = con.execute(
            f"SELECT f.relpath, f.period, count(*) FROM {union} AS s JOIN (VALUES {periods}) AS f(path, period, relpath) ON s.__tagml_file = f.path "
            f"WHERE {period_sql} IS NOT NULL AND {period_sql} <> f.period GROUP BY 1, 2 ORDER BY 1"
        ).fetchall()
        if outside:
            raise ContractError(
                [
                    Violation(spec.name, column, "in_period", f"{relpath}: rows whose {column} is not in the file's period {period.isoformat()}", int(n))
                    for relpath, period, n in outside
                ]
            )
    source = f"src_{spec.name}_dated_rows"
    con.execute(f"CREATE OR REPLACE TEMP VIEW {source} AS SELECT * EXCLUDE (__tagml_file) FROM {union}")
    contract_names = {c.name for c in spec.columns}
    described = con.execute(f"DESCRIBE {source}").fetchall()
    present = {row[0]: row[1] for row in described if row[0] in contract_names}
    ignored = [row[0] for row in described if row[0] not in contract_names]
    location = inputs[0].relpath if len(inputs) == 1 else f"{spec.name}/ ({len(inputs)} dated files, {inputs[0].period} to {inputs[-1].period})"
    return required_columns_present(spec, RawSource(source, location, present, ignored))
