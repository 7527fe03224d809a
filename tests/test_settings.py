"""Settings: every value is checked when read and a bad one names its variable and what it expects;
unknown TAGML_* variables are warned about; stored locations survive a moved home."""

import warnings

import pytest

from tagml.core.settings import (
    DEFAULT_CATALOG,
    HomeNotFoundError,
    Settings,
    SettingsError,
    UnknownSettingWarning,
    valid_cron,
)
from tagml.core.storage import WarehouseConfigError, connect
from tagml.orchestration.definitions import build_definitions


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("TAGML_THREADS", "two", "whole number"),
        ("TAGML_THREADS", "abc", "whole number"),
        ("TAGML_THREADS", "0", "whole number >= 1"),
        ("TAGML_TIMEZONE", "Mars/Olympus_Mons", "IANA time zone"),
        ("TAGML_PARTITIONS_START", "yesterday", "YYYY-MM-DD"),
        ("TAGML_SCORING_CRON", "every night", "cron"),
        ("TAGML_SCORING_CRON", "0 3 * * 8", "cron"),
        ("TAGML_DUCKDB_MEMORY_LIMIT", "lots", "4GB, 512MB"),
        ("TAGML_DUCKDB_MEMORY_LIMIT", "4", "4GB, 512MB"),
        ("TAGML_DRIFT_SAMPLE_ROWS", "5k", "whole number"),
        ("TAGML_REEVALUATION_COOLDOWN_DAYS", "-1", "whole number >= 0"),
        ("TAGML_REFRESH_TIME", "4.30pm", "HH:MM"),
    ],
)
def test_a_bad_value_names_the_variable_and_the_expected_type(tmp_path, variable, value, expected):
    with pytest.raises(SettingsError) as error:
        Settings.from_env({"TAGML_HOME": str(tmp_path), variable: value})
    message = str(error.value)
    assert variable in message and repr(value) in message and expected in message
    assert "\n" not in message


def test_bad_values_fail_before_dagster_sees_them(tmp_path):
    # before: DagsterInvalidDefinitionError / ZoneInfoNotFoundError / ValueError from deep inside the definitions
    for env in ({"TAGML_SCORING_CRON": "61 2 * * *"}, {"TAGML_TIMEZONE": "Asia/Atlantis"}, {"TAGML_PARTITIONS_START": "2024-13-01"}):
        with pytest.raises(SettingsError, match=next(iter(env))):
            build_definitions(Settings.from_env({"TAGML_HOME": str(tmp_path), **env}))


def test_the_dagster_code_location_fails_its_load_by_name(tmp_path, monkeypatch):
    from tagml.orchestration.definitions import defs

    monkeypatch.setenv("TAGML_HOME", str(tmp_path))
    monkeypatch.setenv("TAGML_TIMEZONE", "Asia/Atlantis")  # before: ZoneInfoNotFoundError from the partitions
    with pytest.raises(SettingsError, match="TAGML_TIMEZONE='Asia/Atlantis' is invalid: expected an IANA time zone"):
        defs()
    assert not tmp_path.joinpath("home.json").exists()


def test_good_values_and_the_defaults_are_unchanged(tmp_path):
    env = {
        "TAGML_HOME": str(tmp_path),
        "TAGML_THREADS": "3",
        "TAGML_DUCKDB_MEMORY_LIMIT": "512MB",
        "TAGML_SCORING_CRON": "30 1 * * mon-fri",
        "TAGML_TIMEZONE": "Asia/Hong_Kong",
        "TAGML_REFRESH_TIME": "05:15",
    }
    settings = Settings.from_env(env)
    assert (settings.threads, settings.duckdb_memory_limit, settings.timezone) == (3, "512MB", "Asia/Hong_Kong")
    defaults = Settings.from_env({"TAGML_HOME": str(tmp_path)})
    assert (defaults.threads, defaults.duckdb_memory_limit, defaults.partitions_start, defaults.timezone) == (2, "4GB", "2024-01-01", "Asia/Shanghai")
    assert (defaults.scoring_cron, defaults.refresh_time) == ("0 2 * * *", "04:30")
    assert defaults.drift_dir == tmp_path / "warehouse" / "drift" and defaults.duckdb_path == tmp_path / "warehouse" / "tagml.duckdb"
    for size in ("4GB", "1.5GiB", "800 MB", "64kb"):
        assert Settings.from_env({"TAGML_DUCKDB_MEMORY_LIMIT": size}).duckdb_memory_limit == size.replace(" ", "")


def test_every_memory_limit_the_settings_accept_opens_a_connection_with_that_limit(tmp_path):
    # the two checks once differed in case: '1.5gib' passed the settings and was refused by connect
    for size in ("4gb", "1.5gib", "800 mb", "512MiB", " 2 GB "):
        limit = Settings.from_env({"TAGML_HOME": str(tmp_path), "TAGML_DUCKDB_MEMORY_LIMIT": size}).duckdb_memory_limit
        with connect(1, limit) as con:
            assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] != ""
    for size in ("lots", "4", "4 PB", "4GiBs"):
        with pytest.raises(SettingsError, match="TAGML_DUCKDB_MEMORY_LIMIT"):
            Settings.from_env({"TAGML_HOME": str(tmp_path), "TAGML_DUCKDB_MEMORY_LIMIT": size})
        with pytest.raises(WarehouseConfigError, match="TAGML_DUCKDB_MEMORY_LIMIT"):
            connect(1, size)


def test_the_default_catalog_is_the_one_the_catalog_loader_reads():
    from tagml.training.catalog import load_catalog

    assert DEFAULT_CATALOG.is_file() and load_catalog.__defaults__ == (DEFAULT_CATALOG,)


def test_cron_validation_agrees_with_dagster():
    from dagster._utils.schedules import is_valid_cron_string

    for expression in ("0 2 * * *", "*/15 * * * *", "0 3 * * 0", "30 1 * * 1-5", "0 0 1 jan,jul *", "0 4 * * sun", "5 4 * * 7"):
        assert valid_cron(expression) and is_valid_cron_string(expression), expression
    for expression in ("61 * * * *", "0 24 * * *", "0 0 0 * *", "* * * *", "0 0 * * * *", "0 0 * * 8", "a b c d e", "1-70 * * * *"):
        assert not valid_cron(expression) and not is_valid_cron_string(expression), expression


def test_an_unknown_tagml_variable_is_warned_about_with_a_suggestion(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = Settings.from_env({"TAGML_HOME": str(tmp_path), "TAGML_THREAD": "1", "TAGML_SPARK_MASTER_X": "y"})
    messages = [str(w.message) for w in caught if issubclass(w.category, UnknownSettingWarning)]
    assert any("TAGML_THREAD " in m and "did you mean TAGML_THREADS?" in m for m in messages)
    assert any("TAGML_SPARK_MASTER_X" in m for m in messages)
    assert settings.threads == 2


def test_building_settings_creates_nothing_and_a_missing_home_is_named(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "nowhere")})
    with pytest.raises(HomeNotFoundError, match="no tagml home at .*nowhere"):
        settings.require_home()
    assert not (tmp_path / "nowhere").exists()
    settings.ensure_dirs()
    with pytest.raises(HomeNotFoundError, match="no MLflow store"):
        settings.require_home()  # a home where nothing was ever trained
    assert (tmp_path / "nowhere" / "home.json").exists()


def test_stored_paths_are_anchored_and_resolve_in_a_moved_home(tmp_path):
    old = Settings.from_env({"TAGML_HOME": str(tmp_path / "old")})
    snapshot = old.warehouse_dir / "training_sets" / "risk_appetite" / "risk_appetite-2026-09-30-abc.parquet"
    stored = old.stored_path(snapshot)
    assert stored == "$TAGML_WAREHOUSE_DIR/training_sets/risk_appetite/risk_appetite-2026-09-30-abc.parquet"
    assert old.stored_path(old.home / "reports" / "x.html") == "$TAGML_HOME/reports/x.html"
    assert old.stored_path("/elsewhere/x.parquet") == "/elsewhere/x.parquet"  # outside the home: absolute
    new = Settings.from_env({"TAGML_HOME": str(tmp_path / "new")})
    assert new.resolve_stored(stored) == tmp_path / "new" / "warehouse" / "training_sets" / "risk_appetite" / snapshot.name
    assert new.resolve_stored(str(snapshot)) == snapshot  # values written before anchoring stay absolute
