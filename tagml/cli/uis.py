"""`tagml ui` and `tagml mlflow-ui`: the Dagster and MLflow UIs on this home."""

import os
import sys
from typing import Annotated

import typer

from tagml.cli.app import app
from tagml.cli.common import load_settings

# the code location as workspace.yaml names it, by installed module, so a wheel install needs no source tree
DAGSTER_CODE_LOCATION = ("-m", "tagml.orchestration.definitions", "-a", "defs")


@app.command("ui")
def ui(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 3000,
) -> None:
    """Start the Dagster UI (dagster dev) on this TAGML_HOME."""
    settings = load_settings(create=True)
    env = {**os.environ, "DAGSTER_HOME": str(settings.dagster_home), "TAGML_HOME": str(settings.home)}
    command = [sys.executable, "-m", "dagster", "dev", *DAGSTER_CODE_LOCATION, "-h", host, "-p", str(port)]
    os.execvpe(command[0], command, env)


@app.command("mlflow-ui")
def mlflow_ui(
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port")] = 5000,
) -> None:
    """Start the MLflow UI on this TAGML_HOME's tracking store."""
    settings = load_settings(require_home=True)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        settings.mlflow_tracking_uri,
        "--default-artifact-root",
        str(settings.mlflow_artifact_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    os.execvp(command[0], command)
