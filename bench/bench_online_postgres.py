"""The online store on PostgreSQL vs the embedded SQLite file, in the same run, on a synthetic partition of N customers.

Measures: refresh (partition -> loaded and swapped in) for each store, a second Postgres refresh (the swap and drop of
an old generation), single-customer lookups p50/p99 (random ids, one thread, warm), and Postgres lookups from a
second thread while a refresh runs (the swap's effect on readers). PostgreSQL is started by tests/postgres.py
(initdb on a temp dir, 127.0.0.1, fsync=off: a throwaway server, so COPY's WAL is written but never flushed to disk).

    /work/main/.venv/bin/python bench/bench_online_postgres.py --customers 1000000
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AS_OF, NEXT = date(2026, 10, 31), date(2026, 11, 30)


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 4),
        "p99_ms": round(ordered[int(len(ordered) * 0.99) - 1] * 1000, 4),
        "max_ms": round(ordered[-1] * 1000, 3),
        "n": len(ordered),
    }


def _lookups(store, ids: list[str]) -> dict[str, float]:
    for cid in ids[:200]:  # warm the connection and the prepared statement
        store.customer(cid)
    samples = []
    for cid in ids:
        started = time.perf_counter()
        assert store.customer(cid) is not None
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=20_000)
    args = parser.parse_args()

    from tagml.core.storage import connect
    from tagml.scoring.online import SQLiteOnlineStore
    from tagml.scoring.online_postgres import PostgresOnlineStore
    from tagml.scoring.store import ParquetTagStore
    from tagml.scoring.synthetic import write_synthetic_partition
    from tagml.training.catalog import load_catalog
    from tests.postgres import running_postgres

    work = Path(tempfile.mkdtemp(prefix="bench-online-pg-"))
    con = connect(threads=2, memory_limit="4GB")
    catalog = load_catalog()
    tags = ParquetTagStore(work / "tags")
    result: dict = {"customers": args.customers, "load_before": os.getloadavg()}
    started = time.perf_counter()
    for as_of in (AS_OF, NEXT):
        result["rows"] = write_synthetic_partition(con, catalog, tags.partition_path(as_of), as_of, args.customers, seed=1, changed_share=0.05)
    result["write_partitions_s"] = round(time.perf_counter() - started, 1)
    rng = random.Random(0)
    ids = [f"C{rng.randrange(args.customers):09d}" for _ in range(args.lookups)]

    sqlite = SQLiteOnlineStore(work / "online" / "tags.sqlite")
    started = time.perf_counter()
    sqlite.refresh(con, tags, NEXT)
    result["sqlite_refresh_s"] = round(time.perf_counter() - started, 1)
    result["sqlite_file_mb"] = round((work / "online" / "tags.sqlite").stat().st_size / 1e6)

    with running_postgres() as server:
        os.environ["PGPASSWORD"] = server.password
        database = server.create_database("online")
        online = PostgresOnlineStore(f"postgresql://{server.user}@{server.host}:{server.port}/{database}")
        started = time.perf_counter()
        online.refresh(con, tags, AS_OF)
        result["postgres_refresh_s"] = round(time.perf_counter() - started, 1)

        # lookups from another thread while the second refresh (load, swap, drop of the first generation) runs
        during: list[float] = []
        stop = threading.Event()

        def reader() -> None:
            reading = PostgresOnlineStore(online.url)
            i = 0
            while not stop.is_set():
                t = time.perf_counter()
                reading.customer(ids[i % len(ids)])
                during.append(time.perf_counter() - t)
                i += 1
                time.sleep(0.001)
            reading.close()

        thread = threading.Thread(target=reader)
        thread.start()
        started = time.perf_counter()
        online.refresh(con, tags, NEXT)
        result["postgres_second_refresh_s"] = round(time.perf_counter() - started, 1)
        stop.set()
        thread.join()
        result["postgres_lookup_during_refresh"] = _percentiles(during)
        with server.connect(database) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT pg_total_relation_size(c.oid) FROM pg_class c WHERE relname LIKE 'tagml\\_online\\_customers\\_g%' AND relkind = 'r'")
            result["postgres_table_mb"] = round(sum(r[0] for r in cursor.fetchall()) / 1e6)
        connection.close()

        result["sqlite_lookup"] = _lookups(sqlite, ids)
        result["postgres_lookup"] = _lookups(online, ids)
        assert all(online.customer(cid) == sqlite.customer(cid) for cid in ids[:2000])  # the same records
        online.close()
    sqlite.close()
    result["ratios_postgres_over_sqlite"] = {
        "refresh": round(result["postgres_refresh_s"] / result["sqlite_refresh_s"], 2),
        "lookup_p50": round(result["postgres_lookup"]["p50_ms"] / result["sqlite_lookup"]["p50_ms"], 1),
        "lookup_p99": round(result["postgres_lookup"]["p99_ms"] / result["sqlite_lookup"]["p99_ms"], 1),
    }
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
