"""Feature drift of every customer x all 79 features: tagml's tag_drift computation vs Evidently's
DataDriftPreset on the full data.

Data: a synthetic bank with a market shock from 2026-10; reference = the features of 2026-09-30,
current = those of 2026-10-31 (one month of change plus the shock), as tag_drift compares them.

Steps, each in its own subprocess so that peak RSS is per step:
  prepare         generate, stage, build both feature snapshots (once per size, reused)
  tagml           what tag_drift does for the features: PSI of every feature over every customer,
                  overall and per slice (value tier, region), in DuckDB; plus Evidently's preset on
                  the fixed 5,000-row samples for the report (Evidently's import timed separately)
  evidently_full  Evidently's DataDriftPreset on all rows of both snapshots, killed after --cap seconds

The effect of sampling on detection is measured on the same data: per-feature verdicts of PSI on
the samples vs PSI on everyone, and of Evidently on the samples vs Evidently on everyone (where the
full run finishes).

    .venv/bin/python bench/bench_drift.py --sizes 100000 1000000 --cap 600
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import UTC, date, datetime
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "bench" / "out" / "drift"
REFERENCE, CURRENT = date(2026, 9, 30), date(2026, 10, 31)
SAMPLE_ROWS = 5000
PSI_FLAG = 0.2


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _paths(n: int) -> dict[str, Path]:
    work = OUT / f"n{n}"
    return {
        "work": work,
        "raw": work / "raw",
        "staged": work / "staged",
        "reference": work / f"features_{REFERENCE}.parquet",
        "current": work / f"features_{CURRENT}.parquet",
    }


def _kinds() -> dict[str, str]:
    from tagml.features.dictionary import FEATURES

    return {f.name: f.kind for f in FEATURES}


def step_prepare(n: int, threads: int) -> dict:
    from tagml.core.storage import connect, sql_literal
    from tagml.features.contract import RAW_TABLES
    from tagml.features.customer_features import build_customer_features
    from tagml.features.synthetic import BankConfig, generate_bank
    from tagml.features.validation import validate_and_stage

    p = _paths(n)
    started = time.perf_counter()
    if not p["current"].exists():
        generate_bank(BankConfig(customers=n, months=12, seed=42, drift="market_shock", drift_month="2026-10"), p["raw"])
        con = connect(threads, "6GB")
        con.execute(f"SET temp_directory = {sql_literal(p['work'] / 'spill')}")
        for spec in RAW_TABLES:
            validate_and_stage(con, spec, p["raw"], p["staged"])
        for day, target in ((REFERENCE, p["reference"]), (CURRENT, p["current"])):
            build_customer_features(con, p["staged"], day, target)
    return {"seconds": time.perf_counter() - started}


def _columns(kinds: dict[str, str]) -> tuple[list[str], list[str]]:
    numeric = [c for c, k in kinds.items() if k != "categorical"]
    categorical = [c for c, k in kinds.items() if k == "categorical"]
    return numeric, categorical


def step_tagml(n: int, threads: int) -> dict:
    from tagml.core.storage import connect, write_parquet_atomically
    from tagml.monitoring.psi import ALL, feature_psi
    from tagml.monitoring.reference import sample_sql
    from tagml.scoring.rules import rule_case_sql
    from tagml.training.catalog import load_catalog

    p = _paths(n)
    kinds = _kinds()
    con = connect(threads, "6GB")
    slices = {"value_tier": rule_case_sql(load_catalog().get("value_tier")), "region": '"region"'}
    t0 = time.perf_counter()
    full = feature_psi(con, p["reference"], p["current"], kinds, slices)
    psi_seconds = time.perf_counter() - t0
    overall = full[full["slice_column"] == ALL].set_index("feature")["psi"]

    # the report's fixed samples (features only), as tag_drift draws them
    t0 = time.perf_counter()
    samples = {}
    for side in ("reference", "current"):
        samples[side] = con.execute(sample_sql(p[side], list(kinds), SAMPLE_ROWS)).df()
    sample_seconds = time.perf_counter() - t0
    # PSI on the samples alone: what detection would be had PSI itself been sampled
    for side, frame in samples.items():
        con.register("_s", frame)
        write_parquet_atomically(con, "SELECT * FROM _s", p["work"] / f"sample_{side}.parquet")
        con.unregister("_s")
    sampled = feature_psi(con, p["work"] / "sample_reference.parquet", p["work"] / "sample_current.parquet", kinds)
    sampled_psi = sampled[sampled["slice_column"] == ALL].set_index("feature")["psi"]

    t0 = time.perf_counter()
    from evidently import DataDefinition, Dataset, Report  # noqa: F401  (timed: ~4 s)
    from evidently.presets import DataDriftPreset  # noqa: F401

    import_seconds = time.perf_counter() - t0

    from tagml.monitoring.report import drift_report

    numeric, categorical = _columns(kinds)
    t0 = time.perf_counter()
    summary = drift_report(samples["reference"], samples["current"], numeric, categorical, 0.3, p["work"] / "report_sample.html")
    evidently_seconds = time.perf_counter() - t0
    return {
        "seconds": psi_seconds + sample_seconds + import_seconds + evidently_seconds,
        "psi_seconds": psi_seconds,
        "sample_seconds": sample_seconds,
        "evidently_import_seconds": import_seconds,
        "evidently_sample_seconds": evidently_seconds,
        "psi_rows": int(full["current_rows"].max()),
        "slices": int(full[["slice_column", "slice"]].drop_duplicates().shape[0]),
        "psi": overall.to_dict(),
        "psi_sample": sampled_psi.to_dict(),
        "evidently_sample": {c: v.get("drifted") for c, v in summary.columns.items()},
        "evidently_sample_share": summary.drifted_share,
        "peak_gb": _peak_gb(),
    }


def step_evidently_full(n: int, threads: int) -> dict:
    import pandas as pd

    p = _paths(n)
    kinds = _kinds()
    t0 = time.perf_counter()
    from evidently import Report  # noqa: F401

    from tagml.monitoring.report import drift_report

    import_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = pd.read_parquet(p["reference"], columns=list(kinds))
    current = pd.read_parquet(p["current"], columns=list(kinds))
    read_seconds = time.perf_counter() - t0
    numeric, categorical = _columns(kinds)
    t0 = time.perf_counter()
    summary = drift_report(reference, current, numeric, categorical, 0.3, p["work"] / "report_full.html")
    run_seconds = time.perf_counter() - t0
    return {
        "seconds": read_seconds + run_seconds + import_seconds,
        "read_seconds": read_seconds,
        "evidently_import_seconds": import_seconds,
        "evidently_seconds": run_seconds,
        "evidently_full": {c: v.get("drifted") for c, v in summary.columns.items()},
        "evidently_full_share": summary.drifted_share,
        "peak_gb": _peak_gb(),
    }


STEPS = {"prepare": step_prepare, "tagml": step_tagml, "evidently_full": step_evidently_full}


def _child(step: str, n: int, threads: int, cap: float, mem_cap_gb: float = 12.0) -> dict:
    """Run one step in a subprocess; past `cap` seconds or `mem_cap_gb` of RSS it is killed and reported as not finished
    (the machine is shared: a step must not take all of its memory)."""
    out = OUT / f"n{n}" / f"{step}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", step, "--n", str(n), "--threads", str(threads), "--out", str(out)])
    peak_kb = 0
    while proc.poll() is None:
        if time.perf_counter() - started > cap:
            proc.kill()
            proc.wait()
            return {"step": step, "n": n, "finished": False, "cap_seconds": cap, "peak_gb": peak_kb / 1024**2, "load_before": load}
        try:  # the child's high-water mark, for a child that may never report it
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            pass
        if peak_kb / 1024**2 > mem_cap_gb:
            proc.kill()
            proc.wait()
            return {
                "step": step,
                "n": n,
                "finished": False,
                "cap_seconds": cap,
                "peak_gb": peak_kb / 1024**2,
                "load_before": load,
                "error": f"killed at the {mem_cap_gb:.0f} GB memory cap after {time.perf_counter() - started:.0f} s",
            }
        time.sleep(0.5)
    if proc.returncode != 0:
        return {"step": step, "n": n, "finished": False, "error": f"exit code {proc.returncode}", "load_before": load}
    result = json.loads(out.read_text())
    return {"step": step, "n": n, "finished": True, "wall_seconds": time.perf_counter() - started, "load_before": load, "cap_seconds": cap, **result}


def _agreement(a: dict, b: dict) -> tuple[int, int, list[str], list[str]]:
    """(features compared, agreeing, flagged only by a, flagged only by b)."""
    common = [f for f in a if f in b and a[f] is not None and b[f] is not None]
    only_a = sorted(f for f in common if a[f] and not b[f])
    only_b = sorted(f for f in common if b[f] and not a[f])
    return len(common), len(common) - len(only_a) - len(only_b), only_a, only_b


def render(results: list[dict]) -> str:
    import duckdb
    import evidently
    import pandas

    lines = [
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; duckdb {duckdb.__version__}, "
            f"evidently {evidently.__version__}, pandas {pandas.__version__}. Command: `.venv/bin/python bench/bench_drift.py "
            f"--sizes {' '.join(str(n) for n in sorted({r['n'] for r in results}))} --cap {max((r.get('cap_seconds', 0) for r in results if r['step'] == 'evidently_full'), default=0):.0f}`."
        ),
        "",
        "| customers | path | wall s | peak RSS GB | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    by = {(r["n"], r["step"]): r for r in results}
    for n in sorted({r["n"] for r in results}):
        t = by.get((n, "tagml"))
        e = by.get((n, "evidently_full"))
        if t and t["finished"]:
            lines.append(
                f"| {n:,} | tagml: PSI of 79 features, all customers, overall + value tier and region ({t['slices'] - 1} slices), DuckDB | {t['psi_seconds']:.1f} | | |"
            )
            lines.append(
                f"| {n:,} | tagml: + Evidently preset on {SAMPLE_ROWS:,}-row samples (import {t['evidently_import_seconds']:.1f} s, run {t['evidently_sample_seconds']:.1f} s) "
                f"| {t['seconds']:.1f} | {t['peak_gb']:.2f} | load before {t['load_before']:.1f} |"
            )
        if e:
            if e["finished"]:
                lines.append(
                    f"| {n:,} | Evidently preset on all rows (read {e['read_seconds']:.1f} s, import {e['evidently_import_seconds']:.1f} s, run {e['evidently_seconds']:.1f} s) "
                    f"| {e['seconds']:.1f} | {e['peak_gb']:.2f} | load before {e['load_before']:.1f} |"
                )
            else:
                lines.append(
                    f"| {n:,} | Evidently preset on all rows | did not finish in {e.get('cap_seconds', 0):.0f} s | ≥ {e.get('peak_gb', 0):.2f} | {e.get('error', 'killed at the cap')} |"
                )
    lines.append("")
    for n in sorted({r["n"] for r in results}):
        t, e = by.get((n, "tagml")), by.get((n, "evidently_full"))
        if not (t and t["finished"]):
            continue
        full = {f: v > PSI_FLAG for f, v in t["psi"].items()}
        sample = {f: v > PSI_FLAG for f, v in t["psi_sample"].items()}
        total, agree, only_full, only_sample = _agreement(full, sample)
        lines.append(
            f"- {n:,}: PSI > {PSI_FLAG} on everyone flags {sum(full.values())} of {total} features; on the {SAMPLE_ROWS:,}-row samples "
            f"{sum(sample.values())}; verdicts agree on {agree}/{total}"
            + (f" (missed by the sample: {', '.join(only_full)}" if only_full else "")
            + (f"; only on the sample: {', '.join(only_sample)}" if only_sample else "")
            + (")" if only_full or only_sample else "")
            + "."
        )
        if e and e["finished"]:
            total, agree, only_full, only_sample = _agreement(e["evidently_full"], t["evidently_sample"])
            lines.append(
                f"- {n:,}: Evidently on everyone flags {sum(bool(v) for v in e['evidently_full'].values())} columns "
                f"(share {e['evidently_full_share']:.2f}), on the samples {sum(bool(v) for v in t['evidently_sample'].values())} "
                f"(share {t['evidently_sample_share']:.2f}); verdicts agree on {agree}/{total}"
                + (f"; missed by the sample: {', '.join(only_full)}" if only_full else "")
                + (f"; only on the sample: {', '.join(only_sample)}" if only_sample else "")
                + "."
            )
            lines.append(
                f"- {n:,}: Evidently on everyone / tagml = {e['seconds'] / t['seconds']:.1f}× the time, {e['peak_gb'] / t['peak_gb']:.1f}× the peak memory."
            )
    return "\n".join(lines)


def nightly_drift(home: Path, as_of: str, policy: str) -> dict:
    """tag_drift of one as_of in a finished home, as the nightly runs it (the Dagster asset, in process), under a report policy."""
    started = time.perf_counter()
    import dagster as dg

    from tagml.core.settings import Settings
    from tagml.orchestration.definitions import build_definitions
    from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB

    # the process environment: stored home-relative paths (training snapshots) resolve through it
    os.environ.update({"TAGML_HOME": str(home), "TAGML_DRIFT_REPORT": policy})
    settings = Settings.from_env()
    defs = build_definitions(settings)
    imported = time.perf_counter() - started
    job = defs.resolve_job_def(NIGHTLY_SCORING_JOB)
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), partition_key=as_of, asset_selection=[dg.AssetKey("tag_drift")])
    step = next(e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "tag_drift")
    metadata = step.materialization.metadata
    return {
        "policy": policy,
        "as_of": as_of,
        "seconds": round(time.perf_counter() - started, 1),
        "import_seconds": round(imported, 1),
        "reports": metadata["reports"].value,
        "report_why": metadata["report_why"].value,
        "drifted_tags": metadata["drifted_tags"].value,
        "peak_gb": round(_peak_gb(), 2),
    }


# columns that record when and how long, not what: left out of the old-vs-new comparison
TIMING_COLUMNS = ("computed_at", "seconds", "generation")
HISTORY_KEYS = {
    "drift_summary": ["tag"],
    "drift_features": ["tag", "slice_column", "slice", "feature"],
    "drift_predictions": ["tag", "slice_column", "slice", "class"],
}


def _monitoring_from(checkout: Path) -> None:
    """Import tagml.monitoring from another checkout (e.g. the base commit) so old and new code run on the same data.

    Only the monitoring package is swapped: the rest of tagml is this checkout's, which a drift branch leaves as the base had it.
    """
    import importlib.util

    import tagml  # noqa: F401  (the parent package first)

    init = checkout / "monitoring" / "__init__.py"
    spec = importlib.util.spec_from_file_location("tagml.monitoring", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tagml.monitoring"] = module
    spec.loader.exec_module(module)


def drifted_catalog(out: Path, tag: str) -> Path:
    """The shipped catalog with `tag`'s class PSI threshold at 0, so that it drifts on any night: a night with one report."""
    import yaml

    from tagml.training.catalog import DEFAULT_CATALOG

    raw = yaml.safe_load(Path(DEFAULT_CATALOG).read_text())
    entry = next(t for t in raw["tags"] if t["name"] == tag)
    entry["drift"] = {**entry.get("drift", {}), "prediction_psi": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"catalog_{tag}_drifted.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def night_drift(home: Path, mlflow_db: Path, drift_dir: Path, as_of: str, policy: str, catalog: str | None, threads: int, profile: Path | None) -> dict:
    """compute_drift of one night on a staged, featurized and scored home, as bench/bench_nightly.py's drift stage calls it."""
    import cProfile

    from tagml.core.storage import connect
    from tagml.monitoring.drift import DriftLocations, compute_drift
    from tagml.scoring.store import ParquetTagStore
    from tagml.training.catalog import DEFAULT_CATALOG, load_catalog
    from tagml.training.tracking import connect_tracking

    warehouse = home / "warehouse"
    locations = DriftLocations(warehouse, ParquetTagStore.in_warehouse(warehouse), drift_dir, drift_dir.parent / "reports")
    con = connect(threads, "3GB")
    client = connect_tracking(f"sqlite:///{mlflow_db}")
    tags = load_catalog(catalog or DEFAULT_CATALOG)
    before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    profiler = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if profiler:
        profiler.enable()
    run = compute_drift(con, client, tags, date.fromisoformat(as_of), locations, sample_rows=SAMPLE_ROWS, report=policy)
    if profiler:
        profiler.disable()
        profiler.dump_stats(str(profile))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = [a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before)]
    return {
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu[0], 2),
        "report_child_cpu_seconds": round(cpu[1], 2),
        "drifted": [r.tag for r in run.results if r.drifted],
        "reports": list(run.report_plan.tags) if run.report_plan else [],
        "per_tag_seconds": {r.tag: round(r.summary["seconds"], 2) for r in run.results},
        "peak_gb": round(_peak_gb(), 2),
    }


def _history(drift_dir: Path, as_of: date) -> dict:
    import duckdb
    import numpy as np

    from tagml.monitoring.history import DriftHistory

    history = DriftHistory(drift_dir)
    con = duckdb.connect()
    frames = {}
    for table, keys in HISTORY_KEYS.items():
        frame = con.execute(f"SELECT * FROM read_parquet('{history.path(table, as_of)}')").df()
        frame = frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame])
        if "reference_population" in frame:  # each code's own drift directory holds the populations it built
            frame["reference_population"] = frame["reference_population"].str.replace(str(drift_dir), "<drift_dir>", regex=False)
        for column in frame.columns:  # list cells (reasons, drifted features) compare as tuples
            if frame[column].dtype == object:
                frame[column] = frame[column].map(lambda v: tuple(v) if isinstance(v, (list, np.ndarray)) else v)
        frames[table] = frame.sort_values(keys).reset_index(drop=True)
    return frames


def compare_histories(old: Path, new: Path, as_of: date) -> dict:
    """Per history table: rows, whether every cell is equal (==, NaN equal to NaN) and the largest float difference."""
    import numpy as np

    a, b = _history(old, as_of), _history(new, as_of)
    out = {}
    for table in HISTORY_KEYS:
        x, y = a[table], b[table]
        entry = {"rows": [len(x), len(y)], "columns_equal": list(x.columns) == list(y.columns)}
        if len(x) == len(y) and entry["columns_equal"]:
            unequal, max_diff = [], 0.0
            for column in x.columns:
                left, right = x[column], y[column]
                same = (left == right) | (left.isna() & right.isna())
                if not same.all():
                    unequal.append(column)
                    if np.issubdtype(left.dtype, np.floating):
                        max_diff = max(max_diff, float(np.nanmax(np.abs(left.to_numpy() - right.to_numpy()))))
            entry.update(identical=not unequal, unequal_columns=unequal, max_float_difference=max_diff)
        out[table] = entry
    return out


def night_bench(args: argparse.Namespace) -> int:
    """Old (--compare-with checkout) vs new monitoring code on one night, alternated --repeat times.

    Each code gets its own drift directory, started from a copy of the home's and warmed by one untimed run of that
    code: the two codes' reference caches differ in format and location (a cache keyed by an absolute path is cold in
    any copy), and a night after the first is what a nightly pays. The timed runs then reuse that directory in place.
    """
    import shutil

    home, out = Path(args.night_home), Path(args.out_dir)
    catalog = str(drifted_catalog(out, args.drifted_tag)) if args.drifted_tag else None
    codes = ["old", "new"] if args.compare_with else ["new"]

    def child(code: str, result: Path, profile: Path | None) -> dict:
        drift_dir = out / code / "drift"
        argv = [sys.executable, __file__, "--child", "night", "--night-home", str(home), "--mlflow-db", args.mlflow_db, "--drift-dir", str(drift_dir)]
        argv += ["--as-of", args.as_of, "--policies", args.policies[0], "--threads", str(args.threads), "--out", str(result)]
        if catalog:
            argv += ["--catalog", catalog]
        if profile:
            argv += ["--profile-out", str(profile)]
        if code == "old":
            argv += ["--compare-with", args.compare_with]
        load = os.getloadavg()
        subprocess.run(argv, check=True)
        return {"code": code, "load_before": round(load[0], 2), **json.loads(result.read_text())}

    warmups = {}
    for code in codes:
        shutil.rmtree(out / code, ignore_errors=True)
        shutil.copytree(home / "drift", out / code / "drift", symlinks=True)  # never the original
        warmups[code] = child(code, out / code / "warmup.json", None)
        print(json.dumps({"warm_up": True, **warmups[code]}), flush=True)
    runs: list[dict] = []
    for i in range(args.repeat):
        for code in codes:
            result = {"repeat": i, **child(code, out / code / f"result_{i}.json", out / code / f"drift_{i}.prof" if args.profile else None)}
            print(json.dumps(result), flush=True)
            runs.append(result)
    summary: dict = {"as_of": args.as_of, "policy": args.policies[0], "drifted_tag": args.drifted_tag, "warm_ups": warmups, "runs": runs}
    if args.compare_with:
        summary["equality"] = compare_histories(out / "old" / "drift", out / "new" / "drift", date.fromisoformat(args.as_of))
        for metric in ("wall_seconds", "cpu_seconds"):
            old = sorted(r[metric] for r in runs if r["code"] == "old")
            new = sorted(r[metric] for r in runs if r["code"] == "new")
            summary[f"old_over_new_{metric}"] = round(old[len(old) // 2] / new[len(new) // 2], 2)
    (out / "night_bench.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nightly-home", help="a finished home (a copy: drift results are rewritten): time its tag_drift under each --policies")
    parser.add_argument("--as-of", default="2026-10-31")
    parser.add_argument("--policies", nargs="+", default=["always", "on_drift_or_weekly"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap", type=float, default=600, help="seconds before Evidently on the full data is killed")
    parser.add_argument("--mem-cap-gb", type=float, default=12.0, help="RSS at which a step is killed (the machine is shared)")
    parser.add_argument("--skip-full", action="store_true", help="do not run Evidently on the full data")
    parser.add_argument("--render", help="print the markdown of a results JSON file")
    parser.add_argument("--child")
    parser.add_argument("--n", type=int)
    parser.add_argument("--out")
    parser.add_argument("--night-home", help="a staged, featurized and scored home with a warm drift/ directory: time compute_drift of --as-of")
    parser.add_argument("--mlflow-db", help="the champions' MLflow SQLite file (--night-home)")
    parser.add_argument("--compare-with", help="a checkout whose monitoring package is the old code (--night-home): old vs new, same data")
    parser.add_argument("--repeat", type=int, default=1, help="old/new pairs (--night-home); ratios of the medians")
    parser.add_argument("--drifted-tag", help="make this tag drift (its class PSI threshold 0): a night with one report")
    parser.add_argument("--out-dir", default=str(OUT / "night"))
    parser.add_argument("--profile", action="store_true", help="cProfile each night run (drift.prof beside its result)")
    parser.add_argument("--profile-out")
    parser.add_argument("--drift-dir")
    parser.add_argument("--catalog")
    args = parser.parse_args()
    if args.child == "night":
        if args.compare_with:
            _monitoring_from(Path(args.compare_with))
        result = night_drift(
            Path(args.night_home),
            Path(args.mlflow_db),
            Path(args.drift_dir),
            args.as_of,
            args.policies[0],
            args.catalog,
            args.threads,
            Path(args.profile_out) if args.profile_out else None,
        )
        Path(args.out).write_text(json.dumps(result))
        return 0
    if args.night_home:
        return night_bench(args)
    if args.nightly_home and args.child == "nightly":
        Path(args.out).write_text(json.dumps(nightly_drift(Path(args.nightly_home), args.as_of, args.policies[0])))
        return 0
    if args.nightly_home:
        # each policy in a fresh process: Evidently's import is part of what a nightly pays
        for policy in args.policies:
            out = Path(args.nightly_home) / f"bench_drift_{policy}.json"
            argv = [
                sys.executable,
                __file__,
                "--child",
                "nightly",
                "--nightly-home",
                args.nightly_home,
                "--as-of",
                args.as_of,
                "--policies",
                policy,
                "--out",
                str(out),
            ]
            started = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            result = json.loads(out.read_text())
            result["process_seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(result), flush=True)
        return 0
    if args.child:
        Path(args.out).write_text(json.dumps(STEPS[args.child](args.n, args.threads), default=float))
        return 0
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return 0
    results = []
    for n in args.sizes:
        prepared = _child("prepare", n, args.threads, cap=3600)
        print(f"n={n:,} prepare: {prepared.get('seconds', 0):.0f}s", flush=True)
        for step in ("tagml", *(() if args.skip_full else ("evidently_full",))):
            result = _child(step, n, args.threads, cap=args.cap if step == "evidently_full" else 3600, mem_cap_gb=args.mem_cap_gb)
            results.append(result)
            print(f"n={n:,} {step}: " + (f"{result['seconds']:.1f}s, peak {result['peak_gb']:.2f} GB" if result["finished"] else "did not finish"), flush=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = OUT / f"results-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nresults: {path}\n")
    print(render(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
