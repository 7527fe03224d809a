"""The online tag store: one partition of the tag store, keyed by customer id, for lookups in well under a millisecond.

The tag store (`ParquetTagStore`) is columnar and partitioned: right for scoring, drift and audiences,
but one customer's lookup over a 1M-customer Parquet file costs tens of milliseconds. After each
nightly scoring run the newest partition is loaded here: one row per customer holding the JSON of
all its tag rows, plus the partition's metadata and per-tag quality.

`SQLiteOnlineStore` (the embedded default) builds a complete new SQLite file beside the current one
and swaps it in with `os.replace`: a reader sees the old file or the new one, never a half-loaded
store. Readers open the file read-only and immutable (no locks: the file under a name never changes,
a refresh only replaces the name), and reopen it when the name points to a new file.

Every tag is loaded, published or not, confidential or not: what a caller may see is decided by the
caller (the API's scopes, the tag lifecycle), at read time, so a publication takes effect at once.
"""

import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from tagml.core.storage import atomic_replace
from tagml.scoring.store import TagStore

if TYPE_CHECKING:
    from tagml.training.catalog import Catalog

SCHEMA_VERSION = "2"
# the fields of each tag entry, in the order the tag store's rows have them (scoring/lookup.py's TAG_FIELDS + maps)
ENTRY_FIELDS = (
    "tag",
    "value",
    "probability",
    "probabilities",
    "reasons",
    "source",
    "producer",
    "model_version",
    "mlflow_run_id",
    "observed_value",
    "inferred_value",
    "observed_mismatch",
    "assessment",
    "assessed_on",
    "inferred_as_of",
)
INSERT_BATCH = 100_000
# tag rows sorted at a time: each range of customers is sorted and grouped on its own, so memory stays near
# ROWS_PER_BUCKET rows of JSON (a whole 1M-customer partition sorted at once needs ~3 GB)
ROWS_PER_BUCKET = 1_000_000
# A tag is stale when its as_of is older than its catalog cadence allows: the cadence's period plus a day for
# the nightly run that scores it (the catalog's `refresh`, read when quality is shown; the cadence lives there only).
REFRESH_MAX_AGE_DAYS = {"daily": 2, "weekly": 8, "monthly": 32, "quarterly": 93}
# the file's tables: rows of ~2 KB do not suit a WITHOUT ROWID b-tree (overflow pages doubled the file and
# quadrupled the insert time at 1M customers), so customers is a rowid table with a unique index; big pages
# keep a row on one page
CREATE_TABLES = (
    "PRAGMA page_size = 65536; PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
    "CREATE TABLE customers (customer_id TEXT NOT NULL, tags TEXT NOT NULL);"
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE tag_quality (tag TEXT PRIMARY KEY, quality TEXT NOT NULL) WITHOUT ROWID;"
)
CREATE_INDEX = "CREATE UNIQUE INDEX customers_by_id ON customers (customer_id)"


class OnlineStoreError(LookupError):
    """The online store has not been loaded yet, or cannot be read (names the store and what to run)."""


class OnlineStoreUnreadableError(OnlineStoreError):
    """The online store's file is there but is not a store this tagml reads (damaged, foreign, an older layout)."""


class OnlineStoreUnavailableError(RuntimeError):
    """The online store's database cannot be reached (Postgres down, wrong URL); the message never holds a password."""


@dataclass(frozen=True)
class OnlineSnapshot:
    """What the online store holds: which partition, when it was scored and loaded, how many customers."""

    as_of: str
    scored_at: str
    loaded_at: str
    customers: int
    rows: int
    source: str  # the tag partition it was loaded from

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def loaded_now(cls, as_of: date, scored_at: str, customers: int, rows: int, source: str) -> "OnlineSnapshot":
        """The snapshot of a partition being loaded at this moment (every store stamps it so)."""
        return cls(as_of.isoformat(), scored_at, datetime.now(UTC).isoformat(timespec="seconds"), customers, rows, source)


@dataclass(frozen=True)
class TagQuality:
    """Tag quality as users see it, per tag for the loaded as_of.

    coverage: share of customers with a value other than `unknown`; changed_share: share of customers
    whose value differs from the previous partition (None when there is none); oldest_inferred_as_of: the
    oldest features any value was inferred from (earlier than as_of where the catalog's refresh carried a
    period's inference); freshness is that day's age against the clock (`freshness_days`).
    """

    tag: str
    as_of: str
    customers: int
    coverage: float
    changed_share: float | None
    previous_as_of: str | None
    scored_at: str
    oldest_inferred_as_of: str | None = None  # None: recorded before inferred_as_of existed (= as_of)

    def as_dict(self, today: date | None = None) -> dict[str, Any]:
        return {**asdict(self), "freshness_days": freshness_days(self.oldest_inferred_as_of or self.as_of, today)}


def freshness_days(as_of: str, today: date | None = None) -> int:
    """Days from `as_of` to today (UTC)."""
    return ((today or datetime.now(UTC).date()) - date.fromisoformat(as_of)).days


def quality_report(quality: Sequence[TagQuality], catalog: "Catalog | None" = None, today: date | None = None) -> list[dict[str, Any]]:
    """Per tag: coverage, changed_share, freshness_days and, where the catalog knows the tag, its `refresh`
    cadence and `stale` (older than the cadence allows, REFRESH_MAX_AGE_DAYS). Read at show time: freshness
    moves with the clock, and the cadence stays in the catalog (a tag the catalog does not know: stale None)."""
    specs = {spec.name: spec for spec in catalog.tags} if catalog is not None else {}
    report = []
    for q in quality:
        entry = q.as_dict(today)
        spec = specs.get(q.tag)
        entry["refresh"] = spec.refresh if spec is not None else None
        entry["stale"] = entry["freshness_days"] > REFRESH_MAX_AGE_DAYS[spec.refresh] if spec is not None else None
        report.append(entry)
    return report


def quality_markdown(report: Sequence[dict[str, Any]]) -> str:
    """`quality_report` as a markdown table (Dagster metadata, `tagml online status`)."""
    lines = [
        "| tag | coverage | changed since previous | as_of | oldest inference | freshness (days) | refresh | stale |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for q in report:
        changed = "n/a" if q["changed_share"] is None else f"{q['changed_share']:.2%}"
        stale = "n/a" if q["stale"] is None else ("yes" if q["stale"] else "no")
        oldest = q.get("oldest_inferred_as_of") or q["as_of"]
        lines.append(f"| {q['tag']} | {q['coverage']:.2%} | {changed} | {q['as_of']} | {oldest} | {q['freshness_days']} | {q['refresh'] or 'n/a'} | {stale} |")
    return "\n".join(lines)


class OnlineTagStore(Protocol):
    """The seam where an online store plugs in: the embedded SQLite file, or Postgres at a bank."""

    def refresh(self, con: duckdb.DuckDBPyConnection, store: TagStore, as_of: date | None = None) -> OnlineSnapshot: ...

    def snapshot(self) -> OnlineSnapshot | None: ...

    def customer(self, customer_id: str) -> dict[str, Any] | None: ...

    def customers(self, customer_ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...

    def quality(self) -> list[TagQuality]: ...

    def erase(self, customer_ids: Iterable[str]) -> int: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


def entry_json_sql(partition_sql: str, where: str = "") -> str:
    """(customer_id, entry): each tag row of one partition as the JSON of its entry, sorted by customer and tag
    (a sort, not a GROUP BY: DuckDB's hash aggregation of 1M customers' JSON lists was 5x slower and needed GBs)."""
    fields = ", ".join(f"{name} := {name}" for name in ENTRY_FIELDS)
    return f"SELECT customer_id, to_json(struct_pack({fields}))::VARCHAR AS entry FROM {partition_sql} {where} ORDER BY customer_id, tag"


def customer_ranges(con: duckdb.DuckDBPyConnection, partition_sql: str, rows: int) -> list[tuple[str | None, str | None]]:
    """[lo, hi) customer-id ranges of about ROWS_PER_BUCKET tag rows each (None: open end), in id order."""
    buckets = max(1, -(-rows // ROWS_PER_BUCKET))
    if buckets == 1:
        return [(None, None)]
    quantiles = ", ".join(str(i / buckets) for i in range(1, buckets))
    bounds = sorted(set(con.execute(f"SELECT quantile_disc(customer_id, [{quantiles}]) FROM {partition_sql}").fetchall()[0][0]))
    edges: list[str | None] = [None, *bounds, None]
    return list(pairwise(edges))


def grouped_customers(batches: Iterable[pa.RecordBatch]) -> Iterator[tuple[pa.Array, pa.Array]]:
    """From (customer_id, entry) batches sorted by customer: (ids, JSON array bodies of their entries), grouped in
    Arrow (a Python loop over 6M rows cost ~10 s). A customer's rows may straddle two batches: the last customer
    of a batch is held back until the next batch (or the end) shows it complete."""
    ids = pa.array([], pa.string())
    entries = pa.array([], pa.string())
    for batch in batches:
        ids = pa.concat_arrays([ids, batch.column(0).cast(pa.string())])
        entries = pa.concat_arrays([entries, batch.column(1).cast(pa.string())])
        starts = _run_starts(ids)
        if len(starts) > 1:
            yield _join_runs(ids, entries, starts)
            last = starts[-1].as_py()
            ids, entries = ids.slice(last), entries.slice(last)
    if len(ids):
        yield _join_runs(ids, entries, pa.concat_arrays([_run_starts(ids), pa.array([len(ids)], pa.int32())]))


def _run_starts(ids: pa.Array) -> pa.Array:
    """Where each run of equal ids starts (int32 offsets)."""
    if len(ids) < 2:
        return pa.array([0], pa.int32())
    changes = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    return pa.concat_arrays([pa.array([0], pa.int32()), pc.add(pc.indices_nonzero(changes), 1).cast(pa.int32())])


def _join_runs(ids: pa.Array, entries: pa.Array, offsets: pa.Array) -> tuple[pa.Array, pa.Array]:
    """The ids and 'entry,entry,...' of the complete runs that `offsets` bound (the last offset closes the last run)."""
    runs = pa.ListArray.from_arrays(offsets, entries.slice(0, offsets[-1].as_py()))
    return ids.take(offsets.slice(0, len(offsets) - 1)), pc.binary_join(runs, ",")


def partition_scored_at(con: duckdb.DuckDBPyConnection, partition_sql: str) -> str:
    """When the partition was scored, as every online store records it ('YYYY-MM-DD HH:MM:SS', UTC)."""
    return con.execute(f"SELECT strftime(max(scored_at), '%Y-%m-%d %H:%M:%S') FROM {partition_sql}").fetchall()[0][0]


def customer_records(con: duckdb.DuckDBPyConnection, partition_sql: str, rows: int) -> Iterator[tuple[list[str], list[str]]]:
    """Batches of (customer ids, their records: the JSON array of their tag entries), in id order; what every online store loads.

    JSON per tag row in DuckDB, sorted per range of customers, grouped per customer in Arrow."""
    for lo, hi in customer_ranges(con, partition_sql, rows):
        bounds = [(f"customer_id {op} ?", value) for op, value in ((">=", lo), ("<", hi)) if value is not None]
        where = ("WHERE " + " AND ".join(cond for cond, _ in bounds)) if bounds else ""
        # con.sql, not con.execute: a DB-API result's Arrow batches come out of order when preserve_insertion_order is off
        reader = con.sql(entry_json_sql(partition_sql, where), params=[value for _, value in bounds]).to_arrow_reader(INSERT_BATCH)
        for ids, bodies in grouped_customers(reader):
            yield ids.to_pylist(), pc.binary_join_element_wise("[", bodies, "]", "").to_pylist()


def quality_rows(con: duckdb.DuckDBPyConnection, store: TagStore, as_of: date, scored_at: str) -> list[TagQuality]:
    """Coverage per tag of the partition, and the share changed since the previous partition."""
    partition_sql = store.read_sql(as_of)
    coverage = con.execute(
        f"SELECT tag, count(*), avg((value IS NOT NULL AND value <> 'unknown')::INT), min(inferred_as_of) FROM {partition_sql} GROUP BY tag ORDER BY tag"
    ).fetchall()
    previous = [d for d in store.partitions() if d < as_of]
    changed = store.changed_share(con, previous[-1], as_of) if previous else {}
    return [
        TagQuality(
            tag=tag,
            as_of=as_of.isoformat(),
            customers=int(customers),
            coverage=round(float(share), 6),
            changed_share=changed.get(tag),
            previous_as_of=previous[-1].isoformat() if previous else None,
            scored_at=scored_at,
            oldest_inferred_as_of=oldest.isoformat(),
        )
        for tag, customers, share, oldest in coverage
    ]


class SQLiteOnlineStore:
    """The embedded online store: one SQLite file, rebuilt whole and swapped atomically on each refresh."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._local = threading.local()

    def describe(self) -> str:
        return f"the online tag store {self.path}"

    # --- writing -------------------------------------------------------------------------------

    def refresh(self, con: duckdb.DuckDBPyConnection, store: TagStore, as_of: date | None = None) -> OnlineSnapshot:
        """Load the partition on or before `as_of` (default: the newest) into a new file and swap it in."""
        partition = store.latest_on_or_before(as_of)
        partition_sql = store.read_sql(partition)
        scored_at = partition_scored_at(con, partition_sql)
        quality = quality_rows(con, store, partition, scored_at)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_replace(self.path) as tmp:
            customers, rows = self._build(tmp, con, partition_sql)
            snapshot = OnlineSnapshot.loaded_now(partition, scored_at, customers, rows, store.location(partition))
            _write_meta(tmp, snapshot, quality)
        return snapshot

    def _build(self, tmp: Path, con: duckdb.DuckDBPyConnection, partition_sql: str) -> tuple[int, int]:
        """Fill the new file with `customer_records`, inserted in id order (the index is built once at the end:
        cheaper than keeping a b-tree sorted)."""
        rows = int(con.execute(f"SELECT count(*) FROM {partition_sql}").fetchall()[0][0])
        if rows == 0:
            raise OnlineStoreError(f"the tag partition {partition_sql} has no rows; {self.describe()} was left as it was")
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp)
        try:
            db.executescript(CREATE_TABLES)  # a file nobody reads until it is complete: no journal, one fsync at the end
            customers = 0
            for ids, records in customer_records(con, partition_sql, rows):
                db.executemany("INSERT INTO customers VALUES (?, ?)", zip(ids, records))
                customers += len(ids)
            try:
                db.execute(CREATE_INDEX)
            except sqlite3.IntegrityError as err:  # a customer's rows did not arrive together: never publish such a file
                raise OnlineStoreError(f"the tag partition {partition_sql} was not grouped by customer ({err}); {self.describe()} was left as it was") from err
            db.commit()
        finally:
            db.close()
        return customers, rows

    def erase(self, customer_ids: Iterable[str]) -> int:
        """Rebuild the file without these customers and swap it in; returns the customers removed.

        meta's `customers` and `rows` drop by the removed customers and their tag rows; the quality figures
        stay those of the partition as loaded (they are shares of the partition, which an erasure does not rewrite)."""
        ids = sorted(set(customer_ids))
        if not ids or not self.path.exists():
            return 0
        self._require()  # a corrupt or foreign file: the store's own error, not SQLite's
        with atomic_replace(self.path) as tmp:
            tmp.unlink(missing_ok=True)
            db = sqlite3.connect(tmp)
            try:
                db.executescript(CREATE_TABLES)
                db.execute("ATTACH DATABASE ? AS current", [f"file:{self.path}?mode=ro&immutable=1"])
                db.execute("CREATE TEMP TABLE erased (customer_id TEXT PRIMARY KEY)")
                db.executemany("INSERT OR IGNORE INTO erased VALUES (?)", [(i,) for i in ids])
                removed, removed_rows = db.execute(
                    "SELECT count(*), coalesce(sum(json_array_length(tags)), 0) FROM current.customers WHERE customer_id IN (SELECT customer_id FROM erased)"
                ).fetchone()
                db.execute(
                    "INSERT INTO customers SELECT customer_id, tags FROM current.customers "
                    "WHERE customer_id NOT IN (SELECT customer_id FROM erased) ORDER BY customer_id"
                )
                db.execute(CREATE_INDEX)
                db.execute("INSERT INTO meta SELECT * FROM current.meta")
                db.execute("INSERT INTO tag_quality SELECT * FROM current.tag_quality")
                db.execute("UPDATE meta SET value = CAST(value AS INTEGER) - ? WHERE key = 'customers'", [removed])
                db.execute("UPDATE meta SET value = CAST(value AS INTEGER) - ? WHERE key = 'rows'", [removed_rows])
                db.commit()
                db.execute("DETACH DATABASE current")
            finally:
                db.close()
            with open(tmp, "rb+") as handle:  # on disk before the name points to it
                os.fsync(handle.fileno())
        return int(removed)

    # --- reading -------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection | None:
        """This thread's read-only connection to the file the name points to now (reopened after a swap)."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return None
        held = getattr(self._local, "held", None)
        if held is not None and held[0] == inode:
            return held[1]
        if held is not None:
            held[1].close()
        db = sqlite3.connect(f"file:{self.path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta WHERE key IN ('schema_version', 'as_of')").fetchall())
            db.execute("SELECT customer_id, tags FROM customers LIMIT 0").fetchall()
        except sqlite3.Error as err:
            db.close()
            raise OnlineStoreUnreadableError(f"{self.describe()} is not a readable online store ({err}); rebuild it with `tagml online refresh`") from err
        if meta.get("schema_version") != SCHEMA_VERSION or "as_of" not in meta:
            db.close()
            raise OnlineStoreUnreadableError(
                f"{self.describe()} has layout version {meta.get('schema_version')!r}, this tagml reads {SCHEMA_VERSION!r}; "
                "rebuild it with `tagml online refresh`"
            )
        self._local.held = (inode, db)
        return db

    def snapshot(self) -> OnlineSnapshot | None:
        db = self._connection()
        if db is None:
            return None
        meta = self._meta(db)
        return OnlineSnapshot(
            as_of=meta["as_of"],
            scored_at=meta["scored_at"],
            loaded_at=meta["loaded_at"],
            customers=int(meta["customers"]),
            rows=int(meta["rows"]),
            source=meta["source"],
        )

    def customer(self, customer_id: str) -> dict[str, Any] | None:
        """{customer_id, as_of, scored_at, tags: [entry per tag]}; None when the customer is not in the store.

        Raises OnlineStoreError when the store has not been loaded yet."""
        db = self._require()
        row = db.execute("SELECT tags FROM customers WHERE customer_id = ?", [customer_id]).fetchone()
        if row is None:
            return None
        meta = self._meta(db)
        return {"customer_id": customer_id, "as_of": meta["as_of"], "scored_at": meta["scored_at"], "tags": json.loads(row[0])}

    def customers(self, customer_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The records of the customers that are in the store, by id."""
        return {cid: record for cid in dict.fromkeys(customer_ids) if (record := self.customer(cid)) is not None}

    def quality(self) -> list[TagQuality]:
        db = self._require()
        return [TagQuality(**json.loads(q)) for (q,) in db.execute("SELECT quality FROM tag_quality ORDER BY tag").fetchall()]

    def _require(self) -> sqlite3.Connection:
        db = self._connection()
        if db is None:
            raise OnlineStoreError(f"{self.describe()} has not been loaded yet: run the nightly scoring job (it refreshes the store) or `tagml online refresh`")
        return db

    def _meta(self, db: sqlite3.Connection) -> dict[str, str]:
        cached = getattr(self._local, "meta", None)
        if cached is not None and cached[0] is db:
            return cached[1]
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self._local.meta = (db, meta)
        return meta

    def close(self) -> None:
        held = getattr(self._local, "held", None)
        if held is not None:
            held[1].close()
            self._local.held = None


def _write_meta(path: Path, snapshot: OnlineSnapshot, quality: list[TagQuality]) -> None:
    db = sqlite3.connect(path)
    try:
        meta = {**{k: str(v) for k, v in snapshot.as_dict().items()}, "schema_version": SCHEMA_VERSION}
        db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        db.executemany("INSERT INTO tag_quality VALUES (?, ?)", [(q.tag, json.dumps(asdict(q))) for q in quality])
        db.commit()
    finally:
        db.close()
    with open(path, "rb+") as handle:  # on disk before the name points to it
        os.fsync(handle.fileno())


def open_online_store(location: str) -> OnlineTagStore:
    """The online store at `location` (TAGML_ONLINE_STORE): a SQLite file path, or a postgresql:// URL."""
    if location.strip().startswith(("postgresql://", "postgres://")):
        from tagml.scoring.online_postgres import PostgresOnlineStore  # psycopg2 only where Postgres is configured

        return PostgresOnlineStore(location)
    return SQLiteOnlineStore(Path(location))
