"""The whole loop at a bank's set-up, once: TAGML_ENGINE=spark (a real local[2] session), Dagster on a
Postgres-backed instance (deploy/dagster.yaml on a real PostgreSQL) and MLflow through a real `mlflow server`
whose backend store is Postgres. Ingest -> features -> train -> gate -> score -> drift -> sensor -> re-evaluate
on a small bank with a market shock in 2026-10: models trained on 2026-08-31, the nightly run for 2026-10-31."""

import shutil
from datetime import date
from pathlib import Path

import dagster as dg
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tagml.core.settings import Settings
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.monitoring.drift import DriftLocations, compute_drift
from tagml.monitoring.history import DriftHistory
from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, RAW_INGEST_JOB, TRAIN_ALL_JOB, reevaluation_run_config
from tagml.orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR, in_process_run_tags, sensor_context
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import load_catalog
from tests.conftest import make_connection, write_test_catalog
from tests.postgres import mlflow_postgres, postgres  # noqa: F401 (the fixtures)

pytestmark = [pytest.mark.spark, pytest.mark.postgres, pytest.mark.server, pytest.mark.slow]

TRAINED, AFTER = date(2026, 8, 31), date(2026, 10, 31)
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def _written_by_spark(path: Path) -> bool:
    # a Spark step's parts are committed by pyarrow; DuckDB's own COPY signs its files "DuckDB"
    return "DuckDB" not in pq.ParquetFile(path).metadata.created_by


@pytest.fixture(scope="module")
def loop(spark, postgres, mlflow_postgres, tmp_path_factory):  # noqa: F811
    from tagml.orchestration.definitions import build_definitions

    root = tmp_path_factory.mktemp("spark_loop")
    write_test_catalog(root / "catalog.yaml", ("risk_appetite", "value_tier"))
    settings = Settings.from_env(
        {
            "TAGML_HOME": str(root / "home"),
            "TAGML_CATALOG": str(root / "catalog.yaml"),
            "TAGML_ENGINE": "spark",
            "MLFLOW_TRACKING_URI": mlflow_postgres.url,
            "TAGML_DRIFT_SAMPLE_ROWS": "1000",
            "TAGML_THREADS": "1",
        }
    )
    settings.ensure_dirs()
    shutil.copy(DEPLOY / "dagster.yaml", settings.dagster_home / "dagster.yaml")
    generate_bank(BankConfig(customers=3000, months=12, seed=11, drift="market_shock", drift_month="2026-10"), settings.raw_dir)
    database = postgres.create_database("dagster_" + root.name.lower())
    with pytest.MonkeyPatch.context() as patch:
        for name, value in postgres.dagster_env(database).items():
            patch.setenv(name, value)
        defs = build_definitions(settings)
        catalog = load_catalog(settings.catalog_path)
        with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
            ingest = defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance)
            train_config = {"ops": {k: v for t in catalog.model_tags for k, v in reevaluation_run_config(t.name, TRAINED.isoformat())["ops"].items()}}
            trained = defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(instance=instance, run_config=train_config)
            nightly = defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(instance=instance, partition_key=AFTER.isoformat())
            tags_before = pd.read_parquet(settings.warehouse_dir / "customer_tags" / f"as_of={AFTER}" / "data.parquet")
            sensor = defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)
            tick = sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance, None))
            [request] = tick.run_requests
            reevaluated = defs.resolve_job_def(request.job_name).execute_in_process(
                instance=instance, partition_key=request.partition_key, run_config=request.run_config, tags=in_process_run_tags(request)
            )
            # tag_drift once more on its own: the Spark jobs it starts are the PSI's bin counts (DuckDB would start none)
            jobs_before = len(spark.sparkContext.statusTracker().getJobIdsForGroup(None))
            drift_again = defs.resolve_implicit_global_asset_job_def().execute_in_process(
                instance=instance,
                partition_key=AFTER.isoformat(),
                asset_selection=[dg.AssetKey("tag_drift")],
                run_config={"ops": {"tag_drift": {"config": {"report": False}}}},
            )
            drift_spark_jobs = len(spark.sparkContext.statusTracker().getJobIdsForGroup(None)) - jobs_before
            storage = (type(instance.run_storage).__name__, type(instance.event_log_storage).__name__)
            run_ids = {r.dagster_run.run_id for r in instance.get_run_records()}
        yield {
            "settings": settings,
            "runs": {"ingest": ingest, "trained": trained, "nightly": nightly, "reevaluated": reevaluated, "drift_again": drift_again},
            "drift_spark_jobs": drift_spark_jobs,
            "tags_before": tags_before,
            "request": request,
            "storage": storage,
            "run_ids": run_ids,
            "client": MlflowClient(mlflow_postgres.url),
        }


def test_every_step_ran_on_spark_with_dagster_and_mlflow_on_postgres(loop):
    runs = loop["runs"]
    assert all(run.success for run in runs.values()), {name: run.success for name, run in runs.items()}
    assert loop["storage"] == ("PostgresRunStorage", "PostgresEventLogStorage")
    assert {run.run_id for run in runs.values()} <= loop["run_ids"]
    warehouse = loop["settings"].warehouse_dir
    assert _written_by_spark(warehouse / "raw" / "transactions.parquet")
    assert _written_by_spark(warehouse / "customer_features" / f"as_of={AFTER}" / "data.parquet")
    assert _written_by_spark(warehouse / "customer_tags" / f"as_of={AFTER}" / "data.parquet")
    assert not list(loop["settings"].dagster_home.rglob("*.db"))  # no SQLite storage beside Postgres


def test_drift_counted_on_spark_equals_drift_counted_on_duckdb(loop, tmp_path):
    assert loop["drift_spark_jobs"] > 0
    settings = loop["settings"]
    with make_connection(tmp_path) as con:
        stored = DriftHistory(settings.drift_dir).summary(con, AFTER).set_index("tag")
        locations = DriftLocations(settings.warehouse_dir, ParquetTagStore.in_warehouse(settings.warehouse_dir), tmp_path / "drift", tmp_path / "reports")
        recomputed = compute_drift(con, loop["client"], load_catalog(settings.catalog_path), AFTER, locations, report=False)
    for result in recomputed.results:
        row = stored.loc[result.tag]
        assert result.drifted == bool(row["drifted"]) and result.reasons == list(row["reasons"])
        for column in ("drifted_feature_share", "prediction_psi", "probability_psi"):
            assert result.summary[column] == pytest.approx(row[column], abs=1e-9), column


def test_the_drifted_tag_is_reevaluated_through_the_server(loop):
    request = loop["request"]
    assert (request.job_name, request.partition_key) == ("reevaluate_risk_appetite_job", AFTER.isoformat())
    run = loop["runs"]["reevaluated"]
    materialized = {e.asset_key.to_user_string(): e.materialization.metadata for e in run.get_asset_materialization_events()}
    assert {"risk_appetite/training_set", "risk_appetite/tag_model", "customer_tags"} <= set(materialized)
    version = materialized["risk_appetite/tag_model"]["model_version"].value
    [gate] = [e for e in run.get_asset_check_evaluations() if e.check_name == "promotion_gate"]
    client = loop["client"]
    assert client.get_model_version("tagml-risk_appetite", version).tags["gate.decision"] == gate.metadata["decision"].value
    champion = str(client.get_model_version_by_alias("tagml-risk_appetite", "champion").version)
    scores = pd.read_parquet(loop["settings"].warehouse_dir / "customer_tags" / f"as_of={AFTER}" / "data.parquet")
    risk = set(scores.loc[scores["tag"] == "risk_appetite", "model_version"])
    assert risk == {champion}
    if gate.metadata["decision"].value == "promoted":
        assert champion == version
    else:
        assert risk == set(loop["tags_before"].loc[loop["tags_before"]["tag"] == "risk_appetite", "model_version"])
