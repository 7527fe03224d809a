"""The one Dagster entry point. The environment is read here, once, when definitions are built."""

# Before anything imports mlflow (it starts its telemetry client at import): `dagster dev`, the
# webserver, the daemon and run workers load this module, and none of them may phone home.
from tagml.core.runtime import configure_process

configure_process()

import dagster as dg

from tagml.core.runtime import open_home
from tagml.core.settings import Settings
from tagml.orchestration.compliance_jobs import build_erasure_job
from tagml.orchestration.feature_assets import build_customer_features_asset, monthly_aggregates
from tagml.orchestration.jobs import build_jobs, build_nightly_scoring_job, build_reevaluation_jobs
from tagml.orchestration.maintenance import build_purge_job, build_purge_schedule
from tagml.orchestration.monitoring_assets import build_tag_drift_asset
from tagml.orchestration.own_table_assets import build_own_features_assets
from tagml.orchestration.partitions import as_of_partitions
from tagml.orchestration.raw_assets import RAW_ASSETS
from tagml.orchestration.resources import (
    MlflowResource,
    MonitoringResource,
    WarehouseResource,
)
from tagml.orchestration.schedules import build_schedules
from tagml.orchestration.scoring_assets import build_customer_tags_asset
from tagml.orchestration.sensors import build_reevaluation_sensor
from tagml.orchestration.serving_assets import OnlineStoreResource, build_online_tags_asset
from tagml.orchestration.training_assets import build_all_training_assets
from tagml.training.catalog import load_catalog


def build_definitions(settings: Settings) -> dg.Definitions:
    """Every asset, job, schedule, sensor and resource, from one Settings (read by the caller)."""
    partitions = as_of_partitions(settings)
    catalog = load_catalog(settings.catalog_path)
    reevaluation = build_reevaluation_jobs(partitions, catalog)
    purge = build_purge_job(settings)
    return dg.Definitions(
        assets=[
            *RAW_ASSETS,
            monthly_aggregates,
            build_customer_features_asset(partitions),
            *build_all_training_assets(catalog),
            *build_own_features_assets(partitions, catalog),
            build_customer_tags_asset(partitions, catalog),
            build_tag_drift_asset(partitions, catalog),
            build_online_tags_asset(partitions, catalog),
        ],
        jobs=[*build_jobs(partitions, catalog), build_nightly_scoring_job(partitions, catalog), *reevaluation, purge, build_erasure_job(settings)],
        schedules=[*build_schedules(settings, catalog), build_purge_schedule(settings, purge)],
        sensors=[build_reevaluation_sensor(catalog, reevaluation)],
        resources={
            "warehouse": WarehouseResource.from_settings(settings),
            "mlflow_store": MlflowResource.from_settings(settings),
            "monitoring": MonitoringResource.from_settings(settings),
            "online_store": OnlineStoreResource.from_settings(settings),
            "io_manager": dg.FilesystemIOManager(base_dir=str(settings.dagster_home / "storage")),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    settings = Settings.from_env()  # a bad value fails the load with its variable named
    open_home(settings)  # a moved or copied home is re-anchored before anything runs in it
    return build_definitions(settings)
