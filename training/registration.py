"""Registering a trained model as a tag's new challenger version: the version's lineage and contents as
registry tags (read back by tagml.training.versions), its signature and the code version."""

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from tagml.core.files import file_sha256
from tagml.core.settings import home_relative
from tagml.training.catalog import TagSpec
from tagml.training.dataset import TrainingSet
from tagml.training.tracking import is_missing
from tagml.training.versions import REGISTRATION_COMPLETE, REGISTRATION_PENDING, REGISTRATION_TAG, registered_model_name

SNAPSHOT_HASH_TAG = "snapshot_sha256"  # the training snapshot's sha256 at registration: a later rewrite (e.g. an erasure) changes it
PIP_REQUIREMENTS = ["scikit-learn>=1.6,<2", "xgboost>=3.0,<3.3", "pandas>=2.2,<3", "numpy>=2.0,<2.5"]


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def model_signature(data: TrainingSet, n_classes: int) -> ModelSignature:
    """Every feature optional (missing values are normal in bank data) and typed as in training:
    text for categorical, double for numeric. Inferring it from a few example rows would mark columns
    required and reject tomorrow's nulls."""
    inputs = Schema([ColSpec("string" if n in data.categorical else "double", n, required=False) for n in data.feature_names])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("float64"), (-1, n_classes))]))


def register_version(
    client: MlflowClient,
    tag: TagSpec,
    source: str,
    model_id: str,
    run_id: str,
    data: TrainingSet,
    metrics: Mapping[str, float],
    extra_tags: Mapping[str, str],
) -> str:
    """A new version of the tag's registered model with its registry tags (and `extra_tags`), aliased `challenger`."""
    name = registered_model_name(tag.name)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        client.create_registered_model(name, description=tag.description, tags={"owner": tag.owner, "sensitivity": tag.sensitivity})
    # the source is the logged model's own artifact location with its model id: a server checks the two
    # belong together, and a `models:/m-...` source would make a SQLite store resolve it through
    # MLflow's process-global tracking URI
    version = client.create_model_version(name, source, run_id=run_id, model_id=model_id, tags={REGISTRATION_TAG: REGISTRATION_PENDING}).version
    tags = {
        **extra_tags,
        "data_snapshot": home_relative(data.snapshot_path),
        "snapshot_id": data.snapshot_id,
        "feature_list": json.dumps(list(data.feature_names)),
        "feature_types": json.dumps(data.feature_types or {n: ("categorical" if n in data.categorical else "numeric") for n in data.feature_names}),
        "classes": json.dumps(list(tag.classes)),
        "catalog_hash": tag.content_hash(),
        "code_version": code_version(),
        "promotion_metric": tag.promotion.metric,
        f"test_{tag.promotion.metric}": f"{metrics[tag.promotion.metric]:.6f}",
    }
    if data.snapshot_path.exists():  # a training set built in memory (tests) has no file to hash
        tags[SNAPSHOT_HASH_TAG] = file_sha256(data.snapshot_path)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, REGISTRATION_TAG, REGISTRATION_COMPLETE)  # last: everything above is in place
    client.set_registered_model_alias(name, "challenger", version)
    return str(version)
