"""Nightly scoring and drift PSI on Spark local[N] vs the embedded DuckDB path, on the same inputs.

One synthetic bank (`market_shock` from 2026-10) gives the features of 2026-09-30 (drift's reference)
and 2026-10-31 (scored, and drift's current); champions of every model tag are trained once on a
50k-customer bank (--train-customers) (one trial each: the model's quality is not what is measured). Smaller sizes are
the first n customers of the large snapshots. Steps, each in its own subprocess; the parent samples
the RSS of the step's whole process tree (the JVM and Spark's Python workers included) with psutil:

  score_duckdb   score_partition: every catalog tag, reasons on (what the nightly job runs)
  score_spark    score_partition_spark on local[N], the same arguments
  psi_duckdb     feature_psi of all 79 features, overall + value tier + region slices
  psi_spark      the same with spark_bin_counter (bins from the reference in DuckDB, counts on Spark)

A Spark step's work time excludes the session start (reported apart); its first job also starts the
Python workers and loads each champion there.

    .venv/bin/python bench/bench_spark_scoring.py --size 1000000 --scaling-size 250000
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE, AS_OF = date(2026, 9, 30), date(2026, 10, 31)


def _features(work: Path, size: int, day: date) -> Path:
    return work / f"n{size}" / f"features_{day}.parquet"


def _stage(con, raw: Path, staged: Path) -> None:
    from tagml.features.contract import RAW_TABLES
    from tagml.features.validation import validate_and_stage

    for spec in RAW_TABLES:
        validate_and_stage(con, spec, raw, staged)


def step_train(work: Path, size: int, threads: int, master: str) -> dict:
    from tagml.core.storage import connect
    from tagml.features.synthetic import BankConfig, generate_bank
    from tagml.scoring.rules import slice_expressions
    from tagml.training.catalog import load_catalog
    from tagml.training.dataset import build_training_set
    from tagml.training.registry import promote
    from tagml.training.tracking import connect_tracking
    from tagml.training.train import train_tag

    bank = work / "train_bank"
    generate_bank(BankConfig(customers=size, months=12, seed=5), bank / "raw")
    con = connect(threads, "6GB")
    _stage(con, bank / "raw", bank / "staged")
    client = connect_tracking(f"sqlite:///{work / 'mlflow.db'}")
    for tag in load_catalog().model_tags:
        data = build_training_set(con, bank / "staged", tag, AS_OF, bank / "sets")
        slices = slice_expressions(load_catalog(), set(data.feature_names))
        result = train_tag(tag, data, client, slices, artifact_location=str(work / "artifacts"), threads=threads, trials=1)
        promote(client, tag.name, result.version, by="bench", reason="spark scoring benchmark")
    return {}


def step_setup(work: Path, size: int, threads: int, master: str) -> dict:
    from tagml.core.storage import connect, sql_literal
    from tagml.features.customer_features import build_customer_features
    from tagml.features.synthetic import BankConfig, generate_bank

    generate_bank(BankConfig(customers=size, months=12, seed=42, drift="market_shock", drift_month="2026-10"), work / "raw")
    con = connect(threads, "6GB")
    con.execute(f"SET temp_directory = {sql_literal(work / 'spill')}")
    _stage(con, work / "raw", work / "staged")
    return {"customers": {str(day): build_customer_features(con, work / "staged", day, _features(work, size, day)) for day in (REFERENCE, AS_OF)}}


def step_subset(work: Path, size: int, threads: int, master: str, source: int) -> dict:
    """The first `size` customers of the `source`-size snapshots (scored with the same staged labels)."""
    import pyarrow.parquet as pq

    (work / f"n{size}").mkdir(parents=True, exist_ok=True)
    for day in (REFERENCE, AS_OF):
        pq.write_table(pq.read_table(_features(work, source, day)).slice(0, size), _features(work, size, day), compression="zstd")
    return {}


def _session(master: str):
    from tagml.core.spark import spark_session

    t0 = time.perf_counter()
    spark = spark_session(master, "tagml-bench")
    return spark, time.perf_counter() - t0


def _score(work: Path, size: int, threads: int, master: str | None) -> dict:
    from tagml.core.storage import connect
    from tagml.scoring.score import score_partition
    from tagml.scoring.spark_scoring import score_partition_spark
    from tagml.training.catalog import load_catalog
    from tagml.training.tracking import connect_tracking

    con, client = connect(threads, "2GB"), connect_tracking(f"sqlite:///{work / 'mlflow.db'}")
    target = work / f"n{size}" / f"tags_{master or 'duckdb'}.parquet"
    args = (client, load_catalog(), _features(work, size, AS_OF), work / "staged", AS_OF, target)
    extra = {}
    if master is None:
        started = time.perf_counter()
        summary = score_partition(con, *args)
    else:
        spark, extra["session_seconds"] = _session(master)
        started = time.perf_counter()
        summary = score_partition_spark(spark, con, *args)
    return {
        "seconds": time.perf_counter() - started,
        "rows": summary.rows,
        "per_tag_seconds": {k: round(v["seconds"], 1) for k, v in summary.per_tag.items()},
        **extra,
    }


def _psi(work: Path, size: int, threads: int, master: str | None) -> dict:
    from tagml.core.storage import connect
    from tagml.features.dictionary import FEATURES
    from tagml.monitoring.psi import ALL, feature_psi
    from tagml.monitoring.spark_psi import spark_bin_counter
    from tagml.scoring.rules import rule_case_sql
    from tagml.training.catalog import load_catalog

    kinds = {f.name: f.kind for f in FEATURES}
    slices = {"value_tier": rule_case_sql(load_catalog().get("value_tier")), "region": '"region"'}
    con = connect(threads, "6GB")
    extra, counter = {}, None
    if master is not None:
        spark, extra["session_seconds"] = _session(master)
        counter = spark_bin_counter(spark)
    started = time.perf_counter()
    psi = feature_psi(con, _features(work, size, REFERENCE), _features(work, size, AS_OF), kinds, slices, counter)
    overall = psi[psi.slice_column == ALL].set_index("feature")["psi"]
    return {"seconds": time.perf_counter() - started, "features": len(overall), "rows": int(psi["current_rows"].max()), "psi": overall.to_dict(), **extra}


STEPS = {
    "train": step_train,
    "setup": step_setup,
    "score_duckdb": lambda w, s, t, m: _score(w, s, t, None),
    "score_spark": _score,
    "psi_duckdb": lambda w, s, t, m: _psi(w, s, t, None),
    "psi_spark": _psi,
}


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_step(step: str, work: Path, size: int, threads: int, master: str = "", source: int = 0) -> dict:
    """One step in a subprocess, with the peak RSS of its process tree sampled every 0.2 s."""
    command = [sys.executable, __file__, "_step", step, "--workdir", str(work), "--size", str(size), "--threads", str(threads), "--master", master]
    load = os.getloadavg()
    started = time.perf_counter()
    proc = subprocess.Popen([*command, "--source", str(source)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} {size} {master} failed:\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result.update(wall_seconds=round(time.perf_counter() - started, 1), peak_tree_rss_gb=round(peak[0] / 1024**3, 2), load_before=[round(x, 2) for x in load])
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--scaling-size", type=int, default=250_000)
    parser.add_argument("--train-customers", type=int, default=50_000)
    parser.add_argument("--workdir", default="bench/out/spark_scoring")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "mlflow.db").exists():
        print(f"training champions on a {args.train_customers:,}-customer bank ...", flush=True)
        run_step("train", work, args.train_customers, args.threads)
    if not _features(work, args.size, AS_OF).exists():
        print(f"setting up {args.size:,} customers ...", flush=True)
        print(json.dumps(run_step("setup", work, args.size, args.threads)), flush=True)
    if not _features(work, args.scaling_size, AS_OF).exists():
        run_step("subset", work, args.scaling_size, args.threads, source=args.size)
    plan = [(args.size, step, master) for step, master in (("score_duckdb", ""), ("score_spark", "local[2]"), ("psi_duckdb", ""), ("psi_spark", "local[2]"))]
    plan += [(args.scaling_size, step, master) for step in ("score_spark", "psi_spark") for master in ("local[1]", "local[2]")]
    results = []
    for size, step, master in plan:
        result = {"size": size, "step": step, "master": master or "duckdb", **run_step(step, work, size, args.threads, master)}
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "psi"}), flush=True)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    (work / "results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))


def _step_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--master", default="")
    parser.add_argument("--source", type=int, default=0)
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if args.step == "subset":
        out = step_subset(work, args.size, args.threads, args.master, args.source)
    else:
        out = STEPS[args.step](work, args.size, args.threads, args.master)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        _step_main(sys.argv[2:])
    else:
        main()
