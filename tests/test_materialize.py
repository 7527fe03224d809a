"""Real Dagster materializations of raw -> customer_features on a small bank in a temp TAGML_HOME."""

import shutil
from datetime import date
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from tagml.core.settings import Settings
from tagml.features.contract import RAW_TABLES
from tagml.features.dictionary import FEATURE_NAMES
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import CUSTOMER_FEATURES_JOB, RAW_INGEST_JOB

AS_OF = "2026-10-31"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path_factory.mktemp("tagml_home"))})
    settings.ensure_dirs()
    generate_bank(BankConfig(customers=1_500, months=12, seed=3), settings.raw_dir)
    return settings


def _run(settings, job, **kwargs):
    return build_definitions(settings).resolve_job_def(job).execute_in_process(instance=dg.DagsterInstance.ephemeral(), raise_on_error=False, **kwargs)


def test_raw_then_features_materialize_with_passing_checks(home):
    raw = _run(home, RAW_INGEST_JOB)
    assert raw.success
    staged = {e.asset_key.to_user_string() for e in raw.get_asset_materialization_events()}
    assert staged == {f"raw_{spec.name}" for spec in RAW_TABLES}
    customers = pq.read_table(home.warehouse_dir / "raw" / "customers.parquet")
    assert not {"full_name", "phone", "national_id", "address"} & set(customers.column_names)

    result = _run(home, CUSTOMER_FEATURES_JOB, partition_key=AS_OF)
    assert result.success
    by_asset = {e.asset_key.to_user_string(): e for e in result.get_asset_materialization_events()}
    assert set(by_asset) == {"monthly_aggregates", "customer_features"}  # the job keeps the aggregates up to date first
    metadata = by_asset["customer_features"].materialization.metadata
    assert metadata["method"].value == "incremental"
    assert metadata["rows"].value == customers.num_rows  # every demo customer is onboarded by the end
    evaluations = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert evaluations == {
        "row_count": True,
        "unique_customers": True,
        "schema": True,
        "null_rates": True,
        "unseen_categories": True,
        "constant_features": True,
        "freshness": True,
    }
    # aggregates only: not one customer id anywhere in the materialization's metadata
    shown = " ".join(str(v.value) for v in metadata.values())
    assert "preview" not in metadata and not [c for c in customers.column("customer_id").to_pylist() if c in shown]
    assert "aum_total" in metadata["feature_summary"].value and "median" in metadata["feature_summary"].value
    table = pq.read_table(home.warehouse_dir / "customer_features" / f"as_of={AS_OF}" / "data.parquet")
    assert table.column_names == ["customer_id", "as_of", *FEATURE_NAMES]
    assert set(table.column("as_of").to_pylist()) == {date(2026, 10, 31)}
    import duckdb

    with duckdb.connect(str(home.duckdb_path), read_only=True) as warehouse:  # SQL over the Parquet via views
        assert warehouse.execute("SELECT count(*) FROM customer_features").fetchall()[0][0] == customers.num_rows
        assert warehouse.execute("SELECT count(*) FROM raw_customers").fetchall()[0][0] == customers.num_rows


def test_rerunning_a_partition_replaces_it(home):
    assert _run(home, CUSTOMER_FEATURES_JOB, partition_key=AS_OF).success
    target_dir = home.warehouse_dir / "customer_features" / f"as_of={AS_OF}"
    assert [p.name for p in target_dir.iterdir()] == ["data.parquet"]


def test_contract_violation_fails_the_asset_and_keeps_the_staged_table(home, tmp_path):
    assert _run(home, RAW_INGEST_JOB).success
    staged_dir = home.warehouse_dir / "raw"
    # snapshot tables staged whole (<table>.parquet), event tables by period (<table>/<YYYY-MM-DD>.parquet)
    before = {str(p.relative_to(staged_dir)): p.read_bytes() for p in staged_dir.rglob("*.parquet")}
    assert {name.split("/")[0].removesuffix(".parquet") for name in before} == {spec.name for spec in RAW_TABLES}
    bad = tmp_path / "raw"
    shutil.copytree(home.raw_dir, bad)
    table = pq.read_table(bad / "customers" / "part-00000.parquet")
    regions = table.column("region").to_pylist()
    regions[0] = "atlantis"
    table = table.set_column(table.schema.get_field_index("region"), "region", [regions])
    pq.write_table(table, bad / "customers" / "part-00000.parquet")
    broken = Settings.from_env({"TAGML_HOME": str(home.home), "TAGML_RAW_DIR": str(bad)})

    result = _run(broken, RAW_INGEST_JOB)
    assert not result.success
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert [(e.asset_key.to_user_string(), e.check_name) for e in failed] == [("raw_customers", "contract")]
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "customers.region" in failure.event_specific_data.error.message
    assert "allowed_values" in failure.event_specific_data.error.message
    # the delivery is one unit: no table was replaced, not only customers
    assert {str(p.relative_to(staged_dir)): p.read_bytes() for p in staged_dir.rglob("*.parquet")} == before


def test_training_job_trains_registers_and_gates_one_tag(home):
    from mlflow.tracking import MlflowClient

    from tagml.orchestration.jobs import train_tag_job_name

    assert _run(home, RAW_INGEST_JOB).success
    config = {"trials": 1, "seed": 0}
    run_config = {"ops": {"risk_appetite__training_set": {"config": config}, "risk_appetite__tag_model": {"config": config}}}
    result = _run(home, train_tag_job_name("risk_appetite"), run_config=run_config)
    materialized = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert set(materialized) == {"risk_appetite/training_set", "risk_appetite/tag_model"}
    [gate] = result.get_asset_check_evaluations()
    assert gate.check_name == "promotion_gate"
    assert gate.metadata["decision"].value in {"promoted", "rejected"}
    version = materialized["risk_appetite/tag_model"]["model_version"].value
    client = MlflowClient(home.mlflow_tracking_uri)
    registered = client.get_model_version("tagml-risk_appetite", version)
    assert registered.tags["gate.decision"] == gate.metadata["decision"].value
    assert registered.tags["data_snapshot"] == str(materialized["risk_appetite/training_set"]["snapshot_path"].value)
    # the version's model card, re-logged after the gate, is linked from the materialization
    model = materialized["risk_appetite/tag_model"]
    assert model["model_card_revision"].value == 2 and model["model_card_gate"].value == gate.metadata["decision"].value
    assert Path(model["model_card"].value).is_file()
    # the run fails only when a blocking gate fails with no champion to fall back on
    assert result.success == (gate.passed or gate.severity.value == "WARN")


@pytest.fixture(scope="module")
def small_home(tmp_path_factory):
    import yaml

    from tagml.training.catalog import load_catalog

    root = tmp_path_factory.mktemp("small_home")
    shipped = load_catalog()
    risk = shipped.get("risk_appetite").model_dump(mode="json")
    # a pipeline test: one trial on 1,500 customers loses to the logistic baseline on test (tests/test_gate.py holds that bar)
    risk["model"].update(trials=1, baseline=None)
    risk["promotion"].update(max_calibration_error=0.5, slice_floor=0.0)
    catalog = root / "catalog.yaml"
    catalog.write_text(yaml.safe_dump({"tags": [risk, shipped.get("value_tier").model_dump(mode="json")]}))
    settings = Settings.from_env({"TAGML_HOME": str(root / "home"), "TAGML_CATALOG": str(catalog)})
    settings.ensure_dirs()
    generate_bank(BankConfig(customers=1_500, months=12, seed=3), settings.raw_dir)
    return settings


@pytest.mark.slow
def test_nightly_scoring_job_needs_a_champion_then_tags_everyone(small_home):
    from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, train_tag_job_name

    failed = _run(small_home, NIGHTLY_SCORING_JOB, partition_key=AS_OF)
    assert not failed.success
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert "no 'champion' alias on registered model 'tagml-risk_appetite'" in failure.event_specific_data.error.message
    assert not (small_home.warehouse_dir / "customer_tags" / f"as_of={AS_OF}" / "data.parquet").exists()

    assert _run(small_home, train_tag_job_name("risk_appetite")).success
    scored = _run(small_home, NIGHTLY_SCORING_JOB, partition_key=AS_OF)
    assert scored.success
    tags_event = next(e for e in scored.get_asset_materialization_events() if e.asset_key.to_user_string() == "customer_tags")
    metadata = tags_event.materialization.metadata
    customers = metadata["customers"].value
    assert metadata["rows"].value == 2 * customers
    assert "risk_appetite" in metadata["distribution"].value and "value_tier" in metadata["distribution"].value
    coverage = [e for e in scored.get_asset_check_evaluations() if e.check_name == "coverage"]
    assert [c.passed for c in coverage] == [True]
