"""monthly_aggregates and customer_features: the event tables' per-customer monthly measures, and the
point-in-time feature snapshot for one as_of (from them plus the windows' edge days), behind its quality checks."""

from contextlib import closing
from datetime import date

import dagster as dg
import pandas as pd

from tagml.features.aggregates import update_monthly_aggregates
from tagml.features.dictionary import FEATURES
from tagml.features.quality import FEATURE_CHECKS, feature_summary
from tagml.features.snapshot import FeatureQualityError, build_feature_snapshot
from tagml.orchestration.checks import check_result, check_spec
from tagml.orchestration.partitions import SINGLE_RUN_BACKFILL, as_of_dates
from tagml.orchestration.raw_assets import raw_asset_name
from tagml.orchestration.resources import WarehouseResource

FEATURES_GROUP = "features"
FEATURE_SOURCES = ("customers", "balances", "loans", "transactions", "digital_events")
AGGREGATED_SOURCES = ("transactions", "digital_events")
MONTHLY_AGGREGATES = "monthly_aggregates"


@dg.asset(
    name=MONTHLY_AGGREGATES,
    group_name=FEATURES_GROUP,
    deps=[raw_asset_name(t) for t in AGGREGATED_SOURCES],
    kinds={"duckdb", "parquet"},
    description="Per customer and calendar month, every mergeable measure of the transactions and digital events "
    "(only months complete in the staged data; rebuilt only when their staged files change).",
)
def monthly_aggregates(context: dg.AssetExecutionContext, warehouse: WarehouseResource) -> dg.MaterializeResult:
    with closing(warehouse.connect()) as con:
        update = update_monthly_aggregates(con, warehouse.staged_dir, warehouse.layout.aggregates_dir)
    # months and counts only: no customer-level values in Dagster's stores
    months = {
        f"{what}_{source}": [m.strftime("%Y-%m") for m in done[source]]
        for what, done in (("built", update.built), ("removed", update.removed))
        for source in done
    }
    return dg.MaterializeResult(
        metadata={
            **{k: dg.MetadataValue.json(v) for k, v in months.items()},
            "months_kept": sum(len(v) for v in update.kept.values()),
            "months_incomplete": dg.MetadataValue.json({s: [m.strftime("%Y-%m") for m in v] for s, v in update.incomplete.items()}),
            "rows_written": update.rows,
        }
    )


def _build_snapshot(warehouse: WarehouseResource, con, as_of: date, target):
    """DuckDB: from the monthly aggregates (months missing or stale there are read from the staged rows, so the
    snapshot is exact whatever their state; they are not updated here, concurrent partitions would race);
    Spark: the full recompute on the engine."""
    if warehouse.on_spark:
        return warehouse.build_features(con, as_of, target)
    return build_feature_snapshot(con, warehouse.staged_dir, as_of, target, aggregates_dir=warehouse.layout.aggregates_dir, update_aggregates=False)


def _range_check(snapshots: list, name: str) -> dg.AssetCheckResult:
    """One check over a range's nights (warnings only reach here: a blocking failure stopped the run): passed
    when it passed on every night, with the nights it did not."""
    outcomes = [(s.as_of, o) for s in snapshots for o in s.checks if o.name == name]
    failed = [as_of.isoformat() for as_of, o in outcomes if not o.passed]
    blocking = any(o.blocking for _, o in outcomes)
    return dg.AssetCheckResult(
        check_name=name,
        passed=not failed,
        severity=dg.AssetCheckSeverity.ERROR if blocking else dg.AssetCheckSeverity.WARN,
        metadata={"partitions": len(snapshots), "failed_on": dg.MetadataValue.json(failed)},
    )


def build_customer_features_asset(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="customer_features",
        backfill_policy=SINGLE_RUN_BACKFILL,
        group_name=FEATURES_GROUP,
        partitions_def=partitions_def,
        deps=[*(raw_asset_name(t) for t in FEATURE_SOURCES), MONTHLY_AGGREGATES],
        check_specs=[check_spec("customer_features", check) for check in FEATURE_CHECKS],
        kinds={"duckdb", "parquet"},
        description="Point-in-time customer features (one row per customer) as of the partition date.",
    )
    def customer_features(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        # a backfill's range in one run, oldest first; the monthly aggregates (the work the nights share) were
        # brought up to date once, upstream, for the whole range
        snapshots = []
        with closing(warehouse.connect()) as con:
            for as_of in as_of_dates(context):
                target = warehouse.features_path(as_of)
                try:
                    snapshot = _build_snapshot(warehouse, con, as_of, target)
                except FeatureQualityError as err:
                    for outcome in err.outcomes:
                        yield check_result(outcome)
                    raise dg.Failure(description=str(err)) from err
                # aggregates only: no customer-level values in Dagster's stores
                snapshots.append((snapshot, pd.DataFrame(feature_summary(con, target))))
        warehouse.publish_views()
        if len(snapshots) == 1:
            snapshot, summary = snapshots[0]
            yield dg.MaterializeResult(
                metadata={
                    "rows": snapshot.rows,
                    "features": len(FEATURES),
                    "as_of": snapshot.as_of.isoformat(),
                    "method": snapshot.method,
                    "months_from_aggregates": dg.MetadataValue.json({s: len(v) for s, v in snapshot.months_from_aggregates.items()}),
                    "path": dg.MetadataValue.path(str(snapshot.path)),
                    "feature_summary": dg.MetadataValue.md(summary.to_markdown(index=False)),
                },
                check_results=[check_result(o) for o in snapshot.checks],
            )
            return
        # a range: Dagster records this metadata on every partition of the range, so it is keyed by as_of
        yield dg.MaterializeResult(
            metadata={
                "partitions": len(snapshots),
                "as_of": f"{snapshots[0][0].as_of}..{snapshots[-1][0].as_of}",
                "features": len(FEATURES),
                "by_as_of": dg.MetadataValue.json({s.as_of.isoformat(): {"rows": s.rows, "method": s.method} for s, _ in snapshots}),
            },
            check_results=[_range_check([s for s, _ in snapshots], check.name) for check in FEATURE_CHECKS],
        )

    return customer_features
