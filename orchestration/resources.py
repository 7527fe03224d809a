"""Resources: the Dagster side of the seams, built from `Settings`.

`WarehouseResource` vends the `Warehouse` (tagml.core.storage) and the `TagStore` (tagml.scoring.store);
the embedded DuckDB/Parquet implementations by default. Another store is another implementation
returned here (a subclass of the resource overriding `warehouse()` / `tag_store()`), with no change to
the assets that use them.

It is also the one place the engine is chosen (TAGML_ENGINE): the assets call `stage`, `build_features`,
`score_partition` and `drift_bin_counter` here, and each runs today's DuckDB function or its Spark twin
from the domain packages. Domain code never chooses; the Spark functions are imported only on the Spark
branch, so the DuckDB default needs no pyspark and starts no JVM.

Dagster on Spark is an in-process PySpark session owned by this resource (`spark()`), not Dagster Pipes
with `spark-submit`: the step process is the Spark driver in client mode and `TAGML_SPARK_MASTER`
says where the executors are (`local[N]`, `yarn`, `k8s://...`, `spark://...`). The driver runs the
same Python code, venv and settings as every other step, so there is no second packaging of tagml
(no zipped job script, no copy of the catalog), and the assets, partitions (by as_of), metadata and
checks are the same on both engines. The executors need the same Python environment (PYSPARK_PYTHON),
as they would under Pipes. The cost: the driver's memory is the step's, so the run launcher sizes the
step's container for it. A platform that only accepts submitted jobs (EMR, Databricks, Dataproc) would
replace this session with a Pipes client in the same methods.
"""

from collections.abc import Mapping
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import dagster as dg
import duckdb
from mlflow.tracking import MlflowClient
from pydantic import Field

from tagml.core.settings import DEFAULT_TIMEZONE, Settings
from tagml.core.storage import EmbeddedWarehouse, Warehouse, WarehouseLayout
from tagml.features.delivery import StagedDelivery, stage_delivery
from tagml.features.snapshot import FeatureSnapshot, build_feature_snapshot
from tagml.monitoring.drift import DriftLocations
from tagml.monitoring.psi import BinCounter
from tagml.scoring.score import DEFAULT_BATCH_ROWS, ScoringSummary, score_partition
from tagml.scoring.store import ParquetTagStore, TagStore
from tagml.training.catalog import Catalog
from tagml.training.tracking import DEFAULT_UI_URL, connect_tracking

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


class WarehouseResource(dg.ConfigurableResource):
    """Raw input directory, the Parquet warehouse, and the engine (DuckDB or Spark) that computes it."""

    raw_dir: str = Field(description="Directory holding the raw contract tables (Parquet files/dirs or CSV).")
    warehouse_dir: str = Field(description="Directory of the Parquet warehouse (staged raw tables, features).")
    duckdb_path: str = Field(description="DuckDB file holding views over the warehouse's Parquet files.")
    threads: int = Field(default=2, description="DuckDB threads; keep at or below the cores you can use.")
    memory_limit: str = Field(default="4GB", description="DuckDB memory limit; larger work spills to disk.")
    timezone: str = Field(default=DEFAULT_TIMEZONE, description="The bank's timezone: a delivery's default date is today there.")
    engine: Literal["duckdb", "spark"] = Field(default="duckdb", description="Where staging, features and scoring run: duckdb or spark (TAGML_ENGINE).")
    spark_master: str = Field(default="local[2]", description="Spark master of the in-process driver: local[N], yarn, k8s://..., spark://...")
    governance_db: str | None = Field(
        default=None, description="The governance store (TAGML_GOVERNANCE_DB): staging drops the rows of erased customers it lists."
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> "WarehouseResource":
        return cls(
            raw_dir=str(settings.raw_dir),
            warehouse_dir=str(settings.warehouse_dir),
            duckdb_path=str(settings.duckdb_path),
            threads=settings.threads,
            memory_limit=settings.duckdb_memory_limit,
            timezone=settings.timezone,
            engine=settings.engine,
            spark_master=settings.spark_master,
            governance_db=str(settings.governance_db),
        )

    @property
    def on_spark(self) -> bool:
        return self.engine == "spark"

    def spark(self) -> "SparkSession":
        """The process's Spark session (started on first use) on `spark_master`."""
        from tagml.core.spark import spark_session

        return spark_session(self.spark_master)

    def stage(self, con: duckdb.DuckDBPyConnection, delivery_date: date) -> StagedDelivery:
        """Validate and stage the raw delivery as one new generation (all or nothing), on the engine."""
        if self.on_spark:
            from tagml.features.spark_staging import stage_delivery_spark

            return stage_delivery_spark(self.spark(), self.raw_path, self.staged_dir, delivery_date, self.governance_path)
        return stage_delivery(con, self.raw_path, self.staged_dir, delivery_date, governance_db=self.governance_path)

    @property
    def governance_path(self) -> Path | None:
        return Path(self.governance_db) if self.governance_db else None

    def build_features(self, con: duckdb.DuckDBPyConnection, as_of: date, target: Path) -> FeatureSnapshot:
        """The feature snapshot for `as_of`, computed on the engine and swapped into `target` only if its blocking checks pass."""
        write = None
        if self.on_spark:
            from tagml.features.spark_features import build_customer_features_spark

            spark = self.spark()

            def write(candidate: Path) -> int:
                return build_customer_features_spark(spark, self.staged_dir, as_of, candidate)

        return build_feature_snapshot(con, self.staged_dir, as_of, target, write=write)

    def score_partition(
        self,
        con: duckdb.DuckDBPyConnection,
        client: MlflowClient | None,
        catalog: Catalog,
        features_path: Path | None,
        as_of: date,
        target: Path,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        own_features: Mapping[str, Path] | None = None,
        skip: Mapping[str, str] | None = None,
        previous_partition: Path | None = None,
        honour_refresh: bool = True,
        reuse_unchanged: bool = False,
    ) -> ScoringSummary:
        """`tagml.scoring.score.score_partition` of the staged delivery, on the engine (both carry inferences under the
        catalog's refresh from `previous_partition`; `reuse_unchanged` is DuckDB's only: Spark infers the others anew)."""
        args = (client, catalog, features_path, self.staged_dir, as_of, target)
        kwargs = {
            "batch_rows": batch_rows,
            "own_features": own_features,
            "skip": skip,
            "previous_partition": previous_partition,
            "honour_refresh": honour_refresh,
        }
        if self.on_spark:
            from tagml.scoring.spark_scoring import score_partition_spark

            return score_partition_spark(self.spark(), con, *args, **kwargs)
        return score_partition(con, *args, **kwargs, reuse_unchanged=reuse_unchanged)

    def drift_bin_counter(self) -> BinCounter | None:
        """What counts the feature PSI's bins over every customer in `compute_drift`: None is DuckDB's own."""
        if self.on_spark:
            from tagml.monitoring.spark_psi import spark_bin_counter

            return spark_bin_counter(self.spark())
        return None

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
    report_policy: str = Field(
        default="on_drift_or_weekly", description="When the Evidently report runs (TAGML_DRIFT_REPORT): on_drift_or_weekly, on_drift, always, never."
    )
    report_weekday: int = Field(default=6, ge=0, le=6, description="The weekly report's weekday of the as_of, 0 = Monday (TAGML_DRIFT_REPORT_WEEKDAY).")

    @classmethod
    def from_settings(cls, settings: Settings) -> "MonitoringResource":
        return cls(
            drift_dir=str(settings.drift_dir),
            reports_dir=str(settings.reports_dir),
            sample_rows=settings.drift_sample_rows,
            reevaluation_cooldown_days=settings.reevaluation_cooldown_days,
            report_policy=settings.drift_report,
            report_weekday=settings.drift_report_weekday,
        )

    def locations(self, warehouse: WarehouseResource) -> DriftLocations:
        return DriftLocations(Path(warehouse.warehouse_dir), warehouse.tag_store(), Path(self.drift_dir), Path(self.reports_dir), warehouse.governance_path)
