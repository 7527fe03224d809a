"""Looking for customers in every store of a home, decoded: the verification step of an erasure.

Each file under the home's stores is read as what it is: Parquet (every string column, through DuckDB),
SQLite (every value of every table, plus the file's raw pages and its journal, where deleted rows
linger), a DuckDB database (its tables' string columns), a zip archive (an MLflow model: each member),
anything else as bytes (HTML, JSON, YAML, logs, pickles). An id counts where it appears as a whole
token (not inside a longer id). Only counts leave this module: never an id, never the matching text.
"""

import re
import sqlite3
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from tagml.core.settings import Settings
from tagml.core.storage import WarehouseLayout, connect, quote, sql_literal
from tagml.features.delivery import generations_dir

ERASED_IDS_VIEW = "erased_customer_ids"
SQLITE_MAGIC = b"SQLite format 3\x00"
PARQUET_MAGIC = b"PAR1"
DUCKDB_MAGIC = b"DUCK"
# places that hold ids on purpose and are not part of the verification: the bank's own delivery (tagml reads it,
# never writes it) and the erasure job's pending request files (deleted by the job once the erasure is verified)
UNVERIFIED_STORES = ("raw delivery", "erasure requests")
REQUESTS_DIR = "erasure_requests"  # the erasure job's request files, under the governance directory: ids stay out of Dagster's run config


ONLINE_STORE = "online tag store"
AUDIENCE_EXPORTS = "audience exports"  # the audience files tagml writes under its home (tagml.serving.audiences)


class ScanError(RuntimeError):
    """A store could not be read to look for customers (names the file); the erasure is then not verified."""


@dataclass(frozen=True)
class Store:
    name: str
    root: Path


def home_stores(settings: Settings) -> list[Store]:
    """Every place tagml writes under a home, most specific first (a file belongs to the first store that holds it)."""
    warehouse = settings.warehouse_dir
    stores = [
        Store("staged raw tables", generations_dir(WarehouseLayout(warehouse).staged_dir)),
        Store("customer_features", warehouse / "customer_features"),
        Store("customer_tags", warehouse / "customer_tags"),
        Store("training_sets", warehouse / "training_sets"),
        Store("own_features", warehouse / "own_features"),
        Store("monthly_aggregates", WarehouseLayout(warehouse).aggregates_dir),
        Store("drift", settings.drift_dir),
        Store("duckdb", settings.duckdb_path),
        Store("warehouse (other files)", warehouse),
        Store("evidently reports", settings.reports_dir),
        Store("mlflow artifacts", settings.mlflow_artifact_dir),
        Store("dagster", settings.dagster_home),
        Store(AUDIENCE_EXPORTS, settings.audiences_dir),
        Store("erasure requests", settings.governance_db.parent / REQUESTS_DIR),
        Store("governance", settings.governance_db.parent),
        Store("raw delivery", settings.raw_dir),
    ]
    db = settings.embedded_tracking_db
    if db is not None:
        stores.insert(0, Store("mlflow tracking db", db))
    online = settings.online_store_path
    if online is not None:  # the embedded online store's SQLite file (a Postgres one is asked by `scan_home`)
        stores.insert(0, Store(ONLINE_STORE, online))
    return stores


def id_pattern(customer_ids: Sequence[str]) -> re.Pattern[bytes]:
    """The ids as whole tokens, in bytes (UTF-8): not preceded or followed by a letter, digit or underscore."""
    alternatives = b"|".join(re.escape(c.encode("utf-8")) for c in sorted(set(customer_ids), key=len, reverse=True))
    return re.compile(rb"(?<![A-Za-z0-9_])(?:" + alternatives + rb")(?![A-Za-z0-9_])")


def store_files(stores: list[Store]) -> Iterator[tuple[Store, Path]]:
    """Every regular file of every store, once (the first store holding it); symlinks are not followed."""
    seen: set[Path] = set()
    for store in stores:
        root = Path(store.root)
        files = [root] if root.is_file() else (p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()) if root.is_dir() else []
        for path in files:
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                yield store, path


def register_ids(con: duckdb.DuckDBPyConnection, customer_ids: Sequence[str]) -> None:
    con.register(ERASED_IDS_VIEW, pa.table({"customer_id": pa.array(sorted(set(customer_ids)), pa.string())}))


def table_sql(path: Path) -> str:
    """A DuckDB relation over one rewritable file: Parquet, or a CSV audience export read as text (its header names the columns)."""
    if path.suffix == ".csv":
        return f"read_csv({sql_literal(path)}, all_varchar = true, header = true)"
    return f"read_parquet({sql_literal(path)})"


def _string_columns(path: Path) -> list[str]:
    if path.suffix == ".csv":
        with closing(duckdb.connect()) as con:
            return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {table_sql(path)}").fetchall()]
    schema = pq.read_schema(path)
    return [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_dictionary(f.type)]


def parquet_match_sql(path: Path) -> str | None:
    """A predicate true for the rows of the Parquet file where any string column holds an erased id (None: no string column)."""
    names = _string_columns(path)
    if not names:
        return None
    return " OR ".join(f"coalesce({quote(n)}::VARCHAR IN (SELECT {ids} FROM {ERASED_IDS_VIEW}), false)" for n in names for ids in _forms(path))


GUARDED_ID = "'''' || customer_id"  # an erased id behind the `'` an export puts before a formula-like cell


def _forms(path: Path) -> tuple[str, ...]:
    """How an erased id appears in a file's cells: as itself, and in a CSV export also behind the `'` that guards
    a cell starting like a spreadsheet formula (scoring/store.py's FORMULA_PREFIXES)."""
    return ("customer_id", GUARDED_ID) if path.suffix == ".csv" else ("customer_id",)


def _guarded_cells(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """Cells of a CSV file holding an erased id behind the formula guard (0 when it is not a table with a header)."""
    try:
        names = _string_columns(path)
    except duckdb.Error:
        return 0
    if not names:
        return 0
    cells = " + ".join(f"count_if({quote(n)} IN (SELECT {GUARDED_ID} FROM {ERASED_IDS_VIEW}))" for n in names)
    return int(con.execute(f"SELECT {cells} FROM {table_sql(path)}").fetchall()[0][0])


def parquet_ids_found(con: duckdb.DuckDBPyConnection, path: Path) -> set[str]:
    """Which erased ids the Parquet file holds (kept in memory by the caller, never logged)."""
    names = _string_columns(path)
    if not names:
        return set()
    on = " OR ".join(f"t.{quote(n)}::VARCHAR = {form.replace('customer_id', 'e.customer_id')}" for n in names for form in _forms(path))
    rows = con.execute(f"SELECT DISTINCT e.customer_id FROM {ERASED_IDS_VIEW} e JOIN {table_sql(path)} t ON {on}").fetchall()
    return {r[0] for r in rows}


def parquet_hits(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    match = parquet_match_sql(path)
    if match is None:
        return 0
    return int(con.execute(f"SELECT count(*) FROM {table_sql(path)} WHERE {match}").fetchall()[0][0])


def _sqlite_hits(path: Path, pattern: re.Pattern[bytes]) -> int:
    hits = 0
    for raw in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-journal")):
        if raw.exists():
            hits += len(pattern.findall(raw.read_bytes()))
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in con.execute(f"SELECT * FROM {quote(table)}"):
                for value in row:
                    if isinstance(value, str):
                        value = value.encode("utf-8")
                    if isinstance(value, bytes) and pattern.search(value):
                        hits += len(pattern.findall(value))
    finally:
        con.close()
    return hits


def _duckdb_hits(path: Path, customer_ids: Sequence[str]) -> int:
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:
        raise ScanError(f"the DuckDB file {path} cannot be opened read-only to look for erased customers ({type(exc).__name__})") from exc
    try:
        register_ids(con, customer_ids)
        hits = 0
        columns = con.execute(
            "SELECT table_name, column_name FROM duckdb_columns() WHERE NOT internal AND data_type = 'VARCHAR' AND database_name = current_database()"
        )
        for table, column in columns.fetchall():
            kind = con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND database_name = current_database()", [table]).fetchall()[0][0]
            if kind:  # base tables only: the views read the Parquet files scanned as such
                hits += con.execute(f"SELECT count(*) FROM {quote(table)} WHERE {quote(column)} IN (SELECT customer_id FROM {ERASED_IDS_VIEW})").fetchall()[0][
                    0
                ]
        return int(hits)
    finally:
        con.close()


def file_hits(con: duckdb.DuckDBPyConnection, path: Path, customer_ids: Sequence[str], pattern: re.Pattern[bytes]) -> int:
    """How often the erased ids appear in one file, read as what it is."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    try:
        if head.startswith(PARQUET_MAGIC):
            return parquet_hits(con, path)
        if head.startswith(SQLITE_MAGIC):
            return _sqlite_hits(path, pattern)
        if head[8:12] == DUCKDB_MAGIC:
            return _duckdb_hits(path, customer_ids)
        if path.suffix == ".csv":  # the bytes, and the cells an export guarded (CSV-quoted: no byte match)
            return len(pattern.findall(path.read_bytes())) + _guarded_cells(con, path)
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return sum(len(pattern.findall(archive.read(member))) for member in archive.namelist())
        return len(pattern.findall(path.read_bytes()))
    except (OSError, duckdb.Error, sqlite3.Error, zipfile.BadZipFile, pa.ArrowException) as exc:
        raise ScanError(f"{path} cannot be read to look for erased customers ({type(exc).__name__})") from exc


@dataclass(frozen=True)
class ScanResult:
    hits: dict[str, int]  # store -> occurrences of the erased ids
    files: dict[str, int]  # store -> files read
    files_with_hits: dict[str, list[Path]]

    def tagml_hits(self) -> int:
        return sum(n for store, n in self.hits.items() if store not in UNVERIFIED_STORES)


def scan_home(settings: Settings, customer_ids: Sequence[str], con: duckdb.DuckDBPyConnection | None = None) -> ScanResult:
    """Every file of every store of the home, decoded, searched for the ids."""
    if not customer_ids:
        raise ValueError("no customer ids to look for")
    pattern = id_pattern(customer_ids)
    own = con is None
    con = con or connect(settings.threads, settings.duckdb_memory_limit)
    hits: dict[str, int] = {}
    files: dict[str, int] = {}
    with_hits: dict[str, list[Path]] = {}
    try:
        register_ids(con, customer_ids)
        stores = home_stores(settings)
        for store in stores:
            hits.setdefault(store.name, 0)
            files.setdefault(store.name, 0)
        for store, path in store_files(stores):
            n = file_hits(con, path, customer_ids, pattern)
            files[store.name] += 1
            hits[store.name] += n
            if n:
                with_hits.setdefault(store.name, []).append(path)
        if settings.online_store_path is None:
            hits[ONLINE_STORE] = _online_database_hits(settings, customer_ids)
    finally:
        if own:
            con.close()
    return ScanResult(hits, files, with_hits)


def _online_database_hits(settings: Settings, customer_ids: Sequence[str]) -> int:
    """Customers of the ids the online store's database (Postgres) still answers for."""
    from tagml.scoring.online import OnlineStoreError, open_online_store

    online = open_online_store(settings.online_store)
    try:
        return len(online.customers(list(customer_ids)))
    except OnlineStoreError:  # never loaded: it holds nobody
        return 0
    finally:
        online.close()


def scan_for_customers(settings: Settings, customer_ids: Sequence[str]) -> dict[str, int]:
    """Store -> occurrences of the ids in it (0 everywhere once they are erased, except the bank's raw delivery)."""
    return scan_home(settings, customer_ids).hits
