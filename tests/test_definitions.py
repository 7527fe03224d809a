"""The code location loads as Dagster would load it, with settings taken from the environment."""

import dagster as dg

from tagml.core.settings import Settings
from tagml.orchestration.definitions import build_definitions, defs
from tagml.orchestration.jobs import CUSTOMER_FEATURES_JOB, RAW_INGEST_JOB


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


def test_nightly_schedule_scores_yesterday_in_the_bank_timezone(tmp_path):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    loaded = build_definitions(Settings.from_env({"TAGML_HOME": str(tmp_path)}))
    schedule = loaded.resolve_schedule_def("nightly_scoring_schedule")
    assert schedule.cron_schedule == "0 2 * * *" and schedule.execution_timezone == "Asia/Shanghai"
    moment = datetime(2026, 11, 25, 2, 0, tzinfo=ZoneInfo("Asia/Shanghai"))
    context = dg.build_schedule_context(scheduled_execution_time=moment, repository_def=loaded.get_repository_def())
    [request] = schedule.evaluate_tick(context).run_requests
    assert request.partition_key == "2026-11-24" and request.run_key == "score-2026-11-24"
    assert loaded.resolve_job_def(schedule.job_name).partitions_def is not None


def test_retraining_is_scheduled_once_from_the_catalog(tmp_path):
    from tagml.orchestration.jobs import TRAIN_ALL_JOB
    from tagml.training.catalog import load_catalog

    loaded = build_definitions(Settings.from_env({"TAGML_HOME": str(tmp_path)}))
    repository = loaded.get_repository_def()
    by_job = {}
    for schedule in repository.schedule_defs:
        by_job.setdefault(schedule.job_name, []).append(schedule.name)
    model_tags = [t.name for t in load_catalog().model_tags]
    # one refresh schedule per model tag, and nothing else retrains: no weekly run of every tag on top
    assert by_job == {
        "nightly_scoring_job": ["nightly_scoring_schedule"],
        "purge_old_runs_job": ["purge_old_runs_schedule"],  # event-log retention, not training
        **{f"reevaluate_{t}_job": [f"refresh_{t}_schedule"] for t in model_tags},
    }
    assert not [s.name for s in repository.sensor_defs if TRAIN_ALL_JOB in {j.name for j in s.jobs}]
    assert {s.name for s in repository.sensor_defs} == {"reevaluate_on_drift_sensor"}


def test_cron_and_timezone_come_from_settings(tmp_path):
    env = {"TAGML_HOME": str(tmp_path), "TAGML_SCORING_CRON": "30 1 * * 1-5", "TAGML_TIMEZONE": "Asia/Hong_Kong"}
    schedule = build_definitions(Settings.from_env(env)).resolve_schedule_def("nightly_scoring_schedule")
    assert (schedule.cron_schedule, schedule.execution_timezone) == ("30 1 * * 1-5", "Asia/Hong_Kong")


def test_drift_monitoring_is_generated_from_the_catalog(tmp_path):
    from datetime import datetime
    from zoneinfo import ZoneInfo

    from tagml.orchestration.jobs import reevaluation_run_config
    from tagml.training.catalog import load_catalog

    env = {"TAGML_HOME": str(tmp_path), "TAGML_REFRESH_TIME": "05:15", "TAGML_REEVALUATION_COOLDOWN_DAYS": "3"}
    settings = Settings.from_env(env)
    assert settings.drift_dir == tmp_path / "warehouse" / "drift" and settings.reevaluation_cooldown_days == 3
    loaded = build_definitions(settings)
    model_tags = [t for t in load_catalog().model_tags]
    graph = loaded.resolve_asset_graph()
    checks = {k.name for k in graph.asset_check_keys if k.asset_key.to_user_string() == "tag_drift"}
    assert checks == {f"{t.name}_drift" for t in model_tags}
    nightly = loaded.resolve_job_def("nightly_scoring_job")
    assert dg.AssetKey("tag_drift") in nightly.asset_layer.executable_asset_keys
    sensor = loaded.resolve_sensor_def("reevaluate_on_drift_sensor")
    assert {j.name for j in sensor.jobs} == {f"reevaluate_{t.name}_job" for t in model_tags}
    crons = {"daily": "15 5 * * *", "weekly": "15 5 * * 1", "monthly": "15 5 1 * *", "quarterly": "15 5 1 1,4,7,10 *"}
    for tag in model_tags:
        schedule = loaded.resolve_schedule_def(f"refresh_{tag.name}_schedule")
        assert schedule.cron_schedule == crons[tag.refresh] and schedule.job_name == f"reevaluate_{tag.name}_job"
    moment = datetime(2026, 11, 30, 5, 15, tzinfo=ZoneInfo("Asia/Shanghai"))
    context = dg.build_schedule_context(scheduled_execution_time=moment, repository_def=loaded.get_repository_def())
    [request] = loaded.resolve_schedule_def("refresh_risk_appetite_schedule").evaluate_tick(context).run_requests
    assert (request.run_key, request.partition_key) == ("refresh-risk_appetite-2026-11-29", "2026-11-29")
    assert request.run_config == reevaluation_run_config("risk_appetite", "2026-11-29")


def test_every_job_runs_in_process(tmp_path):
    # a step per process costs ~4 s of imports for sub-second work: no job may fall back to the multiprocess default
    loaded = build_definitions(Settings.from_env({"TAGML_HOME": str(tmp_path)}))
    jobs = [job for job in loaded.get_repository_def().get_all_jobs() if not job.name.startswith("__")]
    assert len(jobs) >= 6
    assert {job.name: job.executor_def.name for job in jobs} == {job.name: dg.in_process_executor.name for job in jobs}
