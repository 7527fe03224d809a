"""Partitions, built once from settings.

customer_features is partitioned by *day*: the nightly job scores yesterday's snapshot, and daily
windows (recency, 1-month spend) move every day even though balances are month-end snapshots.
Training sets do not depend on partitions: they compute features at each label's own date.
"""

import dagster as dg

from tagml.core.settings import Settings


def as_of_partitions(settings: Settings) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=settings.partitions_start, timezone=settings.timezone)
