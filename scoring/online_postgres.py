"""The online tag store on PostgreSQL (TAGML_ONLINE_STORE=postgresql://user@host:port/db): the same contract as the
SQLite file (`OnlineTagStore`), loaded with COPY into a new table and swapped in one transaction.

What it keeps, in the connection's current schema (a bank gives it its own: `?options=-csearch_path%3Dtagml_online`):
- `tagml_online_customers_g<N>`: one table per generation N (customer_id PRIMARY KEY, tags: the JSON of its tag entries);
- `tagml_online_generations`: one row per generation (as_of, scored_at, loaded_at, counts, source, state loading/current/retired);
- `tagml_online_quality`: the per-tag quality of each generation (the JSON of a `TagQuality`);
- `tagml_online_pointer`: one row, the current generation;
- views: `tagml_online_customers` (the current generation's customers with its as_of and scored_at),
  `tagml_online_snapshot` and `tagml_online_tag_quality` (through the pointer). Readers use only these views.

A refresh COPYs the partition into a new generation's table (the primary key built after the load), then in ONE
transaction re-points `tagml_online_customers` and the pointer: a lookup is a single statement over that view, so it
reads the old generation or the new one, never half. The old generation is dropped after. A failed load drops its own
table and leaves the old generation serving. Refreshes and erasures take one advisory lock, so an erasure that arrives
during a refresh waits for it and then erases from the generation just swapped in.

Identifiers are made here (never from data) and quoted with psycopg2.sql.Identifier; values are parameters. The
password belongs in PGPASSWORD or ~/.pgpass, not in the URL; it is stripped from every message either way.
"""

import json
import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from datetime import date
from typing import Any

import duckdb
import psycopg2
import psycopg2.errors
from psycopg2 import sql
from psycopg2.extensions import parse_dsn

from tagml.scoring.online import (
    SCHEMA_VERSION,
    OnlineSnapshot,
    OnlineStoreError,
    OnlineStoreUnavailableError,
    TagQuality,
    customer_records,
    partition_scored_at,
    quality_rows,
)
from tagml.scoring.store import TagStore

PREFIX = "tagml_online"
CUSTOMERS_VIEW = f"{PREFIX}_customers"
GENERATIONS = f"{PREFIX}_generations"
QUALITY = f"{PREFIX}_quality"
POINTER = f"{PREFIX}_pointer"
SNAPSHOT_VIEW = f"{PREFIX}_snapshot"
QUALITY_VIEW = f"{PREFIX}_tag_quality"
SEQUENCE = f"{PREFIX}_generation_seq"
LOOKUP_STATEMENT = f"{PREFIX}_lookup"
# one advisory lock (per database) serialises refreshes and erasures; an arbitrary constant of ours
ADVISORY_LOCK = 7_304_117_013
CONNECT_TIMEOUT_S = 5  # unless the URL says otherwise: an unreachable host fails in seconds, not minutes
WAIT_FOR_WRITER = "15min"  # how long a refresh or erasure waits for another one to finish
SWAP_LOCK_TIMEOUT = "5s"  # the swap waits this long for in-flight lookups on the view (readers queue behind it meanwhile)
SWAP_ATTEMPTS = 3
DROP_LOCK_TIMEOUT = "2s"  # dropping an old generation never stalls lookups for long; what is left is dropped next time
COPY_CHUNK = 1 << 20


def generation_table(generation: int) -> str:
    return f"{PREFIX}_customers_g{int(generation)}"


def _copy_text(value: str) -> str:
    """A value in COPY's text format (backslash, tab, newline and carriage return escaped)."""
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class _CopyStream:
    """A read()-able stream of COPY text lines from `customer_records` batches of (ids, records); counts the customers."""

    def __init__(self, batches: Iterator[tuple[list[str], list[str]]]):
        self._batches = batches
        self._buffer = b""
        self.customers = 0

    def _lines(self) -> bytes:
        batch = next(self._batches, None)
        if batch is None:
            return b""
        ids, tags = batch
        self.customers += len(ids)
        return "".join(f"{_copy_text(c)}\t{_copy_text(t)}\n" for c, t in zip(ids, tags)).encode("utf-8")

    def read(self, size: int = -1) -> bytes:
        want = COPY_CHUNK if size is None or size < 0 else size
        while len(self._buffer) < want:
            more = self._lines()
            if not more:
                break
            self._buffer += more
        chunk, self._buffer = self._buffer[:want], self._buffer[want:]
        return chunk


class PostgresOnlineStore:
    """The online store in PostgreSQL: a table per generation, swapped in by re-pointing one view in one transaction."""

    def __init__(self, url: str):
        self.url = url.strip()
        self._local = threading.local()
        self._held: list[Any] = []  # every thread's connection, so that close() closes them all
        self._held_lock = threading.Lock()
        try:
            self._params = parse_dsn(self.url)
        except psycopg2.ProgrammingError as exc:
            raise OnlineStoreUnavailableError(
                f"the online store URL (TAGML_ONLINE_STORE) {self._redacted_url()} is not a valid PostgreSQL URL: {self._redact(str(exc).strip())}"
            ) from None
        self._params.setdefault("connect_timeout", str(CONNECT_TIMEOUT_S))
        self._params.setdefault("application_name", "tagml-online")
        self._params["client_encoding"] = "UTF8"

    # --- naming it without its password ---------------------------------------------------------

    def _where(self) -> str:
        p = getattr(self, "_params", {})
        host = p.get("host") or os.environ.get("PGHOST") or "localhost (its socket)"
        port = p.get("port") or os.environ.get("PGPORT") or "5432"
        database = p.get("dbname") or os.environ.get("PGDATABASE") or p.get("user") or "(the user's)"
        user = p.get("user") or os.environ.get("PGUSER") or "(the OS user)"
        return f"host {host} port {port} database {database} user {user}"

    def _redacted_url(self) -> str:
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", self.url)

    def _redact(self, message: str) -> str:
        message = re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", message)
        message = re.sub(r"(password\s*=\s*)\S+", r"\1***", message, flags=re.IGNORECASE)
        for secret in (getattr(self, "_params", {}).get("password"), os.environ.get("PGPASSWORD")):
            if secret and len(secret) >= 4:
                message = message.replace(secret, "***")
        return message

    def describe(self) -> str:
        return f"the online tag store on PostgreSQL ({self._where()})"

    def _unavailable(self, exc: Exception) -> OnlineStoreUnavailableError:
        diag = getattr(exc, "diag", None)
        primary = diag.message_primary if diag is not None else None  # a server's own words, without its context (which may quote a row)
        reason = self._redact(" ".join((primary or str(exc)).split())) or type(exc).__name__
        return OnlineStoreUnavailableError(f"cannot reach {self.describe()}: {reason}")

    def _failed(self, what: str, exc: psycopg2.Error) -> OnlineStoreError:
        """A database error as our message: its primary text and SQLSTATE only (its context may quote a row's values)."""
        primary = exc.diag.message_primary if getattr(exc, "diag", None) is not None and exc.diag.message_primary else type(exc).__name__
        return OnlineStoreError(f"{what} in {self.describe()} failed: {self._redact(primary)} (SQLSTATE {exc.pgcode})")

    @staticmethod
    def _lost(exc: psycopg2.Error) -> bool:
        """The connection is gone (no answer from a server, a connection error, the server shutting down), not a statement's error."""
        code = exc.pgcode or ""
        return not code or code.startswith("08") or code in ("57P01", "57P02", "57P03")

    def _error(self, what: str, exc: psycopg2.Error) -> OnlineStoreError | OnlineStoreUnavailableError:
        return self._unavailable(exc) if self._lost(exc) else self._failed(what, exc)

    def _connect(self, autocommit: bool) -> Any:
        try:
            connection = psycopg2.connect(**self._params)
        except psycopg2.Error as exc:
            raise self._unavailable(exc) from None
        connection.autocommit = autocommit
        return connection

    # --- writing -------------------------------------------------------------------------------

    def refresh(self, con: duckdb.DuckDBPyConnection, store: TagStore, as_of: date | None = None) -> OnlineSnapshot:
        """Load the partition on or before `as_of` (default: the newest) into a new generation and swap it in."""
        partition = store.latest_on_or_before(as_of)
        partition_sql = store.read_sql(partition)  # a missing or corrupt partition fails here, before Postgres is touched
        scored_at = partition_scored_at(con, partition_sql)
        quality = quality_rows(con, store, partition, scored_at)
        rows = int(con.execute(f"SELECT count(*) FROM {partition_sql}").fetchall()[0][0])
        writer = self._connect(autocommit=True)
        try:
            self._lock_writers(writer)
            self._ensure_schema(writer)
            self._drop_leftovers(writer)
            with writer.cursor() as cursor:
                cursor.execute(
                    sql.SQL("INSERT INTO {} (generation, state, schema_version) VALUES (nextval({}), 'loading', %s) RETURNING generation").format(
                        sql.Identifier(GENERATIONS), sql.Literal(SEQUENCE)
                    ),
                    [SCHEMA_VERSION],
                )
                generation = int(cursor.fetchone()[0])
            try:
                customers = self._load(writer, con, partition_sql, rows, generation)
                snapshot = OnlineSnapshot.loaded_now(partition, scored_at, customers, rows, store.location(partition))
                self._write_meta(writer, generation, snapshot, quality)
                retired = self._swap(writer, generation)
            except BaseException as exc:
                self._discard(writer, generation)
                if isinstance(exc, psycopg2.Error):
                    raise self._error(f"loading the partition {partition.isoformat()}", exc) from None
                raise
            self._drop_generations(writer, retired)
        except psycopg2.Error as exc:
            raise self._error("refreshing", exc) from None
        finally:
            writer.close()  # also releases the advisory lock
        return snapshot

    def _lock_writers(self, writer: Any) -> None:
        """Wait (up to WAIT_FOR_WRITER) for any other refresh or erasure of this database's online store to finish."""
        with writer.cursor() as cursor:
            cursor.execute("SET lock_timeout = %s", [WAIT_FOR_WRITER])
            try:
                cursor.execute("SELECT pg_advisory_lock(%s)", [ADVISORY_LOCK])
            except psycopg2.errors.LockNotAvailable:
                raise OnlineStoreError(f"another refresh or erasure of {self.describe()} held its lock for {WAIT_FOR_WRITER}; try again later") from None
            cursor.execute("RESET lock_timeout")

    def _ensure_schema(self, writer: Any) -> None:
        ident = sql.Identifier
        statements = [
            sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(ident(SEQUENCE)),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (generation BIGINT PRIMARY KEY, state TEXT NOT NULL CHECK (state IN ('loading', 'current', 'retired')), "
                "as_of TEXT, scored_at TEXT, loaded_at TEXT, customers BIGINT, rows BIGINT, source TEXT, schema_version TEXT NOT NULL)"
            ).format(ident(GENERATIONS)),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (generation BIGINT NOT NULL, tag TEXT NOT NULL, quality TEXT NOT NULL, PRIMARY KEY (generation, tag))"
            ).format(ident(QUALITY)),
            sql.SQL("CREATE TABLE IF NOT EXISTS {} (only_row BOOLEAN PRIMARY KEY DEFAULT true CHECK (only_row), generation BIGINT NOT NULL)").format(
                ident(POINTER)
            ),
            sql.SQL(
                "CREATE OR REPLACE VIEW {} AS SELECT g.generation, g.as_of, g.scored_at, g.loaded_at, g.customers, g.rows, g.source, g.schema_version "
                "FROM {} g JOIN {} p USING (generation)"
            ).format(ident(SNAPSHOT_VIEW), ident(GENERATIONS), ident(POINTER)),
            sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT q.tag, q.quality FROM {} q JOIN {} p USING (generation)").format(
                ident(QUALITY_VIEW), ident(QUALITY), ident(POINTER)
            ),
        ]
        with writer.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)

    def _load(self, writer: Any, con: duckdb.DuckDBPyConnection, partition_sql: str, rows: int, generation: int) -> int:
        """COPY the customers' JSON into the generation's new table, then index it; one transaction (a failure leaves no table)."""
        table = sql.Identifier(generation_table(generation))
        customers = 0
        writer.autocommit = False
        try:
            with writer.cursor() as cursor:
                # no autovacuum: the table is analyzed below and never updated (an erasure's few deleted rows stay dead); an
                # autovacuum worker on it would make the DROP after the next swap wait, and lookups queue behind that DROP
                cursor.execute(sql.SQL("CREATE TABLE {} (customer_id TEXT NOT NULL, tags TEXT NOT NULL) WITH (autovacuum_enabled = false)").format(table))
                copy = sql.SQL("COPY {} (customer_id, tags) FROM STDIN").format(table).as_string(writer)
                stream = _CopyStream(customer_records(con, partition_sql, rows))
                cursor.copy_expert(copy, stream, size=COPY_CHUNK)
                customers += stream.customers
                # the index after the load: one sort instead of a million inserts into a b-tree
                cursor.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY (customer_id)").format(table))
                cursor.execute(sql.SQL("ANALYZE {}").format(table))
            writer.commit()
        except BaseException:
            writer.rollback()
            raise
        finally:
            writer.autocommit = True
        return customers

    def _write_meta(self, writer: Any, generation: int, snapshot: OnlineSnapshot, quality: list[TagQuality]) -> None:
        with writer.cursor() as cursor:
            cursor.execute(
                sql.SQL("UPDATE {} SET as_of = %s, scored_at = %s, loaded_at = %s, customers = %s, rows = %s, source = %s WHERE generation = %s").format(
                    sql.Identifier(GENERATIONS)
                ),
                [snapshot.as_of, snapshot.scored_at, snapshot.loaded_at, snapshot.customers, snapshot.rows, snapshot.source, generation],
            )
            cursor.executemany(
                sql.SQL("INSERT INTO {} (generation, tag, quality) VALUES (%s, %s, %s)").format(sql.Identifier(QUALITY)),
                [(generation, q.tag, json.dumps(asdict(q))) for q in quality],
            )

    def _swap(self, writer: Any, generation: int) -> list[int]:
        """Re-point the customers view and the pointer to `generation` in one transaction; returns the generations retired."""
        view = sql.SQL(
            "CREATE OR REPLACE VIEW {view} AS SELECT c.customer_id, c.tags, g.as_of, g.scored_at FROM {table} c CROSS JOIN {generations} g "
            "WHERE g.generation = {generation}"
        ).format(
            view=sql.Identifier(CUSTOMERS_VIEW),
            table=sql.Identifier(generation_table(generation)),
            generations=sql.Identifier(GENERATIONS),
            generation=sql.Literal(int(generation)),
        )
        for attempt in range(SWAP_ATTEMPTS):
            writer.autocommit = False
            try:
                with writer.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = %s", [SWAP_LOCK_TIMEOUT])
                    cursor.execute(view)
                    cursor.execute(
                        sql.SQL(
                            "INSERT INTO {} (only_row, generation) VALUES (true, %s) ON CONFLICT (only_row) DO UPDATE SET generation = EXCLUDED.generation"
                        ).format(sql.Identifier(POINTER)),
                        [generation],
                    )
                    cursor.execute(
                        sql.SQL(
                            "UPDATE {} SET state = CASE WHEN generation = %s THEN 'current' ELSE 'retired' END WHERE state <> 'retired' RETURNING generation"
                        ).format(sql.Identifier(GENERATIONS)),
                        [generation],
                    )
                    retired = [int(g) for (g,) in cursor.fetchall() if g != generation]
                writer.commit()
                return retired
            except psycopg2.errors.LockNotAvailable:
                writer.rollback()
                if attempt == SWAP_ATTEMPTS - 1:
                    raise
            except BaseException:
                writer.rollback()
                raise
            finally:
                writer.autocommit = True
        raise AssertionError("unreachable")

    def _discard(self, writer: Any, generation: int) -> None:
        """Drop a generation that did not become current (best effort: the next refresh drops what is left)."""
        try:
            if writer.closed:
                return
            if writer.status != psycopg2.extensions.STATUS_READY:
                writer.rollback()
            writer.autocommit = True
            self._drop_generation(writer, generation)
        except psycopg2.Error:
            pass

    def _drop_generation(self, writer: Any, generation: int) -> None:
        with writer.cursor() as cursor:
            cursor.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(generation_table(generation))))
            cursor.execute(sql.SQL("DELETE FROM {} WHERE generation = %s").format(sql.Identifier(QUALITY)), [generation])
            cursor.execute(sql.SQL("DELETE FROM {} WHERE generation = %s").format(sql.Identifier(GENERATIONS)), [generation])

    def _drop_generations(self, writer: Any, generations: Iterable[int]) -> None:
        """Drop retired generations; one still read by a long lookup is left for the next refresh rather than stalling readers."""
        for generation in generations:
            writer.autocommit = False
            try:
                with writer.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = %s", [DROP_LOCK_TIMEOUT])
                self._drop_generation(writer, generation)
                writer.commit()
            except psycopg2.errors.LockNotAvailable:
                writer.rollback()
            finally:
                writer.autocommit = True

    def _drop_leftovers(self, writer: Any) -> None:
        """Generations a crashed refresh left loading, retired ones not yet dropped, and tables without a generation row."""
        with writer.cursor() as cursor:
            cursor.execute(sql.SQL("SELECT generation FROM {} WHERE state <> 'current'").format(sql.Identifier(GENERATIONS)))
            stale = {int(g) for (g,) in cursor.fetchall()}
            cursor.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() AND tablename LIKE %s",
                [f"{PREFIX}\\_customers\\_g%"],
            )
            tables = {int(name.rsplit("_g", 1)[1]) for (name,) in cursor.fetchall() if name.rsplit("_g", 1)[1].isdigit()}
            cursor.execute(sql.SQL("SELECT generation FROM {} WHERE state = 'current'").format(sql.Identifier(GENERATIONS)))
            current = {int(g) for (g,) in cursor.fetchall()}
        self._drop_generations(writer, sorted(stale | (tables - current)))

    def erase(self, customer_ids: Iterable[str]) -> int:
        """Delete these customers from the current generation in one transaction; returns how many were there."""
        ids = sorted(set(customer_ids))
        if not ids:
            return 0
        writer = self._connect(autocommit=True)
        try:
            self._lock_writers(writer)  # a refresh under way finishes first: the erasure then applies to what it swapped in
            writer.autocommit = False
            with writer.cursor() as cursor:
                try:
                    cursor.execute(sql.SQL("SELECT generation FROM {} FOR UPDATE").format(sql.Identifier(POINTER)))
                except psycopg2.errors.UndefinedTable:
                    writer.rollback()
                    return 0  # never loaded: nothing to erase
                row = cursor.fetchone()
                if row is None:
                    writer.rollback()
                    return 0
                generation = int(row[0])
                cursor.execute(
                    sql.SQL("DELETE FROM {} WHERE customer_id = ANY(%s)").format(sql.Identifier(generation_table(generation))),
                    [ids],
                )
                removed = cursor.rowcount
                cursor.execute(
                    sql.SQL("UPDATE {} SET customers = customers - %s WHERE generation = %s").format(sql.Identifier(GENERATIONS)),
                    [removed, generation],
                )
            writer.commit()
            return int(removed)
        except psycopg2.Error as exc:
            raise self._error("erasing customers", exc) from None
        finally:
            writer.close()

    # --- reading -------------------------------------------------------------------------------

    def _reader(self) -> Any:
        """This thread's connection (autocommit: a lookup holds no lock past its statement, so a swap never waits on idle readers)."""
        connection = getattr(self._local, "connection", None)
        if connection is not None and not connection.closed:
            return connection
        connection = self._connect(autocommit=True)
        self._local.connection, self._local.prepared = connection, False
        with self._held_lock:
            self._held = [c for c in self._held if not c.closed] + [connection]
        return connection

    def _read(self, run: Any) -> Any:
        """run(cursor) on this thread's connection; once more on a new connection when the old one was lost (a server restart)."""
        for attempt in range(2):
            connection = self._reader()
            try:
                with connection.cursor() as cursor:
                    return run(cursor)
            except psycopg2.errors.UndefinedTable:
                raise OnlineStoreError(
                    f"{self.describe()} has not been loaded yet: run the nightly scoring job (it refreshes the store) or `tagml online refresh`"
                ) from None
            except psycopg2.Error as exc:
                if not (self._lost(exc) or connection.closed):
                    raise self._failed("reading", exc) from None
                try:
                    connection.close()
                except psycopg2.Error:
                    pass
                self._local.connection = None
                if attempt == 1:
                    raise self._unavailable(exc) from None
        raise AssertionError("unreachable")

    def _lookup(self, cursor: Any, customer_ids: Sequence[str]) -> list[tuple[str, str, str, str]]:
        if not getattr(self._local, "prepared", False):
            cursor.execute(
                sql.SQL("PREPARE {} (text[]) AS SELECT customer_id, tags, as_of, scored_at FROM {} WHERE customer_id = ANY($1)").format(
                    sql.Identifier(LOOKUP_STATEMENT), sql.Identifier(CUSTOMERS_VIEW)
                )
            )
            self._local.prepared = True
        cursor.execute(sql.SQL("EXECUTE {} (%s)").format(sql.Identifier(LOOKUP_STATEMENT)), [list(customer_ids)])
        return cursor.fetchall()

    def snapshot(self) -> OnlineSnapshot | None:
        def run(cursor: Any) -> OnlineSnapshot | None:
            try:
                cursor.execute(sql.SQL("SELECT as_of, scored_at, loaded_at, customers, rows, source FROM {}").format(sql.Identifier(SNAPSHOT_VIEW)))
            except psycopg2.errors.UndefinedTable:
                return None
            row = cursor.fetchone()
            if row is None:
                return None
            as_of, scored_at, loaded_at, customers, rows, source = row
            return OnlineSnapshot(as_of=as_of, scored_at=scored_at, loaded_at=loaded_at, customers=int(customers), rows=int(rows), source=source)

        return self._read(run)

    def customer(self, customer_id: str) -> dict[str, Any] | None:
        """{customer_id, as_of, scored_at, tags: [entry per tag]}; None when the customer is not in the store.

        Raises OnlineStoreError when the store has not been loaded yet, OnlineStoreUnavailableError when Postgres cannot be reached."""
        return self.customers([customer_id]).get(customer_id)

    def customers(self, customer_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The records of the customers that are in the store, by id (in the order asked); one statement for all of them."""
        wanted = list(dict.fromkeys(customer_ids))
        if not wanted:
            return {}  # as the SQLite store: no question, no answer (and no round trip)
        found = {cid: (tags, as_of, scored_at) for cid, tags, as_of, scored_at in self._read(lambda cursor: self._lookup(cursor, wanted))}
        return {
            cid: {"customer_id": cid, "as_of": found[cid][1], "scored_at": found[cid][2], "tags": json.loads(found[cid][0])} for cid in wanted if cid in found
        }

    def quality(self) -> list[TagQuality]:
        def run(cursor: Any) -> list[TagQuality]:
            cursor.execute(sql.SQL("SELECT quality FROM {} ORDER BY tag").format(sql.Identifier(QUALITY_VIEW)))
            return [TagQuality(**json.loads(q)) for (q,) in cursor.fetchall()]

        qualities = self._read(run)
        if not qualities and self.snapshot() is None:
            raise OnlineStoreError(f"{self.describe()} has not been loaded yet: run the nightly scoring job (it refreshes the store) or `tagml online refresh`")
        return qualities

    def close(self) -> None:
        """Close every thread's connection (a thread that reads again reconnects)."""
        with self._held_lock:
            held, self._held = self._held, []
        for connection in held:
            try:
                connection.close()
            except psycopg2.Error:
                pass
        self._local.connection = None
