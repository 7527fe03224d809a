"""Connecting to MLflow with a clear error when the tracking store cannot be reached, and what the rest
of tagml needs to know about a store: local or a server, how registry errors read, where its UI is."""

import os

# MLflow's telemetry client starts when mlflow is imported: it looks up a DNS name and writes an
# installation id under ~/.config/mlflow. A bank's batch hosts must do neither, so the switches are set
# before this module imports mlflow (and connect_tracking drops a client an earlier import started).
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "1"

from pathlib import Path
from urllib.parse import quote

import mlflow
from filelock import FileLock
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

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
        raise TrackingUnavailableError(f"MLflow tracking store {tracking_uri!r} is unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return client


def ui_base_url(tracking_uri: str, ui_url: str = DEFAULT_UI_URL) -> str:
    """Where a person opens the MLflow UI: the server itself, or (for a local store) `ui_url`."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return ui_url.rstrip("/")


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(base: str, model_name: str, version: str) -> str:
    return f"{base}/#/models/{quote(model_name, safe='')}/versions/{version}"
