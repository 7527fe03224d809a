"""Resources: the warehouse (DuckDB over Parquet) built from `Settings`."""

from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
from pydantic import Field

from features.warehouse import connect, features_path, staged_dir_of
from tagml.settings import Settings


class WarehouseResource(dg.ConfigurableResource):
    """Raw input directory plus the embedded DuckDB/Parquet warehouse."""

    raw_dir: str = Field(description="Directory holding the raw contract tables (Parquet files/dirs or CSV).")
    warehouse_dir: str = Field(description="Directory of the Parquet warehouse (staged raw tables, features).")
    threads: int = Field(default=2, description="DuckDB threads; keep at or below the cores you can use.")
    memory_limit: str = Field(default="4GB", description="DuckDB memory limit; larger work spills to disk.")

    @classmethod
    def from_settings(cls, settings: Settings) -> "WarehouseResource":
        return cls(
            raw_dir=str(settings.raw_dir),
            warehouse_dir=str(settings.warehouse_dir),
            threads=settings.threads,
            memory_limit=settings.duckdb_memory_limit,
        )

    def connect(self) -> duckdb.DuckDBPyConnection:
        return connect(self.threads, self.memory_limit)

    @property
    def raw_path(self) -> Path:
        return Path(self.raw_dir)

    @property
    def staged_dir(self) -> Path:
        return staged_dir_of(Path(self.warehouse_dir))

    def features_path(self, as_of: date) -> Path:
        return features_path(Path(self.warehouse_dir), as_of)
