"""reevaluate_on_drift_sensor: reads the drift history and launches `reevaluate_<tag>_job` for exactly
the tags whose catalog thresholds were crossed. The decision is monitoring.reevaluation's (cursor,
run key `reevaluate-<tag>-<as_of>`, per-tag cooldown in data days); this is the Dagster wrapper."""

from contextlib import closing

import dagster as dg

from features.warehouse import connect
from monitoring.history import DriftHistory
from monitoring.reevaluation import Cursor, events_from_rows, plan_reevaluations
from orchestration.jobs import reevaluate_job_name, reevaluation_run_config
from tagml.settings import Settings
from training.catalog import Catalog

REEVALUATE_ON_DRIFT_SENSOR = "reevaluate_on_drift_sensor"


def build_reevaluation_sensor(settings: Settings, catalog: Catalog, reevaluation_jobs: list) -> dg.SensorDefinition:
    history = DriftHistory(settings.drift_dir)
    model_tags = [t.name for t in catalog.model_tags]
    cooldown = settings.reevaluation_cooldown_days

    @dg.sensor(
        name=REEVALUATE_ON_DRIFT_SENSOR,
        jobs=reevaluation_jobs,
        minimum_interval_seconds=60,
        description=f"After tag_drift flags a model tag, retrain -> gate -> re-score that tag for the drifted as_of "
        f"(once per tag and as_of; then a {cooldown}-day cooldown per tag).",
    )
    def reevaluate_on_drift_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor = Cursor.parse(context.cursor)
        with closing(connect(1, "512MB")) as con:
            rows = history.events_since(con, cursor.seen_through)
        events = events_from_rows(rows.to_dict("records"))
        plan = plan_reevaluations(events, cursor, cooldown, model_tags)
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
        fresh = [e for e in events if cursor.seen_through is None or e.computed_at > cursor.seen_through]
        quiet = f"{len(fresh)} new drift result(s), no tag drifted" if fresh else "no new drift results"
        return dg.SensorResult(skip_reason=plan.describe_skips() or quiet, cursor=plan.cursor.dumps())

    return reevaluate_on_drift_sensor
