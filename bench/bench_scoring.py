"""Scoring every customer with all catalog tags: tagml's chunked scorer vs the naive MLflow path.

Steps, each in its own subprocess so that peak RSS is per step:
  setup    generate a bank, stage it, build features at 2026-10-31; train every model tag on a
           50k-customer bank (small trial budget) and promote it, once per workdir
  tagml    score_partition with reason codes (what the nightly job runs)
  plain    score_partition without reason codes (cost of the reasons)
  naive    for each model tag: pandas.read_parquet(all features) + mlflow.pyfunc.load_model(champion).predict

    .venv/bin/python bench/bench_scoring.py --sizes 100000 1000000
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
AS_OF = date(2026, 10, 31)
TRAIN_CUSTOMERS = 50_000


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def step_train(work: Path, threads: int) -> dict:
    from tagml.core.storage import connect
    from tagml.features.contract import RAW_TABLES
    from tagml.features.synthetic import BankConfig, generate_bank
    from tagml.features.validation import validate_and_stage
    from tagml.scoring.rules import slice_expressions
    from tagml.training.catalog import load_catalog
    from tagml.training.dataset import build_training_set
    from tagml.training.registry import promote
    from tagml.training.tracking import connect_tracking
    from tagml.training.train import train_tag

    bank = work / "train_bank"
    generate_bank(BankConfig(customers=TRAIN_CUSTOMERS, months=12, seed=5), bank / "raw")
    con = connect(threads, "6GB")
    for spec in RAW_TABLES:
        validate_and_stage(con, spec, bank / "raw", bank / "staged")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = connect_tracking(uri)
    versions = {}
    for tag in load_catalog().model_tags:
        data = build_training_set(con, bank / "staged", tag, AS_OF, bank / "sets")
        result = train_tag(
            tag, data, client, slice_expressions(load_catalog(), set(data.feature_names)), artifact_location=str(work / "artifacts"), threads=threads, trials=3
        )
        promote(client, tag.name, result.version, by="bench", reason="scoring benchmark")
        versions[tag.name] = result.version
    return {"versions": versions}


def step_setup(work: Path, size: int, threads: int) -> dict:
    from tagml.core.storage import connect
    from tagml.features.contract import RAW_TABLES
    from tagml.features.customer_features import build_customer_features
    from tagml.features.synthetic import BankConfig, generate_bank
    from tagml.features.validation import validate_and_stage

    bank = work / f"n{size}"
    generate_bank(BankConfig(customers=size, months=12, seed=9), bank / "raw")
    con = connect(threads, "8GB")
    for spec in RAW_TABLES:
        validate_and_stage(con, spec, bank / "raw", bank / "staged")
    rows = build_customer_features(con, bank / "staged", AS_OF, bank / "features.parquet")
    return {"customers": rows}


def step_score(work: Path, size: int, threads: int, reasons: bool, batch_rows: int) -> dict:
    from tagml.core.storage import connect
    from tagml.scoring.score import score_partition
    from tagml.training.catalog import load_catalog
    from tagml.training.tracking import connect_tracking

    bank = work / f"n{size}"
    con = connect(threads, "2GB")
    started = time.perf_counter()
    summary = score_partition(
        con,
        connect_tracking(f"sqlite:///{work / 'mlflow.db'}"),
        load_catalog(),
        bank / "features.parquet",
        bank / "staged",
        AS_OF,
        bank / ("tags.parquet" if reasons else "tags_plain.parquet"),
        batch_rows=batch_rows,
        with_reasons=reasons,
    )
    return {"seconds": time.perf_counter() - started, "rows": summary.rows, "per_tag_seconds": {k: round(v["seconds"], 1) for k, v in summary.per_tag.items()}}


def step_naive(work: Path, size: int, threads: int) -> dict:
    import mlflow
    import pandas as pd

    from tagml.training.catalog import load_catalog
    from tagml.training.versions import registered_model_name

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    started = time.perf_counter()
    rows = 0
    for tag in load_catalog().model_tags:
        model = mlflow.pyfunc.load_model(f"models:/{registered_model_name(tag.name)}@champion")
        features = pd.read_parquet(work / f"n{size}" / "features.parquet")
        schema = model.metadata.get_input_schema().inputs
        names = [c.name for c in schema]
        # the signature wants doubles; integer counts must be cast, as any pyfunc user has to
        X = features[names].astype({c.name: "float64" for c in schema if c.type.name == "double"})
        predictions = model.predict(X)
        rows += len(predictions)
        del features, predictions
    return {"seconds": time.perf_counter() - started, "rows": rows}


def run_step(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "_step", *args], capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"step {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="*", type=int, default=[100_000, 1_000_000])
    parser.add_argument("--workdir", default="bench/out/scoring")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-rows", type=int, default=100_000)
    args = parser.parse_args()
    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    common = ["--workdir", str(work), "--threads", str(args.threads)]
    if not (work / "mlflow.db").exists():
        print("training champions on a 50k-customer bank ...", flush=True)
        run_step(["train", *common])
    results = {"threads": args.threads, "batch_rows": args.batch_rows, "sizes": {}}
    for size in args.sizes:
        sized = [*common, "--size", str(size), "--batch-rows", str(args.batch_rows)]
        if not (work / f"n{size}" / "features.parquet").exists():
            print(f"setting up {size:,} customers ...", flush=True)
            run_step(["setup", *sized])
        entry = {}
        for name in ("tagml", "plain", "naive"):
            entry[name] = run_step([name, *sized])
            # the machine is shared: the 1-minute load average after each step says how contended it was
            entry[name]["load_after"] = round(os.getloadavg()[0], 2)
            print(size, name, json.dumps(entry[name]), flush=True)
        results["sizes"][size] = entry
    results["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print("| customers | path | wall s | customers/s | peak RSS GB | load after |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size, entry in results["sizes"].items():
        for name, label in (
            ("tagml", "tagml scorer, all tags + reasons"),
            ("plain", "tagml scorer, no reasons"),
            ("naive", "naive pyfunc predict, model tags only"),
        ):
            r = entry[name]
            print(f"| {size:,} | {label} | {r['seconds']:.1f} | {size / r['seconds']:,.0f} | {r['peak_rss_gb']:.2f} | {r['load_after']} |")
        print(f"| {size:,} | reasons / plain | {entry['tagml']['seconds'] / entry['plain']['seconds']:.2f}x | | | |")


def _step_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int)
    parser.add_argument("--batch-rows", type=int, default=100_000)
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if args.step == "train":
        out = step_train(work, args.threads)
    elif args.step == "setup":
        out = step_setup(work, args.size, args.threads)
    elif args.step in ("tagml", "plain"):
        out = step_score(work, args.size, args.threads, reasons=args.step == "tagml", batch_rows=args.batch_rows)
    else:
        out = step_naive(work, args.size, args.threads)
    out["peak_rss_gb"] = round(_peak_gb(), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        _step_main(sys.argv[2:])
    else:
        main()
