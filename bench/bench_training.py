"""Model quality and training cost per model tag on a synthetic bank.

For each model tag in the catalog: build the training set (labels at their own dates), train with the
catalog's budget (Optuna + MLflow SQLite + registry), and compare the held-out accuracy with the best
achievable accuracy, E[max_k p_k] of the generator's true label probabilities for the same test rows.
Also reports where training time goes: inside the learner (xgboost fit/predict) vs everything else
(Optuna, MLflow logging and registration, preprocessing, evaluation, plots).

    .venv/bin/python bench/bench_training.py --customers 750000   # ~200k risk questionnaires
"""

import argparse
import json
import os
import platform
import resource
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd

from tagml.core.storage import connect
from tagml.features.contract import RAW_TABLES
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.features.validation import validate_and_stage
from tagml.scoring.rules import slice_expressions
from tagml.training.catalog import load_catalog
from tagml.training.dataset import build_training_set
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag

TRAIN_AS_OF = date(2026, 10, 31)


def bayes_accuracy(raw_dir: Path, tag: str, test: pd.DataFrame) -> float:
    truth = pd.read_parquet(raw_dir / "_truth" / f"{tag}.parquet")
    truth["label_date"] = pd.to_datetime(truth["label_date"])
    rows = test[["customer_id", "as_of"]].assign(as_of=lambda d: pd.to_datetime(d["as_of"]))
    joined = rows.merge(truth, left_on=["customer_id", "as_of"], right_on=["customer_id", "label_date"], how="left")
    probs = joined[[c for c in truth.columns if c.startswith("p_")]].to_numpy()
    assert not np.isnan(probs).any(), "every test row has its true probabilities"
    return float(probs.max(axis=1).mean())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--customers", type=int, default=750_000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--workdir", default="bench/out/training")
    parser.add_argument("--tags", nargs="*")
    parser.add_argument("--trials", type=int, help="override the catalog's trial budget")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    work = Path(args.workdir) / f"n{args.customers}"
    raw, staged = work / "raw", work / "staged"
    results: dict = {"customers": args.customers, "seed": args.seed, "threads": args.threads, "tags": {}}
    started = time.perf_counter()
    if not (raw / "_truth" / "manifest.json").exists():
        generate_bank(BankConfig(customers=args.customers, months=12, seed=args.seed), raw)
    con = connect(args.threads, "8GB")
    if not (staged / "tag_labels.parquet").exists():
        for spec in RAW_TABLES:
            validate_and_stage(con, spec, raw, staged)
    results["prepare_seconds"] = time.perf_counter() - started

    catalog = load_catalog()
    uri = f"sqlite:///{(work / 'mlflow.db').resolve()}"
    for tag in catalog.model_tags:
        if args.tags and tag.name not in args.tags:
            continue
        t0 = time.perf_counter()
        data = build_training_set(con, staged, tag, TRAIN_AS_OF, work / "training_sets", seed=0)
        t_set = time.perf_counter() - t0
        t0 = time.perf_counter()
        result = train_tag(
            tag,
            data,
            connect_tracking(uri),
            slice_expressions(catalog, set(data.feature_names)),
            artifact_location=str((work / "artifacts").resolve()),
            threads=args.threads,
            trials=args.trials,
        )
        t_train = time.perf_counter() - t0
        test = data.frame[data.frame["split"] == "test"]
        best = bayes_accuracy(raw, tag.name, test)
        m = result.metrics
        results["tags"][tag.name] = {
            "labelled_rows": len(data.frame),
            "train_rows": int((data.frame["split"] == "train").sum()),
            "test_rows": len(test),
            "trials": args.trials or tag.model.trials,
            "training_set_seconds": round(t_set, 1),
            "train_seconds": round(t_train, 1),
            "learner_seconds": round(result.seconds.get("model_fit", 0.0), 1),
            "outside_learner_share": round(1 - result.seconds.get("model_fit", 0.0) / t_train, 3),
            "macro_f1": round(m["macro_f1"], 4),
            "accuracy": round(m["accuracy"], 4),
            "best_achievable_accuracy": round(best, 4),
            "accuracy_vs_best": round(m["accuracy"] / best, 4),
            "roc_auc_ovr": round(m["roc_auc_ovr"], 4),
            "calibration_error": round(m["calibration_error"], 4),
            "calibration_error_debiased": round(m["calibration_error_debiased"], 4),
            "baseline_macro_f1": round(result.baseline_metrics.get("macro_f1", float("nan")), 4),
            "seconds": {k: round(v, 1) for k, v in result.seconds.items()},
        }
        print(tag.name, json.dumps(results["tags"][tag.name]), flush=True)
    results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
    results["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    out = work / "results.json"
    out.write_text(json.dumps(results, indent=2))
    print("| tag | labelled | test rows | macro-F1 | accuracy | best achievable | ratio | ECE (debiased) | train s | outside learner |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results["tags"].items():
        print(
            f"| {name} | {r['labelled_rows']:,} | {r['test_rows']:,} | {r['macro_f1']:.3f} | {r['accuracy']:.3f} | {r['best_achievable_accuracy']:.3f} "
            f"| {r['accuracy_vs_best']:.3f} | {r['calibration_error']:.3f} ({r['calibration_error_debiased']:.3f}) | {r['train_seconds']:.0f} | {r['outside_learner_share']:.0%} |"
        )
    print(f"peak RSS {results['peak_rss_gb']} GB; results in {out}")


if __name__ == "__main__":
    main()
