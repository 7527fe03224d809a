"""customer_features: the point-in-time feature snapshot for one as_of, behind its quality checks."""

from contextlib import closing
from datetime import date

import dagster as dg
import pandas as pd

from tagml.features.dictionary import FEATURES
from tagml.features.quality import FEATURE_CHECKS, feature_summary
from tagml.features.snapshot import FeatureQualityError
from tagml.orchestration.checks import check_result, check_spec
from tagml.orchestration.raw_assets import raw_asset_name
from tagml.orchestration.resources import WarehouseResource

FEATURES_GROUP = "features"
FEATURE_SOURCES = ("customers", "balances", "loans", "transactions", "digital_events")


def build_customer_features_asset(partitions_def: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    @dg.asset(
        name="customer_features",
        group_name=FEATURES_GROUP,
        partitions_def=partitions_def,
        deps=[raw_asset_name(t) for t in FEATURE_SOURCES],
        check_specs=[check_spec("customer_features", check) for check in FEATURE_CHECKS],
        kinds={"duckdb", "parquet"},
        description="Point-in-time customer features (one row per customer) as of the partition date.",
    )
    def customer_features(context: dg.AssetExecutionContext, warehouse: WarehouseResource):
        as_of = date.fromisoformat(context.partition_key)
        target = warehouse.features_path(as_of)
        with closing(warehouse.connect()) as con:
            try:
                snapshot = warehouse.build_features(con, as_of, target)
            except FeatureQualityError as err:
                for outcome in err.outcomes:
                    yield check_result(outcome)
                raise dg.Failure(description=str(err)) from err
            # aggregates only: no customer-level values in Dagster's stores
            summary = pd.DataFrame(feature_summary(con, target))
        warehouse.publish_views()
        yield dg.MaterializeResult(
            metadata={
                "rows": snapshot.rows,
                "features": len(FEATURES),
                "as_of": as_of.isoformat(),
                "path": dg.MetadataValue.path(str(target)),
                "feature_summary": dg.MetadataValue.md(summary.to_markdown(index=False)),
            },
            check_results=[check_result(o) for o in snapshot.checks],
        )

    return customer_features
