"""`tagml ingest`, `tagml train TAG`, `tagml score --as-of`: the code location's Dagster jobs run in process
on the home's instance (tagml.orchestration.commands), so each run shows in `tagml ui`; printed here."""

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Annotated, Any

import typer

from tagml.cli.app import app
from tagml.cli.common import console, fmt, load_settings, parse_date, print_json, tag_spec
from tagml.cli.errors import CommandFailed, ExitCode, exit_codes_by_class_name

# printed on the first line of `tagml train`, or paths and tables the Dagster UI shows better
TRAINING_SET_SHOWN = ("rows", "train_as_of", "features", "snapshot_id", "snapshot_path", "class_balance", "path")
JSON = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


@contextmanager
def _running(job: str) -> Iterator[None]:
    """A spinner on stderr while `job` runs; library warnings (plot fonts, sklearn) stay out of the command's
    output, which says what the run did (MLflow's download bars are off in every process: configure_process)."""
    with console(stderr=True).status(f"{job} running"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _exit_code(error_classes: tuple[str, ...]) -> ExitCode:
    """The code of the first named domain error in the step's error chain (Dagster keeps class names only)."""
    by_class = exit_codes_by_class_name()
    return next((by_class[c] for c in error_classes if c in by_class), ExitCode.FAILED_RUN)


def _raise_if_failed(run: Any) -> None:
    if run.success:
        return
    failure = run.failure
    raise CommandFailed(
        f"{run.job} failed at step {failure.step or '?'}: {failure.message} (run {run.run_id}; its logs are in tagml ui)", _exit_code(failure.error_classes)
    )


def _json_or_failed(outcome: Any, as_json: bool) -> bool:
    """Print the outcome as JSON (whatever the run did) or raise its failure; True when nothing more is to be
    printed (JSON went out). Otherwise the run's line is printed and the command prints the rest."""
    if as_json:
        print_json(_payload(outcome))
    _raise_if_failed(outcome.run)
    if not as_json:
        print(_run_line(outcome.run))
    return as_json


def _payload(outcome: Any) -> dict[str, Any]:
    data = asdict(outcome)
    run = data.pop("run")
    return {"job": run["job"], "run_id": run["run_id"], "success": run["success"], "seconds": round(run["seconds"], 1), "failure": run["failure"], **data}


def _run_line(run: Any) -> str:
    return f"{run.job}: {'ok' if run.success else 'FAILED'} in {run.seconds:.0f}s (run {run.run_id})"


@app.command("ingest")
def ingest(as_json: JSON = False) -> None:
    """Run raw_ingest_job: validate the raw contract tables, drop PII, stage them (all or nothing)."""
    from tagml.orchestration import commands

    settings = load_settings(create=True)
    with _running("raw_ingest_job"):
        outcome = commands.ingest(settings)
    if _json_or_failed(outcome, as_json):
        return
    print(f"staged (delivery {outcome.delivery_date}) under {settings.warehouse_dir / 'raw'}:")
    for table, rows in outcome.tables.items():
        dropped = outcome.pii_columns_dropped.get(table)
        print(f"  {table:<16} {rows:>12,} rows" + (f"  (PII columns dropped: {', '.join(dropped)})" if dropped else ""))


@app.command("train")
def train(
    tag: Annotated[str, typer.Argument(help="a model tag of the catalog")],
    as_of: Annotated[
        str | None, typer.Option("--as-of", help="train on the labels known on this date, YYYY-MM-DD (default: the training set's default date)")
    ] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="Optuna trials (default: the catalog's budget)")] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the split, the sampler and the models (default 0)")] = None,
    as_json: JSON = False,
) -> None:
    """Run train_<TAG>_job: training set, Optuna trials logged to MLflow, registry, promotion gate."""
    from tagml.orchestration import commands

    train_as_of = parse_date(as_of)
    settings = load_settings(create=True)
    tag_spec(settings, tag, kind="model")  # an unknown tag is named with the known ones before any run
    with _running(f"train_{tag}_job"):
        outcome = commands.train(settings, tag, train_as_of, trials, seed)
    if as_json:
        print_json(_payload(outcome))
    elif outcome.version is not None:  # trained and registered, whatever the gate decided
        _print_trained(outcome)
    _raise_if_failed(outcome.run)


def _print_trained(outcome: Any) -> None:
    print(_run_line(outcome.run))
    data = outcome.training_set
    print(f"training set: {data.get('rows')} labels known on {data.get('train_as_of')}, {data.get('features')} features")
    # the rest of what the training_set asset published (counts, dropped labels, a feature source's column audit)
    extra = {k: v for k, v in data.items() if k not in TRAINING_SET_SHOWN and isinstance(v, int | float | str | dict | list) and v not in ({}, [], "")}
    for key, value in extra.items():
        print(f"  {key}: {value}" if key != "columns" else "  columns, used or excluded and why:\n    " + str(value).replace("\n", "\n    "))
    print(f"{outcome.tag} v{outcome.version}")
    print("  test:     " + "  ".join(f"{k}={fmt(v, '.3f')}" for k, v in outcome.test_metrics.items()))
    if outcome.baseline_metrics:
        print("  baseline: " + "  ".join(f"{k}={fmt(v, '.3f')}" for k, v in outcome.baseline_metrics.items()))
    if outcome.gate is not None:
        print(f"  gate: {'promoted' if outcome.gate.promoted else 'rejected'} (champion before: {outcome.gate.champion_before or 'none'})")
        for reason in outcome.gate.reasons or [outcome.gate.description]:
            print(f"    - {reason}")
    if outcome.mlflow_run:
        print(f"  MLflow run: {outcome.mlflow_run}")


@app.command("score")
def score(
    as_of: Annotated[str, typer.Option("--as-of", help="the partition to score, YYYY-MM-DD")],
    no_drift: Annotated[bool, typer.Option("--no-drift", help="skip tag_drift (features and customer_tags only)")] = False,
    skip_tag: Annotated[
        list[str] | None, typer.Option("--skip-tag", help="publish the partition without this tag (repeatable; needs --skip-reason, recorded with it)")
    ] = None,
    skip_reason: Annotated[str | None, typer.Option("--skip-reason", help="why the --skip-tag tags are left out")] = None,
    as_json: JSON = False,
) -> None:
    """Run nightly_scoring_job for one as_of without its ingest: customer_features, customer_tags, tag_drift."""
    from tagml.orchestration import commands

    day = parse_date(as_of)
    settings = load_settings(create=True)
    skipped = tuple(skip_tag or ())
    for name in skipped:
        tag_spec(settings, name)  # an unknown tag is named before anything runs
    if skipped and not (skip_reason or "").strip():
        raise typer.BadParameter("--skip-tag needs a --skip-reason: it is recorded with the partition", param_hint="--skip-reason")
    with _running(f"nightly_scoring_job for {day}"):
        outcome = commands.score(settings, day, drift=not no_drift, skip_tags=skipped, skip_reason=skip_reason)
    if _json_or_failed(outcome, as_json):
        return
    print(f"customer_tags[{day}]: {outcome.rows:,} rows, {outcome.customers:,} customers -> {outcome.path}")
    for name, reason in outcome.skipped_tags.items():
        print(f"  {name:<16} left out of the partition (--skip-tag): {reason}")
    for t in outcome.tags:
        print(f"  {t.tag:<16} {t.customers:>10,} customers  observed {t.observed_share:.1%}  by {t.producer}")
    failed = [name for name, passed in outcome.checks.items() if not passed]
    print("checks: " + (f"FAILED {', '.join(failed)}" if failed else f"{len(outcome.checks)} passed"))
    if not no_drift:
        print(f"drift ({len(outcome.drift)} model tags):")
        for d in outcome.drift:
            print(f"  {d.tag:<16} {'DRIFTED' if d.drifted else 'ok':<8} {d.description}")
