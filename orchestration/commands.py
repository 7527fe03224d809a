"""`tagml ingest / train / score`: one of the code location's jobs run in process on the home's Dagster
instance (so that the run, its logs and its asset materializations show in `tagml ui`), and what it
produced, read back from the materialization and check metadata as plain data for the CLI to print.

The metadata is what the assets publish (aggregates and column names, never customer values); a
failed run is reported by its failing step and that step's error, never raised.
"""

import logging
import time
from contextlib import closing
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import dagster as dg

from tagml.core.settings import Settings
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, RAW_INGEST_JOB, train_tag_job_name
from tagml.orchestration.monitoring_assets import MONITORING_GROUP, drift_check_name
from tagml.orchestration.own_table_assets import own_features_key
from tagml.orchestration.partitions import as_of_partitions
from tagml.orchestration.raw_assets import RAW_GROUP
from tagml.orchestration.training_assets import tag_model_key, training_set_key

# the command prints what the run did and its failure in one line; the step logs stay in the run's event log (tagml ui)
SILENT = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
# Dagster's wrappers around the error a step raised: the message worth printing is the one they wrap
_WRAPPERS = ("DagsterExecutionStepExecutionError", "DagsterUserCodeExecutionError")


class UnknownPartitionError(LookupError):
    """An as_of outside the code location's daily partitions (named with their range); nothing ran."""


@dataclass(frozen=True)
class StepFailure:
    step: str
    message: str
    error_classes: tuple[str, ...]  # class names of the step's error and its causes, outermost first


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    description: str
    metadata: dict[str, Any]


@dataclass(frozen=True)
class JobRun:
    """One in-process run: its id on the instance, outcome, and what it materialized and checked."""

    job: str
    run_id: str
    success: bool
    seconds: float
    failure: StepFailure | None
    materialized: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset key "a/b" -> metadata values
    checks: dict[tuple[str, str], CheckOutcome] = field(default_factory=dict)  # (asset key, check name) -> outcome


def run_job(
    settings: Settings,
    job: str,
    *,
    partition_key: str | None = None,
    run_config: dict | None = None,
    exclude_groups: tuple[str, ...] = (),
    exclude_assets: tuple[dg.AssetKey, ...] = (),
) -> JobRun:
    """Execute `job` of the settings' code location on its Dagster instance, without the assets of `exclude_groups`
    and `exclude_assets`."""
    logging.getLogger("mlflow").setLevel(logging.ERROR)  # the command prints what the run did
    settings.ensure_dirs()
    defs = build_definitions(settings)
    job_def = defs.resolve_job_def(job)
    selection = None
    if exclude_groups or exclude_assets:
        excluded = dg.AssetSelection.groups(*exclude_groups).resolve(defs.resolve_asset_graph()) | set(exclude_assets)
        selection = sorted(job_def.asset_layer.selected_asset_keys - excluded, key=lambda k: k.to_user_string())
    started = time.perf_counter()
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        result = job_def.execute_in_process(
            instance=instance, run_config={**SILENT, **(run_config or {})}, partition_key=partition_key, asset_selection=selection, raise_on_error=False
        )
    return _job_run(job, result, time.perf_counter() - started)


def _plain(metadata: dict[str, dg.MetadataValue]) -> dict[str, Any]:
    return {key: value.value for key, value in metadata.items()}


def _job_run(job: str, result: dg.ExecuteInProcessResult, seconds: float) -> JobRun:
    materialized = {e.asset_key.to_user_string(): _plain(e.materialization.metadata) for e in result.get_asset_materialization_events()}
    checks = {
        (e.asset_key.to_user_string(), e.check_name): CheckOutcome(e.passed, e.description or "", _plain(e.metadata))
        for e in result.get_asset_check_evaluations()
    }
    return JobRun(job, result.run_id, result.success, seconds, None if result.success else _failure(result, checks), materialized, checks)


def _failure(result: dg.ExecuteInProcessResult, checks: dict[tuple[str, str], CheckOutcome]) -> StepFailure:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data is not None:
            chain = []
            error = event.step_failure_data.error
            while error is not None:
                chain.append(error)
                error = error.cause
            user = event.step_failure_data.user_failure_data
            raised = next((e for e in chain if e.cls_name not in _WRAPPERS), chain[-1] if chain else None)
            message = user.description if user is not None and user.description else _first_line(raised.message if raised else "")
            if raised is not None and raised.cls_name == "DagsterAssetCheckFailedError":
                # a blocking check stopped the step: what it found is the message, not Dagster's count of failed checks
                failed = [f"{asset} {name}: {c.description}" for (asset, name), c in checks.items() if not c.passed]
                message = "; ".join(failed) or message
            return StepFailure(event.step_key or "", message, tuple(e.cls_name or "" for e in chain))
    return StepFailure("", "the run failed before any step (see its logs in tagml ui)", ())


def _first_line(message: str) -> str:
    """`module.Class: text` as `Class: text`, first line only (later lines repeat SQL or paths)."""
    first = next((line.strip() for line in message.splitlines() if line.strip()), "")
    head, sep, rest = first.partition(": ")
    return f"{head.rpartition('.')[2]}{sep}{rest}" if sep and " " not in head else first


# ---- ingest ----


@dataclass(frozen=True)
class IngestOutcome:
    run: JobRun
    tables: dict[str, int]  # staged table -> rows
    delivery_date: str | None
    pii_columns_dropped: dict[str, list[str]]


def ingest(settings: Settings) -> IngestOutcome:
    """raw_ingest_job: validate the raw contract, drop PII, stage every table (all or nothing)."""
    run = run_job(settings, RAW_INGEST_JOB)
    raw = {key.removeprefix("raw_"): meta for key, meta in run.materialized.items() if key.startswith("raw_")}
    return IngestOutcome(
        run=run,
        tables={table: int(meta["rows"]) for table, meta in raw.items()},
        delivery_date=next((str(meta["delivery_date"]) for meta in raw.values()), None),
        pii_columns_dropped={table: list(meta.get("pii_columns_dropped") or []) for table, meta in raw.items() if meta.get("pii_columns_dropped")},
    )


# ---- train ----


@dataclass(frozen=True)
class GateOutcome:
    promoted: bool
    description: str
    reasons: list[str]
    champion_before: str


@dataclass(frozen=True)
class TrainOutcome:
    tag: str
    run: JobRun
    training_set: dict[str, Any]  # rows, train_as_of, features, ... as the training_set asset published them
    version: str | None
    test_metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    mlflow_run: str | None
    gate: GateOutcome | None


def training_run_config(tag: str, train_as_of: date | None, trials: int | None, seed: int | None) -> dict:
    """Run config of the training ops of `tag`; an option left out takes the asset's default (train_as_of: its default date)."""
    config = {"train_as_of": train_as_of.isoformat() if train_as_of else None, "trials": trials, "seed": seed}
    chosen = {"config": {k: v for k, v in config.items() if v is not None}}
    return {"ops": {training_set_key(tag).to_python_identifier(): chosen, tag_model_key(tag).to_python_identifier(): chosen}}


def train(settings: Settings, tag: str, train_as_of: date | None = None, trials: int | None = None, seed: int | None = None) -> TrainOutcome:
    """train_<tag>_job: the training set, Optuna + MLflow, the registry and the promotion gate."""
    run = run_job(settings, train_tag_job_name(tag), run_config=training_run_config(tag, train_as_of, trials, seed))
    model = run.materialized.get(tag_model_key(tag).to_user_string(), {})
    check = run.checks.get((tag_model_key(tag).to_user_string(), "promotion_gate"))
    gate = None
    if check is not None:
        gate = GateOutcome(
            check.passed, check.description, [str(r) for r in check.metadata.get("reasons") or []], str(check.metadata.get("champion_version_before", ""))
        )
    return TrainOutcome(
        tag=tag,
        run=run,
        training_set=run.materialized.get(training_set_key(tag).to_user_string(), {}),
        version=str(model["model_version"]) if "model_version" in model else None,
        test_metrics={k.removeprefix("test_"): v for k, v in model.items() if k.startswith("test_") and isinstance(v, int | float)},
        baseline_metrics={k.removeprefix("baseline_"): v for k, v in model.items() if k.startswith("baseline_") and isinstance(v, int | float)},
        mlflow_run=model.get("mlflow_run"),
        gate=gate,
    )


# ---- score ----


@dataclass(frozen=True)
class TagScored:
    tag: str
    customers: int
    producer: str
    observed_share: float  # customers whose value is an observed label, not inferred


@dataclass(frozen=True)
class DriftOutcome:
    tag: str
    drifted: bool
    description: str


@dataclass(frozen=True)
class ScoreOutcome:
    as_of: date
    run: JobRun
    rows: int | None
    customers: int | None
    path: str | None
    tags: list[TagScored]
    drift: list[DriftOutcome]
    checks: dict[str, bool]  # check of the nightly assets ("customer_features/…", "customer_tags/coverage") -> passed
    skipped_tags: dict[str, str] = field(default_factory=dict)  # tag left out of the partition -> the reason recorded with it


def score(settings: Settings, as_of: date, drift: bool = True, skip_tags: tuple[str, ...] = (), skip_reason: str | None = None) -> ScoreOutcome:
    """The nightly scoring job for one as_of without its ingest (features, customer tags, and drift unless `drift` is False).

    `skip_tags` publishes the partition without those tags (customer_tags' `skip_tags` run config, recorded with
    `skip_reason`); an own-table tag's `own_features` step is then not run either (its table may be what is missing)."""
    partitions = as_of_partitions(settings)
    if not partitions.has_partition_key(as_of.isoformat()):
        first, last = partitions.get_first_partition_key(), partitions.get_last_partition_key()
        raise UnknownPartitionError(
            f"no as_of partition {as_of}: the daily partitions run from {first} (TAGML_PARTITIONS_START) to {last} (yesterday in TAGML_TIMEZONE)"
        )
    run_config = {"ops": {"customer_tags": {"config": {"skip_tags": list(skip_tags), "skip_reason": skip_reason}}}} if skip_tags else None
    run = run_job(
        settings,
        NIGHTLY_SCORING_JOB,
        partition_key=as_of.isoformat(),
        run_config=run_config,
        exclude_groups=(RAW_GROUP,) if drift else (RAW_GROUP, MONITORING_GROUP),
        exclude_assets=tuple(own_features_key(tag) for tag in skip_tags),
    )
    tags_meta = run.materialized.get("customer_tags")
    drift_checks = {key[1]: c for key, c in run.checks.items() if key[0] == "tag_drift"}
    verdicts = []
    for name in sorted(dict(tags_meta.get("producers") or {}) if tags_meta else ()):
        check = drift_checks.get(drift_check_name(name))
        if check is not None and check.metadata.get("evaluated", True):
            verdicts.append(DriftOutcome(name, not check.passed, check.description))
    return ScoreOutcome(
        as_of=as_of,
        run=run,
        rows=int(tags_meta["rows"]) if tags_meta else None,
        customers=int(tags_meta["customers"]) if tags_meta else None,
        path=str(tags_meta["path"]) if tags_meta else None,
        tags=_tags_scored(settings, as_of, dict(tags_meta.get("producers") or {})) if tags_meta else [],
        drift=verdicts,
        checks={f"{asset}/{name}": c.passed for (asset, name), c in run.checks.items() if asset != "tag_drift"},
        skipped_tags=dict(tags_meta.get("skipped_tags") or {}) if tags_meta else {},
    )


def _tags_scored(settings: Settings, as_of: date, producers: dict[str, str]) -> list[TagScored]:
    """Per tag of the published partition: customers, what produced it, the observed share."""
    from tagml.core.storage import connect
    from tagml.scoring.store import ParquetTagStore

    with closing(connect(settings.threads, settings.duckdb_memory_limit)) as con:
        distribution = ParquetTagStore.in_warehouse(settings.warehouse_dir).distribution(con, as_of)
    scored = []
    for tag, rows in distribution.groupby("tag", sort=True):
        customers = int(rows["customers"].sum())
        observed = float((rows["customers"] * rows["observed_share"]).sum() / customers) if customers else 0.0
        scored.append(TagScored(str(tag), customers, str(producers.get(tag, "")), round(observed, 4)))
    return scored
