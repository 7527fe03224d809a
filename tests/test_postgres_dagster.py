"""Dagster on PostgreSQL: an instance loaded from deploy/dagster.yaml (the file a bank installs as
$DAGSTER_HOME/dagster.yaml, its storage from DAGSTER_PG_* variables) pointed at a real PostgreSQL runs tagml's
ingest and feature jobs in process; runs, materializations and the drift sensor's reads go through Postgres;
the purge deletes old runs and their events and keeps new ones."""

import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from tagml.core.settings import Settings
from tagml.orchestration.commands import run_job
from tagml.orchestration.definitions import build_definitions
from tagml.orchestration.jobs import CUSTOMER_FEATURES_JOB, RAW_INGEST_JOB
from tagml.orchestration.maintenance import PURGE_JOB, PURGE_SCHEDULE, purge_old_runs
from tagml.orchestration.monitoring_assets import DRIFT_BY_TAG
from tagml.orchestration.partitions import as_of_partitions
from tagml.orchestration.sensors import REEVALUATE_ON_DRIFT_SENSOR, sensor_context
from tests.conftest import WINDOW_END
from tests.postgres import DEPLOY, HOST_FILES, deployed_tagml_env, listening, postgres, running_unit  # noqa: F401 (postgres: the fixture)

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def home(postgres, bank, tmp_path_factory):  # noqa: F811
    """A tagml home whose Dagster instance is deploy/dagster.yaml on a fresh Postgres database; the session bank's raw data."""
    root = tmp_path_factory.mktemp("postgres_dagster")
    database = postgres.create_database("dagster_" + root.name.lower())
    settings = Settings.from_env({"TAGML_HOME": str(root / "home"), "TAGML_RAW_DIR": str(bank["raw"])})
    settings.dagster_home.mkdir(parents=True)
    shutil.copy(DEPLOY / "dagster.yaml", settings.dagster_home / "dagster.yaml")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in postgres.dagster_env(database).items():
            patch.setenv(name, value)
        yield {"settings": settings, "postgres": postgres, "database": database}


def _instance(settings: Settings) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(settings.dagster_home))


@pytest.mark.slow  # ingest and features of the session bank (~20 s)
def test_tagml_jobs_run_on_a_postgres_instance_and_are_read_back_from_it(home):
    settings = home["settings"]
    with _instance(settings) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage" and type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator" and instance.run_monitoring_enabled

    ingest = run_job(settings, RAW_INGEST_JOB)
    features = run_job(settings, CUSTOMER_FEATURES_JOB, partition_key=WINDOW_END.isoformat())
    assert ingest.success and features.success, (ingest.failure, features.failure)

    with _instance(settings) as instance:  # a fresh instance: everything below comes from Postgres
        runs = {r.dagster_run.run_id: r.dagster_run for r in instance.get_run_records()}
        assert {ingest.run_id, features.run_id} <= set(runs)
        assert runs[features.run_id].tags["dagster/partition"] == WINDOW_END.isoformat() and runs[features.run_id].status == dg.DagsterRunStatus.SUCCESS
        [record] = instance.fetch_materializations(dg.AssetKey("customer_features"), limit=5).records
        assert record.run_id == features.run_id and record.partition_key == WINDOW_END.isoformat()
        assert record.asset_materialization.metadata["rows"].value == features.materialized["customer_features"]["rows"]
        assert instance.fetch_materializations(dg.AssetKey("raw_customers"), limit=5).records[0].run_id == ingest.run_id
    with home["postgres"].connect(home["database"]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_id FROM runs")
        assert {ingest.run_id, features.run_id} <= {row[0] for row in cursor.fetchall()}
        cursor.execute("SELECT count(*) FROM event_logs WHERE run_id = %s", (features.run_id,))
        assert cursor.fetchone()[0] > 0
    assert not list(settings.dagster_home.rglob("*.db"))  # no SQLite storage fell in beside it


def test_the_drift_sensor_and_the_nightly_schedule_evaluate_against_postgres(home):
    settings = home["settings"]
    defs = build_definitions(settings)

    @dg.asset(name="tag_drift", partitions_def=as_of_partitions(settings))
    def tag_drift() -> dg.MaterializeResult:  # tag_drift's key, partitions and verdict metadata, without the drift computation
        return dg.MaterializeResult(metadata={DRIFT_BY_TAG: dg.MetadataValue.json({"risk_appetite": {"drifted": True, "reasons": ["class PSI 0.31 > 0.2"]}})})

    with _instance(settings) as instance:
        assert dg.materialize([tag_drift], instance=instance, partition_key=WINDOW_END.isoformat()).success
        sensor = defs.resolve_sensor_def(REEVALUATE_ON_DRIFT_SENSOR)
        first = sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance))
        assert [(r.job_name, r.partition_key) for r in first.run_requests] == [("reevaluate_risk_appetite_job", WINDOW_END.isoformat())]
        assert sensor.evaluate_tick(sensor_context(defs.get_repository_def(), instance, first.cursor)).run_requests == []  # the cursor moved on

        schedule = defs.resolve_schedule_def("nightly_scoring_schedule")
        moment = datetime(2026, 11, 1, 2, 0, tzinfo=UTC)
        context = dg.build_schedule_context(instance=instance, scheduled_execution_time=moment, repository_def=defs.get_repository_def())
        [request] = schedule.evaluate_tick(context).run_requests
        assert request.partition_key == "2026-10-31"


def test_the_purge_deletes_old_runs_and_their_events_and_keeps_new_ones(home):
    settings = home["settings"]

    @dg.asset
    def scratch() -> None:
        pass

    with _instance(settings) as instance:
        old, old_latest = (dg.materialize([scratch], instance=instance).run_id for _ in range(2))
        time.sleep(1.5)  # Postgres timestamps: the cutoff falls strictly between the two groups of runs
        boundary = datetime.now(UTC)
        time.sleep(1.5)
        new = dg.materialize([scratch], instance=instance, tags={"t": "new"}).run_id
        # a week on, with a week's retention: `old` goes; `new` is newer than the cutoff
        summary = purge_old_runs(instance, 7, now=boundary + timedelta(days=7))
        assert instance.get_run_by_id(old) is None and instance.all_logs(old) == []
        assert instance.get_run_by_id(new) is not None
        # `old_latest` is old too, but it held scratch's latest materialization until `new` ran: only `new` protects it now
        assert instance.get_run_by_id(old_latest) is None
        assert summary.deleted >= 2 and summary.cutoff == boundary

        # an old run holding an asset's latest materialization is kept
        @dg.asset
        def quarterly() -> None:
            pass

        holder = dg.materialize([quarterly], instance=instance).run_id
        later = purge_old_runs(instance, 1, now=datetime.now(UTC) + timedelta(days=2))
        assert instance.get_run_by_id(holder) is not None and later.kept_latest >= 1
        assert instance.get_latest_materialization_event(dg.AssetKey("quarterly")).run_id == holder

        with pytest.raises(ValueError, match="TAGML_RUN_RETENTION_DAYS"):
            purge_old_runs(instance, 0)

    # the purge job of the code location runs on the same instance (the default 90 days: nothing that recent goes)
    defs = build_definitions(settings)
    assert defs.resolve_schedule_def(PURGE_SCHEDULE).default_status == dg.DefaultScheduleStatus.RUNNING
    with _instance(settings) as instance:
        before = len(instance.get_run_records())
        assert defs.resolve_job_def(PURGE_JOB).execute_in_process(instance=instance).success
        assert len(instance.get_run_records()) == before + 1


@pytest.mark.slow  # a code server, the daemon and a run worker start (~1-2 minutes on two busy cores)
def test_the_daemon_launches_a_queued_run_through_the_code_server_on_postgres(postgres, tmp_path):  # noqa: F811
    """The production process set: the code server and the daemon started from their units, an operator's
    `dagster job launch` queues a run, the daemon dequeues it and launches it through the code server."""
    env = {**os.environ, **deployed_tagml_env(tmp_path), **postgres.dagster_env(postgres.create_database("dagster_daemon"))}
    home = Path(env["DAGSTER_HOME"])
    home.mkdir()
    shutil.copy(DEPLOY / "dagster.yaml", home / "dagster.yaml")
    with running_unit("tagml-code-server.service", env, tmp_path / "code_server.log") as code_server:
        deadline = time.monotonic() + 180
        while code_server.poll() is None and time.monotonic() < deadline and not listening(int(env["DAGSTER_CODE_SERVER_PORT"])):
            time.sleep(0.5)
        with running_unit("dagster-daemon.service", env, tmp_path / "daemon.log"):
            workspace = HOST_FILES["/etc/tagml/workspace.yaml"]
            launch = subprocess.run(
                [sys.executable, "-m", "dagster", "job", "launch", "-w", workspace, "-l", "tagml", "-j", PURGE_JOB],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            assert launch.returncode == 0, launch.stderr[-2000:]
            with pytest.MonkeyPatch.context() as patch:
                for name, value in postgres.dagster_env(env["DAGSTER_PG_DB"]).items():
                    patch.setenv(name, value)
                with dg.DagsterInstance.from_config(str(home)) as instance:
                    deadline = time.monotonic() + 300
                    while time.monotonic() < deadline:
                        [run] = instance.get_runs(dg.RunsFilter(job_name=PURGE_JOB))
                        if run.is_finished:
                            break
                        time.sleep(2)
                    logs = {name: (tmp_path / name).read_text()[-1500:] for name in ("code_server.log", "daemon.log")}
                    assert run.status == dg.DagsterRunStatus.SUCCESS, logs
                    assert "purge_old_runs" in {e.step_key for e in instance.all_logs(run.run_id) if e.is_dagster_event and e.dagster_event.is_step_success}
                    daemons = set(instance.get_daemon_heartbeats())
                    assert {"SCHEDULER", "SENSOR", "QUEUED_RUN_COORDINATOR", "MONITORING"} <= daemons
