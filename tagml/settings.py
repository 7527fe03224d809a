"""Where tagml keeps things, resolved from environment variables with embedded defaults.

Nothing here runs at import time: callers build a `Settings` when they start (CLI command,
Dagster definitions, a test) and pass it down. Every location a bank would change lives here.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".tagml"
DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "tags" / "catalog.yaml"


@dataclass(frozen=True)
class Settings:
    """Resolved locations and runtime knobs. Build with `Settings.from_env()`."""

    home: Path
    raw_dir: Path
    warehouse_dir: Path
    duckdb_path: Path
    dagster_home: Path
    mlflow_tracking_uri: str
    mlflow_artifact_dir: Path
    reports_dir: Path
    catalog_path: Path
    drift_dir: Path
    threads: int = 2
    duckdb_memory_limit: str = "4GB"
    partitions_start: str = "2024-01-01"
    timezone: str = "Asia/Shanghai"
    scoring_cron: str = "0 2 * * *"
    retrain_cron: str = "0 3 * * 0"
    drift_sample_rows: int = 5000
    reevaluation_cooldown_days: int = 7
    refresh_time: str = "04:30"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read `TAGML_*`, `DAGSTER_HOME` and `MLFLOW_TRACKING_URI`; default everything under TAGML_HOME."""
        env = os.environ if env is None else env
        home = Path(env.get("TAGML_HOME", DEFAULT_HOME)).expanduser().resolve()

        def path(var: str, default: Path) -> Path:
            value = env.get(var)
            return Path(value).expanduser().resolve() if value else default

        warehouse_dir = path("TAGML_WAREHOUSE_DIR", home / "warehouse")
        artifact_dir = path("TAGML_MLFLOW_ARTIFACTS", home / "mlflow" / "artifacts")
        return cls(
            home=home,
            raw_dir=path("TAGML_RAW_DIR", home / "raw"),
            warehouse_dir=warehouse_dir,
            duckdb_path=path("TAGML_DUCKDB_PATH", warehouse_dir / "tagml.duckdb"),
            dagster_home=path("DAGSTER_HOME", home / "dagster"),
            mlflow_tracking_uri=env.get(
                "MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
            ),
            mlflow_artifact_dir=artifact_dir,
            reports_dir=path("TAGML_REPORTS_DIR", home / "reports"),
            catalog_path=path("TAGML_CATALOG", DEFAULT_CATALOG),
            drift_dir=path("TAGML_DRIFT_DIR", warehouse_dir / "drift"),
            threads=int(env.get("TAGML_THREADS", "2")),
            duckdb_memory_limit=env.get("TAGML_DUCKDB_MEMORY_LIMIT", "4GB"),
            partitions_start=env.get("TAGML_PARTITIONS_START", "2024-01-01"),
            timezone=env.get("TAGML_TIMEZONE", "Asia/Shanghai"),
            scoring_cron=env.get("TAGML_SCORING_CRON", "0 2 * * *"),
            retrain_cron=env.get("TAGML_RETRAIN_CRON", "0 3 * * 0"),
            drift_sample_rows=int(env.get("TAGML_DRIFT_SAMPLE_ROWS", "5000")),
            reevaluation_cooldown_days=int(env.get("TAGML_REEVALUATION_COOLDOWN_DAYS", "7")),
            refresh_time=env.get("TAGML_REFRESH_TIME", "04:30"),
        )

    def ensure_dirs(self) -> None:
        """Create the data directories and a Dagster instance config (telemetry off: no network)."""
        for directory in (self.raw_dir, self.warehouse_dir, self.dagster_home, self.reports_dir):
            directory.mkdir(parents=True, exist_ok=True)
        if self.mlflow_tracking_uri.startswith("sqlite:///"):
            Path(self.mlflow_tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        dagster_yaml = self.dagster_home / "dagster.yaml"
        if not dagster_yaml.exists():
            dagster_yaml.write_text("telemetry:\n  enabled: false\n")
