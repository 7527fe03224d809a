"""tagml: customer tag models on Dagster, MLflow, DuckDB and Evidently."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tagml")  # the one version: pyproject.toml's, as installed
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
