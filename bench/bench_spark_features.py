"""Feature snapshot on Spark local[N] vs DuckDB: wall time, peak memory, scaling, extrapolation.

    .venv/bin/python bench/bench_spark_features.py --prepare 250000 500000 1000000     # generate + stage (bench_features.py steps)
    .venv/bin/python bench/bench_spark_features.py duckdb:1000000 spark2:1000000 spark2:250000 spark2:500000 spark1:500000

Each run (`<engine>:<customers>`, engine duckdb | spark1 | spark2 = local[1] | local[2]) builds the 79
features for --as-of in its own interpreter (`bench_spark_features.py _run ...`), with
`build_customer_features` or `build_customer_features_spark` on the bank that bench_features.py
generates and stages under --workdir (`n<customers>/staged`). The child reports the wall time of
the build itself and, for Spark, the session start separately. The parent polls the child's process
tree with psutil (the Python driver and the JVM pyspark starts) and reports the peak of their summed
RSS, the tree's CPU seconds, and how much CPU other processes used meanwhile (the machine is shared).
After each Spark run at a size that DuckDB also ran, the two snapshots are compared feature by
feature (doubles within 1e-9 relative, everything else exactly).
"""

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_features import DEFAULT_WORKDIR, Timer, _busy_cpu_s, bank_dir

MASTERS = {"spark1": "local[1]", "spark2": "local[2]"}


def run_child(args) -> None:
    d = bank_dir(args.workdir, args.size)
    as_of = date.fromisoformat(args.as_of)
    target = d / f"features_{args.engine}.parquet"
    result: dict = {}
    if args.engine == "duckdb":
        from tagml.core.storage import connect
        from tagml.features.customer_features import build_customer_features

        con = connect(2, "8GB")
        con.execute("SET enable_progress_bar = false")
        timer = Timer()
        rows = build_customer_features(con, d / "staged", as_of, target)
    else:
        from tagml.core.spark import spark_session
        from tagml.features.spark_features import build_customer_features_spark

        t = time.perf_counter()
        spark = spark_session(MASTERS[args.engine], "tagml-bench")
        result["session_s"] = round(time.perf_counter() - t, 1)
        timer = Timer()
        rows = build_customer_features_spark(spark, d / "staged", as_of, target)
    print("RESULT " + json.dumps({**timer.done(rows=rows), **result}), flush=True)


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def launch(args, engine: str, size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "_run", engine, str(size), "--workdir", str(args.workdir), "--as-of", args.as_of]
    log = bank_dir(args.workdir, size) / f"spark_bench_{engine}.log"
    busy0, t0 = _busy_cpu_s(), time.perf_counter()
    load = psutil.getloadavg()[0]
    peak_rss, cpu = 0, {}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=bank_dir(args.workdir, size))
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            rss = 0
            for p in _tree(watched):
                try:
                    rss += p.memory_info().rss
                    times = p.cpu_times()
                    cpu[p.pid] = times.user + times.system + times.children_user + times.children_system
                except psutil.NoSuchProcess:
                    pass
            peak_rss = max(peak_rss, rss)
            time.sleep(0.2)
    process_s = time.perf_counter() - t0
    others = max(0.0, (_busy_cpu_s() - busy0) - sum(cpu.values())) / (psutil.cpu_count() * process_s)
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"engine": engine, "customers": size, "failed": f"exit {proc.returncode}, see {log}"}
    result = json.loads(lines[-1][len("RESULT ") :])
    return {
        "engine": engine,
        "customers": size,
        **result,
        "process_s": round(process_s, 1),
        "peak_rss_gb": round(peak_rss / 1024**3, 2),
        "tree_cpu_s": round(sum(cpu.values()), 1),
        "others_cpu_share": round(others, 2),
        "load1_before": round(load, 2),
    }


def compare(d: Path, engine: str) -> dict:
    """DuckDB's and this engine's snapshot: rows, column types, features beyond 1e-9 relative (doubles) or differing."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    duck, other = pq.read_table(d / "features_duckdb.parquet"), pq.read_table(d / f"features_{engine}.parquet")
    differing = []
    for name in duck.column_names:
        a, b = duck.column(name), other.column(name)
        if pa.types.is_floating(a.type):
            x, y = a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False)
            bad = int((~(np.isclose(x, y, rtol=1e-9, atol=0.0) | (np.isnan(x) & np.isnan(y)))).sum())
        else:
            same = pc.or_(pc.fill_null(pc.equal(a, b), False), pc.and_(pc.is_null(a), pc.is_null(b)))
            bad = int(pc.sum(pc.invert(same)).as_py() or 0)
        if bad:
            differing.append(name)
    return {
        "rows_equal": duck.num_rows == other.num_rows,
        "types_equal": [f.type for f in duck.schema] == [f.type for f in other.schema],
        "differing": differing,
    }


def prepare(args) -> None:
    for size in args.prepare:
        d = bank_dir(args.workdir, size)
        for step, done in (("generate", d / "raw"), ("stage", d / "staged")):
            if not done.exists():
                cmd = [sys.executable, str(HERE / "bench_features.py"), "_step", step, "--size", str(size), "--workdir", str(args.workdir)]
                t = time.perf_counter()
                d.mkdir(parents=True, exist_ok=True)
                subprocess.run(cmd, check=True, cwd=d, stdout=subprocess.DEVNULL)
                print(f"{step} {size}: {time.perf_counter() - t:.0f} s", flush=True)


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_run":
        p = argparse.ArgumentParser()
        p.add_argument("engine", choices=["duckdb", *MASTERS])
        p.add_argument("size", type=int)
        p.add_argument("--workdir", type=Path, required=True)
        p.add_argument("--as-of", required=True)
        run_child(p.parse_args(argv[1:]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="engine:customers, engine = duckdb | spark1 | spark2")
    p.add_argument("--prepare", type=int, nargs="*", default=[], help="generate and stage these bank sizes when missing")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--as-of", default="2026-10-31")
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    prepare(args)
    results = []
    for run in args.runs:
        engine, size = run.split(":")
        result = launch(args, engine, int(size))
        d = bank_dir(args.workdir, int(size))
        if engine != "duckdb" and "failed" not in result and (d / "features_duckdb.parquet").exists():
            result["vs_duckdb"] = compare(d, engine)
        print(json.dumps(result), flush=True)
        results.append(result)
    if results:
        out = args.workdir / f"spark-results-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
        out.write_text(json.dumps(results, indent=1))
        print(f"results: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
