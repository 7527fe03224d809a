"""The one Dagster entry point. The environment is read here, once, when definitions are built."""

import dagster as dg

from orchestration.feature_assets import build_customer_features_asset
from orchestration.jobs import build_jobs
from orchestration.partitions import as_of_partitions
from orchestration.raw_assets import RAW_ASSETS
from orchestration.resources import MlflowResource, WarehouseResource
from orchestration.training_assets import build_all_training_assets
from tagml.settings import Settings
from training.catalog import load_catalog


def build_definitions(settings: Settings) -> dg.Definitions:
    partitions = as_of_partitions(settings)
    catalog = load_catalog(settings.catalog_path)
    return dg.Definitions(
        assets=[*RAW_ASSETS, build_customer_features_asset(partitions), *build_all_training_assets(catalog)],
        jobs=build_jobs(partitions, catalog),
        resources={
            "warehouse": WarehouseResource.from_settings(settings),
            "mlflow_store": MlflowResource.from_settings(settings),
            "io_manager": dg.FilesystemIOManager(base_dir=str(settings.dagster_home / "storage")),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions(Settings.from_env())
