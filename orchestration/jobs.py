"""Jobs, selected by asset group."""

import dagster as dg

from orchestration.feature_assets import FEATURES_GROUP
from orchestration.raw_assets import RAW_GROUP

RAW_INGEST_JOB = "raw_ingest_job"
CUSTOMER_FEATURES_JOB = "customer_features_job"


def build_jobs(partitions_def: dg.PartitionsDefinition) -> list:
    # In-process: each step would otherwise start a process (~4 s of imports) for sub-second work.
    return [
        dg.define_asset_job(
            RAW_INGEST_JOB,
            selection=dg.AssetSelection.groups(RAW_GROUP),
            description="Validate and stage every raw contract table.",
            executor_def=dg.in_process_executor,
        ),
        dg.define_asset_job(
            CUSTOMER_FEATURES_JOB,
            selection=dg.AssetSelection.groups(FEATURES_GROUP),
            partitions_def=partitions_def,
            description="Build the customer feature snapshot for one as_of.",
            executor_def=dg.in_process_executor,
        ),
    ]
