"""`tagml` command line: generate a synthetic bank, run the demo, open the UI, print the contract."""

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from tagml.settings import Settings

DEMO_CUSTOMERS = 20_000


def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from features.synthetic import BankConfig, generate_bank

    config = BankConfig(
        customers=args.customers, months=args.months, seed=args.seed, end_month=args.end_month,
        drift=args.drift, drift_month=args.drift_month,
    )
    out = Path(args.out) if args.out else settings.raw_dir
    started = time.perf_counter()
    summary = generate_bank(config, out)
    print(json.dumps({"out": str(out), "seconds": round(time.perf_counter() - started, 1), **summary}, indent=2, default=str))
    return 0


def _dagster_instance(settings: Settings):
    import dagster as dg

    settings.ensure_dirs()
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    from features.synthetic import BankConfig, generate_bank, month_ends
    from orchestration.definitions import build_definitions
    from orchestration.jobs import NIGHTLY_SCORING_JOB, RAW_INGEST_JOB, TRAIN_ALL_JOB, reevaluation_run_config
    from orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR
    from training.catalog import load_catalog

    import dagster as dg
    import logging

    logging.getLogger("mlflow").setLevel(logging.ERROR)  # keep the demo's output to what it did
    settings.ensure_dirs()
    drift = None if args.drift == "none" else args.drift
    ends = month_ends(BankConfig().end_month, 12)
    as_of: date = ends[-1].item()  # the newest month end: the drifted partition
    train_as_of: date = ends[-2].item()  # a month earlier: models trained and a first partition scored
    config = BankConfig(customers=args.customers, months=12, seed=args.seed, drift=drift, drift_month=f"{as_of:%Y-%m}" if drift else None)
    scenario = f", {drift} from {as_of:%Y-%m}" if drift else ""
    print(f"[1/6] generating a synthetic bank: {config.customers:,} customers x {config.months} months{scenario} -> {settings.raw_dir}")
    started = time.perf_counter()
    summary = generate_bank(config, settings.raw_dir)
    print(f"      {summary['rows']} in {time.perf_counter() - started:.1f}s")

    defs = build_definitions(settings)
    catalog = load_catalog(settings.catalog_path)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    train_config = {"ops": {k: v for t in catalog.model_tags for k, v in reevaluation_run_config(t.name, train_as_of.isoformat())["ops"].items()}}
    sensor = defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)
    with _dagster_instance(settings) as instance:
        clock = time.perf_counter()

        def took() -> str:
            nonlocal clock
            elapsed, clock = time.perf_counter() - clock, time.perf_counter()
            return f"{elapsed:.0f}s"

        print("[2/6] raw_ingest_job: validate the raw contract, drop PII, stage Parquet")
        defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance, run_config=quiet)
        print(f"      {took()}")
        print(f"[3/6] train_all_tags_job on the labels known on {train_as_of}: training sets, Optuna + MLflow, registry, promotion gate")
        trained = defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(
            instance=instance, run_config={**quiet, **train_config}, raise_on_error=False
        )
        training_seconds = took()
        print(f"      {training_seconds}")
        # the raw tables are already staged: each nightly run starts at the features
        nightly_assets = [dg.AssetKey(name) for name in ("customer_features", "customer_tags", "tag_drift")]
        scored, cursor, requested, reevaluated = {}, None, [], []
        for step, day in ((4, train_as_of), (5, as_of)):
            print(f"[{step}/6] nightly_scoring_job for as_of={day}: features, rule + model tags from the champions, tag_drift")
            scored[day] = defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(
                instance=instance, partition_key=day.isoformat(), run_config=quiet, raise_on_error=False, asset_selection=nightly_assets
            )
            tick = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def()))
            cursor = tick.cursor
            requested += [(day, r) for r in tick.run_requests]
            outcome = ", ".join(f"{r.job_name} (run key {r.run_key})" for r in tick.run_requests) or f"nothing ({tick.skip_message})"
            print(f"      {took()}; then {REEVALUATE_ON_DRIFT_SENSOR} requests {outcome}")
        checks = [f"{e.check_name}={'ok' if e.passed else 'FAILED'}" for e in scored[train_as_of].get_asset_check_evaluations() if e.asset_key.to_user_string() == "customer_features"]
        again = sensor.evaluate_tick(dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=defs.get_repository_def()))
        print(f"      the sensor evaluated again on the same drift requests {len(again.run_requests)} runs")
        print("[6/6] the re-evaluation the sensor requested: retrain -> gate -> re-score")
        for _, request in requested:
            started = time.perf_counter()
            run = defs.resolve_job_def(request.job_name).execute_in_process(
                instance=instance, partition_key=request.partition_key, run_config={**quiet, **request.run_config},
                tags=request.tags, raise_on_error=False,
            )
            reevaluated.append((request, run, time.perf_counter() - started))
            print(f"      {took()}")

    from features.warehouse import features_path

    path = features_path(settings.warehouse_dir, train_as_of)
    import pyarrow.parquet as pq

    meta = pq.read_metadata(path)
    print()
    print(f"customer_features[{train_as_of}]: {meta.num_rows:,} customers x {meta.num_columns - 2} features -> {path}")
    if checks:
        print("checks: " + ", ".join(checks))
    print(f"\nmodels ({training_seconds}):")
    _print_models(trained)
    if not trained.success:
        print("  training job FAILED; see the Dagster UI for the step logs")
    ok = trained.success and all(r.success for r in scored.values())
    if scored[as_of].success:
        from features.warehouse import connect
        from scoring.store import TagStore

        store = TagStore(settings.warehouse_dir / "customer_tags")
        con = connect(settings.threads, settings.duckdb_memory_limit)
        for day in (train_as_of, as_of):
            print(f"\ncustomer_tags[{day}] -> {store.partition_path(day)}")
            for tag, rows in store.distribution(con, day).groupby("tag", sort=False):
                print(f"  {tag:<16} " + "  ".join(f"{r.value} {r.share:.1%}" for r in rows.itertuples()))
        print(f"\n$ tagml drift --as-of {train_as_of}")
        _print_drift(settings, train_as_of, None, details=False, compact=True)
        print(f"\n$ tagml drift --as-of {as_of}")
        _print_drift(settings, as_of, None, details=False)
        print(f"\nre-evaluation ({REEVALUATE_ON_DRIFT_SENSOR}):")
        if not reevaluated:
            print("  none requested")
        for request, run, seconds in reevaluated:
            ok = ok and run.success
            print(f"  {request.job_name} for {request.partition_key} (run key {request.run_key}, {seconds:.0f}s): {'ok' if run.success else 'FAILED'}")
            print(f"    because: {request.tags.get('tagml/drift_reasons', '')}")
            _print_models(run, indent="    ")
            for event in run.get_asset_materialization_events():
                if event.asset_key.to_user_string() == "customer_tags":
                    producers = {k: v.value for k, v in event.materialization.metadata.items()}.get("producers") or {}
                    tag = request.tags.get("tagml/tag", "")
                    print(f"    re-scored customer_tags[{request.partition_key}]: {tag} now by {producers.get(tag)}")
        example = con.execute(
            f"SELECT customer_id FROM read_parquet('{store.partition_path(as_of)}') WHERE tag = 'risk_appetite' AND source = 'model' ORDER BY customer_id LIMIT 1"
        ).fetchall()
        if example:
            print(f"\n$ tagml tags {example[0][0]}")
            _tags(argparse.Namespace(customer_id=example[0][0], as_of=None, lineage=True), settings)
        con.close()
    else:
        print("  scoring job FAILED; see the Dagster UI for the step logs")
    print(f"\nstaged raw tables:  {settings.warehouse_dir / 'raw'}")
    print(f"drift history:      {settings.drift_dir}   reports: {settings.reports_dir}")
    print(f"Dagster instance:   {settings.dagster_home}")
    print(f"MLflow:             {settings.mlflow_tracking_uri}")
    print("open the UIs with:  make ui (Dagster, http://127.0.0.1:3000)   make mlflow-ui (http://127.0.0.1:5000)")
    return 0 if ok else 1


def _print_models(result, indent: str = "  ") -> None:
    """One line per trained model and one per promotion-gate decision of a Dagster run."""
    for event in result.get_asset_materialization_events():
        key = event.asset_key.path
        if key[-1] != "tag_model":
            continue
        meta = {k: v.value for k, v in event.materialization.metadata.items()}
        print(
            f"{indent}{key[0]:<14} v{meta['model_version']}  macro_f1={meta['test_macro_f1']:.3f}  accuracy={meta['test_accuracy']:.3f}"
            f"  calibration_error={meta['test_calibration_error']:.3f}  (baseline macro_f1={meta.get('baseline_macro_f1', float('nan')):.3f})"
        )
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.check_name == "promotion_gate":
            print(f"{indent}gate {evaluation.asset_key.path[0]:<14} {evaluation.description}")


def _ui(args: argparse.Namespace, settings: Settings) -> int:
    settings.ensure_dirs()
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home), "TAGML_HOME": str(settings.home)}
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "-h", args.host, "-p", str(args.port)]
    os.execvpe(command[0], command, env)
    return 0  # unreachable


def _contract(args: argparse.Namespace, settings: Settings) -> int:
    from features.contract import contract_markdown

    _emit(contract_markdown(), args.out)
    return 0


def _features(args: argparse.Namespace, settings: Settings) -> int:
    from features.customer_features import feature_dictionary_markdown

    _emit(feature_dictionary_markdown(), args.out)
    return 0


def _leaderboard(args: argparse.Namespace, settings: Settings) -> int:
    import pandas as pd

    from training.catalog import load_catalog
    from training.registry import leaderboard
    from training.tracking import connect_tracking

    tag = load_catalog(settings.catalog_path).get(args.tag)
    board = leaderboard(connect_tracking(settings.mlflow_tracking_uri), tag, limit=args.limit)
    if board.empty:
        print(f"no training runs for {args.tag} yet")
        return 0
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format", "{:.4f}".format):
        print(f"{args.tag}: runs ranked by test {tag.promotion.metric}")
        print(board.drop(columns=["run_id"]).to_string(index=False))
    return 0


def _promote(args: argparse.Namespace, settings: Settings) -> int:
    from training.registry import promote
    from training.tracking import connect_tracking

    promote(connect_tracking(settings.mlflow_tracking_uri), args.tag, args.version, by=args.by, reason=args.reason)
    print(f"{args.tag}: v{args.version} is now champion")
    return 0


def _rollback(args: argparse.Namespace, settings: Settings) -> int:
    from training.registry import rollback
    from training.tracking import connect_tracking

    restored = rollback(connect_tracking(settings.mlflow_tracking_uri), args.tag, by=args.by, reason=args.reason)
    print(f"{args.tag}: champion rolled back to v{restored}")
    return 0


def _mlflow_ui(args: argparse.Namespace, settings: Settings) -> int:
    settings.ensure_dirs()
    command = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", settings.mlflow_tracking_uri,
        "--default-artifact-root", str(settings.mlflow_artifact_dir), "--host", args.host, "--port", str(args.port), "--workers", "1",
    ]
    os.execvp(command[0], command)
    return 0  # unreachable


def _present(value: object) -> bool:
    """Not None/NA/NaN and, for containers, not empty."""
    if value is None or value is getattr(__import__("pandas"), "NA"):
        return False
    if isinstance(value, float):
        return value == value
    try:
        return len(value) > 0  # type: ignore[arg-type]
    except TypeError:
        return True


def _tags(args: argparse.Namespace, settings: Settings) -> int:
    from features.warehouse import connect
    from scoring.store import TagStore
    from training.registry import lineage
    from training.tracking import connect_tracking

    store = TagStore(settings.warehouse_dir / "customer_tags")
    as_of = date.fromisoformat(args.as_of) if args.as_of else None
    con = connect(settings.threads, settings.duckdb_memory_limit)
    frame = store.customer_tags(con, args.customer_id, as_of)
    client = None
    print(f"customer {args.customer_id}, tags as of {frame['as_of'].iloc[0]:%Y-%m-%d} (scored {frame['scored_at'].iloc[0]:%Y-%m-%d %H:%M} UTC)")
    for row in frame.itertuples():
        line = f"  {row.tag:<16} {row.value:<16}"
        if _present(row.probability):
            line += f" p={row.probability:.2f}"
        line += f"  [{row.source}"
        if _present(row.observed_value) and row.observed_mismatch is True:
            line += f"; model says {row.inferred_value}, observed {row.observed_value}"
        line += f"]  by {row.producer}"
        print(line)
        if _present(row.probabilities):
            print("      probabilities: " + ", ".join(f"{k} {v:.2f}" for k, v in dict(row.probabilities).items()))
        if _present(row.reasons):
            print("      reasons: " + "; ".join(row.reasons))
        if _present(row.model_version) and args.lineage:
            client = client or connect_tracking(settings.mlflow_tracking_uri)
            info = lineage(client, row.tag, row.model_version)
            print(f"      lineage: {info['model']} <- run {info['mlflow_run_id']} <- snapshot {info['data_snapshot']} (catalog {info['catalog_hash']}, code {info['code_version']})")
    return 0


def _fmt(value: object, spec: str = ".4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and value != value) else format(value, spec)


def _print_drift(settings: Settings, as_of: date | None, tag: str | None, details: bool, compact: bool = False) -> int:
    """The drift summary of one partition (default: the newest), per model tag, with its report path."""
    from contextlib import closing

    from features.warehouse import connect

    with closing(connect(settings.threads, settings.duckdb_memory_limit)) as con:
        return _print_drift_with(con, settings, as_of, tag, details, compact)


def _print_drift_with(con, settings: Settings, as_of: date | None, tag: str | None, details: bool, compact: bool) -> int:
    from monitoring.history import DriftHistory

    history = DriftHistory(settings.drift_dir)
    as_of = as_of or history.latest()
    frame = history.summary(con, as_of, tag)
    print(f"drift of {as_of} (computed {frame['computed_at'].max():%Y-%m-%d %H:%M} UTC) -> {history.path('drift_summary', as_of)}")
    for row in frame.itertuples():
        verdict = "DRIFTED" if row.drifted else "ok"
        if compact:
            print(f"  {row.tag:<15} {verdict:<8} {len(row.drifted_features)}/{row.n_features} features drifted, class PSI {row.prediction_psi:.4f}, "
                  f"performance {row.performance_status}; report {row.report_path if isinstance(row.report_path, str) else 'not written'}")
            continue
        print(f"  {row.tag:<15} {verdict:<8} {row.producer} against the population of {row.reference_as_of:%Y-%m-%d} ({row.reference_rows:,} -> {row.current_rows:,} customers)")
        top = history.features(con, as_of, row.tag).head(3)
        tops = ", ".join(f"{r.feature} {r.psi:.2f}" for r in top.itertuples())
        print(f"      features:    {len(row.drifted_features)}/{row.n_features} ({row.drifted_feature_share:.1%}) with PSI > {row.feature_psi_threshold} "
              f"(threshold {row.drifted_feature_share_threshold:.0%}); highest: {tops}"
              + (f"; critical: {', '.join(row.critical_features_drifted)}" if len(row.critical_features_drifted) else ""))
        print(f"      predictions: class PSI {row.prediction_psi:.4f} (threshold {row.prediction_psi_threshold}); probability PSI {_fmt(row.probability_psi)}"
              + (f"; worst slice {row.max_slice} {_fmt(row.max_slice_prediction_psi)}" if isinstance(row.max_slice, str) else ""))
        if row.realised_metric == row.realised_metric and row.realised_metric is not None:
            print(f"      performance: realised {row.performance_metric} {row.realised_metric:.4f} on {row.performance_partition:%Y-%m-%d} "
                  f"({row.performance_labels:,} matured labels) vs test {_fmt(row.expected_metric)} (drop threshold {row.performance_drop_threshold})"
                  + (f"; {row.performance_note}" if row.performance_note else ""))
        else:
            print(f"      performance: {row.performance_status}" + (f" ({row.performance_note})" if row.performance_note else ""))
        for reason in row.reasons:
            print(f"      reason:      {reason}")
        if isinstance(row.report_path, str):
            print(f"      report:      {row.report_path} (Evidently on {row.report_sample_rows:,} rows per side: {row.evidently_drifted_share:.0%} of columns drifted)")
        if details:
            predictions = history.predictions(con, as_of, row.tag)
            overall = predictions[predictions["slice_column"] == "(all)"]
            print("      classes:     " + ", ".join(f"{r['class']} {r.reference_share:.1%} -> {r.current_share:.1%}" for _, r in overall.iterrows()))
            slices = predictions[predictions["slice_column"] != "(all)"].groupby(["slice_column", "slice"], sort=False).agg(
                psi=("slice_psi", "first"), reference=("reference_count", "sum"), current=("current_count", "sum")
            ).reset_index()
            from monitoring.drift import MIN_SLICE_ROWS

            for column, rows in slices.groupby("slice_column", sort=False):
                print(f"      class PSI by {column}: " + ", ".join(
                    f"{r.slice} {r.psi:.4f}" + (f" (n={int(min(r.reference, r.current))}, too small to flag)" if min(r.reference, r.current) < MIN_SLICE_ROWS else "")
                    for r in rows.itertuples()
                ))
            features = history.features(con, as_of, row.tag).head(10)
            print("      top features (PSI, Evidently on the sample):")
            for r in features.itertuples():
                evidently = f"{r.evidently_method} {r.evidently_value:.3f}" if isinstance(r.evidently_method, str) else ""
                print(f"        {r.feature:<28} {r.psi:8.3f} {'drifted' if r.drifted else '':<8} {evidently}")
    return 0


def _drift(args: argparse.Namespace, settings: Settings) -> int:
    return _print_drift(settings, date.fromisoformat(args.as_of) if args.as_of else None, args.tag, details=bool(args.tag))


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from features.warehouse import connect
    from scoring.store import TagStore

    store = TagStore(settings.warehouse_dir / "customer_tags")
    as_of = store.latest_on_or_before(date.fromisoformat(args.as_of) if args.as_of else None)
    rows = store.export(connect(settings.threads, settings.duckdb_memory_limit), as_of, args.format, Path(args.out))
    print(f"exported {rows:,} tag rows of {as_of} to {args.out}")
    return 0


def _emit(text: str, out: str | None) -> None:
    if out:
        Path(out).write_text(text)
    else:
        print(text)


def build_parser() -> argparse.ArgumentParser:
    from features.synthetic import DEFAULT_END_MONTH, DRIFT_SCENARIOS

    parser = argparse.ArgumentParser(prog="tagml", description="Customer tag models: features, training, scoring, monitoring.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="write a synthetic bank in the raw data contract")
    gen.add_argument("--customers", type=int, default=DEMO_CUSTOMERS)
    gen.add_argument("--months", type=int, default=12)
    gen.add_argument("--seed", type=int, default=42)
    gen.add_argument("--end-month", default=DEFAULT_END_MONTH, help="last generated month, YYYY-MM")
    gen.add_argument("--drift", choices=sorted(DRIFT_SCENARIOS), help="a named drift scenario")
    gen.add_argument("--drift-month", help="YYYY-MM the scenario starts (default: 3 months before the end)")
    gen.add_argument("--out", help="output directory (default: $TAGML_HOME/raw)")
    gen.set_defaults(run=_generate)

    demo = sub.add_parser("demo", help="generate the demo bank and run the pipeline end to end")
    demo.add_argument("--customers", type=int, default=DEMO_CUSTOMERS)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument("--drift", choices=[*sorted(DRIFT_SCENARIOS), "none"], default="market_shock", help="scenario starting in the last month")
    demo.set_defaults(run=_demo)

    ui = sub.add_parser("ui", help="start the Dagster UI (dagster dev) on this TAGML_HOME")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(run=_ui)

    board = sub.add_parser("leaderboard", help="training runs of a tag ranked by its promotion metric")
    board.add_argument("tag")
    board.add_argument("--limit", type=int, default=20)
    board.set_defaults(run=_leaderboard)

    user = os.environ.get("USER", "unknown")
    prom = sub.add_parser("promote", help="make a model version the champion of its tag (recorded)")
    prom.add_argument("tag")
    prom.add_argument("version")
    prom.add_argument("--reason", default="manual promotion")
    prom.add_argument("--by", default=user)
    prom.set_defaults(run=_promote)

    back = sub.add_parser("rollback", help="restore the previous champion of a tag (recorded)")
    back.add_argument("tag")
    back.add_argument("--reason", default="manual rollback")
    back.add_argument("--by", default=user)
    back.set_defaults(run=_rollback)

    tags = sub.add_parser("tags", help="a customer's tags with probabilities, reasons and lineage")
    tags.add_argument("customer_id")
    tags.add_argument("--as-of", help="YYYY-MM-DD (default: the newest partition)")
    tags.add_argument("--no-lineage", dest="lineage", action="store_false", help="skip the MLflow lineage lookup")
    tags.set_defaults(run=_tags)

    export = sub.add_parser("export", help="write one tag partition for downstream systems")
    export.add_argument("--as-of", help="YYYY-MM-DD (default: the newest partition)")
    export.add_argument("--format", choices=["parquet", "csv"], default="parquet")
    export.add_argument("--out", required=True)
    export.set_defaults(run=_export)

    drift = sub.add_parser("drift", help="drift summary of a partition per model tag, with the Evidently report's path")
    drift.add_argument("--as-of", help="YYYY-MM-DD (default: the newest drift partition)")
    drift.add_argument("--tag", help="one model tag, with its classes, slices and most drifted features")
    drift.set_defaults(run=_drift)

    mui = sub.add_parser("mlflow-ui", help="start the MLflow UI on this TAGML_HOME's tracking store")
    mui.add_argument("--host", default="127.0.0.1")
    mui.add_argument("--port", type=int, default=5000)
    mui.set_defaults(run=_mlflow_ui)

    for name, func, what in (("contract", _contract, "the raw data contract"), ("features", _features, "the feature dictionary")):
        p = sub.add_parser(name, help=f"print {what} as markdown")
        p.add_argument("--out", help="write to this file instead of stdout")
        p.set_defaults(run=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # xgboost/OpenMP threads spin-wait by default, which starves a busy 2-core machine (STACK.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    return args.run(args, Settings.from_env())


if __name__ == "__main__":
    raise SystemExit(main())
