"""online_tags: the online tag store, refreshed from the newest tag partition after each run that (re)scores one.

Thin: the refresh, the quality figures and their table are scoring/online.py's. A backfill of an older
partition leaves the store on the newest one (it reports what it kept); the asset check compares the
store with the partition it holds (customers and tag rows, counts only).
"""

import time
from contextlib import closing
from datetime import date

import dagster as dg
from pydantic import Field

from tagml.core.settings import Settings
from tagml.orchestration.partitions import SINGLE_RUN_BACKFILL, as_of_dates
from tagml.orchestration.resources import WarehouseResource
from tagml.orchestration.scoring_assets import SCORING_GROUP
from tagml.scoring.online import OnlineSnapshot, OnlineTagStore, open_online_store, quality_markdown, quality_report
from tagml.training.catalog import Catalog

ONLINE_TAGS = "online_tags"

CHECK_SPECS = [
    dg.AssetCheckSpec(
        "holds_partition",
        asset=ONLINE_TAGS,
        blocking=False,
        description="The online store holds exactly the customers and tag rows of the partition it was loaded from.",
    )
]


class OnlineStoreResource(dg.ConfigurableResource):
    """Where the online tag store lives (TAGML_ONLINE_STORE): a SQLite file, or a postgresql:// URL."""

    location: str = Field(description="A SQLite file path or a postgresql:// URL (TAGML_ONLINE_STORE).")

    @classmethod
    def from_settings(cls, settings: Settings) -> "OnlineStoreResource":
        return cls(location=settings.online_store)

    def open(self) -> OnlineTagStore:
        return open_online_store(self.location)


def build_online_tags_asset(partitions_def: dg.PartitionsDefinition, catalog: Catalog) -> dg.AssetsDefinition:
    @dg.asset(
        name=ONLINE_TAGS,
        group_name=SCORING_GROUP,  # in the nightly scoring job with customer_tags, by group
        partitions_def=partitions_def,
        backfill_policy=SINGLE_RUN_BACKFILL,  # a backfilled range loads the store once, from the newest partition
        deps=["customer_tags"],
        check_specs=CHECK_SPECS,
        kinds={"sqlite"},
        description="The online tag store (one record per customer, for the API), loaded from the newest tag partition and swapped in atomically; "
        "per-tag coverage, stability and freshness.",
    )
    def online_tags(context: dg.AssetExecutionContext, warehouse: WarehouseResource, online_store: OnlineStoreResource):
        as_of = as_of_dates(context)[-1]  # the newest night of the run (a range's last)
        store = warehouse.tag_store()
        newest = store.latest_on_or_before(None)
        online = online_store.open()
        try:
            held = online.snapshot()
            started = time.perf_counter()
            if as_of < newest and held is not None and held.as_of >= newest.isoformat():
                # a backfill of an older partition: the store keeps serving the newest
                snapshot, refreshed = held, False
            else:
                with closing(warehouse.connect()) as con:
                    snapshot, refreshed = online.refresh(con, store, newest), True
            seconds = round(time.perf_counter() - started, 2)
            report = quality_report(online.quality(), catalog)
            yield dg.MaterializeResult(
                metadata={
                    "as_of": snapshot.as_of,
                    "refreshed": refreshed,
                    "kept_because": None if refreshed else f"partition {as_of} is older than the loaded {snapshot.as_of}",
                    "customers": snapshot.customers,
                    "rows": snapshot.rows,
                    "seconds": seconds,
                    "store": online.describe(),
                    "quality": dg.MetadataValue.md(quality_markdown(report)),
                    "quality_json": dg.MetadataValue.json(report),
                }
            )
            yield _holds_partition(warehouse, snapshot)
        finally:
            online.close()

    return online_tags


def _holds_partition(warehouse: WarehouseResource, snapshot: OnlineSnapshot) -> dg.AssetCheckResult:
    """Counts of the loaded partition against the store's (the store counts what it inserted)."""
    store = warehouse.tag_store()
    with closing(warehouse.connect()) as con:
        customers, rows = con.execute(f"SELECT count(DISTINCT customer_id), count(*) FROM {store.read_sql(date.fromisoformat(snapshot.as_of))}").fetchall()[0]
    passed = (int(customers), int(rows)) == (snapshot.customers, snapshot.rows)
    return dg.AssetCheckResult(
        check_name="holds_partition",
        passed=passed,
        metadata={"partition_customers": int(customers), "store_customers": snapshot.customers, "partition_rows": int(rows), "store_rows": snapshot.rows},
        description=None if passed else "the online store and its partition differ; run `tagml online refresh`",
    )
