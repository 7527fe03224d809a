"""`tagml` command line: generate a synthetic bank, run the demo, look up tags, drift and the registry.

The CLI only parses and prints. Domain errors are named exceptions of the packages; `EXIT_CODES`
maps each to an exit code and `main` prints it as one line (`tagml: error: ...`) on stderr.
"""

import getpass
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import date
from enum import Enum, IntEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from features.synthetic import DEFAULT_END_MONTH, DRIFT_SCENARIOS
from tagml import __version__
from tagml.core.runtime import configure_process, keep_caches_in_home, relocate_home
from tagml.core.settings import Settings

DEMO_CUSTOMERS = 20_000


class ExitCode(IntEnum):
    """The exit codes of every command (README, Commands)."""

    OK = 0
    UNEXPECTED = 1
    USAGE = 2  # a bad argument or option (Typer/click's own code)
    NOT_FOUND = 3  # unknown tag, customer, partition, model version
    CONFIG = 4  # invalid settings, catalog or input data; missing or unwritable home
    UNAVAILABLE = 5  # the MLflow store/server cannot be reached
    DRIFT = 6  # `tagml drift --fail-on-drift` found a drifted tag
    FAILED_RUN = 7  # the demo ran, but one of its Dagster runs failed
    BROKEN_PIPE = 141  # the reader of stdout went away (`tagml drift | head`): 128 + SIGPIPE
    INTERRUPTED = 130


# Named domain exceptions -> exit code, matched on the exception's class and its bases by
# "module.Class" so that no domain package (mlflow, dagster...) is imported just to compare.
EXIT_CODES: dict[str, ExitCode] = {
    "tagml.cli.NotFoundError": ExitCode.NOT_FOUND,
    "scoring.store.TagStoreError": ExitCode.NOT_FOUND,
    "monitoring.history.DriftHistoryError": ExitCode.NOT_FOUND,
    "training.registry.RegistryError": ExitCode.NOT_FOUND,
    "monitoring.reference.DriftInputError": ExitCode.NOT_FOUND,
    "tagml.core.settings.SettingsError": ExitCode.CONFIG,
    "training.catalog.CatalogError": ExitCode.CONFIG,
    "features.raw.ContractError": ExitCode.CONFIG,
    "training.dataset.TrainingDataError": ExitCode.CONFIG,
    "features.snapshot.FeatureQualityError": ExitCode.CONFIG,
    "scoring.score.ScoringError": ExitCode.NOT_FOUND,  # no champion, no feature snapshot
    "training.tracking.TrackingUnavailableError": ExitCode.UNAVAILABLE,
    "training.registry.RegistryUnavailableError": ExitCode.UNAVAILABLE,
    "training.registry.GateOverrideRequiredError": ExitCode.USAGE,
    "training.train.TrainingInProgressError": ExitCode.UNAVAILABLE,
    "tagml.core.storage.WarehouseConfigError": ExitCode.CONFIG,
    "training.catalog.RuleSyntaxError": ExitCode.CONFIG,
    "scoring.rules.RuleInputError": ExitCode.CONFIG,
    "tagml.core.files.CorruptFileError": ExitCode.CONFIG,
}


class NotFoundError(LookupError):
    """Something the user named (a tag, a file) does not exist."""


class CommandFailed(RuntimeError):
    """A command did its work and reports a non-zero outcome (drift found, a failed run)."""

    def __init__(self, message: str, code: ExitCode):
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> ExitCode:
    if isinstance(exc, CommandFailed):
        return exc.code
    for cls in type(exc).__mro__:
        code = EXIT_CODES.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return ExitCode.UNEXPECTED


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return "; ".join(lines)[:2000] or type(exc).__name__


app = typer.Typer(
    name="tagml",
    help="Customer tag models: features, training, scoring, monitoring. Exit codes: 0 ok, 1 unexpected, 2 bad argument, "
    "3 not found, 4 configuration, 5 store unavailable, 6 drift found, 7 a demo run failed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_state: dict[str, bool] = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"tagml {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error")] = False,
) -> None:
    """Customer tag models: features, training, scoring, monitoring."""
    _state["debug"] = debug


# --- settings, output --------------------------------------------------------------------------


def _settings(*, require_home: bool = False, create: bool = False, writes: bool = False) -> Settings:
    """Settings from the environment (a bad value is a named error before anything runs); a moved
    home is re-anchored; read commands refuse a missing home instead of starting an empty one, and
    commands that write refuse a read-only one by name (not with SQLite's error halfway through)."""
    settings = Settings.from_env()
    if require_home:
        settings.require_home()
    if writes or create:
        settings.check_writable()
    if create:
        settings.ensure_dirs()
    moved = relocate_home(settings)
    if moved is not None:
        _note(moved.describe())
    keep_caches_in_home(settings)
    return settings


def _note(message: str) -> None:
    print(f"tagml: {message}", file=sys.stderr)


def _print_json(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str, ensure_ascii=False))


def _records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready records (NaN -> null, timestamps ISO, arrays -> lists)."""
    return json.loads(frame.to_json(orient="records", date_format="iso", default_handler=str))


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # not a terminal (a pipe, a file, a test): rich would wrap at 80 columns
    return Console(file=stream, width=None if stream.isatty() else 200, highlight=False, soft_wrap=not stream.isatty())


def _date(value: str | None, option: str = "--as-of") -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date YYYY-MM-DD", param_hint=option) from None


def _is_month(value: str) -> bool:
    try:
        date.fromisoformat(f"{value}-01")
    except ValueError:
        return False
    return len(value) == 7


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no USER/LOGNAME and no passwd entry (some containers)
        return "unknown"


def _tag_spec(settings: Settings, name: str, kind: str | None = None):
    from training.catalog import load_catalog

    catalog = load_catalog(settings.catalog_path)
    try:
        spec = catalog.get(name)
    except KeyError:
        raise NotFoundError(f"no tag {name!r} in the catalog {settings.catalog_path}; known: {', '.join(t.name for t in catalog.tags)}") from None
    if kind and spec.kind != kind:
        names = ", ".join(t.name for t in catalog.tags if t.kind == kind)
        raise NotFoundError(f"tag {name!r} is a {spec.kind} tag, not a {kind} tag; {kind} tags: {names}")
    return spec


def _connect(settings: Settings):
    from tagml.core.storage import connect

    return connect(settings.threads, settings.duckdb_memory_limit)


def _client(settings: Settings):
    from training.tracking import connect_tracking

    return connect_tracking(settings.mlflow_tracking_uri)


# --- generate ----------------------------------------------------------------------------------


# the generator's scenarios are the one list of choices (imported here: Typer needs them to parse)
Scenario = Enum("Scenario", {name: name for name in sorted(DRIFT_SCENARIOS)}, type=str)  # type: ignore[misc]
DemoScenario = Enum("DemoScenario", {name: name for name in [*sorted(DRIFT_SCENARIOS), "none"]}, type=str)  # type: ignore[misc]

DEFAULT_DEMO_SCENARIO = DemoScenario("market_shock")


class ExportFormat(str, Enum):
    parquet = "parquet"
    csv = "csv"


GENERATED_TABLES = ("customers", "balances", "loans", "transactions", "digital_events", "tag_labels")


def _watch_generation(out: Path, stop: threading.Event, advance: Callable[[int], None]) -> None:
    """Follow the generator by the files it writes (one part per chunk and table)."""
    seen = 0
    while not stop.wait(0.2):
        done = sum(len(list((out / t).glob("part-*.parquet"))) for t in GENERATED_TABLES)
        if done > seen:
            advance(done - seen)
            seen = done


def _generate_with_progress(config: Any, out: Path) -> dict:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from features.synthetic import CHUNK_SIZE, generate_bank

    parts = len(GENERATED_TABLES) * max(1, -(-config.customers // CHUNK_SIZE))
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("table files"), TimeElapsedColumn(),
                  console=_console(stderr=True), transient=True) as progress:
        task = progress.add_task("generate", total=parts)
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_generation, args=(out, stop, lambda n: progress.advance(task, n)), daemon=True)
        watcher.start()
        try:
            summary = generate_bank(config, out)
        finally:
            stop.set()
            watcher.join()
        progress.update(task, completed=parts)
    return summary


@app.command("generate")
def generate(
    customers: Annotated[int, typer.Option(min=1, help="number of customers")] = DEMO_CUSTOMERS,
    months: Annotated[int, typer.Option(min=1, help="months of history")] = 12,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same bank)")] = 42,
    end_month: Annotated[str, typer.Option(help="last generated month, YYYY-MM")] = DEFAULT_END_MONTH,
    drift: Annotated[Scenario | None, typer.Option(help="a named drift scenario")] = None,
    drift_month: Annotated[str | None, typer.Option(help="YYYY-MM the scenario starts (default: 3 months before the end)")] = None,
    out: Annotated[Path | None, typer.Option(help="output directory (default: $TAGML_HOME/raw)")] = None,
) -> None:
    """Write a synthetic bank in the raw data contract."""
    from features.synthetic import BankConfig

    for value, option in ((end_month, "--end-month"), (drift_month, "--drift-month")):
        if value is not None and not _is_month(value):
            raise typer.BadParameter(f"{value!r} is not a month YYYY-MM", param_hint=option)
    settings = _settings(create=out is None)
    config = BankConfig(customers=customers, months=months, seed=seed, end_month=end_month,
                        drift=drift.value if drift else None, drift_month=drift_month)
    target = out if out is not None else settings.raw_dir
    started = time.perf_counter()
    summary = _generate_with_progress(config, target)
    _print_json({"out": str(target), "seconds": round(time.perf_counter() - started, 1), **summary})


# --- demo --------------------------------------------------------------------------------------


def _dagster_instance(settings: Settings):
    import dagster as dg

    settings.ensure_dirs()
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


@app.command("demo")
def demo(
    customers: Annotated[int, typer.Option(min=100, help="customers in the demo bank")] = DEMO_CUSTOMERS,
    seed: Annotated[int, typer.Option(help="random seed")] = 42,
    drift: Annotated[DemoScenario, typer.Option(help="scenario starting in the last month")] = DEFAULT_DEMO_SCENARIO,
) -> None:
    """Generate the demo bank and run the pipeline end to end (ingest, train, score, drift, re-evaluate)."""
    settings = _settings(create=True)
    ok = _demo(settings, customers, seed, None if drift.value == "none" else drift.value)
    if not ok:
        raise CommandFailed("a demo run failed; see the Dagster UI (tagml ui) for the step logs", ExitCode.FAILED_RUN)


def _demo(settings: Settings, customers: int, seed: int, drift: str | None) -> bool:
    import logging

    import dagster as dg

    from features.synthetic import BankConfig, month_ends
    from orchestration.definitions import build_definitions
    from orchestration.jobs import (
        NIGHTLY_SCORING_JOB,
        RAW_INGEST_JOB,
        TRAIN_ALL_JOB,
        reevaluation_run_config,
    )
    from orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR, in_process_run_tags, sensor_context
    from training.catalog import load_catalog

    logging.getLogger("mlflow").setLevel(logging.ERROR)  # keep the demo's output to what it did
    status = _console(stderr=True)
    ends = month_ends(BankConfig().end_month, 12)
    as_of: date = ends[-1].item()  # the newest month end: the drifted partition
    train_as_of: date = ends[-2].item()  # a month earlier: models trained and a first partition scored
    config = BankConfig(customers=customers, months=12, seed=seed, drift=drift, drift_month=f"{as_of:%Y-%m}" if drift else None)
    scenario = f", {drift} from {as_of:%Y-%m}" if drift else ""
    print(f"[1/6] generating a synthetic bank: {config.customers:,} customers x {config.months} months{scenario} -> {settings.raw_dir}", flush=True)
    started = time.perf_counter()
    summary = _generate_with_progress(config, settings.raw_dir)
    print(f"      {summary['rows']} in {time.perf_counter() - started:.1f}s", flush=True)

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

        print("[2/6] raw_ingest_job: validate the raw contract, drop PII, stage Parquet", flush=True)
        with status.status("raw_ingest_job running"):
            defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance, run_config=quiet)
        print(f"      {took()}", flush=True)
        print(f"[3/6] train_all_tags_job on the labels known on {train_as_of}: training sets, Optuna + MLflow, registry, promotion gate", flush=True)
        names = ", ".join(t.name for t in catalog.model_tags)
        with status.status(f"training {len(catalog.model_tags)} model tags ({names}): Optuna trials logged to MLflow, then the gate"):
            trained = defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(
                instance=instance, run_config={**quiet, **train_config}, raise_on_error=False
            )
        training_seconds = took()
        print(f"      {training_seconds}", flush=True)
        # the raw tables are already staged: each nightly run starts at the features
        nightly_assets = [dg.AssetKey(name) for name in ("customer_features", "customer_tags", "tag_drift")]
        scored, cursor, requested, reevaluated = {}, None, [], []
        for step, day in ((4, train_as_of), (5, as_of)):
            print(f"[{step}/6] nightly_scoring_job for as_of={day}: features, rule + model tags from the champions, tag_drift", flush=True)
            with status.status(f"nightly_scoring_job for {day} running"):
                scored[day] = defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(
                    instance=instance, partition_key=day.isoformat(), run_config=quiet, raise_on_error=False, asset_selection=nightly_assets
                )
            tick = sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance, cursor))
            cursor = tick.cursor
            requested += [(day, r) for r in tick.run_requests]
            outcome = ", ".join(f"{r.job_name} (run key {r.run_key})" for r in tick.run_requests) or f"nothing ({tick.skip_message})"
            print(f"      {took()}; then {REEVALUATE_ON_DRIFT_SENSOR} requests {outcome}", flush=True)
        checks = [f"{e.check_name}={'ok' if e.passed else 'FAILED'}" for e in scored[train_as_of].get_asset_check_evaluations() if e.asset_key.to_user_string() == "customer_features"]
        again = sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance, cursor))
        print(f"      the sensor evaluated again on the same drift requests {len(again.run_requests)} runs", flush=True)
        print("[6/6] the re-evaluation the sensor requested: retrain -> gate -> re-score", flush=True)
        for _, request in requested:
            started = time.perf_counter()
            with status.status(f"{request.job_name} for {request.partition_key} running"):
                run = defs.resolve_job_def(request.job_name).execute_in_process(
                    instance=instance, partition_key=request.partition_key, run_config={**quiet, **request.run_config},
                    tags=in_process_run_tags(request), raise_on_error=False,
                )
            reevaluated.append((request, run, time.perf_counter() - started))
            print(f"      {took()}", flush=True)

    import pyarrow.parquet as pq

    from tagml.core.storage import WarehouseLayout

    path = WarehouseLayout(settings.warehouse_dir).customer_features.path(train_as_of)
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
        from scoring.store import ParquetTagStore

        store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
        with closing(_connect(settings)) as con:
            for day in (train_as_of, as_of):
                print(f"\ncustomer_tags[{day}] -> {store.partition_path(day)}")
                for tag, rows in store.distribution(con, day).groupby("tag", sort=False):
                    print(f"  {tag:<16} " + "  ".join(f"{r.value} {r.share:.1%}" for r in rows.itertuples()))
            print(f"\n$ tagml drift --as-of {train_as_of}")
            _print_drift_with(con, settings, train_as_of, None, details=False, compact=True)
            print(f"\n$ tagml drift --as-of {as_of}")
            _print_drift_with(con, settings, as_of, None, details=False, compact=False)
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
            # the partition path is data: passed as a parameter, never pasted into the SQL
            example = con.execute(
                "SELECT customer_id FROM read_parquet(?) WHERE tag = 'risk_appetite' AND source = 'model' ORDER BY customer_id LIMIT 1",
                [str(store.partition_path(as_of))],
            ).fetchall()
        if example:
            print(f"\n$ tagml tags {example[0][0]}")
            _print_tags(_customer_tags(settings, example[0][0], None, lineage=True))
    else:
        print("  scoring job FAILED; see the Dagster UI for the step logs")
    print(f"\nstaged raw tables:  {settings.warehouse_dir / 'raw'}")
    print(f"drift history:      {settings.drift_dir}   reports: {settings.reports_dir}")
    print(f"Dagster instance:   {settings.dagster_home}")
    print(f"MLflow:             {settings.mlflow_tracking_uri}")
    print("open the UIs with:  make ui (Dagster, http://127.0.0.1:3000)   make mlflow-ui (http://127.0.0.1:5000)")
    return ok


def _print_models(result: Any, indent: str = "  ") -> None:
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


# --- UIs ---------------------------------------------------------------------------------------


@app.command("ui")
def ui(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 3000,
) -> None:
    """Start the Dagster UI (dagster dev) on this TAGML_HOME."""
    settings = _settings(create=True)
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home), "TAGML_HOME": str(settings.home)}
    workspace = Path(__file__).resolve().parent.parent / "workspace.yaml"
    command = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "-h", host, "-p", str(port)]
    os.execvpe(command[0], command, env)


@app.command("mlflow-ui")
def mlflow_ui(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
) -> None:
    """Start the MLflow UI on this TAGML_HOME's tracking store."""
    settings = _settings(require_home=True)
    command = [
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", settings.mlflow_tracking_uri,
        "--default-artifact-root", str(settings.mlflow_artifact_dir), "--host", host, "--port", str(port), "--workers", "1",
    ]
    os.execvp(command[0], command)


# --- the catalog and the registry ---------------------------------------------------------------


@app.command("catalog")
def catalog_command(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """The resolved tag catalog: each tag's kind, classes, features, owner and sensitivity."""
    from training.catalog import load_catalog

    settings = _settings()
    catalog = load_catalog(settings.catalog_path)
    rows = [
        {
            "tag": t.name, "kind": t.kind, "classes": list(t.classes),
            "features": len(t.feature_names) if t.kind == "model" else 0,
            "owner": t.owner, "sensitivity": t.sensitivity, "refresh": t.refresh,
            "promotion_metric": t.promotion.metric if t.kind == "model" else None,
            "description": " ".join(t.description.split()),
        }
        for t in catalog.tags
    ]
    if as_json:
        _print_json({"catalog": str(settings.catalog_path), "tags": rows})
        return
    from rich.table import Table

    table = Table(title=f"tag catalog {settings.catalog_path}", title_justify="left")
    for column in ("tag", "kind", "classes", "features", "owner", "sensitivity", "refresh"):
        table.add_column(column, justify="right" if column == "features" else "left")
    for r in rows:
        table.add_row(r["tag"], r["kind"], ", ".join(r["classes"]), str(r["features"]) if r["kind"] == "model" else "-",
                      r["owner"], r["sensitivity"], r["refresh"])
    _console().print(table)


@app.command("leaderboard")
def leaderboard_command(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    limit: Annotated[int, typer.Option(min=1, help="at most this many runs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Training runs of a tag ranked by its promotion metric, with versions, aliases and gate decisions."""
    settings = _settings(require_home=True)
    from training.registry import leaderboard

    spec = _tag_spec(settings, tag, kind="model")
    board = leaderboard(_client(settings), spec, limit=limit)
    if as_json:
        _print_json({"tag": tag, "metric": spec.promotion.metric, "runs": [] if board.empty else _records(board)})
        return
    if board.empty:
        print(f"no training runs for {tag} yet")
        return
    from rich.table import Table

    table = Table(title=f"{tag}: runs ranked by test {spec.promotion.metric}", title_justify="left")
    shown = board.drop(columns=["run_id"])
    for column in shown.columns:
        table.add_column(str(column))
    for row in shown.itertuples(index=False):
        table.add_row(*("" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}" if isinstance(v, float) else str(v) for v in row))
    _console().print(table)


@app.command("promote")
def promote_command(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    version: Annotated[str, typer.Argument(help="the registered model version to make champion")],
    reason: Annotated[str | None, typer.Option(help="why (recorded on the version and in the champion history); needed with --force")] = None,
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = _user(),
    force: Annotated[bool, typer.Option("--force", help="promote a version the gate rejected (give a --reason)")] = False,
) -> None:
    """Make a model version the champion of its tag (recorded with who and why)."""
    settings = _settings(require_home=True, writes=True)
    from training.registry import promote

    _tag_spec(settings, tag, kind="model")
    if not version.isdigit():
        raise typer.BadParameter(f"{version!r} is not a model version number", param_hint="VERSION")
    overrode = promote(_client(settings), tag, version, by=by, reason=reason, force=force)
    print(f"{tag}: v{version} is now champion" + (" (overriding the gate's rejection, recorded)" if overrode else ""))


@app.command("rollback")
def rollback_command(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    reason: Annotated[str, typer.Option(help="why (recorded)")] = "manual rollback",
    by: Annotated[str, typer.Option(help="who (recorded); default: the current user")] = _user(),
) -> None:
    """Restore the previous champion of a tag (recorded)."""
    settings = _settings(require_home=True, writes=True)
    from training.registry import rollback

    _tag_spec(settings, tag, kind="model")
    restored = rollback(_client(settings), tag, by=by, reason=reason)
    print(f"{tag}: champion rolled back to v{restored}")


# --- the tag store -----------------------------------------------------------------------------


def _present(value: object) -> bool:
    """Not None/NA/NaN and, for containers, not empty."""
    import pandas as pd

    if value is None or value is pd.NA:
        return False
    if isinstance(value, float):
        return not math.isnan(value)
    try:
        return len(value) > 0  # type: ignore[arg-type]
    except TypeError:
        return True


def _customer_tags(settings: Settings, customer_id: str, as_of: date | None, lineage: bool) -> dict[str, Any]:
    """One customer's tags as plain data (printed as text or JSON)."""
    from scoring.store import ParquetTagStore
    from training.registry import lineage as model_lineage

    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    with closing(_connect(settings)) as con:
        frame = store.customer_tags(con, customer_id, as_of)
    client = None
    tags = []
    for record, row in zip(_records(frame), frame.itertuples()):
        entry = {k: record.get(k) for k in ("tag", "value", "probability", "source", "producer", "model_version", "observed_value", "inferred_value", "observed_mismatch")}
        entry["probabilities"] = dict(row.probabilities) if _present(row.probabilities) else None
        entry["reasons"] = list(row.reasons) if _present(row.reasons) else []
        if _present(row.model_version) and lineage:
            client = client or _client(settings)
            entry["lineage"] = model_lineage(client, row.tag, row.model_version)
        tags.append(entry)
    return {
        "customer_id": customer_id,
        "as_of": f"{frame['as_of'].iloc[0]:%Y-%m-%d}",
        "scored_at": f"{frame['scored_at'].iloc[0]:%Y-%m-%d %H:%M}",
        "tags": tags,
    }


def _print_tags(result: dict[str, Any]) -> None:
    print(f"customer {result['customer_id']}, tags as of {result['as_of']} (scored {result['scored_at']} UTC)")
    for row in result["tags"]:
        line = f"  {row['tag']:<16} {row['value']:<16}"
        if _present(row["probability"]):
            line += f" p={row['probability']:.2f}"
        line += f"  [{row['source']}"
        if _present(row["observed_value"]) and row["observed_mismatch"] is True:
            line += f"; model says {row['inferred_value']}, observed {row['observed_value']}"
        line += f"]  by {row['producer']}"
        print(line)
        if row["probabilities"]:
            print("      probabilities: " + ", ".join(f"{k} {v:.2f}" for k, v in row["probabilities"].items()))
        if row["reasons"]:
            print("      reasons: " + "; ".join(row["reasons"]))
        if "lineage" in row:
            info = row["lineage"]
            print(f"      lineage: {info['model']} <- run {info['mlflow_run_id']} <- snapshot {info['data_snapshot']} "
                  f"(catalog {info['catalog_hash']}, code {info['code_version']})")


@app.command("tags")
def tags_command(
    customer_id: Annotated[str, typer.Argument(help="the customer's id")],
    as_of: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest partition)")] = None,
    lineage: Annotated[bool, typer.Option("--lineage/--no-lineage", help="look up each model version's lineage in MLflow")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A customer's tags with probabilities, reasons and lineage."""
    day = _date(as_of)
    settings = _settings(require_home=True)
    result = _customer_tags(settings, customer_id, day, lineage)
    if as_json:
        _print_json(result)
    else:
        _print_tags(result)


@app.command("export")
def export_command(
    out: Annotated[Path, typer.Option(help="file to write")],
    as_of: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest partition)")] = None,
    format: Annotated[ExportFormat, typer.Option(help="file format")] = ExportFormat.parquet,
    as_json: Annotated[bool, typer.Option("--json", help="print what was written as JSON")] = False,
) -> None:
    """Write one tag partition for downstream systems (CRM, marketing)."""
    from scoring.store import ParquetTagStore

    day = _date(as_of)
    settings = _settings(require_home=True)
    # an export inside the warehouse would be read back as data (a fake tag partition): refused by name
    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    partition = store.latest_on_or_before(day)
    with closing(_connect(settings)) as con:
        rows = store.export(con, partition, format.value, out)
    if as_json:
        _print_json({"as_of": partition.isoformat(), "rows": rows, "format": format.value, "out": str(out)})
    else:
        print(f"exported {rows:,} tag rows of {partition} to {out}")


# --- drift -------------------------------------------------------------------------------------


def _fmt(value: object, spec: str = ".4f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _print_drift_with(con: Any, settings: Settings, as_of: date | None, tag: str | None, details: bool, compact: bool) -> list[str]:
    """Print the drift summary of one partition (default: the newest) per model tag; returns the drifted tags."""
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
        if row.realised_metric is not None and not math.isnan(row.realised_metric):
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
            _print_drift_details(con, history, as_of, row.tag)
    return [row.tag for row in frame.itertuples() if row.drifted]


def _print_drift_details(con: Any, history: Any, as_of: date, tag: str) -> None:
    from monitoring.drift import MIN_SLICE_ROWS

    predictions = history.predictions(con, as_of, tag)
    overall = predictions[predictions["slice_column"] == "(all)"]
    print("      classes:     " + ", ".join(f"{r['class']} {r.reference_share:.1%} -> {r.current_share:.1%}" for _, r in overall.iterrows()))
    slices = predictions[predictions["slice_column"] != "(all)"].groupby(["slice_column", "slice"], sort=False).agg(
        psi=("slice_psi", "first"), reference=("reference_count", "sum"), current=("current_count", "sum")
    ).reset_index()
    for column, rows in slices.groupby("slice_column", sort=False):
        print(f"      class PSI by {column}: " + ", ".join(
            f"{r.slice} {r.psi:.4f}" + (f" (n={int(min(r.reference, r.current))}, too small to flag)" if min(r.reference, r.current) < MIN_SLICE_ROWS else "")
            for r in rows.itertuples()
        ))
    features = history.features(con, as_of, tag).head(10)
    print("      top features (PSI, Evidently on the sample):")
    for r in features.itertuples():
        evidently = f"{r.evidently_method} {r.evidently_value:.3f}" if isinstance(r.evidently_method, str) else ""
        print(f"        {r.feature:<28} {r.psi:8.3f} {'drifted' if r.drifted else '':<8} {evidently}")


def _drift_json(con: Any, settings: Settings, as_of: date | None, tag: str | None) -> dict[str, Any]:
    from monitoring.history import DriftHistory

    history = DriftHistory(settings.drift_dir)
    as_of = as_of or history.latest()
    summary = history.summary(con, as_of, tag)
    payload: dict[str, Any] = {"as_of": as_of.isoformat(), "path": str(history.path("drift_summary", as_of)), "tags": _records(summary)}
    if tag:
        payload["features"] = _records(history.features(con, as_of, tag))
        payload["predictions"] = _records(history.predictions(con, as_of, tag))
    return payload


@app.command("drift")
def drift_command(
    as_of: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default: the newest drift partition)")] = None,
    tag: Annotated[str | None, typer.Option(help="one model tag, with its classes, slices and most drifted features")] = None,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="exit with 6 when a tag drifted")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Drift summary of a partition per model tag, with the Evidently report's path."""
    day = _date(as_of)
    settings = _settings(require_home=True)
    if tag is not None:
        _tag_spec(settings, tag, kind="model")
    with closing(_connect(settings)) as con:
        if as_json:
            payload = _drift_json(con, settings, day, tag)
            drifted = [t["tag"] for t in payload["tags"] if t.get("drifted")]
            _print_json(payload)
        else:
            drifted = _print_drift_with(con, settings, day, tag, details=tag is not None, compact=False)
    if drifted and fail_on_drift:
        raise CommandFailed(f"drift found in {', '.join(drifted)}", ExitCode.DRIFT)


# --- documents ---------------------------------------------------------------------------------


def _emit(text: str, out: Path | None) -> None:
    if out:
        out.write_text(text)
    else:
        print(text)


@app.command("contract")
def contract_command(out: Annotated[Path | None, typer.Option(help="write to this file instead of stdout")] = None) -> None:
    """Print the raw data contract as markdown."""
    from features.contract import contract_markdown

    _emit(contract_markdown(), out)


@app.command("features")
def features_command(out: Annotated[Path | None, typer.Option(help="write to this file instead of stdout")] = None) -> None:
    """Print the feature dictionary as markdown."""
    from features.customer_features import feature_dictionary_markdown

    _emit(feature_dictionary_markdown(), out)


# --- main --------------------------------------------------------------------------------------


def _silence_stdout() -> None:
    """After a closed pipe, later writes (and Python's flush at exit) must not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns its exit code (errors are one line on stderr, never a traceback)."""
    configure_process()
    import warnings

    # an unknown TAGML_* variable: one line, once, not Python's two-line warning format
    warnings.showwarning = lambda message, category, *_a, **_k: print(f"tagml: warning: {message}", file=sys.stderr)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="tagml", standalone_mode=False)
        sys.stdout.flush()
        return int(result) if isinstance(result, int) else ExitCode.OK
    except typer.Exit as done:
        return done.exit_code
    except SystemExit as stop:
        # click answers a closed stdout (EPIPE) itself with sys.exit(1) after pacifying the stream
        if type(sys.stdout).__name__ == "PacifyFlushWrapper":
            _silence_stdout()
            return ExitCode.BROKEN_PIPE
        return stop.code if isinstance(stop.code, int) else ExitCode.UNEXPECTED
    except typer.Abort:
        print("tagml: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except typer.TyperException as usage:  # bad arguments and options: Typer's message, code 2
        show = getattr(usage, "show", None)
        if show is not None:
            show(file=sys.stderr)
        else:
            print(f"tagml: error: {usage}", file=sys.stderr)
        return usage.exit_code
    except BrokenPipeError:
        _silence_stdout()
        return ExitCode.BROKEN_PIPE
    except KeyboardInterrupt:
        print("tagml: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the one place errors become messages and exit codes
        code = exit_code_for(exc)
        if _state["debug"]:
            import traceback

            traceback.print_exc()
        if isinstance(exc, CommandFailed):
            print(f"tagml: {exc}", file=sys.stderr)
        elif code == ExitCode.UNEXPECTED:
            print(f"tagml: unexpected error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        else:
            print(f"tagml: error: {_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
