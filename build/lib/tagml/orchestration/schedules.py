"""Schedules, named after what they start. Cron and timezone come from settings.

Retraining has one mechanism: each model tag's `refresh` cadence in the catalog, a
`refresh_<tag>_schedule` that runs `reevaluate_<tag>_job` (retrain -> gate -> re-score), next to the
drift sensor that runs the same job on drift. There is no second, catalog-blind weekly retraining of
every tag: it overlapped every refresh schedule and needed its own re-score sensor afterwards.
`train_all_tags_job` stays for bootstrapping and manual runs; its new champions score from the next
nightly run (or run a tag's re-evaluation job to re-score at once).
"""

from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from tagml.core.settings import Settings
from tagml.orchestration.jobs import (
    NIGHTLY_SCORING_JOB,
    reevaluate_job_name,
    reevaluation_run_config,
)
from tagml.training.catalog import Catalog


def _yesterday(moment: datetime, zone: ZoneInfo) -> str:
    """The as_of a run at `moment` works on: the day before, in the bank's timezone."""
    return (moment.astimezone(zone).date() - timedelta(days=1)).isoformat()


def build_schedules(settings: Settings, catalog: Catalog) -> list[dg.ScheduleDefinition]:
    """The nightly scoring schedule and one refresh schedule per model tag of the catalog."""
    return [_nightly_scoring_schedule(settings), *(_refresh_schedule(settings, tag.name, tag.refresh) for tag in catalog.model_tags)]


def _nightly_scoring_schedule(settings: Settings) -> dg.ScheduleDefinition:
    zone = ZoneInfo(settings.timezone)

    @dg.schedule(
        name="nightly_scoring_schedule",
        job_name=NIGHTLY_SCORING_JOB,
        cron_schedule=settings.scoring_cron,
        execution_timezone=settings.timezone,
        description="Ingest raw data, build yesterday's features and score every customer's tags.",
    )
    def nightly_scoring_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        as_of = _yesterday(context.scheduled_execution_time, zone)
        return dg.RunRequest(run_key=f"score-{as_of}", partition_key=as_of)

    return nightly_scoring_schedule


# When each cadence of the catalog's `refresh` re-evaluates a tag (at settings.refresh_time).
REFRESH_DAYS = {"daily": "* * *", "weekly": "* * 1", "monthly": "1 * *", "quarterly": "1 1,4,7,10 *"}


def refresh_schedule_name(tag: str) -> str:
    return f"refresh_{tag}_schedule"


def _refresh_schedule(settings: Settings, tag: str, cadence: str) -> dg.ScheduleDefinition:
    """Re-evaluate (retrain -> gate -> re-score) yesterday, at the tag's refresh cadence."""
    zone = ZoneInfo(settings.timezone)
    hour, minute = (int(part) for part in settings.refresh_time.split(":"))

    @dg.schedule(
        name=refresh_schedule_name(tag),
        job_name=reevaluate_job_name(tag),
        cron_schedule=f"{minute} {hour} {REFRESH_DAYS[cadence]}",
        execution_timezone=settings.timezone,
        description=f"{tag} refresh ({cadence}, from the catalog): retrain on the labels known yesterday, gate, re-score yesterday.",
    )
    def refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        as_of = _yesterday(context.scheduled_execution_time, zone)
        return dg.RunRequest(
            run_key=f"refresh-{tag}-{as_of}",
            partition_key=as_of,
            run_config=reevaluation_run_config(tag, as_of),
            tags={"tagml/trigger": "refresh", "tagml/tag": tag},
        )

    return refresh
