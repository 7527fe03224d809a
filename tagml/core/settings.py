"""Where tagml keeps things, resolved from environment variables with embedded defaults.

Nothing here runs at import time: callers build a `Settings` when they start (CLI command,
Dagster definitions, a test) and pass it down. Every location a bank would change lives here, and
every value is checked when it is read, so a bad one fails before anything runs and names its
variable (`SettingsError`) instead of surfacing later as a ValueError deep inside Dagster or DuckDB.
"""

import difflib
import json
import os
import warnings
from collections.abc import Mapping
from datetime import UTC, date, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tagml.core.storage import MEMORY_LIMIT, atomic_replace

DEFAULT_HOME = ".tagml"
# the catalog shipped as package data (tags/catalog.yaml in the source tree)
DEFAULT_CATALOG = Path(str(files("tagml.tags").joinpath("catalog.yaml")))
HOME_MANIFEST = "home.json"
# Stored locations (registry tags) name their anchor instead of an absolute path, so that a moved
# or copied home resolves them to where it is now.
WAREHOUSE_ANCHOR = "$TAGML_WAREHOUSE_DIR/"
HOME_ANCHOR = "$TAGML_HOME/"


class SettingsError(ValueError):
    """A configuration value is invalid or the home it points to is unusable; names the variable."""


class HomeNotFoundError(SettingsError):
    """A read command pointed at a TAGML_HOME that does not exist (wrong directory or variable)."""


class HomeNotWritableError(SettingsError):
    """The home (or one of its directories) cannot be written."""


class UnknownSettingWarning(UserWarning):
    """A `TAGML_*` variable that no setting reads (most likely a typo)."""


# variable -> (field, what a valid value looks like); the one list of what can be configured
VARIABLES: dict[str, tuple[str, str]] = {
    "TAGML_HOME": ("home", "a directory path"),
    "TAGML_RAW_DIR": ("raw_dir", "a directory path"),
    "TAGML_WAREHOUSE_DIR": ("warehouse_dir", "a directory path"),
    "TAGML_DUCKDB_PATH": ("duckdb_path", "a file path"),
    "DAGSTER_HOME": ("dagster_home", "a directory path"),
    "MLFLOW_TRACKING_URI": ("mlflow_tracking_uri", "an MLflow tracking URI (sqlite:///... or http(s)://...)"),
    "TAGML_MLFLOW_ARTIFACTS": ("mlflow_artifact_dir", "a directory path"),
    "TAGML_MLFLOW_UI_URL": ("mlflow_ui_url", "an http(s) URL such as http://127.0.0.1:5000"),
    "TAGML_REPORTS_DIR": ("reports_dir", "a directory path"),
    "TAGML_CATALOG": ("catalog_path", "a file path"),
    "TAGML_DRIFT_DIR": ("drift_dir", "a directory path"),
    "TAGML_THREADS": ("threads", "a whole number >= 1"),
    "TAGML_DUCKDB_MEMORY_LIMIT": ("duckdb_memory_limit", "a size such as 4GB, 512MB or 1.5GiB"),
    "TAGML_PARTITIONS_START": ("partitions_start", "a date YYYY-MM-DD"),
    "TAGML_TIMEZONE": ("timezone", "an IANA time zone such as Asia/Shanghai"),
    "TAGML_SCORING_CRON": ("scoring_cron", "a 5-field cron expression such as '0 2 * * *'"),
    "TAGML_DRIFT_SAMPLE_ROWS": ("drift_sample_rows", "a whole number >= 1"),
    "TAGML_REEVALUATION_COOLDOWN_DAYS": ("reevaluation_cooldown_days", "a whole number >= 0"),
    "TAGML_DRIFT_REPORT": ("drift_report", "one of on_drift_or_weekly, on_drift, always, never"),
    "TAGML_DRIFT_REPORT_WEEKDAY": ("drift_report_weekday", "a weekday number 0 (Monday) .. 6 (Sunday)"),
    "TAGML_REFRESH_TIME": ("refresh_time", "a time of day HH:MM"),
    "TAGML_ENGINE": ("engine", "duckdb or spark"),
    "TAGML_SPARK_MASTER": ("spark_master", "a Spark master URL such as local[2], yarn, k8s://https://host:443 or spark://host:7077"),
    "TAGML_RUN_RETENTION_DAYS": ("run_retention_days", "a whole number >= 1"),
    "TAGML_GOVERNANCE_DB": ("governance_db", "a file path"),
    "TAGML_ONLINE_STORE": ("online_store", "a file path (SQLite) or a postgresql://user@host:port/db URL"),
    "TAGML_API_KEYS": ("api_keys_path", "a file path"),
    "TAGML_CONTACT_CAP_AUDIENCES": ("contact_cap_audiences", "a whole number >= 0 (0: no contact-frequency cap)"),
    "TAGML_CONTACT_CAP_DAYS": ("contact_cap_days", "a whole number >= 1"),
}
_WARNED: set[str] = set()
DEFAULT_TIMEZONE = "Asia/Shanghai"  # the bank's timezone: partitions, schedules, a delivery's default date
FIELD_VARIABLE = {field: var for var, (field, _) in VARIABLES.items()}

CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_NAMES = (
    {},
    {},
    {},
    {m: i + 1 for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"])},
    {d: i for i, d in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
)


def _cron_field_ok(text: str, low: int, high: int, names: dict[str, int]) -> bool:
    def number(token: str) -> int | None:
        if token.isdigit():
            return int(token)
        return names.get(token.lower())

    for item in text.split(","):
        body, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            return False
        if body == "*":
            continue
        start, _, end = body.partition("-")
        bounds = [number(start)] + ([number(end)] if end else [])
        if any(b is None or not low <= b <= high for b in bounds):
            return False
    return True


def valid_cron(expression: str) -> bool:
    """Five fields (minute hour day month weekday), as Dagster schedules accept them."""
    fields = expression.split()
    return len(fields) == 5 and all(_cron_field_ok(f, lo, hi, names) for f, (lo, hi), names in zip(fields, CRON_RANGES, CRON_NAMES))


def is_database_url(value: str) -> bool:
    """A Postgres URL (the online store at a bank) rather than a file path."""
    return value.strip().startswith(("postgresql://", "postgres://"))


def _resolve(value: Any) -> Path:
    return Path(value).expanduser().resolve()


class Settings(BaseSettings):
    """Resolved locations and runtime knobs. Build with `Settings.from_env()`."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    home: Path = Field(validation_alias="TAGML_HOME")
    raw_dir: Path = Field(validation_alias="TAGML_RAW_DIR")
    warehouse_dir: Path = Field(validation_alias="TAGML_WAREHOUSE_DIR")
    duckdb_path: Path = Field(validation_alias="TAGML_DUCKDB_PATH")
    dagster_home: Path = Field(validation_alias="DAGSTER_HOME")
    mlflow_tracking_uri: str = Field(validation_alias="MLFLOW_TRACKING_URI")
    mlflow_artifact_dir: Path = Field(validation_alias="TAGML_MLFLOW_ARTIFACTS")
    # where Dagster metadata links MLflow runs of the embedded store (`tagml mlflow-ui` serves it there)
    mlflow_ui_url: str = Field(default="http://127.0.0.1:5000", pattern=r"^https?://\S+$", validation_alias="TAGML_MLFLOW_UI_URL")
    reports_dir: Path = Field(validation_alias="TAGML_REPORTS_DIR")
    catalog_path: Path = Field(validation_alias="TAGML_CATALOG")
    drift_dir: Path = Field(validation_alias="TAGML_DRIFT_DIR")
    threads: int = Field(default=2, ge=1, validation_alias="TAGML_THREADS")
    duckdb_memory_limit: str = Field(default="4GB", validation_alias="TAGML_DUCKDB_MEMORY_LIMIT")
    partitions_start: str = Field(default="2024-01-01", validation_alias="TAGML_PARTITIONS_START")
    timezone: str = Field(default=DEFAULT_TIMEZONE, validation_alias="TAGML_TIMEZONE")
    scoring_cron: str = Field(default="0 2 * * *", validation_alias="TAGML_SCORING_CRON")
    drift_sample_rows: int = Field(default=5000, ge=1, validation_alias="TAGML_DRIFT_SAMPLE_ROWS")
    reevaluation_cooldown_days: int = Field(default=7, ge=0, validation_alias="TAGML_REEVALUATION_COOLDOWN_DAYS")
    # when tag_drift renders the Evidently report (monitoring/report_policy.py); PSI and decisions run every night
    drift_report: Literal["on_drift_or_weekly", "on_drift", "always", "never"] = Field(default="on_drift_or_weekly", validation_alias="TAGML_DRIFT_REPORT")
    drift_report_weekday: int = Field(default=6, ge=0, le=6, validation_alias="TAGML_DRIFT_REPORT_WEEKDAY")
    refresh_time: str = Field(default="04:30", validation_alias="TAGML_REFRESH_TIME")
    # where features, staging, scoring and drift's bin counts run; chosen here only (settings -> resources)
    engine: Literal["duckdb", "spark"] = Field(default="duckdb", validation_alias="TAGML_ENGINE")
    spark_master: str = Field(default="local[2]", pattern=r"^\S+$", validation_alias="TAGML_SPARK_MASTER")
    # Dagster runs (and their event log) older than this are deleted by purge_old_runs_schedule
    run_retention_days: int = Field(default=90, ge=1, validation_alias="TAGML_RUN_RETENTION_DAYS")
    # tag lifecycle, export decisions and erasure receipts: kept apart from the catalog file's edit history
    governance_db: Path = Field(validation_alias="TAGML_GOVERNANCE_DB")
    # the online tag store the API reads: a SQLite file swapped atomically (default) or a Postgres database
    online_store: str = Field(validation_alias="TAGML_ONLINE_STORE")
    # the API's keys: names, scopes and the keys' sha256 (never a key itself)
    api_keys_path: Path = Field(validation_alias="TAGML_API_KEYS")
    # contact-frequency cap of audience exports: a customer already in this many audiences of the same
    # purpose in the last contact_cap_days days is left out of the next one (0: no cap)
    contact_cap_audiences: int = Field(default=3, ge=0, validation_alias="TAGML_CONTACT_CAP_AUDIENCES")
    contact_cap_days: int = Field(default=30, ge=1, validation_alias="TAGML_CONTACT_CAP_DAYS")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings):
        # from_env passes the environment explicitly (tests pass a dict); reading os.environ here too
        # would let the process's variables leak into a test's settings
        return (init_settings,)

    @model_validator(mode="before")
    @classmethod
    def _defaults_under_home(cls, values: Any) -> Any:
        """Every location not set explicitly defaults under TAGML_HOME (or the warehouse)."""
        if not isinstance(values, Mapping):
            return values
        raw = {k: v for k, v in values.items() if v not in (None, "")}

        def get(var: str) -> Any:
            field = VARIABLES[var][0]
            return raw.get(var, raw.get(field))

        home = _resolve(get("TAGML_HOME") or DEFAULT_HOME)
        warehouse = _resolve(get("TAGML_WAREHOUSE_DIR") or home / "warehouse")
        defaults = {
            "home": home,
            "raw_dir": home / "raw",
            "warehouse_dir": warehouse,
            "duckdb_path": warehouse / "tagml.duckdb",
            "dagster_home": home / "dagster",
            "mlflow_tracking_uri": f"sqlite:///{home / 'mlflow' / 'mlflow.db'}",
            "mlflow_artifact_dir": home / "mlflow" / "artifacts",
            "reports_dir": home / "reports",
            "catalog_path": DEFAULT_CATALOG,
            "drift_dir": warehouse / "drift",
            "governance_db": home / "governance" / "governance.db",
            "online_store": str(home / "online" / "tags.sqlite"),
            "api_keys_path": home / "api" / "keys.json",
        }
        out: dict[str, Any] = {}
        for var, (field, _) in VARIABLES.items():
            value = get(var)
            if value is None:
                if field in defaults:
                    out[field] = defaults[field]
                continue
            if field == "online_store" and isinstance(value, str) and not is_database_url(value):
                value = str(_resolve(value))
            elif field in defaults and field not in ("mlflow_tracking_uri", "online_store"):
                value = _resolve(value)
            out[field] = value.strip() if isinstance(value, str) else value
        out["home"], out["warehouse_dir"] = home, warehouse
        return out

    @field_validator("duckdb_memory_limit")
    @classmethod
    def _size(cls, value: str) -> str:
        if not MEMORY_LIMIT.match(value):
            raise ValueError("not a size")
        return value.replace(" ", "")

    @field_validator("partitions_start")
    @classmethod
    def _date(cls, value: str) -> str:
        date.fromisoformat(value)
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError("unknown time zone") from exc
        return value

    @field_validator("scoring_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        if not valid_cron(value):
            raise ValueError("not a cron expression")
        return value

    @field_validator("refresh_time")
    @classmethod
    def _time(cls, value: str) -> str:
        datetime.strptime(value, "%H:%M")
        return value

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        """Read `TAGML_*`, `DAGSTER_HOME` and `MLFLOW_TRACKING_URI`; default everything under TAGML_HOME.

        Raises `SettingsError` naming the variable and the expected value; warns (UnknownSettingWarning)
        about `TAGML_*` variables that no setting reads.
        """
        env = os.environ if env is None else env
        unknown = sorted(k for k in env if k.startswith("TAGML_") and k not in VARIABLES)
        for name in unknown:
            if name in _WARNED:
                continue
            _WARNED.add(name)
            close = difflib.get_close_matches(name, list(VARIABLES), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            warnings.warn(f"unknown setting {name} is ignored{hint}", UnknownSettingWarning, stacklevel=2)
        try:
            return cls.model_validate({k: env[k] for k in VARIABLES if k in env})
        except ValidationError as exc:
            raise SettingsError(_describe(exc, env)) from None

    # --- the home and what it contains ---------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.home / HOME_MANIFEST

    @property
    def audiences_dir(self) -> Path:
        """Where audience exports made through the API (and by default from the CLI) are written, with their manifests."""
        return self.home / "audiences"

    @property
    def online_store_path(self) -> Path | None:
        """The SQLite file of the online tag store when it is the embedded one (else None: a Postgres URL)."""
        return None if is_database_url(self.online_store) else Path(self.online_store)

    @property
    def embedded_tracking_db(self) -> Path | None:
        """The SQLite file of the MLflow store when it is the embedded one (else None)."""
        if self.mlflow_tracking_uri.startswith("sqlite:///"):
            return Path(self.mlflow_tracking_uri.removeprefix("sqlite:///"))
        return None

    def require_home(self) -> None:
        """For read commands: the home must exist (never silently start a new, empty one)."""
        if not self.home.is_dir():
            source = f"TAGML_HOME={os.environ['TAGML_HOME']}" if "TAGML_HOME" in os.environ else f"TAGML_HOME not set: {DEFAULT_HOME} in the working directory"
            raise HomeNotFoundError(
                f"no tagml home at {self.home} ({source}): set TAGML_HOME to an existing home or create one with `tagml demo` / `tagml generate`"
            )
        db = self.embedded_tracking_db
        if db is not None and not db.exists():
            raise HomeNotFoundError(f"the home {self.home} has no MLflow store at {db} (MLFLOW_TRACKING_URI): nothing has been trained there yet")

    def check_writable(self) -> None:
        """Every existing directory the pipeline writes to must be writable; names the first that is not."""
        candidates = [self.home, self.raw_dir, self.warehouse_dir, self.dagster_home, self.reports_dir, self.mlflow_artifact_dir]
        db = self.embedded_tracking_db
        if db is not None:
            candidates += [db.parent, db]
        for path in candidates:
            existing = path
            while not existing.exists() and existing != existing.parent:
                existing = existing.parent
            if not _writable(existing):
                var = FIELD_VARIABLE.get(next((f for f, v in self._locations() if v == path), ""), "TAGML_HOME")
                raise HomeNotWritableError(f"{existing} is not writable ({var}); tagml cannot store anything there")

    def _locations(self) -> list[tuple[str, Path]]:
        return [(f, getattr(self, f)) for f in ("home", "raw_dir", "warehouse_dir", "dagster_home", "reports_dir", "mlflow_artifact_dir")]

    def ensure_dirs(self) -> None:
        """Create the data directories, the home manifest and a Dagster instance config (telemetry off)."""
        self.check_writable()
        for directory in (self.raw_dir, self.warehouse_dir, self.dagster_home, self.reports_dir, self.governance_db.parent):
            directory.mkdir(parents=True, exist_ok=True)
        db = self.embedded_tracking_db
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        dagster_yaml = self.dagster_home / "dagster.yaml"
        if not dagster_yaml.exists():
            dagster_yaml.write_text("telemetry:\n  enabled: false\n")
        if not self.manifest_path.exists():
            write_manifest(self)

    # --- stored locations that survive a moved home ----------------------------------------------

    def stored_path(self, path: Path | str) -> str:
        """`path` as it should be stored (registry tags): anchored on the warehouse or home when inside them."""
        path = Path(path).resolve()
        for anchor, root in ((WAREHOUSE_ANCHOR, self.warehouse_dir), (HOME_ANCHOR, self.home)):
            if path.is_relative_to(root):
                return anchor + path.relative_to(root).as_posix()
        return str(path)

    def resolve_stored(self, stored: str) -> Path:
        """The inverse of `stored_path`; absolute values (older versions) are returned unchanged."""
        for anchor, root in ((WAREHOUSE_ANCHOR, self.warehouse_dir), (HOME_ANCHOR, self.home)):
            if stored.startswith(anchor):
                return root / stored.removeprefix(anchor)
        return Path(stored)


def home_relative(path: Path | str) -> str:
    """Store a location under this process's home/warehouse (from the environment) as anchored text.

    Writers of registry tags call this (e.g. `data_snapshot`); readers call `resolve_home_path`. A
    path outside the configured home stays absolute, so both ends agree when settings differ.
    """
    return Settings.from_env().stored_path(path)


def resolve_home_path(stored: str) -> Path:
    """Where a location stored by `home_relative` is now, through the current settings."""
    return Settings.from_env().resolve_stored(stored)


def write_manifest(settings: Settings) -> None:
    """home.json records where the home was created, so a moved or copied home can be recognised."""
    payload = {"path": str(settings.home), "written_at": datetime.now(UTC).isoformat(timespec="seconds")}
    with atomic_replace(settings.manifest_path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def read_manifest(settings: Settings) -> dict[str, Any] | None:
    try:
        return json.loads(settings.manifest_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SettingsError(f"the home manifest {settings.manifest_path} is unreadable ({type(exc).__name__}); restore or delete it") from None


def _writable(path: Path) -> bool:
    # os.access says yes to root on a read-only *mount*; a probe write answers for every case
    if not os.access(path, os.W_OK):
        return False
    if path.is_dir():
        probe = path / f".tagml-write-probe-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError:
            return False
    return True


def _describe(exc: ValidationError, env: Mapping[str, str]) -> str:
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        var = FIELD_VARIABLE.get(field, field)
        expected = VARIABLES.get(var, ("", "a valid value"))[1]
        value = env.get(var, "")
        problems.append(f"{var}={value!r} is invalid: expected {expected}")
    return "; ".join(problems)
