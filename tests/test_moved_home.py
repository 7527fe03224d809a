"""A TAGML_HOME moved to another directory keeps working there and never writes to where it was.

A small bank is ingested, a one-trial model trained and a partition scored (with drift) by real
Dagster runs on a persistent instance inside the home; then the home is moved with shutil.move so
that its old path no longer exists. In the new place: the CLI looks up tags (with lineage), prints
drift, promotes and rolls back; Dagster (definitions loaded from the environment, as `dagster dev`
does) scores a new partition with the champion and retrains from the stored training set. The MLflow
store, the DuckDB views and every registry path then point into the new home, and the old path was
never recreated.
"""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import date
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from tagml.cli import main
from tagml.cli.errors import ExitCode
from tagml.core.settings import Settings
from tagml.features.synthetic import BankConfig, generate_bank
from tagml.orchestration.jobs import (
    NIGHTLY_SCORING_JOB,
    RAW_INGEST_JOB,
    TRAIN_ALL_JOB,
    reevaluation_run_config,
)
from tagml.orchestration.training_assets import tag_model_key
from tagml.scoring.store import ParquetTagStore
from tests.conftest import publish_tags, write_test_catalog

TRAINED, FIRST, SECOND = date(2026, 8, 31), date(2026, 9, 30), date(2026, 10, 31)
NO_REPORT = {"ops": {"tag_drift": {"config": {"report": False}}}}

pytestmark = pytest.mark.slow


def _nightly(defs: dg.Definitions, instance: dg.DagsterInstance, day: date) -> dg.ExecuteInProcessResult:
    return defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(
        instance=instance,
        partition_key=day.isoformat(),
        run_config=NO_REPORT,
        asset_selection=[dg.AssetKey(k) for k in ("customer_features", "customer_tags", "tag_drift")],
    )


@pytest.fixture(scope="module")
def homes(tmp_path_factory):
    from tagml.orchestration.definitions import build_definitions

    root = tmp_path_factory.mktemp("moved_home")
    old, new = root / "laptop" / "home", root / "server" / "home"
    # the test is about locations, not model quality: the first model must become champion
    write_test_catalog(root / "catalog.yaml", ("risk_appetite", "value_tier"), max_calibration_error=1.0, require_all_classes_predicted=False)
    with pytest.MonkeyPatch.context() as env:
        for name in list(os.environ):
            if name.startswith("TAGML_") or name in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME"):
                env.delenv(name)
        env.setenv("TAGML_HOME", str(old))
        env.setenv("TAGML_CATALOG", str(root / "catalog.yaml"))
        env.setenv("TAGML_THREADS", "1")
        settings = Settings.from_env()
        settings.ensure_dirs()
        generate_bank(BankConfig(customers=1500, months=12, seed=5, drift="market_shock", drift_month="2026-10"), settings.raw_dir)
        defs = build_definitions(settings)
        train = {"ops": reevaluation_run_config("risk_appetite", TRAINED.isoformat())["ops"]}
        with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
            assert defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance).success
            assert defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(instance=instance, run_config=train).success
            assert _nightly(defs, instance, FIRST).success
        publish_tags(settings)  # the governance store moves with the home
        new.parent.mkdir(parents=True)
        shutil.move(old, new)
        shutil.rmtree(root / "laptop")  # the old path vanishes: anything written there would recreate it
        env.setenv("TAGML_HOME", str(new))
        # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI (for its subprocesses): in this process it
        # still names the old store; a new process, as after a real move, starts without it
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield {"root": root, "old": old, "new": new, "env": env}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def _customer(settings: Settings, day: date) -> str:
    with duckdb.connect() as con:
        [(customer,)] = con.execute(
            "SELECT min(customer_id) FROM read_parquet(?) WHERE tag = 'risk_appetite' AND source = 'model'",
            [str(ParquetTagStore(settings.warehouse_dir / "customer_tags").partition_path(day))],
        ).fetchall()
    return customer


def test_a_moved_home_works_where_it_is_now_and_writes_nothing_where_it_was(homes, capsys):
    from tagml.orchestration.definitions import defs as load_definitions

    old, new = homes["old"], homes["new"]
    settings = Settings.from_env()
    assert settings.home == new and not old.exists()

    # the first command re-anchors the home, and says so
    customer = _customer(settings, FIRST)
    code, out, err = _cli(capsys, "tags", customer, "--json")
    assert code == 0, err
    assert f"this home was at {old}; re-anchored to {new}" in err
    looked_up = json.loads(out)
    [model_row] = [t for t in looked_up["tags"] if t["tag"] == "risk_appetite"]
    snapshot = Path(model_row["lineage"]["data_snapshot"])
    assert snapshot.is_relative_to(new) and snapshot.exists()
    assert json.loads(json.dumps(looked_up))["as_of"] == FIRST.isoformat()
    code, out, err = _cli(capsys, "tags", customer)  # again: nothing left to re-anchor
    assert code == 0 and "re-anchored" not in err and f"snapshot {snapshot}" in out
    code, out, err = _cli(capsys, "drift", "--json")
    assert code == 0 and {t["tag"] for t in json.loads(out)["tags"]} == {"risk_appetite"}, err

    # Dagster, loaded from the environment as `dagster dev` loads it, on the moved instance
    definitions = load_definitions()
    with dg.DagsterInstance.from_config(str(settings.dagster_home)) as instance:
        # the champion's artifacts are found in the new home, and its drift reference too
        assert _nightly(definitions, instance, SECOND).success
        # the training set stored by the earlier run (in the moved io-manager storage) is found
        retrain = definitions.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(
            instance=instance,
            asset_selection=[tag_model_key("risk_appetite")],
            run_config={"ops": {tag_model_key("risk_appetite").to_python_identifier(): {"config": {"train_as_of": TRAINED.isoformat()}}}},
        )
        assert retrain.success
    code, out, err = _cli(capsys, "leaderboard", "risk_appetite", "--json")
    runs = json.loads(out)["runs"]
    assert code == 0 and sorted(r["version"] for r in runs) == ["1", "2"], err
    [champion] = [r["version"] for r in runs if "champion" in r["alias"]]
    [other] = [r["version"] for r in runs if r["version"] != champion]

    # whatever the gate decided about v2: force the other version in, then roll back to the champion
    code, out, err = _cli(capsys, "promote", "risk_appetite", other, "--force", "--reason", "moved-home test")
    assert code == 0 and f"v{other} is now champion" in out, err
    code, out, err = _cli(capsys, "rollback", "risk_appetite", "--reason", "moved-home test")
    assert code == 0 and f"rolled back to v{champion}" in out, err
    code, out, err = _cli(capsys, "drift", "--as-of", SECOND.isoformat(), "--fail-on-drift")
    assert code == ExitCode.DRIFT and "risk_appetite   DRIFTED" in out and "drift found in risk_appetite" in err
    code, out, err = _cli(capsys, "tags", _customer(settings, SECOND), "--as-of", SECOND.isoformat(), "--json")
    assert code == 0 and json.loads(out)["as_of"] == SECOND.isoformat(), err

    assert not old.exists(), "something was written under the home's old path"
    db = settings.embedded_tracking_db
    assert db is not None
    with sqlite3.connect(db) as con:
        stale = [
            (table, column)
            for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
            for (_, column, *_rest) in con.execute("SELECT * FROM pragma_table_info(?)", [table]).fetchall()
            if con.execute(f'SELECT count(*) FROM "{table}" WHERE instr(CAST("{column}" AS TEXT), ?) > 0', [str(old)]).fetchone()[0]
        ]
        artifact_roots = [r[0] for r in con.execute("SELECT artifact_uri FROM runs").fetchall()]
    assert stale == [], f"MLflow still names the old home in {stale}"
    assert artifact_roots and all(root.startswith(str(new)) for root in artifact_roots)
    with duckdb.connect(str(settings.duckdb_path), read_only=True) as con:
        views = con.execute("SELECT view_name, sql FROM duckdb_views() WHERE NOT internal").fetchall()
    over_files = [sql for _, sql in views if "read_parquet" in sql]
    assert over_files and all(str(new) in sql for sql in over_files)
    assert all(str(old) not in sql for _, sql in views)


def test_lookups_on_the_moved_home_close_their_connections_and_name_what_is_missing(homes, capsys, monkeypatch, tmp_path):
    from tagml.cli import common as cli

    opened: list[duckdb.DuckDBPyConnection] = []
    real = cli.connect

    def recording(settings):
        con = real(settings)
        opened.append(con)
        return con

    monkeypatch.setattr(cli, "connect", recording)
    settings = Settings.from_env()
    customer = _customer(settings, FIRST)
    assert _cli(capsys, "tags", customer, "--no-lineage")[0] == 0
    assert _cli(capsys, "drift")[0] == 0
    assert _cli(capsys, "export", "--as-of", FIRST.isoformat(), "--format", "csv", "--out", str(tmp_path / "tags.csv"), "--purpose", "service")[0] == 0
    assert (tmp_path / "tags.csv").stat().st_size > 0
    assert len(opened) == 3
    for con in opened:
        with pytest.raises(duckdb.ConnectionException):
            con.execute("SELECT 1")  # closed

    # a marketing export leaves out the synthetic bank's customers without marketing consent, and its record says how many
    code, out, err = _cli(capsys, "export", "--out", str(tmp_path / "marketing.parquet"), "--purpose", "marketing", "--include-confidential", "--json")
    record = json.loads(out)
    assert code == 0 and record["tags"] == ["risk_appetite", "value_tier"] and record["excluded"]["no_consent"] > 0, err
    assert json.loads((tmp_path / "marketing.parquet.manifest.json").read_text()) == record

    # `tagml drift | head`: the reader goes away; the command ends quietly with 141, no traceback
    read, write = os.pipe()
    os.close(read)
    process = subprocess.run([sys.executable, "-m", "tagml.cli", "drift"], stdout=write, stderr=subprocess.PIPE, check=False, timeout=300)
    os.close(write)
    assert process.returncode == ExitCode.BROKEN_PIPE and b"Traceback" not in process.stderr, process.stderr

    code, _, err = _cli(capsys, "tags", "C999999999")
    assert code == ExitCode.NOT_FOUND and "C999999999" in err
    code, _, err = _cli(capsys, "tags", customer, "--as-of", "2020-01-01")
    assert code == ExitCode.NOT_FOUND and "2020-01-01" in err
    code, _, err = _cli(capsys, "promote", "risk_appetite", "99", "--reason", "x")
    assert code == ExitCode.NOT_FOUND and "99" in err
    code, _, err = _cli(capsys, "drift", "--as-of", "2020-01-31")
    assert code == ExitCode.NOT_FOUND and "2020-01-31" in err


def test_a_copied_home_is_re_anchored_and_the_original_is_untouched(tmp_path, monkeypatch):
    """The rewrite on a real MLflow SQLite store and DuckDB file, without training: exact prefixes only,
    in the copy only, and the manifest moves with it (a second look rewrites nothing)."""
    import pandas as pd

    from tagml.core.runtime import MLFLOW_LOCATION_COLUMNS, relocate_home
    from tagml.core.storage import WarehouseLayout, publish_views
    from tagml.training.tracking import connect_tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    original = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    original.ensure_dirs()
    client = connect_tracking(original.mlflow_tracking_uri)
    inside = client.create_experiment("inside", artifact_location=str(original.mlflow_artifact_dir))
    # a sibling directory whose name starts with the home's: not part of the home
    sibling = client.create_experiment("sibling", artifact_location=f"{original.home}2/artifacts")
    run = client.create_run(inside)
    staged = WarehouseLayout(original.warehouse_dir).staged_dir
    staged.mkdir(parents=True)
    pd.DataFrame({"customer_id": ["C1"]}).to_parquet(staged / "customers.parquet")
    publish_views(original.duckdb_path, original.warehouse_dir)

    copy = Settings.from_env({"TAGML_HOME": str(tmp_path / "copy")})
    shutil.copytree(original.home, copy.home)
    moved = relocate_home(copy)
    assert moved is not None and moved.old == original.home and moved.new == copy.home
    assert moved.mlflow_rows == 2 and moved.views == ["raw_customers"]  # experiment + run; the sibling stays
    assert relocate_home(copy) is None  # the manifest now names the copy

    def locations(settings: Settings) -> dict[str, str]:
        with sqlite3.connect(settings.embedded_tracking_db) as con:
            return {
                f"{table}.{column}": value
                for table, column in MLFLOW_LOCATION_COLUMNS
                for (value,) in con.execute(f'SELECT "{column}" FROM "{table}"').fetchall()
                if value and value.startswith("/")
            }

    assert relocate_home(original) is None  # the original is where it was
    with sqlite3.connect(copy.embedded_tracking_db) as con:
        rows = dict(con.execute("SELECT name, artifact_location FROM experiments").fetchall())
        [(run_root,)] = con.execute("SELECT artifact_uri FROM runs WHERE run_uuid = ?", [run.info.run_id]).fetchall()
    assert rows["inside"] == str(copy.mlflow_artifact_dir) and rows["sibling"] == f"{original.home}2/artifacts"
    assert run_root.startswith(str(copy.mlflow_artifact_dir))
    assert all(v.startswith(str(original.home)) for v in locations(original).values())  # untouched
    with duckdb.connect(str(copy.duckdb_path), read_only=True) as con:
        [(sql,)] = con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'raw_customers'").fetchall()
    assert str(WarehouseLayout(copy.warehouse_dir).staged_dir) in sql
    assert sibling  # created, and left alone above
