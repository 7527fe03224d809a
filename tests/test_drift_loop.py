"""The drift loop end to end with real Dagster runs, MLflow, DuckDB and Evidently, on a small bank
with a market shock in 2026-10: models trained on 2026-08-31, a nightly run (features -> tags ->
tag_drift) for 2026-09-30 (before the shock) and 2026-10-31 (after), the re-evaluation sensor after
each, and the run it requests (retrain -> gate -> re-score)."""

from datetime import date

import dagster as dg
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tagml.core.settings import Settings
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.monitoring.drift import DriftLocations, compute_drift
from tagml.monitoring.reference import DriftInputError
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import (
    NIGHTLY_SCORING_JOB,
    RAW_INGEST_JOB,
    TRAIN_ALL_JOB,
    reevaluation_run_config,
)
from tagml.orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR, in_process_run_tags, sensor_context
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import load_catalog
from tests.conftest import make_connection, write_test_catalog

pytestmark = pytest.mark.slow  # a real Dagster loop on a 4,000-customer bank (~2 minutes)

TRAINED, BEFORE, AFTER = date(2026, 8, 31), date(2026, 9, 30), date(2026, 10, 31)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift_loop")
    write_test_catalog(root / "catalog.yaml", ("risk_appetite", "life_stage", "value_tier"))
    settings = Settings.from_env(
        {"TAGML_HOME": str(root / "home"), "TAGML_CATALOG": str(root / "catalog.yaml"), "TAGML_DRIFT_SAMPLE_ROWS": "1500", "TAGML_THREADS": "1"}
    )
    settings.ensure_dirs()
    generate_bank(BankConfig(customers=4000, months=12, seed=11, drift="market_shock", drift_month="2026-10"), settings.raw_dir)
    defs = build_definitions(settings)
    catalog = load_catalog(settings.catalog_path)
    instance = dg.DagsterInstance.ephemeral()
    repository = defs.get_repository_def()
    sensor = defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)

    def tick(cursor):
        return sensor.evaluate_tick(sensor_context(repository, instance, cursor))

    assert defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance).success
    train_config = {"ops": {k: v for t in catalog.model_tags for k, v in reevaluation_run_config(t.name, TRAINED.isoformat())["ops"].items()}}
    trained = defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(instance=instance, run_config=train_config)
    nightly = {}
    ticks = {}
    cursor = None
    for day in (BEFORE, AFTER):
        nightly[day] = defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(instance=instance, partition_key=day.isoformat())
        ticks[day] = tick(cursor)
        cursor = ticks[day].cursor
    repeat = tick(cursor)  # the same drift results, evaluated again
    reset = tick(None)  # a lost cursor
    # same inputs, same decisions: recompute the drifted partition from scratch (references too)
    recomputed_dir = root / "recomputed"
    locations = DriftLocations(settings.warehouse_dir, ParquetTagStore.in_warehouse(settings.warehouse_dir), recomputed_dir, recomputed_dir / "reports")
    with make_connection(root) as con:
        recomputed = compute_drift(con, MlflowClient(settings.mlflow_tracking_uri), catalog, AFTER, locations, report=False)
    tags_before = pd.read_parquet(settings.warehouse_dir / "customer_tags" / f"as_of={AFTER}" / "data.parquet")
    [request] = ticks[AFTER].run_requests
    # as `tagml demo` runs it: in process, with the tags the sensor daemon would give the run
    reevaluated = defs.resolve_job_def(request.job_name).execute_in_process(
        instance=instance,
        partition_key=request.partition_key,
        run_config=request.run_config,
        tags=in_process_run_tags(request),
        raise_on_error=False,
    )
    return {
        "settings": settings,
        "defs": defs,
        "instance": instance,
        "trained": trained,
        "nightly": nightly,
        "ticks": ticks,
        "repeat": repeat,
        "reset": reset,
        "recomputed": recomputed,
        "tags_before": tags_before,
        "request": request,
        "reevaluated": reevaluated,
        "client": MlflowClient(settings.mlflow_tracking_uri),
    }


def _summary(loop, day: date) -> pd.DataFrame:
    from tagml.monitoring.history import DriftHistory

    with make_connection(loop["settings"].home) as con:
        return DriftHistory(loop["settings"].drift_dir).summary(con, day).set_index("tag")


def test_before_the_shock_no_reevaluation_is_requested(loop):
    assert loop["trained"].success and loop["nightly"][BEFORE].success
    before = _summary(loop, BEFORE)
    assert not before["drifted"].any(), before[["drifted_feature_share", "prediction_psi", "reasons"]]
    assert loop["ticks"][BEFORE].run_requests == []
    assert loop["ticks"][BEFORE].skip_message == "2 new drift result(s), no tag drifted"
    # one month of natural change is measured, not zero
    assert (before["reference_as_of"].dt.date == TRAINED).all() and (before["drifted_feature_share"] > 0).all()


def test_after_the_shock_the_sensor_requests_the_affected_tag_only(loop):
    assert loop["nightly"][AFTER].success
    after = _summary(loop, AFTER)
    assert after.loc["risk_appetite", "drifted"] and not after.loc["life_stage", "drifted"]
    assert "risky_share_change_3m" in list(after.loc["risk_appetite", "critical_features_drifted"])
    assert after.loc["life_stage", "reasons"].tolist() == []
    request = loop["request"]
    assert (request.job_name, request.partition_key, request.run_key) == (
        "reevaluate_risk_appetite_job",
        "2026-10-31",
        "reevaluate-risk_appetite-2026-10-31",
    )
    assert request.tags["tagml/trigger"] == "drift" and "risky_share_change_3m" in request.tags["tagml/drift_reasons"]
    # the asset checks: the drifted tag red (ERROR), the other green; neither blocks
    checks = {e.check_name: e for e in loop["nightly"][AFTER].get_asset_check_evaluations() if e.asset_key.to_user_string() == "tag_drift"}
    assert not checks["risk_appetite_drift"].passed and checks["risk_appetite_drift"].severity == dg.AssetCheckSeverity.ERROR
    assert checks["life_stage_drift"].passed
    materialization = next(e for e in loop["nightly"][AFTER].get_asset_materialization_events() if e.asset_key.to_user_string() == "tag_drift")
    metadata = materialization.materialization.metadata
    assert metadata["drifted_tags"].value == ["risk_appetite"]
    report = loop["settings"].reports_dir / "risk_appetite" / "2026-10-31.html"
    assert metadata["report_risk_appetite"].value == str(report)
    assert metadata["report_risk_appetite_url"].value == report.resolve().as_uri() and report.exists()
    assert checks["risk_appetite_drift"].metadata["report_url"].value == report.resolve().as_uri()
    # what the sensor plans from: per tag the verdict and its reasons, no customer values
    by_tag = metadata["drift_by_tag"].value
    assert by_tag["risk_appetite"]["drifted"] is True and by_tag["life_stage"] == {"drifted": False, "reasons": []}
    assert by_tag["risk_appetite"]["reasons"] == list(after.loc["risk_appetite", "reasons"])
    # the report opens with tagml's verdict, which the HTML's Evidently part cannot contradict
    header = report.read_text().split("<header id='tagml-verdict'", 1)[1].split("</header>", 1)[0]
    version = after.loc["risk_appetite", "producer"]
    assert "tagml's verdict: DRIFTED" in header and version in header and "2026-08-31" in header and "2026-10-31" in header


def test_the_sensor_is_idempotent(loop):
    assert loop["repeat"].run_requests == []  # evaluated twice on the same drift: one run
    # even with the cursor lost, the request carries the same run key, which Dagster launches once
    assert [r.run_key for r in loop["reset"].run_requests] == ["reevaluate-risk_appetite-2026-10-31"]


def test_the_demo_style_run_is_the_one_the_daemon_finds_for_the_run_key(loop):
    from types import SimpleNamespace

    from dagster._daemon.sensor import fetch_existing_runs

    # the lost-cursor evaluation requests the same run key again; the daemon's check finds the in-process run
    existing = fetch_existing_runs(loop["instance"], SimpleNamespace(name=REEVALUATE_ON_DRIFT_SENSOR), loop["reset"].run_requests)
    assert {k: r.run_id for k, r in existing.items()} == {"reevaluate-risk_appetite-2026-10-31": loop["reevaluated"].run_id}


def test_a_feature_gone_all_null_is_a_big_drift_not_a_crash(loop, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # before the shock: both tags' partition was scored by the versions trained on 2026-08-31, whose
    # reference population is another day (after the re-evaluation, risk_appetite's may be AFTER itself)
    settings = loop["settings"]
    warehouse = tmp_path / "warehouse"
    (warehouse / "customer_features").mkdir(parents=True)
    (warehouse / "raw").symlink_to(settings.warehouse_dir / "raw")
    for partition in (settings.warehouse_dir / "customer_features").iterdir():
        if partition.name != f"as_of={BEFORE}":
            (warehouse / "customer_features" / partition.name).symlink_to(partition)
    table = pq.read_table(settings.warehouse_dir / "customer_features" / f"as_of={BEFORE}" / "data.parquet")
    column = table.schema.get_field_index("aum_total")
    table = table.set_column(column, "aum_total", pa.nulls(table.num_rows, table.schema.field(column).type))
    (warehouse / "customer_features" / f"as_of={BEFORE}").mkdir()
    pq.write_table(table, warehouse / "customer_features" / f"as_of={BEFORE}" / "data.parquet")
    locations = DriftLocations(warehouse, ParquetTagStore.in_warehouse(settings.warehouse_dir), tmp_path / "drift", tmp_path / "reports")
    with make_connection(tmp_path) as con:
        run = compute_drift(con, loop["client"], load_catalog(settings.catalog_path), BEFORE, locations, sample_rows=500)
    users = []  # every tag got its numbers and its report; those whose model reads aum_total see a big drift
    for result in run.results:
        overall = result.features[result.features["slice_column"] == "(all)"].set_index("feature")
        page = (tmp_path / "reports" / result.tag / f"{BEFORE}.html").read_text()
        assert "tagml's verdict" in page, result.tag
        if "aum_total" in overall.index:
            users.append(result.tag)
            assert overall.loc["aum_total", "psi"] > 1 and overall.loc["aum_total", "drifted"], result.tag
            assert overall.loc["aum_total", "evidently_method"] == "not run: no values in the current sample"
            assert "aum_total (no values in the current sample)" in page
    assert users


def test_reevaluation_retrains_gates_with_a_recorded_reason_and_rescores(loop):
    run = loop["reevaluated"]
    assert run.success
    materialized = {e.asset_key.to_user_string(): e.materialization.metadata for e in run.get_asset_materialization_events()}
    # the re-scored partition is loaded into the online store by the same run (online_tags)
    assert set(materialized) == {"risk_appetite/training_set", "risk_appetite/tag_model", "customer_tags", "online_tags"}
    assert materialized["risk_appetite/training_set"]["train_as_of"].value == "2026-10-31"
    [gate] = [e for e in run.get_asset_check_evaluations() if e.check_name == "promotion_gate"]
    version = materialized["risk_appetite/tag_model"]["model_version"].value
    registered = loop["client"].get_model_version("tagml-risk_appetite", version)
    assert registered.tags["gate.decision"] == gate.metadata["decision"].value
    assert registered.tags["gate.reasons"] and gate.description
    champion = loop["client"].get_model_version_by_alias("tagml-risk_appetite", "champion").version
    scores = pd.read_parquet(loop["settings"].warehouse_dir / "customer_tags" / f"as_of={AFTER}" / "data.parquet")
    risk = scores[scores["tag"] == "risk_appetite"]
    old = loop["tags_before"].query("tag == 'risk_appetite'")["model_version"].unique().tolist()
    if gate.metadata["decision"].value == "promoted":
        assert str(champion) == version and set(risk["model_version"]) == {version}
    else:
        assert set(risk["model_version"]) == set(old) and str(champion) in old
    # the other model tag kept its version; the run was the drift's, not the nightly's
    life = scores[scores["tag"] == "life_stage"]["model_version"].unique().tolist()
    assert life == loop["tags_before"].query("tag == 'life_stage'")["model_version"].unique().tolist()
    assert run.dagster_run.tags["tagml/trigger"] == "drift"


def test_same_inputs_same_decisions(loop):
    stored = _summary(loop, AFTER)
    for result in loop["recomputed"].results:
        row = stored.loc[result.tag]
        assert result.drifted == bool(row["drifted"]) and result.reasons == list(row["reasons"])
        for column in ("drifted_feature_share", "prediction_psi", "probability_psi", "training_gap_share"):
            assert result.summary[column] == pytest.approx(row[column], abs=1e-12), column


def test_reports_hold_features_only(loop):
    report = (loop["settings"].reports_dir / "risk_appetite" / "2026-10-31.html").read_text()
    ids = loop["tags_before"]["customer_id"].drop_duplicates().sample(200, random_state=0)
    assert not [i for i in ids if i in report]
    assert "customer_id" not in report and "risky_share_change_3m" in report


def test_missing_inputs_fail_with_named_errors(loop, tmp_path):
    settings, defs = loop["settings"], loop["defs"]
    failed = defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(
        instance=loop["instance"], partition_key="2026-07-31", asset_selection=[dg.AssetKey("tag_drift")], raise_on_error=False
    )
    failure = next(e for e in failed.all_events if e.event_type_value == "STEP_FAILURE")
    assert "no customer_features partition for as_of 2026-07-31" in failure.event_specific_data.error.message
    # the reference snapshot of the version that scored the partition is gone
    catalog = load_catalog(settings.catalog_path)
    version = loop["tags_before"].query("tag == 'life_stage'")["model_version"].iloc[0]
    snapshot = loop["client"].get_model_version("tagml-life_stage", version).tags["data_snapshot"]
    moved = tmp_path / "snapshot.parquet"
    locations = DriftLocations(settings.warehouse_dir, ParquetTagStore.in_warehouse(settings.warehouse_dir), tmp_path / "drift", tmp_path / "reports")
    from pathlib import Path

    Path(snapshot).rename(moved)
    try:
        with (
            make_connection(tmp_path) as con,
            pytest.raises(DriftInputError, match=f"tag 'life_stage': the training snapshot of tagml-life_stage/{version} .* does not exist"),
        ):
            compute_drift(con, loop["client"], catalog, AFTER, locations, tags=["life_stage"], report=False)
    finally:
        moved.rename(snapshot)
    assert not (tmp_path / "drift" / "drift_summary").exists()  # nothing written


def test_tagml_drift_prints_the_summary_and_the_report(loop, monkeypatch, capsys):
    from tagml.cli import main

    monkeypatch.setenv("TAGML_HOME", str(loop["settings"].home))
    monkeypatch.setenv("TAGML_CATALOG", str(loop["settings"].catalog_path))
    assert main(["drift", "--as-of", "2026-10-31"]) == 0
    out = capsys.readouterr().out
    assert "risk_appetite   DRIFTED" in out and "life_stage      ok" in out
    assert str(loop["settings"].reports_dir / "risk_appetite" / "2026-10-31.html") in out
    assert main(["drift", "--tag", "life_stage"]) == 0  # the newest partition, one tag in detail
    detail = capsys.readouterr().out
    assert "risk_appetite" not in detail and "class PSI by value_tier:" in detail and "top features" in detail


def test_drift_of_one_tag_keeps_the_other_tags_results_and_checks(loop):
    config = {"ops": {"tag_drift": {"config": {"tags": ["life_stage"], "report": False}}}}
    run = (
        loop["defs"]
        .resolve_job_def(NIGHTLY_SCORING_JOB)
        .execute_in_process(instance=loop["instance"], partition_key=AFTER.isoformat(), asset_selection=[dg.AssetKey("tag_drift")], run_config=config)
    )
    checks = {e.check_name: e for e in run.get_asset_check_evaluations()}
    assert not checks["risk_appetite_drift"].passed and "stored result" in checks["risk_appetite_drift"].description
    assert checks["life_stage_drift"].passed and "stored result" not in checks["life_stage_drift"].description
    summary = _summary(loop, AFTER)
    assert summary.loc["risk_appetite", "drifted"] and summary.loc["life_stage", "computed_at"] > summary.loc["risk_appetite", "computed_at"]
