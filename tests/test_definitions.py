"""The code location loads as Dagster would load it, with settings taken from the environment."""

import dagster as dg

from orchestration.definitions import build_definitions, defs
from orchestration.jobs import CUSTOMER_FEATURES_JOB, RAW_INGEST_JOB
from tagml.settings import Settings


def test_definitions_load_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TAGML_HOME", str(tmp_path / "home"))
    loaded = defs()
    loaded.validate_loadable(loaded)
    keys = {k.to_user_string() for k in loaded.resolve_asset_graph().get_all_asset_keys()}
    assert {"raw_customers", "raw_transactions", "raw_tag_labels", "customer_features"} <= keys
    assert loaded.resolve_job_def(RAW_INGEST_JOB) is not None
    job = loaded.resolve_job_def(CUSTOMER_FEATURES_JOB)
    assert isinstance(job.partitions_def, dg.DailyPartitionsDefinition)
    warehouse = loaded.resources["warehouse"]
    assert warehouse.warehouse_dir == str(tmp_path / "home" / "warehouse")


def test_every_asset_has_a_description_and_checks():
    loaded = build_definitions(Settings.from_env({"TAGML_HOME": "/nonexistent/tagml"}))
    graph = loaded.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description, key
    check_names = {k.name for k in graph.asset_check_keys}
    assert {"contract", "row_count", "schema", "null_rates", "freshness"} <= check_names


def test_settings_resolve_from_env_without_side_effects(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "h"), "TAGML_THREADS": "1"})
    assert settings.raw_dir == tmp_path / "h" / "raw"
    assert settings.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'h' / 'mlflow' / 'mlflow.db'}"
    assert settings.threads == 1
    assert not (tmp_path / "h").exists()  # building settings creates nothing
    settings.ensure_dirs()
    assert (settings.dagster_home / "dagster.yaml").read_text().count("enabled: false") == 1
