"""What every entry point does before it touches anything: no telemetry, and a moved home re-anchored.

`configure_process()` runs first in the CLI's main, when orchestration/definitions.py is loaded
(`dagster dev`, the webserver, the daemon, run workers) and in tests/conftest.py. It must run before
mlflow is imported: mlflow starts its telemetry client at import time.

`relocate_home(settings)` handles a home that was moved or copied. MLflow's SQLite store keeps
absolute artifact locations per experiment, run, logged model and model version (and resolves
relative ones against the working directory, so they cannot simply be stored relative); the home
manifest (home.json) records the absolute path the home was last used at, and when that differs
the old prefix is rewritten to the new one in one SQLite transaction, the DuckDB views are
republished, and the manifest is updated. Nothing is written under the old path.
"""

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from tagml.core.settings import Settings, SettingsError, read_manifest, write_manifest

TELEMETRY_OFF = {
    # mlflow: checked at import (client start) and per event; without it the first call resolves
    # mlflow's telemetry host and writes an installation id under ~/.config/mlflow
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # the cross-tool convention; dagster's uploader also stops on DAGSTER_DISABLE_TELEMETRY
    "DO_NOT_TRACK": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
}

# Where MLflow's SQLite store (schema of mlflow 3.x) records absolute artifact locations.
MLFLOW_LOCATION_COLUMNS: tuple[tuple[str, str], ...] = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
# registry tags holding paths written before they were stored anchored (see Settings.stored_path)
MLFLOW_PATH_TAGS: tuple[tuple[str, str], ...] = (("model_version_tags", "data_snapshot"),)


def configure_process() -> None:
    """Telemetry off for mlflow and dagster, OpenMP threads that do not spin, no download bars (idempotent)."""
    for name, value in TELEMETRY_OFF.items():
        os.environ.setdefault(name, value)
    # idle xgboost/OpenMP threads spin-wait by default, which starves a busy 2-core machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # every model load downloads its artifacts: MLflow's progress bars would fill the demo's and the commands' output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def open_home(settings: Settings) -> "Relocation | None":
    """What every entry point does once its settings are known (CLI commands, the Dagster load): a moved
    or copied home is re-anchored before anything runs in it, and library caches go into the home."""
    moved = relocate_home(settings)
    keep_caches_in_home(settings)
    return moved


def keep_caches_in_home(settings: Settings) -> None:
    """Library caches live in the home, not under $HOME (matplotlib writes its font list on first use).

    Called once settings are known (CLI commands, the Dagster load), before any plot is drawn."""
    if settings.home.is_dir():
        os.environ.setdefault("MPLCONFIGDIR", str(settings.home / "cache" / "matplotlib"))


@dataclass(frozen=True)
class Relocation:
    old: Path
    new: Path
    mlflow_rows: int
    views: list[str]

    def describe(self) -> str:
        return (
            f"this home was at {self.old}; re-anchored to {self.new} "
            f"({self.mlflow_rows} MLflow locations rewritten, {len(self.views)} DuckDB views republished)"
        )


def relocate_home(settings: Settings) -> Relocation | None:
    """Re-anchor a home that was moved or copied; None when it is where it was (or is new)."""
    if not settings.home.is_dir():
        return None
    manifest = read_manifest(settings)
    if manifest is None:
        # a home from before manifests: adopt it where it is now (a read-only one is only read)
        try:
            settings.check_writable()
        except SettingsError:
            return None
        write_manifest(settings)
        return None
    old = Path(manifest.get("path", ""))
    if old == settings.home:
        return None
    if not old.is_absolute():
        raise SettingsError(f"the home manifest {settings.manifest_path} has no absolute 'path'; restore or delete it")
    settings.check_writable()
    from filelock import FileLock

    with FileLock(str(settings.home / ".relocate.lock"), timeout=60):
        manifest = read_manifest(settings) or {}
        if Path(manifest.get("path", "")) == settings.home:  # another process did it meanwhile
            return None
        rows = 0
        db = settings.embedded_tracking_db
        if db is not None and db.exists() and db.resolve().is_relative_to(settings.home):
            rows = rewrite_mlflow_locations(db, old, settings.home)
        views = republish_views(settings)
        write_manifest(settings)
    return Relocation(old, settings.home, rows, views)


def rewrite_mlflow_locations(db: Path, old: Path, new: Path) -> int:
    """Replace the `old` prefix by `new` in every artifact location of MLflow's SQLite store, in one
    transaction (all or nothing). Plain paths and file:// URIs are both rewritten; returns the row count."""
    prefixes = [(str(old), str(new)), (f"file://{old}", f"file://{new}")]
    con = sqlite3.connect(db)
    try:
        columns = {(t, c) for t, c in MLFLOW_LOCATION_COLUMNS if _has_column(con, t, c)}
        tags = [(t, k) for t, k in MLFLOW_PATH_TAGS if _has_column(con, t, "value")]
        total = 0
        with con:  # commits on success, rolls back on any error
            for before, after in prefixes:
                # exact prefix match (LIKE would treat _ and % in paths as wildcards); the next
                # character must end the path component so /data/home does not match /data/home2.
                # Table and column names are this module's constants, never data.
                for table, column in sorted(columns):
                    sql = (
                        f'UPDATE "{table}" SET "{column}" = :new || substr("{column}", length(:old) + 1) '
                        f'WHERE ("{column}" = :old OR substr("{column}", 1, length(:old) + 1) = :old || \'/\')'
                    )
                    total += con.execute(sql, {"old": before, "new": after}).rowcount
                for table, key in tags:
                    sql = (
                        f'UPDATE "{table}" SET value = :new || substr(value, length(:old) + 1) '
                        f"WHERE key = :key AND (value = :old OR substr(value, 1, length(:old) + 1) = :old || '/')"
                    )
                    total += con.execute(sql, {"old": before, "new": after, "key": key}).rowcount
        return total
    except sqlite3.Error as exc:
        raise SettingsError(f"cannot re-anchor the MLflow store {db} after the home moved from {old}: {exc}") from None
    finally:
        con.close()


def republish_views(settings: Settings) -> list[str]:
    """The warehouse's DuckDB views name Parquet paths; recreate them over the home's new place."""
    if not settings.duckdb_path.exists():
        return []
    from tagml.core.storage import publish_views

    return publish_views(settings.duckdb_path, settings.warehouse_dir)


def _has_column(con: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in con.execute("SELECT * FROM pragma_table_info(?)", [table]))
