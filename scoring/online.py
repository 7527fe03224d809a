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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

import duckdb

from tagml.core.storage import atomic_replace
from tagml.scoring.store import TagStore

SCHEMA_VERSION = "1"
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
)
INSERT_BATCH = 50_000
ROWS_PER_BUCKET = 1_000_000  # tag rows grouped into customers' JSON at a time (memory)


class OnlineStoreError(LookupError):
    """The online store has not been loaded yet, or cannot be read (names the store and what to run)."""


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


@dataclass(frozen=True)
class TagQuality:
    """Tag quality as users see it, per tag for the loaded as_of.

    coverage: share of customers with a value other than `unknown`; changed_share: share of customers
    whose value differs from the previous partition (None when there is none); freshness is read
    against the clock by `freshness_days`.
    """

    tag: str
    as_of: str
    customers: int
    coverage: float
    changed_share: float | None
    previous_as_of: str | None
    scored_at: str

    def as_dict(self, today: date | None = None) -> dict[str, Any]:
        return {**asdict(self), "freshness_days": freshness_days(self.as_of, today)}


def freshness_days(as_of: str, today: date | None = None) -> int:
    """Days from the tags' as_of to today (UTC)."""
    return ((today or datetime.now(UTC).date()) - date.fromisoformat(as_of)).days


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


def customer_json_sql(partition_sql: str, bucket: int = 0, buckets: int = 1) -> str:
    """(customer_id, tags): each customer's tag rows of one partition as a JSON array ordered by tag, for the
    customers of one hash bucket (grouping a whole 1M-customer partition at once needs more than 4 GB)."""
    fields = ", ".join(f"{name} := {name}" for name in ENTRY_FIELDS)
    where = f"WHERE hash(customer_id) % {int(buckets)} = {int(bucket)}" if buckets > 1 else ""
    return (
        f"SELECT customer_id, to_json(list(struct_pack({fields}) ORDER BY tag))::VARCHAR AS tags FROM {partition_sql} {where} "
        "GROUP BY customer_id ORDER BY customer_id"
    )


def quality_rows(con: duckdb.DuckDBPyConnection, store: TagStore, as_of: date, scored_at: str) -> list[TagQuality]:
    """Coverage per tag of the partition, and the share changed since the previous partition."""
    partition_sql = store.read_sql(as_of)
    coverage = con.execute(
        f"SELECT tag, count(*), avg((value IS NOT NULL AND value <> 'unknown')::INT) FROM {partition_sql} GROUP BY tag ORDER BY tag"
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
        )
        for tag, customers, share in coverage
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
        scored_at = con.execute(f"SELECT strftime(max(scored_at), '%Y-%m-%d %H:%M:%S') FROM {partition_sql}").fetchall()[0][0]
        quality = quality_rows(con, store, partition, scored_at)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_replace(self.path) as tmp:
            customers, rows = self._build(tmp, con, partition_sql)
            snapshot = OnlineSnapshot(
                as_of=partition.isoformat(),
                scored_at=scored_at,
                loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
                customers=customers,
                rows=rows,
                source=store.location(partition),
            )
            _write_meta(tmp, snapshot, quality)
        return snapshot

    def _build(self, tmp: Path, con: duckdb.DuckDBPyConnection, partition_sql: str) -> tuple[int, int]:
        tmp.unlink(missing_ok=True)
        db = sqlite3.connect(tmp)
        try:
            # a file nobody reads until it is complete: no journal, no fsync per statement (one at the end)
            db.executescript(
                "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
                "CREATE TABLE customers (customer_id TEXT PRIMARY KEY, tags TEXT NOT NULL) WITHOUT ROWID;"
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
                "CREATE TABLE tag_quality (tag TEXT PRIMARY KEY, quality TEXT NOT NULL) WITHOUT ROWID;"
            )
            rows = int(con.execute(f"SELECT count(*) FROM {partition_sql}").fetchall()[0][0])
            buckets = max(1, -(-rows // ROWS_PER_BUCKET))
            customers = 0
            for bucket in range(buckets):
                reader = con.sql(customer_json_sql(partition_sql, bucket, buckets)).to_arrow_reader(INSERT_BATCH)
                for batch in reader:
                    db.executemany("INSERT INTO customers VALUES (?, ?)", zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()))
                    customers += batch.num_rows
            db.commit()
        finally:
            db.close()
        return customers, rows

    def erase(self, customer_ids: Iterable[str]) -> int:
        """Rebuild the file without these customers and swap it in; returns the customers removed."""
        ids = sorted(set(customer_ids))
        if not ids or not self.path.exists():
            return 0
        with atomic_replace(self.path) as tmp:
            tmp.unlink(missing_ok=True)
            db = sqlite3.connect(tmp)
            try:
                db.execute("ATTACH DATABASE ? AS current", [f"file:{self.path}?mode=ro&immutable=1"])
                db.executescript(
                    "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;"
                    "CREATE TABLE customers (customer_id TEXT PRIMARY KEY, tags TEXT NOT NULL) WITHOUT ROWID;"
                    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
                    "CREATE TABLE tag_quality (tag TEXT PRIMARY KEY, quality TEXT NOT NULL) WITHOUT ROWID;"
                    "CREATE TEMP TABLE erased (customer_id TEXT PRIMARY KEY);"
                )
                db.executemany("INSERT OR IGNORE INTO erased VALUES (?)", [(i,) for i in ids])
                db.execute("INSERT INTO customers SELECT * FROM current.customers WHERE customer_id NOT IN (SELECT customer_id FROM erased)")
                removed = db.execute("SELECT count(*) FROM current.customers WHERE customer_id IN (SELECT customer_id FROM erased)").fetchone()[0]
                db.execute("INSERT INTO meta SELECT * FROM current.meta")
                db.execute("INSERT INTO tag_quality SELECT * FROM current.tag_quality")
                db.execute("UPDATE meta SET value = CAST(value AS INTEGER) - ? WHERE key = 'customers'", [removed])
                db.commit()
                db.execute("DETACH DATABASE current")
            finally:
                db.close()
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
        self._local.held = (inode, db)
        return db

    def snapshot(self) -> OnlineSnapshot | None:
        db = self._connection()
        if db is None:
            return None
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
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
