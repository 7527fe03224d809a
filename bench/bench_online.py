"""The embedded online store, measured and chosen: SQLite (tagml's) vs an indexed DuckDB table vs DuckDB over the Parquet partition.

One synthetic partition (scoring/synthetic.py, every catalog tag) of N customers; in the same run, each
candidate is built in its own subprocess (peak RSS per candidate) and then asked for one customer at a time:
  sqlite    SQLiteOnlineStore.refresh (a file of one JSON record per customer) + customer(id)
  duckdb    the partition copied into a DuckDB file table with an ART index on customer_id + SELECT ... WHERE customer_id = ?
  parquet   no build: ParquetTagStore.customer_tags (DuckDB over the partition, what `tagml tags` reads)

    .venv/bin/python bench/bench_online.py --customers 1000000 --lookups 2000
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

AS_OF, PREVIOUS = date(2026, 11, 30), date(2026, 10, 31)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _ids(customers: int, lookups: int) -> list[str]:
    rng = random.Random(7)
    return [f"C{rng.randrange(customers):09d}" for _ in range(lookups)]


def _percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"p50_ms": round(ordered[len(ordered) // 2] * 1e3, 4), "p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1e3, 4), "lookups": len(ordered)}


def step_setup(work: Path, customers: int) -> dict:
    import duckdb

    from tagml.scoring.store import ParquetTagStore
    from tagml.scoring.synthetic import write_synthetic_partition
    from tagml.training.catalog import load_catalog

    store = ParquetTagStore(work / "customer_tags")
    con = duckdb.connect()
    for day in (PREVIOUS, AS_OF):
        if not store.partition_path(day).exists():
            write_synthetic_partition(con, load_catalog(), store.partition_path(day), day, customers, seed=1)
    return {"partition_mb": round(store.partition_path(AS_OF).stat().st_size / 1e6, 1)}


def step_sqlite(work: Path, customers: int, lookups: int) -> dict:
    import duckdb

    from tagml.scoring.online import SQLiteOnlineStore
    from tagml.scoring.store import ParquetTagStore

    con = duckdb.connect()
    con.execute("SET threads = 2")
    online = SQLiteOnlineStore(work / "online" / "tags.sqlite")
    started = time.perf_counter()
    snapshot = online.refresh(con, ParquetTagStore(work / "customer_tags"), AS_OF)
    build = time.perf_counter() - started
    assert snapshot.customers == customers
    seconds = []
    for customer_id in _ids(customers, lookups):
        t0 = time.perf_counter()
        record = online.customer(customer_id)
        seconds.append(time.perf_counter() - t0)
        assert record is not None and record["tags"]
    return {"build_s": round(build, 2), "file_mb": round(online.path.stat().st_size / 1e6, 1), "peak_gb": round(_peak_gb(), 2), **_percentiles(seconds)}


def step_duckdb(work: Path, customers: int, lookups: int) -> dict:
    import duckdb

    from tagml.scoring.store import ParquetTagStore

    path = work / "online" / "tags.duckdb"
    path.unlink(missing_ok=True)
    source = ParquetTagStore(work / "customer_tags").read_sql(AS_OF)
    started = time.perf_counter()
    con = duckdb.connect(str(path))
    con.execute("SET threads = 2")
    con.execute(f"CREATE TABLE tags AS SELECT * FROM {source} ORDER BY customer_id, tag")
    con.execute("CREATE INDEX tags_by_customer ON tags (customer_id)")
    con.execute("CHECKPOINT")
    con.close()
    build = time.perf_counter() - started
    reader = duckdb.connect(str(path), read_only=True)
    assert reader.execute("SELECT count(DISTINCT customer_id) FROM tags").fetchall()[0][0] == customers
    seconds = []
    for customer_id in _ids(customers, lookups):
        t0 = time.perf_counter()
        rows = reader.execute("SELECT * FROM tags WHERE customer_id = ? ORDER BY tag", [customer_id]).fetchall()
        seconds.append(time.perf_counter() - t0)
        assert rows
    return {"build_s": round(build, 2), "file_mb": round(path.stat().st_size / 1e6, 1), "peak_gb": round(_peak_gb(), 2), **_percentiles(seconds)}


def step_parquet(work: Path, customers: int, lookups: int) -> dict:
    import duckdb

    from tagml.scoring.store import ParquetTagStore

    store = ParquetTagStore(work / "customer_tags")
    con = duckdb.connect()
    con.execute("SET threads = 2")
    seconds = []
    for customer_id in _ids(customers, lookups):
        t0 = time.perf_counter()
        frame = store.customer_tags(con, customer_id, AS_OF)
        seconds.append(time.perf_counter() - t0)
        assert len(frame)
    return {"build_s": 0.0, "file_mb": round(store.partition_path(AS_OF).stat().st_size / 1e6, 1), "peak_gb": round(_peak_gb(), 2), **_percentiles(seconds)}


STEPS = {"sqlite": step_sqlite, "duckdb": step_duckdb, "parquet": step_parquet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--lookups", type=int, default=2_000)
    parser.add_argument("--parquet-lookups", type=int, default=200, help="DuckDB over Parquet is ~1000x slower per lookup")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tagml-bench-online"))
    parser.add_argument("--step", choices=["setup", *STEPS], help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work / str(args.customers)
    work.mkdir(parents=True, exist_ok=True)
    if args.step == "setup":
        print(json.dumps(step_setup(work, args.customers)))
        return
    if args.step:
        lookups = args.parquet_lookups if args.step == "parquet" else args.lookups
        print(json.dumps(STEPS[args.step](work, args.customers, lookups)))
        return

    def run(step: str) -> dict:
        out = subprocess.run(
            [sys.executable, __file__, "--step", step, "--customers", str(args.customers), "--lookups", str(args.lookups),
             "--parquet-lookups", str(args.parquet_lookups), "--work", str(args.work)],
            check=True, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    print(f"load before: {os.getloadavg()}", file=sys.stderr)
    setup = run("setup")
    results = {step: run(step) for step in STEPS}
    print(f"load after: {os.getloadavg()}", file=sys.stderr)
    base = results["sqlite"]
    print(f"{args.customers:,} customers, partition {setup['partition_mb']} MB")
    print("| store | build s | file MB | peak RSS GB | lookup p50 ms | lookup p99 ms | p50 / SQLite | p99 / SQLite |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for step, r in results.items():
        print(
            f"| {step} | {r['build_s']} | {r['file_mb']} | {r['peak_gb']} | {r['p50_ms']} | {r['p99_ms']} | "
            f"{r['p50_ms'] / base['p50_ms']:.0f}x | {r['p99_ms'] / base['p99_ms']:.0f}x |"
        )
    print(json.dumps({"customers": args.customers, "setup": setup, "results": results}))


if __name__ == "__main__":
    main()
