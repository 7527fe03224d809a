"""Event-log retention: Dagster keeps every run and every event of it forever, so a nightly job that scores
every customer grows the instance's database without bound. `purge_old_runs_job` (daily, on
`purge_old_runs_schedule`) deletes finished runs created more than TAGML_RUN_RETENTION_DAYS days ago,
with their events (`DagsterInstance.delete_run`).

A run that holds an asset's latest materialization is kept whatever its age (a tag model trained once a
quarter stays materialized in the UI). What is deleted is Dagster's record only: the data a run wrote (the
tag store, features, drift history) and MLflow's runs and versions are untouched. Schedule and sensor ticks
are purged by the daemon itself (`retention:` in deploy/dagster.yaml).
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg

from tagml.core.settings import Settings

PURGE_JOB = "purge_old_runs_job"
PURGE_SCHEDULE = "purge_old_runs_schedule"
PURGE_CRON = "15 6 * * *"  # after the nightly scoring (TAGML_SCORING_CRON, 02:00 by default) and the refreshes (04:30)
FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
PAGE = 200


@dataclass(frozen=True)
class PurgeSummary:
    cutoff: datetime
    deleted: int
    kept_latest: int  # old runs kept because they hold an asset's latest materialization


def purge_old_runs(instance: dg.DagsterInstance, retention_days: int, now: datetime | None = None) -> PurgeSummary:
    """Delete finished runs (and their events) created before `now - retention_days`, except the runs that hold
    an asset's latest materialization."""
    if retention_days < 1:
        raise ValueError(f"retention_days must be >= 1 (TAGML_RUN_RETENTION_DAYS), got {retention_days}")
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    latest = instance.get_latest_materialization_events(instance.get_asset_keys())
    protected = {event.run_id for event in latest.values() if event is not None}
    deleted = kept = 0
    cursor = None
    while True:
        records = instance.get_run_records(dg.RunsFilter(statuses=FINISHED, created_before=cutoff), limit=PAGE, cursor=cursor)
        if not records:
            break
        cursor = records[-1].dagster_run.run_id
        for record in records:
            if record.dagster_run.run_id in protected:
                kept += 1
                continue
            instance.delete_run(record.dagster_run.run_id)
            deleted += 1
    return PurgeSummary(cutoff, deleted, kept)


def build_purge_job(settings: Settings) -> dg.JobDefinition:
    retention_days = settings.run_retention_days

    @dg.op(name="purge_old_runs", description=f"Delete finished runs older than {retention_days} days (TAGML_RUN_RETENTION_DAYS) and their events.")
    def purge(context: dg.OpExecutionContext) -> None:
        summary = purge_old_runs(context.instance, retention_days)
        context.log.info(
            f"deleted {summary.deleted} runs created before {summary.cutoff:%Y-%m-%d %H:%M} UTC; kept {summary.kept_latest} holding a latest materialization"
        )

    @dg.job(name=PURGE_JOB, executor_def=dg.in_process_executor, description="Event-log retention: delete old finished runs and their events.")
    def purge_job() -> None:
        purge()

    return purge_job


def build_purge_schedule(settings: Settings, job: dg.JobDefinition) -> dg.ScheduleDefinition:
    # running by default: retention must not depend on someone remembering to switch it on
    return dg.ScheduleDefinition(
        name=PURGE_SCHEDULE,
        job=job,
        cron_schedule=PURGE_CRON,
        execution_timezone=settings.timezone,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Daily: delete finished runs older than {settings.run_retention_days} days (TAGML_RUN_RETENTION_DAYS).",
    )
