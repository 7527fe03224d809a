"""Resources: the Dagster side of the seams, built from `Settings`.

`WarehouseResource` vends the `Warehouse` (tagml.core.storage) and the `TagStore` (tagml.scoring.store);
the embedded DuckDB/Parquet implementations by default. Another engine or store is another
implementation returned here (a subclass of the resource overriding `warehouse()` / `tag_store()`),
with no change to the assets that use them.
"""

from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
from mlflow.tracking import MlflowClient
from pydantic import Field

from tagml.core.settings import DEFAULT_TIMEZONE, Settings
from tagml.core.storage import EmbeddedWarehouse, Warehouse, WarehouseLayout
from tagml.monitoring.drift import DriftLocations
from tagml.scoring.store import ParquetTagStore, TagStore
from tagml.training.tracking import DEFAULT_UI_URL, connect_tracking


class WarehouseResource(dg.ConfigurableResource):
    """Raw input directory plus the embedded DuckDB/Parquet warehouse."""

    raw_dir: str = Field(description="Directory holding the raw contract tables (Parquet files/dirs or CSV).")
    warehouse_dir: str = Field(description="Directory of the Parquet warehouse (staged raw tables, features).")
    duckdb_path: str = Field(description="DuckDB file holding views over the warehouse's Parquet files.")
    threads: int = Field(default=2, description="DuckDB threads; keep at or below the cores you can use.")
    memory_limit: str = Field(default="4GB", description="DuckDB memory limit; larger work spills to disk.")
    timezone: str = Field(default=DEFAULT_TIMEZONE, description="The bank's timezone: a delivery's default date is today there.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "WarehouseResource":
        return cls(
            raw_dir=str(settings.raw_dir),
            warehouse_dir=str(settings.warehouse_dir),
            duckdb_path=str(settings.duckdb_path),
            threads=settings.threads,
            memory_limit=settings.duckdb_memory_limit,
            timezone=settings.timezone,
        )

    def warehouse(self) -> Warehouse:
        return EmbeddedWarehouse(Path(self.warehouse_dir), Path(self.duckdb_path), self.threads, self.memory_limit)

    def tag_store(self) -> TagStore:
        return ParquetTagStore.in_warehouse(Path(self.warehouse_dir))

    def connect(self) -> duckdb.DuckDBPyConnection:
        return self.warehouse().connect()

    def publish_views(self) -> list[str]:
        return self.warehouse().publish_views()

    @property
    def raw_path(self) -> Path:
        return Path(self.raw_dir)

    @property
    def layout(self) -> WarehouseLayout:
        return self.warehouse().layout

    @property
    def staged_dir(self) -> Path:
        return self.layout.staged_dir

    def features_path(self, as_of: date) -> Path:
        return self.layout.customer_features.path(as_of)

    @property
    def training_sets_dir(self) -> Path:
        return self.layout.training_sets_dir


class MlflowResource(dg.ConfigurableResource):
    """MLflow tracking store and model registry (SQLite file by default, a server at a bank)."""

    tracking_uri: str = Field(description="MLflow tracking/registry URI, e.g. sqlite:///... or https://mlflow.bank")
    artifact_location: str | None = Field(default=None, description="Artifact root for new experiments of a local store (a server chooses its own).")
    ui_url: str = Field(default=DEFAULT_UI_URL, description="MLflow UI linked from Dagster metadata when the store is local (a server links itself).")

    @classmethod
    def from_settings(cls, settings: Settings) -> "MlflowResource":
        return cls(tracking_uri=settings.mlflow_tracking_uri, artifact_location=str(settings.mlflow_artifact_dir), ui_url=settings.mlflow_ui_url)

    def client(self) -> MlflowClient:
        return connect_tracking(self.tracking_uri)


class MonitoringResource(dg.ConfigurableResource):
    """Where drift results and Evidently reports go, and how large the report's sample is."""

    drift_dir: str = Field(description="Directory of the drift history (Parquet partitions) and cached references.")
    reports_dir: str = Field(description="Evidently HTML reports, one per tag and as_of: <reports_dir>/<tag>/<as_of>.html.")
    sample_rows: int = Field(default=5000, description="Rows per side in the Evidently report; PSI always uses every customer.")
    reevaluation_cooldown_days: int = Field(default=7, ge=0, description="Data days after a tag's drift re-evaluation before the sensor re-evaluates it again.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "MonitoringResource":
        return cls(
            drift_dir=str(settings.drift_dir),
            reports_dir=str(settings.reports_dir),
            sample_rows=settings.drift_sample_rows,
            reevaluation_cooldown_days=settings.reevaluation_cooldown_days,
        )

    def locations(self, warehouse: WarehouseResource) -> DriftLocations:
        return DriftLocations(Path(warehouse.warehouse_dir), warehouse.tag_store(), Path(self.drift_dir), Path(self.reports_dir))
