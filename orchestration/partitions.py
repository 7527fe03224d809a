"""Partitions, built once from settings.

customer_features is partitioned by *day*: the nightly job scores yesterday's snapshot, and daily
windows (recency, 1-month spend) move every day even though balances are month-end snapshots.
Training sets do not depend on partitions: they compute features at each label's own date.

A backfill of a range of as_of partitions (a month of nights) runs as ONE run: the partitioned assets
of the nightly carry `SINGLE_RUN_BACKFILL`, and their bodies loop over `as_of_dates(context)` doing
the work the nights share once (champions, the Evidently child, drift references). A nightly run is
the range of one partition.
"""

from datetime import date

import dagster as dg

from tagml.core.settings import Settings

SINGLE_RUN_BACKFILL = dg.BackfillPolicy.single_run()


def as_of_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=settings.partitions_start, timezone=settings.timezone)


def as_of_dates(context: dg.AssetExecutionContext) -> list[date]:
    """The as_of dates of the run, oldest first: one for a nightly run, the whole range for a single-run backfill."""
    return sorted(date.fromisoformat(key) for key in context.partition_keys)
