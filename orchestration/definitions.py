"""The one Dagster entry point. The environment is read here, once, when definitions are built."""

import dagster as dg

from orchestration.feature_assets import build_customer_features_asset
from orchestration.jobs import build_jobs
from orchestration.partitions import as_of_partitions
from orchestration.raw_assets import RAW_ASSETS
from orchestration.resources import WarehouseResource
from tagml.settings import Settings


def build_definitions(settings: Settings) -> dg.Definitions:
    partitions = as_of_partitions(settings)
    return dg.Definitions(
        assets=[*RAW_ASSETS, build_customer_features_asset(partitions)],
        jobs=build_jobs(partitions),
        resources={"warehouse": WarehouseResource.from_settings(settings)},
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(Settings.from_env())
