"""Connecting to MLflow with a clear error when the tracking store cannot be reached."""

import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking store/registry cannot be reached; nothing was logged or registered."""


def connect_tracking(tracking_uri: str, timeout_seconds: int = 10) -> MlflowClient:
    """A client for `tracking_uri`, checked with one cheap call so an outage fails fast and by name."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    else:
        # fail in seconds rather than after MLflow's default minutes of retries
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_seconds))
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:  # any transport or store error means the same thing to the caller
        raise TrackingUnavailableError(f"MLflow tracking store {tracking_uri!r} is unreachable: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}") from exc
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return client
