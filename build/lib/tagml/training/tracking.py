"""Connecting to MLflow with a clear error when the tracking store cannot be reached, and what the rest
of tagml needs to know about a store: local or a server, how registry errors read, where its UI is.

tagml never touches MLflow's process-global state (`mlflow.set_tracking_uri`, the fluent active run):
every run, metric, artifact and model goes through the one `MlflowClient` the caller holds, so two
stores in one process (a test and the demo, a bank's two registries) never see each other's runs.
"""

import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# MLflow's telemetry client starts when mlflow is imported: it looks up a DNS name and writes an
# installation id under ~/.config/mlflow. A bank's batch hosts must do neither, so the switches are set
# before this module imports mlflow (and connect_tracking drops a client an earlier import started).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"

from pathlib import Path
from urllib.parse import quote

import mlflow
from filelock import FileLock
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

DEFAULT_UI_URL = "http://127.0.0.1:5000"
# the codes MLflow answers with for a name, version or alias that does not exist: the SQLite store and a
# server agree (RESOURCE_DOES_NOT_EXIST for a model or version, INVALID_PARAMETER_VALUE "... alias ...
# not found" for an alias); tests/test_registry.py holds both stores to it
_MISSING_CODES = {"RESOURCE_DOES_NOT_EXIST"}


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store/registry cannot be reached; nothing was logged or registered."""


def _disable_telemetry() -> None:
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["DO_NOT_TRACK"] = "1"
    from mlflow.telemetry import get_telemetry_client, set_telemetry_client

    if get_telemetry_client() is not None:  # mlflow was imported before this module
        set_telemetry_client()  # re-reads the switches: drops the client


def is_local_store(tracking_uri: str) -> bool:
    """A store on this machine's disk (SQLite or a file path), as opposed to a tracking server."""
    if tracking_uri.startswith(("sqlite:", "file:")):
        return True
    return "://" not in tracking_uri and tracking_uri.startswith(("/", ".", "~"))  # a bare directory path


def sqlite_path(tracking_uri: str) -> Path | None:
    return Path(tracking_uri.removeprefix("sqlite:///")) if tracking_uri.startswith("sqlite:///") else None


def is_missing(exc: MlflowException) -> bool:
    """True only when MLflow says the model, version or alias does not exist (not for outages or 5xx)."""
    if exc.error_code in _MISSING_CODES:
        return True
    return exc.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc).lower()


def describe(exc: BaseException) -> str:
    """One line naming an MLflow failure: its error code (if any) and the first line of its message."""
    code = getattr(exc, "error_code", None) or type(exc).__name__
    lines = str(exc).splitlines() or [""]
    return f"{code}: {lines[0][:300]}"


def connect_tracking(tracking_uri: str, timeout_seconds: int = 10) -> MlflowClient:
    """A client for `tracking_uri`, checked with one cheap call so an outage fails fast and by name."""
    _disable_telemetry()
    db = sqlite_path(tracking_uri)
    if db is None:
        # fail in seconds rather than after MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_seconds))
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            # MLflow creates (and migrates) a new SQLite store's schema when a client first opens it,
            # without a lock: processes starting together on a fresh store died with "table ... already
            # exists" or an alembic error. Opening the tracking and the registry store is serialised here.
            with FileLock(str(db) + ".schema.lock", timeout=120):
                client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
        else:
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.search_experiments(max_results=1)
    except Exception as exc:  # any transport or store error means the same thing to the caller
        raise TrackingUnavailableError(
            f"MLflow tracking store {tracking_uri!r} is unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        ) from exc
    return client


# ---- runs through the client (what the fluent API does, without its process-global active run) -----


def create_run(client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
    """A RUNNING run with the context tags the fluent API records (user, source), nested under `parent_run_id`."""
    extra = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
    return client.create_run(experiment_id, run_name=run_name, tags=resolve_tags({**tags, **extra})).info.run_id


@contextmanager
def tracked_run(client: MlflowClient, experiment_id: str, run_name: str, tags: Mapping[str, str], parent_run_id: str | None = None) -> Iterator[str]:
    """A run ended FINISHED when the block completes, FAILED when it raises (KILLED on an interrupt)."""
    run_id = create_run(client, experiment_id, run_name, tags, parent_run_id)
    try:
        yield run_id
    except BaseException as exc:
        client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float]) -> None:
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, str]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@dataclass(frozen=True)
class LoggedSklearnModel:
    model_id: str
    model_uri: str  # models:/m-<id>
    artifact_location: str  # where the store keeps its files: the registered version's source


def log_sklearn_model(client: MlflowClient, experiment_id: str, run_id: str, model: Any, name: str = "model", **save_kwargs: Any) -> LoggedSklearnModel:
    """What `mlflow.sklearn.log_model` stores (a LoggedModel of the run, its MLmodel and files, the run's
    params and metrics on it), through `client`: saved to a temporary directory, then uploaded."""
    run_data = client.get_run(run_id).data
    logged = client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, tags=resolve_tags({}), params={k: str(v) for k, v in run_data.params.items()}
    )
    try:
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=logged.model_id) for k, v in run_data.metrics.items()])
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, name)
            meta = Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id, model_id=logged.model_id)
            mlflow.sklearn.save_model(model, local, mlflow_model=meta, **save_kwargs)
            client.log_model_artifacts(logged.model_id, local)
    except BaseException:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
    return LoggedSklearnModel(logged.model_id, f"models:/{logged.model_id}", logged.artifact_location)


def download_artifacts(client: MlflowClient, artifact_uri: str, dst: str) -> str:
    """Files of `artifact_uri` (a version's download URI) into `dst`, through the client's stores."""
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=dst, tracking_uri=client.tracking_uri)


def ui_base_url(tracking_uri: str, ui_url: str = DEFAULT_UI_URL) -> str:
    """Where a person opens the MLflow UI: the server itself, or (for a local store) `ui_url`."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return ui_url.rstrip("/")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(base: str, model_name: str, version: str) -> str:
    return f"{base}/#/models/{quote(model_name, safe='')}/versions/{version}"
