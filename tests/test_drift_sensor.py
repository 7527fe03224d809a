"""The drift sensor reads tag_drift's materializations from a real Dagster instance's event log, in
storage order: a result computed earlier but stored later (two partitions of a backfill finishing
out of order) is still read, which the wall-clock cursor of the drift history dropped."""

from datetime import UTC, datetime
from types import SimpleNamespace

import dagster as dg
from dagster._daemon.sensor import fetch_existing_runs

from tagml.core.settings import Settings
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.monitoring_assets import DRIFT_BY_TAG
from tagml.orchestration.partitions import as_of_partitions
from tagml.orchestration.resources import MonitoringResource
from tagml.orchestration.sensors import (
    REEVALUATE_ON_DRIFT_SENSOR,
    RUN_KEY_TAG,
    SENSOR_NAME_TAG,
    in_process_run_tags,
    sensor_context,
)

VERDICTS = {
    # as_of: (computed_at, per-tag verdicts)
    "2026-10-30": (
        datetime(2026, 11, 1, 10, 0, tzinfo=UTC),
        {"life_stage": {"drifted": True, "reasons": ["class PSI 0.31 > 0.2"]}, "risk_appetite": {"drifted": False, "reasons": []}},
    ),
    "2026-10-31": (
        datetime(2026, 11, 1, 10, 5, tzinfo=UTC),
        {"risk_appetite": {"drifted": True, "reasons": ["critical feature drifted"]}, "life_stage": {"drifted": False, "reasons": []}},
    ),
}


def _stand_in_tag_drift(settings: Settings) -> dg.AssetsDefinition:
    """tag_drift's key, partitions and per-tag verdict metadata, without the drift computation."""

    @dg.asset(name="tag_drift", partitions_def=as_of_partitions(settings))
    def tag_drift(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        computed_at, by_tag = VERDICTS[context.partition_key]
        return dg.MaterializeResult(metadata={"computed_at": computed_at.isoformat(), DRIFT_BY_TAG: dg.MetadataValue.json(by_tag)})

    return tag_drift


def test_results_stored_out_of_computation_order_are_all_read(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)
    instance = dg.DagsterInstance.ephemeral()
    asset = _stand_in_tag_drift(settings)

    def tick(cursor):
        return sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance, cursor))

    # the later-computed partition is stored first, the sensor runs, then the earlier-computed one arrives
    assert dg.materialize([asset], instance=instance, partition_key="2026-10-31").success
    first = tick(None)
    assert [(r.run_key, r.partition_key) for r in first.run_requests] == [("reevaluate-risk_appetite-2026-10-31", "2026-10-31")]
    assert dg.materialize([asset], instance=instance, partition_key="2026-10-30").success
    second = tick(first.cursor)
    assert [(r.run_key, r.job_name) for r in second.run_requests] == [("reevaluate-life_stage-2026-10-30", "reevaluate_life_stage_job")]
    assert second.run_requests[0].tags["tagml/drift_reasons"] == "class PSI 0.31 > 0.2"
    # nothing new: nothing requested, and the message says so
    third = tick(second.cursor)
    assert third.run_requests == [] and third.skip_message == "no new drift results"
    records = instance.fetch_materializations(dg.AssetKey("tag_drift"), limit=10, ascending=True).records
    assert [r.partition_key for r in records] == ["2026-10-31", "2026-10-30"]
    assert [r.asset_materialization.metadata["computed_at"].value for r in records] == sorted(
        (r.asset_materialization.metadata["computed_at"].value for r in records), reverse=True
    )  # storage order is the reverse of computation order


def test_an_in_process_run_with_the_sensor_tags_is_found_by_the_daemons_run_key_check(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)
    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([_stand_in_tag_drift(settings)], instance=instance, partition_key="2026-10-31").success
    [request] = sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance)).run_requests
    tags = in_process_run_tags(request)
    assert tags[RUN_KEY_TAG] == request.run_key and tags[SENSOR_NAME_TAG] == REEVALUATE_ON_DRIFT_SENSOR
    # the names the daemon looks for
    from dagster._core.storage.tags import RUN_KEY_TAG as DAEMON_RUN_KEY_TAG
    from dagster._core.storage.tags import SENSOR_NAME_TAG as DAEMON_SENSOR_NAME_TAG

    assert (RUN_KEY_TAG, SENSOR_NAME_TAG) == (DAEMON_RUN_KEY_TAG, DAEMON_SENSOR_NAME_TAG)
    remote = SimpleNamespace(name=REEVALUATE_ON_DRIFT_SENSOR)  # an in-process run has no remote origin: matched on the name
    assert fetch_existing_runs(instance, remote, [request]) == {}
    # what `tagml demo` does with the request (any job; the daemon's check looks at the tags only)
    dg.materialize([_stand_in_tag_drift(settings)], instance=instance, partition_key="2026-10-30", tags=tags)
    # a lost cursor: the same request again, and the daemon would skip it as already launched
    requests = sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance)).run_requests
    [again] = [r for r in requests if r.run_key == request.run_key]
    existing = fetch_existing_runs(instance, remote, [again])
    assert list(existing) == [request.run_key] and existing[request.run_key].status == dg.DagsterRunStatus.SUCCESS


def test_the_cooldown_comes_from_the_monitoring_resource(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})  # TAGML_REEVALUATION_COOLDOWN_DAYS: 7 by default
    defs = build_definitions(settings)
    repository = defs.get_repository_def()
    sensor = defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)
    instance = dg.DagsterInstance.ephemeral()

    @dg.asset(name="tag_drift", partitions_def=as_of_partitions(settings))
    def tag_drift(context: dg.AssetExecutionContext) -> dg.MaterializeResult:  # life_stage drifts on two days running
        return dg.MaterializeResult(metadata={DRIFT_BY_TAG: dg.MetadataValue.json({"life_stage": {"drifted": True, "reasons": ["class PSI 0.31 > 0.2"]}})})

    for day in ("2026-10-30", "2026-10-31"):
        assert dg.materialize([tag_drift], instance=instance, partition_key=day).success
    default = sensor.evaluate_tick(sensor_context(repository, instance))
    assert [r.partition_key for r in default.run_requests] == ["2026-10-30"]  # the second falls in the 7-day cooldown
    no_cooldown = MonitoringResource(**{**MonitoringResource.from_settings(settings).model_dump(), "reevaluation_cooldown_days": 0})
    context = dg.build_sensor_context(
        instance=instance, repository_def=repository, resources={**repository.get_top_level_resources(), "monitoring": no_cooldown}
    )
    assert [r.partition_key for r in sensor.evaluate_tick(context).run_requests] == ["2026-10-30", "2026-10-31"]
