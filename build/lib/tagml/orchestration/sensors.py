"""reevaluate_on_drift_sensor: reads `tag_drift` materializations from Dagster's event log and
launches `reevaluate_<tag>_job` for exactly the tags whose catalog thresholds were crossed. The
decision is tagml.monitoring.reevaluation's (storage-id cursor, run key `reevaluate-<tag>-<as_of>`,
per-tag cooldown in data days); this is the Dagster wrapper.

Each materialization carries its per-tag verdicts in its metadata (`drift_by_tag`, aggregates only),
so the sensor needs nothing but the event log: results are read in the order they were stored, and
one stored after the cursor is never skipped because it was computed earlier.
"""

from datetime import date

import dagster as dg

from tagml.monitoring.reevaluation import Cursor, events_from_result, plan_reevaluations
from tagml.orchestration.jobs import reevaluate_job_name, reevaluation_run_config
from tagml.orchestration.monitoring_assets import DRIFT_BY_TAG
from tagml.orchestration.resources import MonitoringResource
from tagml.training.catalog import Catalog

REEVALUATE_ON_DRIFT_SENSOR = "reevaluate_on_drift_sensor"
TAG_DRIFT = dg.AssetKey("tag_drift")
EVENTS_PER_EVALUATION = 500  # more wait for the next evaluation (the cursor says where to go on)

# The tags by which Dagster's sensor daemon recognises a run it already launched for a run key
# (dagster._core.storage.tags RUN_KEY_TAG / SENSOR_NAME_TAG, read in dagster/_daemon/sensor.py
# `fetch_existing_runs`: a run without a remote origin matches on these two tags alone).
RUN_KEY_TAG = "dagster/run_key"
SENSOR_NAME_TAG = "dagster/sensor_name"


def in_process_run_tags(request: dg.RunRequest, sensor_name: str = REEVALUATE_ON_DRIFT_SENSOR) -> dict[str, str]:
    """Tags for executing a sensor's run request in process (`tagml demo`) as the daemon would launch it.

    With them, the daemon's run-key check finds the run: enabling the sensor later on the same
    instance skips the request instead of launching the same re-evaluation a second time.
    """
    if not request.run_key:
        raise ValueError("a run request without a run key cannot be recognised by the daemon")
    return {**request.tags, RUN_KEY_TAG: request.run_key, SENSOR_NAME_TAG: sensor_name}


def sensor_context(repository: dg.RepositoryDefinition, instance: dg.DagsterInstance, cursor: str | None = None) -> dg.SensorEvaluationContext:
    """A context for evaluating a sensor in process (`tagml demo`, tests) with the code location's resources,
    as the sensor daemon provides them (an in-process `evaluate_tick` is given none by default)."""
    return dg.build_sensor_context(instance=instance, cursor=cursor, repository_def=repository, resources=repository.get_top_level_resources())


def build_reevaluation_sensor(catalog: Catalog, reevaluation_jobs: list) -> dg.SensorDefinition:
    model_tags = [t.name for t in catalog.model_tags]

    @dg.sensor(
        name=REEVALUATE_ON_DRIFT_SENSOR,
        jobs=reevaluation_jobs,
        minimum_interval_seconds=60,
        description="After tag_drift flags a model tag, retrain -> gate -> re-score that tag for the drifted as_of "
        "(once per tag and as_of; then a cooldown per tag: the monitoring resource's reevaluation_cooldown_days, TAGML_REEVALUATION_COOLDOWN_DAYS).",
    )
    def reevaluate_on_drift_sensor(context: dg.SensorEvaluationContext, monitoring: MonitoringResource) -> dg.SensorResult:
        cooldown = monitoring.reevaluation_cooldown_days
        cursor = Cursor.parse(context.cursor)
        records = context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=TAG_DRIFT, after_storage_id=cursor.seen_through),
            limit=EVENTS_PER_EVALUATION,
            ascending=True,
        ).records
        events = []
        for record in records:
            materialization = record.asset_materialization
            by_tag = materialization.metadata.get(DRIFT_BY_TAG) if materialization else None
            if by_tag is None or not record.partition_key:
                continue  # not a drift result (e.g. an old run without per-tag verdicts): nothing to plan
            events += events_from_result(record.storage_id, date.fromisoformat(record.partition_key), by_tag.value)
        plan = plan_reevaluations(events, cursor, cooldown, model_tags)
        if records:  # also past results without verdicts: never read them again
            plan.cursor.seen_through = max(plan.cursor.seen_through or 0, records[-1].storage_id)
        requests = [
            dg.RunRequest(
                run_key=request.run_key,
                job_name=reevaluate_job_name(request.tag),
                partition_key=request.as_of.isoformat(),
                run_config=reevaluation_run_config(request.tag, request.as_of.isoformat()),
                tags={"tagml/trigger": "drift", "tagml/tag": request.tag, "tagml/drift_reasons": "; ".join(request.reasons)[:1000]},
            )
            for request in plan.requests
        ]
        if plan.skipped:
            context.log.info(f"drift not re-evaluated: {plan.describe_skips()}")
        if requests:
            return dg.SensorResult(run_requests=requests, cursor=plan.cursor.dumps())
        quiet = f"{len(events)} new drift result(s), no tag drifted" if events else "no new drift results"
        return dg.SensorResult(skip_reason=plan.describe_skips() or quiet, cursor=plan.cursor.dumps())

    return reevaluate_on_drift_sensor
