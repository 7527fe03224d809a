"""TAGML_ENGINE is read once, in Settings, and reaches the one place that picks an implementation (the
warehouse resource); the DuckDB default never loads pyspark."""

import json
import os
import subprocess
import sys
import textwrap
from datetime import date

import pyarrow.parquet as pq
import pytest

from tagml.core.settings import Settings, SettingsError
from tagml.features.contract import RAW_TABLES
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import CUSTOMER_FEATURES_JOB, RAW_INGEST_JOB

AS_OF = date(2026, 10, 31)


def test_the_engine_setting_reaches_the_warehouse_resource(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home"), "TAGML_ENGINE": "spark", "TAGML_SPARK_MASTER": "spark://spark-master.bank:7077"})
    warehouse = build_definitions(settings).resources["warehouse"]
    assert (warehouse.engine, warehouse.spark_master) == ("spark", "spark://spark-master.bank:7077")
    default = build_definitions(Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})).resources["warehouse"]
    assert (default.engine, default.spark_master) == ("duckdb", "local[2]")


@pytest.mark.parametrize("variable, value", [("TAGML_ENGINE", "flink"), ("TAGML_SPARK_MASTER", "local [2]")])
def test_an_unknown_engine_or_master_is_a_settings_error_naming_the_variable(variable, value, tmp_path):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({"TAGML_HOME": str(tmp_path / "home"), variable: value})


def test_the_duckdb_default_stages_and_builds_features_without_pyspark(bank, tmp_path):
    """In a fresh interpreter where pyspark cannot be imported (an install without the spark extra): the
    code location loads, a delivery is staged and a feature partition materialized by real Dagster runs,
    and none of tagml's Spark modules was loaded. (mlflow itself tries `import pyspark` when it is
    installed, so the check is that the default does not need it, not that nothing ever looks.)"""
    script = textwrap.dedent(
        f"""
        import importlib.abc, json, sys

        class NoSpark(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("pyspark", "py4j"):
                    raise ModuleNotFoundError(f"{{name}} is not installed here")
                return None

        sys.meta_path.insert(0, NoSpark())
        import dagster as dg
        from tagml.core.settings import Settings
        from tagml.orchestration.definitions import build_definitions
        settings = Settings.from_env({{"TAGML_HOME": {str(tmp_path / "home")!r}, "TAGML_RAW_DIR": {str(bank["raw"])!r}, "TAGML_THREADS": "1"}})
        settings.ensure_dirs()
        defs = build_definitions(settings)
        instance = dg.DagsterInstance.ephemeral()
        ingest = defs.resolve_job_def({RAW_INGEST_JOB!r}).execute_in_process(instance=instance)
        features = defs.resolve_job_def({CUSTOMER_FEATURES_JOB!r}).execute_in_process(instance=instance, partition_key={AS_OF.isoformat()!r})
        loaded = sorted(m for m in sys.modules if m.startswith(("pyspark", "py4j")) or (m.startswith("tagml.") and "spark" in m))
        print(json.dumps({{"ok": ingest.success and features.success, "engine": defs.resources["warehouse"].engine, "spark_modules": loaded}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGML_")}
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome == {"ok": True, "engine": "duckdb", "spark_modules": []}
    assert (tmp_path / "home" / "warehouse" / "customer_features" / f"as_of={AS_OF}" / "data.parquet").is_file()


@pytest.mark.spark
@pytest.mark.slow
def test_the_spark_engine_stages_through_the_same_asset(spark, bank, tmp_path):
    """raw_delivery on TAGML_ENGINE=spark: the same asset, checks and metadata, the files written by Spark's path."""
    import dagster as dg

    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home"), "TAGML_RAW_DIR": str(bank["raw"]), "TAGML_ENGINE": "spark", "TAGML_THREADS": "1"})
    settings.ensure_dirs()
    defs = build_definitions(settings)
    result = defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=dg.DagsterInstance.ephemeral())
    assert result.success
    materialized = {m.asset_key.to_user_string(): m.metadata for m in result.asset_materializations_for_node("raw_delivery")}
    assert set(materialized) == {f"raw_{s.name}" for s in RAW_TABLES}
    assert materialized["raw_customers"]["rows"].value == bank["config"].customers
    assert all(check.passed for check in result.get_asset_check_evaluations())
    staged = settings.warehouse_dir / "raw" / "customers.parquet"
    # committed from Spark's parts by pyarrow; DuckDB's own COPY signs its files "DuckDB"
    assert "DuckDB" not in pq.ParquetFile(staged).metadata.created_by
