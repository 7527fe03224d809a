"""Jobs, selected by asset group."""

import dagster as dg

from tagml.orchestration.feature_assets import FEATURES_GROUP
from tagml.orchestration.monitoring_assets import MONITORING_GROUP
from tagml.orchestration.own_table_assets import OWN_FEATURES_GROUP, own_features_key
from tagml.orchestration.raw_assets import RAW_GROUP
from tagml.orchestration.scoring_assets import SCORING_GROUP
from tagml.orchestration.training_assets import TRAINING_GROUP, tag_model_key, training_set_key
from tagml.scoring.sources import needs_contract, own_source
from tagml.training.catalog import Catalog

RAW_INGEST_JOB = "raw_ingest_job"
CUSTOMER_FEATURES_JOB = "customer_features_job"
TRAIN_ALL_JOB = "train_all_tags_job"
NIGHTLY_SCORING_JOB = "nightly_scoring_job"


def train_tag_job_name(tag: str) -> str:
    return f"train_{tag}_job"


def reevaluate_job_name(tag: str) -> str:
    return f"reevaluate_{tag}_job"


def reevaluation_run_config(tag: str, as_of: str) -> dict:
    """Train on the labels known on the drifted partition's date; the gate then compares on that data."""
    config = {"config": {"train_as_of": as_of}}
    return {"ops": {training_set_key(tag).to_python_identifier(): config, tag_model_key(tag).to_python_identifier(): config}}


def _in_process_job(name: str, selection: dg.AssetSelection, description: str, partitions_def: dg.PartitionsDefinition | None = None):
    # In-process: each step would otherwise start a process (~4 s of imports) for sub-second work.
    return dg.define_asset_job(name, selection=selection, partitions_def=partitions_def, description=description, executor_def=dg.in_process_executor)


def build_reevaluation_jobs(partitions_def: dg.PartitionsDefinition, catalog: Catalog) -> list:
    """Per model tag: retrain -> promotion gate -> re-score the partition (training assets are unpartitioned)."""
    return [
        _in_process_job(
            reevaluate_job_name(tag.name),
            # a bring-your-own tag's snapshot is re-taken with the (new) champion's features before re-scoring
            dg.AssetSelection.assets(
                training_set_key(tag.name), tag_model_key(tag.name), *([own_features_key(tag.name)] if own_source(tag) else []), "customer_tags", "online_tags"
            ),
            f"Re-evaluate {tag.name} for one as_of: retrain on the labels known then, gate the challenger, re-score the partition, refresh the online store.",
            partitions_def,
        )
        for tag in catalog.model_tags
    ]


def build_nightly_scoring_job(partitions_def: dg.PartitionsDefinition, catalog: Catalog):
    """Ingest and customer_features only when some tag reads the raw contract; every bring-your-own tag's own snapshot."""
    contract = (RAW_GROUP, FEATURES_GROUP) if needs_contract(catalog) else ()
    return _in_process_job(
        NIGHTLY_SCORING_JOB,
        dg.AssetSelection.groups(*contract, OWN_FEATURES_GROUP, SCORING_GROUP, MONITORING_GROUP),
        "Ingest raw data, build the as_of's features (the contract's, and each own table's snapshot), score every customer's tags, "
        "refresh the online store and measure each model tag's drift.",
        partitions_def,
    )


def build_jobs(partitions_def: dg.PartitionsDefinition, catalog: Catalog) -> list:
    """Ingest, features and training jobs, and one training job per model tag."""
    return [
        _in_process_job(RAW_INGEST_JOB, dg.AssetSelection.groups(RAW_GROUP), "Validate and stage every raw contract table."),
        _in_process_job(CUSTOMER_FEATURES_JOB, dg.AssetSelection.groups(FEATURES_GROUP), "Build the customer feature snapshot for one as_of.", partitions_def),
        _in_process_job(TRAIN_ALL_JOB, dg.AssetSelection.groups(TRAINING_GROUP), "Build training sets, train, register and gate every model tag."),
        *(
            _in_process_job(
                train_tag_job_name(tag.name),
                dg.AssetSelection.assets(training_set_key(tag.name), tag_model_key(tag.name)),
                f"Retrain {tag.name}: training set, Optuna + MLflow, promotion gate.",
            )
            for tag in catalog.model_tags
        ),
    ]
