"""The demo walkthrough: the code location's jobs run in process, one step at a time, as the
scheduler and the drift sensor would run them (ingest -> train -> nightly scoring x2 -> drift ->
re-evaluation).

Each step returns a plain result (seconds, what ran, what it produced) and never prints: `tagml
demo` shows them. The walkthrough is the one place besides the daemon that drives Dagster.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import dagster as dg

from tagml.core.settings import Settings
from tagml.features.synthetic import BankConfig, month_ends
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, RAW_INGEST_JOB, TRAIN_ALL_JOB, reevaluation_run_config
from tagml.orchestration.own_table_assets import own_features_key
from tagml.orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR, in_process_run_tags, sensor_context
from tagml.scoring.sources import own_tags
from tagml.training.catalog import load_catalog

# the job logs say what Dagster does step by step; the walkthrough's results say what it did
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
# the raw tables are staged by the ingest step: each nightly run of the walkthrough starts at the features
NIGHTLY_ASSETS = ("customer_features", "customer_tags", "online_tags", "tag_drift")


@dataclass(frozen=True)
class DemoPlan:
    """The demo bank and its two partitions: models are trained and a first partition scored a month
    before the newest month end, where the drift scenario (if any) starts."""

    bank: BankConfig
    train_as_of: date
    as_of: date


def plan_demo(customers: int, seed: int, drift: str | None) -> DemoPlan:
    ends = month_ends(BankConfig().end_month, 12)
    as_of: date = ends[-1].item()
    bank = BankConfig(customers=customers, months=12, seed=seed, drift=drift, drift_month=f"{as_of:%Y-%m}" if drift else None)
    return DemoPlan(bank=bank, train_as_of=ends[-2].item(), as_of=as_of)


@dataclass(frozen=True)
class TrainedModel:
    tag: str
    version: str
    test_macro_f1: float
    test_accuracy: float
    test_calibration_error: float
    baseline_macro_f1: float


@dataclass(frozen=True)
class GateDecision:
    tag: str
    description: str


@dataclass(frozen=True)
class RunResult:
    """One Dagster run of the walkthrough, as plain data."""

    job: str
    success: bool
    seconds: float
    models: list[TrainedModel] = field(default_factory=list)
    gates: list[GateDecision] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)  # customer_features check -> passed
    producers: dict[str, str] | None = None  # customer_tags materialized: tag -> what produced it


@dataclass(frozen=True)
class SensorRequest:
    job: str
    partition_key: str
    run_key: str
    tag: str
    reasons: str


@dataclass(frozen=True)
class NightlyResult:
    as_of: date
    run: RunResult
    requests: list[SensorRequest]  # what the drift sensor requested after the run
    skip_message: str | None
    seconds: float  # the run and the sensor's tick


@dataclass(frozen=True)
class Reevaluation:
    request: SensorRequest
    run: RunResult


def _run_result(job: str, result: dg.ExecuteInProcessResult, seconds: float) -> RunResult:
    models, producers = [], None
    for event in result.get_asset_materialization_events():
        key, meta = event.asset_key.path, {k: v.value for k, v in event.materialization.metadata.items()}
        if key[-1] == "tag_model":
            models.append(
                TrainedModel(
                    key[0],
                    str(meta["model_version"]),
                    meta["test_macro_f1"],
                    meta["test_accuracy"],
                    meta["test_calibration_error"],
                    meta.get("baseline_macro_f1", float("nan")),
                )
            )
        elif key == ["customer_tags"]:
            producers = dict(meta.get("producers") or {})
    evaluations = result.get_asset_check_evaluations()
    return RunResult(
        job=job,
        success=result.success,
        seconds=seconds,
        models=models,
        producers=producers,
        gates=[GateDecision(e.asset_key.path[0], e.description or "") for e in evaluations if e.check_name == "promotion_gate"],
        checks={e.check_name: e.passed for e in evaluations if e.asset_key.to_user_string() == "customer_features"},
    )


class Walkthrough:
    """The code location of `settings` on its Dagster instance; open it with `Walkthrough.open`."""

    def __init__(self, settings: Settings, instance: dg.DagsterInstance):
        self.settings = settings
        self.instance = instance
        self.defs = build_definitions(settings)
        self.catalog = load_catalog(settings.catalog_path)
        self._sensor = self.defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)
        self._cursor: str | None = None
        self._requests: dict[str, dg.RunRequest] = {}  # run key -> what the sensor requested

    @classmethod
    @contextmanager
    def open(cls, settings: Settings) -> Iterator["Walkthrough"]:
        logging.getLogger("mlflow").setLevel(logging.ERROR)  # keep the demo's output to what it did
        settings.ensure_dirs()
        with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
            yield cls(settings, instance)

    @property
    def model_tags(self) -> list[str]:
        return [t.name for t in self.catalog.model_tags]

    def _execute(self, job: str, **kwargs: Any) -> RunResult:
        started = time.perf_counter()
        config = {**QUIET, **kwargs.pop("run_config", {})}
        result = self.defs.resolve_job_def(job).execute_in_process(instance=self.instance, run_config=config, raise_on_error=False, **kwargs)
        return _run_result(job, result, time.perf_counter() - started)

    def ingest(self) -> RunResult:
        """Validate the raw contract, drop PII, stage Parquet (a failure raises: nothing later can run)."""
        started = time.perf_counter()
        self.defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=self.instance, run_config=QUIET)
        return RunResult(job=RAW_INGEST_JOB, success=True, seconds=time.perf_counter() - started)

    def train(self, train_as_of: date) -> RunResult:
        """Every model tag on the labels known on `train_as_of`: training sets, Optuna + MLflow, registry, gate."""
        ops = {k: v for tag in self.model_tags for k, v in reevaluation_run_config(tag, train_as_of.isoformat())["ops"].items()}
        return self._execute(TRAIN_ALL_JOB, run_config={"ops": ops})

    def score_nightly(self, as_of: date) -> NightlyResult:
        """The nightly scoring job for `as_of` (features, tags, drift), then one tick of the drift sensor."""
        started = time.perf_counter()
        own = [own_features_key(t.name) for t in own_tags(self.catalog)]  # a bring-your-own tag's snapshot of the as_of
        run = self._execute(NIGHTLY_SCORING_JOB, partition_key=as_of.isoformat(), asset_selection=[*(dg.AssetKey(a) for a in NIGHTLY_ASSETS), *own])
        tick = self._tick()
        self._cursor = tick.cursor
        self._requests.update({r.run_key: r for r in tick.run_requests})
        return NightlyResult(as_of, run, [_request(r) for r in tick.run_requests], tick.skip_message, time.perf_counter() - started)

    def sensor_again(self) -> int:
        """How many runs the drift sensor requests when it evaluates again on the same drift (0: idempotent)."""
        return len(self._tick().run_requests)

    def _tick(self):
        return self._sensor.evaluate_tick(sensor_context(self.defs.get_repository_def(), self.instance, self._cursor))

    def reevaluate(self, request: SensorRequest) -> Reevaluation:
        """Run what the sensor requested (retrain -> gate -> re-score) with the tags the daemon would give it."""
        requested = self._requests[request.run_key]
        run = self._execute(request.job, partition_key=request.partition_key, run_config=requested.run_config, tags=in_process_run_tags(requested))
        return Reevaluation(request, run)


def _request(request: dg.RunRequest) -> SensorRequest:
    return SensorRequest(
        job=request.job_name or "",
        partition_key=request.partition_key or "",
        run_key=request.run_key or "",
        tag=request.tags.get("tagml/tag", ""),
        reasons=request.tags.get("tagml/drift_reasons", ""),
    )


def example_model_customer(con: Any, tags_partition: Any, tag: str = "risk_appetite") -> str | None:
    """A customer whose `tag` the model inferred in the partition file (the demo looks it up)."""
    # the partition path is data: passed as a parameter, never pasted into the SQL
    row = con.execute(
        "SELECT customer_id FROM read_parquet(?) WHERE tag = ? AND source = 'model' ORDER BY customer_id LIMIT 1", [str(tags_partition), tag]
    ).fetchone()
    return None if row is None else row[0]


def feature_snapshot_shape(settings: Settings, as_of: date) -> tuple[Any, int, int]:
    """(path, customers, features) of the customer_features partition of `as_of`."""
    import pyarrow.parquet as pq

    from tagml.core.storage import WarehouseLayout

    path = WarehouseLayout(settings.warehouse_dir).customer_features.path(as_of)
    meta = pq.read_metadata(path)
    return path, meta.num_rows, meta.num_columns - 2  # customer_id and as_of are not features


@dataclass(frozen=True)
class ComplianceDemo:
    """What the demo's compliance step did, as plain data: the tags it published, one suitability mismatch,
    and one purpose-marked export with its consent exclusions."""

    published: list[str]
    mismatch: dict[str, Any] | None
    export: dict[str, Any]
    manifest: str
    seconds: float


# the demo plays two people: four-eyes forbids the approver of a tag from publishing it too
DEMO_APPROVER, DEMO_PUBLISHER = "model-validation", "tag-owner"


def run_compliance_demo(settings: Settings, as_of: date) -> ComplianceDemo:
    """Approve and publish the catalog's tags, find a suitability mismatch and export the partition for marketing with consent."""
    from contextlib import closing

    from tagml.compliance import lifecycle
    from tagml.compliance.exports import ExportSources, export_tags, manifest_path
    from tagml.core.governance import GovernanceStore
    from tagml.core.storage import connect
    from tagml.scoring.store import ParquetTagStore
    from tagml.scoring.suitability import suitability_mismatch

    started = time.perf_counter()
    governance = GovernanceStore(settings.governance_db)
    catalog = load_catalog(settings.catalog_path)
    for spec in catalog.tags:
        current = lifecycle.statuses(governance, catalog)[spec.name].status
        if current == lifecycle.DRAFT:
            lifecycle.approve(governance, spec, by=DEMO_APPROVER, reason="demo bank: validated on the synthetic bank's test set")
        if current != lifecycle.PUBLISHED:
            lifecycle.publish(governance, spec, by=DEMO_PUBLISHER, reason="demo bank")
    out = settings.home / "exports" / f"marketing_{as_of.isoformat()}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    with closing(connect(settings.threads, settings.duckdb_memory_limit)) as con:
        mismatch = suitability_mismatch(con, ParquetTagStore.in_warehouse(settings.warehouse_dir).partition_path(as_of))
        record = export_tags(con, ExportSources.from_settings(settings), purpose="marketing", out=out, by=DEMO_PUBLISHER, as_of=as_of)
    published = [spec.name for spec in catalog.tags]
    return ComplianceDemo(published, mismatch, record.as_dict(), str(manifest_path(out)), time.perf_counter() - started)


# the demo's audience: customers inferred or assessed as growth-minded, with money to invest
DEMO_AUDIENCE = {"all": [{"tag": "risk_appetite", "in": ["C4", "C5"]}, {"tag": "value_tier", "in": ["affluent", "high_net_worth", "private_banking"]}]}


@dataclass(frozen=True)
class ServingDemo:
    """What the demo's serving step found: the online store the API reads, its quality, one audience count and a lookup."""

    snapshot: dict[str, Any]
    quality: list[dict[str, Any]]
    audience: dict[str, Any]
    lookup_ms: float
    customer: str
    seconds: float


def run_serving_demo(settings: Settings, customer_id: str) -> ServingDemo:
    """Read the online store the nightly runs refreshed (as the API does), and count the demo audience for marketing."""
    from contextlib import closing

    from tagml.core.storage import connect
    from tagml.scoring.online import open_online_store, quality_report
    from tagml.serving.audiences import AudienceSources, ContactCap, count_audience, visible_tags

    started = time.perf_counter()
    catalog = load_catalog(settings.catalog_path)
    online = open_online_store(settings.online_store)
    try:
        snapshot = online.snapshot()
        if snapshot is None:
            raise RuntimeError(f"{online.describe()} was not refreshed by the nightly runs")
        online.customer(customer_id)  # opens the store; the second read is what a lookup costs
        timer = time.perf_counter()
        online.customer(customer_id)
        lookup_ms = (time.perf_counter() - timer) * 1000
        quality = quality_report(online.quality(), catalog)
    finally:
        online.close()
    sources = AudienceSources.from_settings(settings)
    with closing(connect(settings.threads, settings.duckdb_memory_limit)) as con:
        counted = count_audience(
            con, sources, DEMO_AUDIENCE, purpose="marketing", cap=ContactCap.from_settings(settings), visible_tags=visible_tags(sources, confidential=True)
        )
    return ServingDemo(snapshot.as_dict(), quality, counted.as_dict(), lookup_ms, customer_id, time.perf_counter() - started)


def erase_demo_customer(settings: Settings, as_of: date, keep: set[str]) -> dict[str, Any]:
    """Erase one customer of the `as_of` partition not in `keep` (the customers the demo showed) and return the receipt."""
    from contextlib import closing

    from tagml.compliance.erasure import erase
    from tagml.core.storage import connect
    from tagml.scoring.store import ParquetTagStore

    partition = ParquetTagStore.in_warehouse(settings.warehouse_dir).partition_path(as_of)
    with closing(connect(settings.threads, settings.duckdb_memory_limit)) as con:
        row = con.execute("SELECT max(customer_id) FROM read_parquet(?) WHERE NOT list_contains(?, customer_id)", [str(partition), sorted(keep)]).fetchone()
    return erase(settings, [row[0]], requested_by="privacy-office", reason="demo: a customer's erasure request (PIPL Art. 47)").to_dict()
