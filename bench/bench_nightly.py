"""The whole nightly, measured end to end: ingest of one new day -> features -> tags with reasons -> drift
(and the online refresh, reported separately), incremental vs the full recompute, in the same run.

Per history length (--history-months, default 12; e.g. 6 12 24 to show that the incremental night grows
with the day's rows, not with history), on a generated bank of --customers:

  setup        generate the bank (cached), stage its history up to the day before AS_OF (both homes) and
               bring the monthly aggregates up to date; one warm-up night (yesterday) per home, built as that
               home's own nightly builds it, so that drift's reference profile is cached and the measured night
               finds what any night after the first finds (not measured): the incremental home's warm-up is
               update_monthly_aggregates + build_feature_snapshot(..., aggregates_dir=), which stores the
               balances features of the last month end (a mid-month night reuses them; a month-end night
               computes its new month end's); the full home's warm-up is the full build
  incremental  ingest_inc    stage_delivery of the new day's delivery files (H1: only new/changed files)
               features_inc  update_monthly_aggregates + build_feature_snapshot(..., aggregates_dir=...) (H2)
  full         ingest_full   re-validate and re-stage every raw table (stage_delivery(..., full=True))
               features_full build_feature_snapshot from the staged rows (no aggregates)
  both         tags          score_partition with reason codes into the tag store, as customer_tags does: the
                             incremental night from yesterday's partition (the catalog's weekly and monthly tags keep
                             their period's inference: for the default as_of and for 2026-11-17, yesterday is of the
                             same ISO week and month; with BENCH_NIGHTLY_REUSE=1 the customers inferred tonight reuse yesterday's output
                             where their split codes did not move), the full recompute infers every customer (what a
                             night on which every model tag is due costs)
               drift         compute_drift with the report policy of the nightly asset (TAGML_DRIFT_REPORT default)
               online        the online store refresh from the newest partition (reported separately)

Every stage runs in its own subprocess: its wall time and its peak RSS (ru_maxrss) are its own. The nightly job runs
its steps in one process (in_process_executor) that imported the code location once, so a stage imports its modules
before its clock starts (`import_seconds` says how long that took) and a path's total is the stack's one import
(`imports`, its own subprocess) plus the warm stages; `cold_stages_seconds` is the sum as separate processes pay it.
Champions are trained once per workdir as bench/bench_scoring.py does (a small bank, few trials) and promoted.

Until H1's incremental staging (features/synthetic/deliveries.py `split_deliveries`, `stage_delivery(...,
full=...)`) and H2's aggregates (`update_monthly_aggregates`, `build_feature_snapshot(..., aggregates_dir=)`)
are merged, the incremental stages fall back to the full ones and the results say so
(`incremental_available`): the script runs today, its ratio is then 1 by construction.

    nice .venv/bin/python bench/bench_nightly.py --customers 1000000 --history-months 6 12 24
    .venv/bin/python bench/bench_nightly.py --customers 20000 --train-customers 20000 --skip-full
"""

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import date, timedelta
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
# the new day (--as-of): by default the last day of the generated bank (end month 2026-10), a month-end night
# (a new balances month end, a month of aggregates to build); 2026-10-15 is an ordinary mid-month night
AS_OF = date.fromisoformat(os.environ.get("BENCH_NIGHTLY_AS_OF", "2026-10-31"))
# customer_tags' exact reuse of unchanged customers' output is off by default (it cost more than it saved at 1M with
# the shipped life_stage champion); BENCH_NIGHTLY_REUSE=1 measures the incremental night with it
REUSE_SCORES = os.environ.get("BENCH_NIGHTLY_REUSE") == "1"
STAGES_INC = ("ingest_inc", "features_inc", "tags", "drift")
STAGES_FULL = ("ingest_full", "features_full", "tags", "drift")
# what each stage's code imports: imported before its clock starts, because the nightly job runs every step in one
# process (in_process_executor) that imported the code location once before its first step; the bench's
# one-subprocess-per-stage (for per-stage peak memory) would otherwise pay the imports once per stage. The one
# import of the whole stack is measured on its own (`imports`) and counted once in each path's total.
STAGE_MODULES = {
    "ingest": ("tagml.features.delivery",),
    "features": ("tagml.features.snapshot", "tagml.features.aggregates"),
    "tags": ("tagml.scoring.score", "tagml.scoring.store", "tagml.training.catalog", "tagml.training.tracking", "mlflow.store.tracking.sqlalchemy_store"),
    "drift": ("tagml.monitoring.drift", "tagml.scoring.store", "tagml.training.catalog", "tagml.training.tracking", "mlflow.store.tracking.sqlalchemy_store"),
    "online": ("tagml.scoring.online", "tagml.scoring.store"),
}
STACK_MODULES = tuple(dict.fromkeys(m for kind in ("ingest", "features", "tags", "drift") for m in STAGE_MODULES[kind]))


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def capabilities() -> dict[str, bool]:
    """Which of the parallel #14 APIs this checkout has (the incremental stages need both)."""
    from tagml.features.delivery import stage_delivery
    from tagml.features.snapshot import build_feature_snapshot

    try:
        from tagml.features.synthetic.deliveries import split_deliveries  # noqa: F401  (H1)

        deliveries = True
    except ImportError:
        deliveries = False
    try:
        from tagml.features.aggregates import update_monthly_aggregates  # noqa: F401  (H2)

        aggregates = "aggregates_dir" in inspect.signature(build_feature_snapshot).parameters
    except ImportError:
        aggregates = False
    return {
        "incremental_ingest": deliveries and "full" in inspect.signature(stage_delivery).parameters,
        "aggregates": aggregates,
    }


class Home:
    """One path's warehouse (its staged generations, features, tags), drift and online store under the bank's directory."""

    def __init__(self, bank: Path, path: str):
        from tagml.core.storage import WarehouseLayout

        self.root = bank / path
        self.warehouse = self.root / "warehouse"
        self.layout = WarehouseLayout(self.warehouse)
        self.aggregates = self.warehouse / "aggregates"
        # each path its own drift directory: the reference cache is keyed by the population's path,
        # which is the path's own features partition when the champions were trained on the nightly's date
        self.drift = self.root / "drift"
        self.reports = self.root / "reports"
        self.online = self.root / "online.sqlite"

    @property
    def features(self) -> Path:
        return self.features_of(AS_OF)

    def features_of(self, night: date) -> Path:
        return self.layout.customer_features.path(night)


def _stage(con, raw: Path, home: Home, delivery_date: date, full: bool | None) -> dict:
    from tagml.features.delivery import stage_delivery

    kwargs = {} if full is None else {"full": full}
    delivery = stage_delivery(con, raw, home.layout.staged_dir, delivery_date, **kwargs)
    changed = getattr(delivery, "changed_periods", None)
    return {"tables": len(delivery.tables), "changed_periods": {t: len(p) for t, p in changed.items()} if changed else None}


def bank_dir(work: Path, customers: int, months: int) -> Path:
    """The generated bank ends with AS_OF's month, so the new day is inside it and the history is everything before."""
    return work / f"c{customers}_m{months}_{AS_OF:%Y-%m}"


def step_setup(work: Path, customers: int, months: int, threads: int) -> dict:
    from tagml.core.storage import connect
    from tagml.features.synthetic import BankConfig, generate_bank

    caps = capabilities()
    bank = bank_dir(work, customers, months)
    raw = bank / "raw"
    if not (raw / "customers").exists():
        generate_bank(BankConfig(customers=customers, months=months, seed=9, end_month=f"{AS_OF:%Y-%m}"), raw)
    for path in ("inc", "full", "deliveries"):
        shutil.rmtree(bank / path, ignore_errors=True)
    yesterday = AS_OF - timedelta(days=1)
    con = connect(threads, "6GB")
    inc, full = Home(bank, "inc"), Home(bank, "full")
    if caps["incremental_ingest"]:
        from tagml.features.synthetic.deliveries import split_deliveries

        # the history already staged: every delivery up to yesterday, staged once; the full path's home is a
        # hard-linked copy of it (staging never rewrites a staged file in place)
        history = bank / f"deliveries_through_{yesterday.isoformat()}"
        if not (history / ".complete").exists():
            # the split of the history is kept between setups (same bank, same night); the night's own copy is
            # hard-linked from it, which is safe because split_deliveries replaces files, never writes into them
            shutil.rmtree(history, ignore_errors=True)
            split_deliveries(raw, history, yesterday)
            (history / ".complete").touch()
        shutil.copytree(history, bank / "deliveries", copy_function=os.link, ignore=shutil.ignore_patterns(".complete"))
        _stage(con, bank / "deliveries", inc, yesterday, full=True)
    else:
        _stage(con, raw, inc, AS_OF, None)
    if caps["aggregates"]:
        from tagml.features.aggregates import update_monthly_aggregates

        update_monthly_aggregates(con, inc.layout.staged_dir, inc.aggregates)
    shutil.copytree(inc.root, full.root, symlinks=True, copy_function=os.link)
    shutil.rmtree(full.aggregates, ignore_errors=True)  # the full recompute reads no aggregates
    # the warm-up night (yesterday, not measured): drift's reference profile of the champions is cached from here on
    from tagml.features.snapshot import build_feature_snapshot

    for home in (inc, full):
        if home is inc and caps["aggregates"]:
            # as the incremental nightly runs: without this the measured night would also pay for the stored
            # balances features of the month end, which only the month's first night computes
            build_feature_snapshot(con, home.layout.staged_dir, yesterday, home.features_of(yesterday), aggregates_dir=home.aggregates)
        else:
            build_feature_snapshot(con, home.layout.staged_dir, yesterday, home.features_of(yesterday))
        _score(con, work, home, yesterday)
        _drift(con, work, home, "never", yesterday)
    if caps["incremental_ingest"]:
        # the new day arrives: its delivery files are written (the nightly's ingest then stages them)
        split_deliveries(raw, bank / "deliveries", AS_OF, days=[AS_OF])
    return {"capabilities": caps, "raw_gb": round(_du(raw) / 1e9, 2)}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _client(work: Path):
    from tagml.training.tracking import connect_tracking

    return connect_tracking(f"sqlite:///{work / 'mlflow.db'}")


def _score(con, work: Path, home: Home, night: date | None = None, incremental: bool = False) -> dict:
    from tagml.scoring.score import score_partition
    from tagml.scoring.store import ParquetTagStore
    from tagml.training.catalog import load_catalog

    store = ParquetTagStore.in_warehouse(home.warehouse)
    # as customer_tags does: into the store's partition, atomically, from the partition before it (a weekly or
    # monthly tag keeps its period's inference and infers only customers without one; with BENCH_NIGHTLY_REUSE=1
    # those reuse last night's output where their split codes did not move); the full recompute infers everyone
    night = night or AS_OF
    previous = store.partition_before(night) if incremental else None
    with store.write_partition(night) as staged:
        summary = score_partition(
            con,
            _client(work),
            load_catalog(),
            home.features_of(night),
            home.layout.staged_dir,
            night,
            staged,
            previous_partition=previous,
            reuse_unchanged=REUSE_SCORES,
        )
    return {
        "rows": summary.rows,
        "per_tag_seconds": {k: round(v["seconds"], 1) for k, v in summary.per_tag.items()},
        "refresh": {k: v["refresh"] for k, v in summary.per_tag.items() if "refresh" in v},
        "reuse": {k: v["reuse"] for k, v in summary.per_tag.items() if "reuse" in v},
    }


def _drift(con, work: Path, home: Home, policy: str, night: date | None = None) -> dict:
    from tagml.monitoring.drift import DriftLocations, compute_drift
    from tagml.scoring.store import ParquetTagStore
    from tagml.training.catalog import load_catalog

    locations = DriftLocations(home.warehouse, ParquetTagStore.in_warehouse(home.warehouse), home.drift, home.reports)
    run = compute_drift(con, _client(work), load_catalog(), night or AS_OF, locations, sample_rows=5000, report=policy)
    plan = run.report_plan
    return {"drifted": [r.tag for r in run.results if r.drifted], "reports": list(plan.tags) if plan else None, "report_why": plan.why if plan else None}


def _stage_kind(name: str) -> str:
    return name.removeprefix("full_").split("_")[0]


def import_modules(modules: tuple[str, ...]) -> float:
    """Seconds to import `modules` in this process (0 for those already imported)."""
    import importlib

    started = time.perf_counter()
    for module in modules:
        importlib.import_module(module)
    return time.perf_counter() - started


def step(work: Path, name: str, customers: int, months: int, threads: int, policy: str) -> dict:
    if name == "imports":
        return {"seconds": round(import_modules(("tagml.core.storage", *STACK_MODULES)), 2)}
    from tagml.core.storage import connect

    import_seconds = import_modules(STAGE_MODULES[_stage_kind(name)])
    caps = capabilities()
    bank = bank_dir(work, customers, months)
    home = Home(bank, "full" if name.endswith("_full") or name.startswith("full_") else "inc")
    con = connect(threads, "3GB")
    started = time.perf_counter()
    out: dict = {}
    if name == "ingest_inc":
        if caps["incremental_ingest"]:
            out = _stage(con, bank / "deliveries", home, AS_OF, full=False)
        else:
            out = _stage(con, bank / "raw", home, AS_OF, None)
    elif name == "ingest_full":
        source = bank / "deliveries" if caps["incremental_ingest"] else bank / "raw"
        out = _stage(con, source, home, AS_OF, True if caps["incremental_ingest"] else None)
    elif name == "features_inc":
        from tagml.features.snapshot import build_feature_snapshot

        if caps["aggregates"]:
            from tagml.features.aggregates import update_monthly_aggregates

            update_monthly_aggregates(con, home.layout.staged_dir, home.aggregates)
            out = {"rows": build_feature_snapshot(con, home.layout.staged_dir, AS_OF, home.features, aggregates_dir=home.aggregates).rows}
        else:
            out = {"rows": build_feature_snapshot(con, home.layout.staged_dir, AS_OF, home.features).rows}
    elif name == "features_full":
        from tagml.features.snapshot import build_feature_snapshot

        out = {"rows": build_feature_snapshot(con, home.layout.staged_dir, AS_OF, home.features).rows}
    elif name.startswith(("tags", "full_tags")):
        out = _score(con, work, home, incremental=name == "tags")
    elif name.startswith(("drift", "full_drift")):
        out = _drift(con, work, home, policy)
    elif name.startswith(("online", "full_online")):
        from tagml.scoring.online import open_online_store
        from tagml.scoring.store import ParquetTagStore

        online = open_online_store(str(home.online))
        try:
            snapshot = online.refresh(con, ParquetTagStore.in_warehouse(home.warehouse), AS_OF)
        finally:
            online.close()
        out = {"customers": snapshot.customers, "rows": snapshot.rows}
    else:
        raise ValueError(f"unknown stage {name!r}")
    out["seconds"] = round(time.perf_counter() - started, 2)
    out["import_seconds"] = round(import_seconds, 2)
    return out


def run_step(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "_step", *args], capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"step {args} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {args[0]:<14} {json.dumps(result)}", flush=True)
    return result


def _totals(stages: dict[str, dict], imports: dict) -> dict:
    """The night as one in-process run: the stack imported once, then every stage warm; `cold_stages_seconds` is the
    sum with each stage's own imports (as separate processes would pay them)."""
    warm = sum(s["seconds"] for s in stages.values())
    return {
        "seconds": round(imports["seconds"] + warm, 2),
        "imports_seconds": imports["seconds"],
        "cold_stages_seconds": round(warm + sum(s.get("import_seconds", 0.0) for s in stages.values()), 2),
        "peak_rss_gb": max(s["peak_rss_gb"] for s in stages.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--as-of", default=None, help="the new day (default 2026-10-31, the bank's last day; every stage's subprocess reads it)")
    parser.add_argument("--history-months", nargs="*", type=int, default=[12], help="one nightly per history length (the full path on the first only)")
    parser.add_argument("--skip-full", action="store_true", help="the incremental nightly only")
    parser.add_argument("--train-customers", type=int, default=50_000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-policy", default="on_drift_or_weekly", help="drift's Evidently report policy (TAGML_DRIFT_REPORT)")
    parser.add_argument("--workdir", default="bench/out/nightly")
    parser.add_argument("--out", default=None, help="results JSON (default bench/out/nightly_<customers>.json)")
    args = parser.parse_args()
    global AS_OF
    if args.as_of:
        AS_OF = date.fromisoformat(args.as_of)
        os.environ["BENCH_NIGHTLY_AS_OF"] = AS_OF.isoformat()  # each stage's subprocess reads it at import
    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "mlflow.db").exists():
        print(f"training champions on a {args.train_customers:,}-customer bank ...", flush=True)
        run_step(["train", "--workdir", str(work), "--threads", str(args.threads), "--train-customers", str(args.train_customers)])
    results: dict = {"customers": args.customers, "as_of": AS_OF.isoformat(), "threads": args.threads, "report_policy": args.report_policy, "runs": {}}
    for i, months in enumerate(args.history_months):
        common = ["--workdir", str(work), "--threads", str(args.threads), "--customers", str(args.customers), "--months", str(months)]
        print(f"{args.customers:,} customers, {months} months of history: setup ...", flush=True)
        setup = run_step(["setup", *common])
        entry: dict = {"setup": setup, "incremental_available": all(setup["capabilities"].values())}
        policy = ["--policy", args.report_policy]
        entry["incremental"] = {s: run_step([s, *common, *policy]) for s in STAGES_INC}
        entry["incremental_online"] = run_step(["online", *common])
        entry["imports"] = run_step(["imports", *common])
        entry["incremental_total"] = _totals(entry["incremental"], entry["imports"])
        if not args.skip_full and i == 0:
            full = {}
            for s in STAGES_FULL:
                full[s] = run_step([s if s.endswith("_full") else f"full_{s}", *common, *policy])
            entry["full"] = full
            entry["full_online"] = run_step(["full_online", *common])
            entry["full_total"] = _totals(full, entry["imports"])
            entry["full_over_incremental"] = round(entry["full_total"]["seconds"] / entry["incremental_total"]["seconds"], 2)
        results["runs"][months] = entry
        print(f"  incremental total {entry['incremental_total']}" + (f", full total {entry['full_total']}" if "full_total" in entry else ""), flush=True)
    results["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_after": os.getloadavg(),
        "disk_free_gb": round(shutil.disk_usage(work).free / 1e9, 1),
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "out" / f"nightly_{args.customers}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results: {out}")
    print("| history months | path | imports (once) | ingest | features | tags | drift | total s | stages cold s | peak GB | online s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for months, entry in results["runs"].items():
        for path, stages in (("incremental", STAGES_INC), ("full", STAGES_FULL)):
            if path not in entry:
                continue
            cells = " | ".join(f"{entry[path][s]['seconds']:.1f}" for s in stages)
            total = entry[f"{path}_total"]
            print(
                f"| {months} | {path} | {total['imports_seconds']:.1f} | {cells} | {total['seconds']:.1f} | {total['cold_stages_seconds']:.1f} "
                f"| {total['peak_rss_gb']:.2f} | {entry[f'{path}_online']['seconds']:.1f} |"
            )


def _step_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("step")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--customers", type=int)
    parser.add_argument("--months", type=int)
    parser.add_argument("--train-customers", type=int, default=50_000)
    parser.add_argument("--policy", default="on_drift_or_weekly")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if args.step == "train":
        import bench_scoring

        bench_scoring.TRAIN_CUSTOMERS = args.train_customers  # its helper reads the module's size
        out = bench_scoring.step_train(work, args.threads)
    elif args.step == "setup":
        out = step_setup(work, args.customers, args.months, args.threads)
    else:
        out = step(work, args.step, args.customers, args.months, args.threads, args.policy)
    out["peak_rss_gb"] = round(_peak_gb(), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_step":
        _step_main(sys.argv[2:])
    else:
        main()
