"""Shared fixtures for the domain tests: one small synthetic bank per session, staged once.

Everything is written under pytest's temporary directories; nothing touches the working tree.
Per-test corruption copies or rewrites single tables into the test's own `tmp_path`.
"""

import os
import shutil
from datetime import date
from pathlib import Path

import duckdb
import pytest

# As the Makefile and the CLI do, before mlflow or xgboost load: telemetry off (mlflow starts its
# client at import) and idle OpenMP threads that do not spin on a busy 2-core machine.
from tagml.core.runtime import configure_process

configure_process()

from tagml.core.storage import connect, sql_literal
from tagml.features.contract import RAW_TABLES
from tagml.features.customer_features import build_customer_features
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.features.validation import validate_and_stage

# Small enough for the whole domain suite to run in well under a minute on two cores, large enough
# for the marginal and causal checks to be far from their tolerances.
BANK = BankConfig(customers=3000, months=12, seed=7)
WINDOW_START = date(2025, 11, 1)  # first day of the 12 generated months ending 2026-10
WINDOW_END = date(2026, 10, 31)
MID_MONTH_END = date(2026, 6, 30)
MID_MONTH_DAY = date(2026, 6, 15)


def make_connection(tmp: Path) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose spill directory is under `tmp` (never the working directory)."""
    con = connect(threads=2, memory_limit="1GB")
    spill = tmp / "duckdb_spill"
    spill.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET temp_directory = {sql_literal(spill)}")
    return con


def raw_glob(raw_dir: Path, table: str) -> str:
    return str(raw_dir / table / "*.parquet")


def stage_all(con: duckdb.DuckDBPyConnection, raw_dir: Path, staged_dir: Path) -> dict:
    """Validate and stage every contract table (customers first, as the loader requires)."""
    return {spec.name: validate_and_stage(con, spec, raw_dir, staged_dir) for spec in RAW_TABLES}


@pytest.fixture
def con(tmp_path):
    connection = make_connection(tmp_path)
    yield connection
    connection.close()


def missing_component(what: str, why: object) -> None:
    """A tier's real component (Spark, PostgreSQL, a server) is not there: skip on a laptop, fail under CI=true."""
    message = f"{what} is not available: {why}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def spark():
    """One real Spark session (local[2]) for the whole test session: starting one costs ~15 s."""
    from tagml.core.spark import SparkUnavailableError, spark_session

    try:
        session = spark_session("local[2]", "tagml-tests", {"spark.driver.memory": "2g", "spark.sql.shuffle.partitions": "4"})
    except SparkUnavailableError as exc:
        missing_component("Spark", exc)
    yield session
    session.stop()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bank")


@pytest.fixture(scope="session")
def bank(session_dir) -> dict:
    """The session's synthetic bank: raw tables, the generator's summary and the staged tables."""
    raw = session_dir / "raw"
    summary = generate_bank(BANK, raw)
    staged = session_dir / "staged"
    connection = make_connection(session_dir)
    try:
        results = stage_all(connection, raw, staged)
    finally:
        connection.close()
    return {"raw": raw, "staged": staged, "summary": summary, "staged_tables": results, "config": BANK}


@pytest.fixture(scope="session")
def bank_features(bank, session_dir) -> dict:
    """Feature snapshots of the session bank at a month end and at a mid-month day."""
    connection = make_connection(session_dir)
    out = {}
    try:
        for as_of in (MID_MONTH_END, MID_MONTH_DAY):
            target = session_dir / "features" / f"{as_of.isoformat()}.parquet"
            build_customer_features(connection, bank["staged"], as_of, target)
            out[as_of] = target
    finally:
        connection.close()
    return out


@pytest.fixture
def staged_copy(bank, tmp_path) -> Path:
    """A private copy of the session's staged tables, for tests that (try to) overwrite them."""
    target = tmp_path / "staged"
    shutil.copytree(bank["staged"], target)
    return target


def shipped_slices(data) -> dict[str, str]:
    """The evaluation slices training gets in production, from the shipped catalog (drift's definition)."""
    from tagml.scoring.rules import slice_expressions
    from tagml.training.catalog import load_catalog

    return slice_expressions(load_catalog(), set(data.feature_names))


def write_test_catalog(path: Path, names: tuple[str, ...], trials: int = 1, model: dict | None = None, **promotion) -> Path:
    """A catalog of shipped tags for a test, written to `path`.

    Model tags get `trials` quick Optuna trials (60 s at most) and a lenient gate (calibration error up
    to 0.5, no slice floor), because these tests are about the pipeline, not model quality; `model` and
    `promotion` override single fields (e.g. margin=0.01).
    """
    import yaml

    from tagml.training.catalog import load_catalog

    shipped = load_catalog()
    entries = []
    for name in names:
        entry = shipped.get(name).model_dump(mode="json")
        if entry["kind"] == "model":
            entry["model"].update({"trials": trials, "timeout_seconds": 60, **(model or {})})
            entry["promotion"].update({"max_calibration_error": 0.5, "slice_floor": 0.0, **promotion})
        entries.append(entry)
    path.write_text(yaml.safe_dump({"version": 1, "tags": entries}))
    return path


def publish_tags(settings, names: tuple[str, ...] | None = None) -> None:
    """Approve and publish catalog tags through the real lifecycle (two people: four-eyes), so that lookups and exports
    show them; tags already published are left as they are."""
    from tagml.compliance import lifecycle
    from tagml.core.governance import GovernanceStore
    from tagml.training.catalog import load_catalog

    catalog, governance = load_catalog(settings.catalog_path), GovernanceStore(settings.governance_db)
    status = lifecycle.statuses(governance, catalog)
    for spec in catalog.tags:
        if (names is None or spec.name in names) and status[spec.name].status != lifecycle.PUBLISHED:
            lifecycle.approve(governance, spec, by="model-validation", reason="validated for the test")
            lifecycle.publish(governance, spec, by="tag-owner")
