"""The champion registry against real MLflow stores: rollback as a stack, registry errors that are not
"no champion", gate overrides, interrupted registrations, pruned trials, stale runs and one training
of a tag at a time. A real `mlflow server` is in tests/test_mlflow_server.py."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tagml.monitoring.reference import DriftInputError, monitored_model
from tagml.scoring.score import ScoringError, resolve_champion
from tagml.training.catalog import load_catalog
from tagml.training.concurrency import TrainingInProgressError, training_lock_path
from tagml.training.dataset import build_training_set
from tagml.training.registry import (
    CHAMPION,
    GateOverrideRequiredError,
    IncompleteRegistrationError,
    RegistryError,
    RegistryUnavailableError,
    alias_version,
    apply_gate,
    champion_version,
    evaluate_gate,
    promote,
    rollback,
)
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag
from tagml.training.versions import REGISTRATION_TAG, registered_model_name
from tests.conftest import WINDOW_END, make_connection, shipped_slices, write_test_catalog

REPO = Path(__file__).resolve().parent.parent
TAG = "risk_appetite"
NAME = registered_model_name(TAG)


def _tag(tmp: Path, **model):
    path = write_test_catalog(tmp / "catalog.yaml", (TAG,), trials=2, model=model, margin=0.01)
    return load_catalog(path).get(TAG), path


def _store(tmp: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return uri, connect_tracking(uri)


def _version(client: MlflowClient, gate: str | None = "promoted", complete: bool = True) -> str:
    """A registered version carrying the registry tags a training writes (no model behind it: the
    registry operations tested with it never load one)."""
    try:
        client.get_registered_model(NAME)
    except MlflowException:
        client.create_registered_model(NAME)
    tags = {REGISTRATION_TAG: "complete" if complete else "pending"}
    if complete:
        tags.update(data_snapshot="/nowhere/risk_appetite-2026-10-31-abc.parquet", snapshot_id="s", feature_list="[]", classes='["C1"]')
    if gate:
        tags.update({"gate.decision": gate, "gate.reasons": json.dumps([f"gate said {gate}"])})
    return str(client.create_model_version(NAME, "file:///nowhere", tags=tags).version)


def _history(client: MlflowClient) -> list[dict]:
    return json.loads(client.get_registered_model(NAME).tags["champion_history"])


# ---- rollback walks back through the champions ---------------------------------------------------


def test_a_second_rollback_goes_further_back_not_forward(tmp_path):
    _, client = _store(tmp_path)
    v1, v2, v3 = (_version(client) for _ in range(3))
    for v in (v1, v2, v3):
        promote(client, TAG, v, by="gate")
    assert rollback(client, TAG, by="ops") == v2
    assert rollback(client, TAG, by="ops") == v1  # the old code re-promoted v3 here
    assert champion_version(client, TAG) == v1
    with pytest.raises(RegistryError, match=f"v{v1} is the first champion on record; nothing to roll back to"):
        rollback(client, TAG, by="ops")
    assert [h["action"] for h in _history(client)] == ["promote"] * 3 + ["rollback"] * 2
    assert [h.get("from") for h in _history(client)][-2:] == [v3, v2]


def test_a_triple_rollback_and_a_promotion_in_between(tmp_path):
    _, client = _store(tmp_path)
    v1, v2, v3, v4, v5 = (_version(client) for _ in range(5))
    for v in (v1, v2, v3, v4):
        promote(client, TAG, v, by="gate")
    assert [rollback(client, TAG, by="ops") for _ in range(3)] == [v3, v2, v1]
    promote(client, TAG, v5, by="gate")  # a new champion is pushed on what is left (v1)
    assert rollback(client, TAG, by="ops") == v1
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(client, TAG, by="ops")


def test_rollback_reads_a_history_written_by_the_old_code(tmp_path):
    """1 -> 2 -> 3, then the old code's rollback to 2 and its mistaken second rollback back to 3."""
    _, client = _store(tmp_path)
    v1, v2, v3 = (_version(client) for _ in range(3))
    client.set_registered_model_alias(NAME, CHAMPION, v3)
    old = [{"version": v, "at": "t", "by": "gate", "reason": "gate"} for v in (v1, v2, v3)]
    old += [
        {"version": v2, "at": "t", "by": "x", "reason": f"rollback (from v{v3})"},
        {"version": v3, "at": "t", "by": "x", "reason": f"rollback (from v{v2})"},
    ]
    client.set_registered_model_tag(NAME, "champion_history", json.dumps(old))
    assert rollback(client, TAG, by="ops") == v1


# ---- promote: gate overrides and interrupted registrations ---------------------------------------


def test_promoting_a_rejected_version_needs_force_and_a_reason_and_is_recorded_as_an_override(tmp_path):
    _, client = _store(tmp_path)
    good, bad = _version(client), _version(client, gate="rejected")
    promote(client, TAG, good, by="gate")
    with pytest.raises(GateOverrideRequiredError, match=f"{NAME}/{bad} was rejected by the promotion gate \\(gate said rejected\\).*--force --reason"):
        promote(client, TAG, bad, by="alice")
    for empty in (None, "  "):
        with pytest.raises(RegistryError, match="forcing a promotion needs a reason"):
            promote(client, TAG, bad, by="alice", reason=empty, force=True)
    assert champion_version(client, TAG) == good  # nothing moved by the refusals
    assert len(_history(client)) == 1

    assert promote(client, TAG, bad, by="alice", reason="regulator asked for the simpler model", force=True) is True
    assert champion_version(client, TAG) == bad
    entry = _history(client)[-1]
    assert entry | {"at": None} == {
        "version": bad,
        "at": None,
        "by": "alice",
        "reason": "regulator asked for the simpler model",
        "action": "override",
        "override": True,
    }
    tags = client.get_model_version(NAME, bad).tags
    assert (tags["override"], tags["override.by"], tags["champion_by"]) == ("true", "alice", "alice")
    assert tags["override.reason"] == "regulator asked for the simpler model"
    assert "override" not in client.get_model_version(NAME, good).tags
    assert rollback(client, TAG, by="alice") == good


@pytest.mark.parametrize("complete", [False, None], ids=["pending", "no-tags-at-all"])
def test_an_unfinished_registration_is_neither_promotable_nor_scorable_nor_monitorable(tmp_path, complete):
    _, client = _store(tmp_path)
    tag, _ = _tag(tmp_path)
    if complete is None:  # what the old code left when killed right after create_model_version
        client.create_registered_model(NAME)
        v = str(client.create_model_version(NAME, "file:///nowhere").version)
    else:
        v = _version(client, gate=None, complete=False)
    with pytest.raises(IncompleteRegistrationError, match=f"{NAME}/{v}: .*cannot be gated, promoted or scored"):
        promote(client, TAG, v, by="alice", reason="x", force=True)
    assert champion_version(client, TAG) is None
    client.set_registered_model_alias(NAME, CHAMPION, v)  # as the old `tagml promote` did
    with pytest.raises(ScoringError, match=f"tag 'risk_appetite': the champion {NAME}/{v}: "):
        resolve_champion(client, tag)
    with pytest.raises(DriftInputError, match=f"{NAME}/{v}: .*cannot be monitored"):
        monitored_model(client, tag, v)


def test_a_missing_model_and_a_missing_alias_read_as_no_champion_on_sqlite(tmp_path):
    _, client = _store(tmp_path)
    assert champion_version(client, TAG) is None  # no registered model
    _version(client)
    assert champion_version(client, TAG) is None  # a model without the alias
    assert alias_version(client, TAG, "challenger") is None


# ---- registry errors are not "no champion" --------------------------------------------------------


class _Unavailable(BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.send_response(503)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(b"service unavailable")

    do_GET = do_POST = do_PATCH = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def unavailable_registry(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}"
    yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    server.shutdown()
    server.server_close()


def test_a_503_is_a_named_error_in_gate_promote_rollback_scoring_and_drift(unavailable_registry, tmp_path):
    client = unavailable_registry
    tag, _ = _tag(tmp_path)
    unavailable = "failed \\(INTERNAL_ERROR: .*503.*\\); the registry is not answering normally, so nothing was decided or changed"
    with pytest.raises(RegistryUnavailableError, match=f"looking up the 'champion' alias of registered model '{NAME}' {unavailable}"):
        champion_version(client, TAG)
    with pytest.raises(RegistryUnavailableError, match=unavailable):
        rollback(client, TAG, by="ops")
    with pytest.raises(RegistryUnavailableError, match=f"reading {NAME}/3 {unavailable}"):
        promote(client, TAG, "3", by="ops")
    with pytest.raises(RegistryUnavailableError, match=unavailable):
        evaluate_gate(client, tag, "3", data=None, slices={})  # type: ignore[arg-type]  (fails before the data is read)
    with pytest.raises(RegistryUnavailableError, match=unavailable):  # was: "no 'champion' alias ... train and promote"
        resolve_champion(client, tag)
    with pytest.raises(RegistryUnavailableError, match=unavailable):  # was: "has no version 3"
        monitored_model(client, tag, "3")


def test_a_stopped_registry_is_a_named_error_not_no_champion(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    client = MlflowClient(tracking_uri="http://127.0.0.1:9", registry_uri="http://127.0.0.1:9")
    with pytest.raises(RegistryUnavailableError, match="the registry is not answering normally"):
        champion_version(client, TAG)


# ---- training: pruned trials, interrupted trainings, one at a time -------------------------------------


@pytest.fixture(scope="module")
def risk(bank, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry_sets")
    tag, catalog_path = _tag(tmp)
    con = make_connection(tmp)
    try:
        data = build_training_set(con, bank["staged"], tag, WINDOW_END, tmp, seed=0)
    finally:
        con.close()
    return {"tag": tag, "data": data, "catalog": catalog_path}


def _runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], max_results=1000)


@pytest.mark.slow
def test_two_stores_in_one_process_never_see_each_other_and_the_fluent_default_is_untouched(risk, tmp_path, monkeypatch):
    """Every run, model and load goes through the caller's client: a decoy set as MLflow's process-wide
    tracking URI (as another library in the process might) receives nothing, and is still the default after."""
    import mlflow

    from tagml.training.registry import load_model

    decoy = f"sqlite:///{tmp_path / 'decoy.db'}"
    before = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(decoy)
    try:
        (a_uri, a), (b_uri, b) = _store(tmp_path / "a"), _store(tmp_path / "b")
        trained = {
            uri: train_tag(
                risk["tag"], risk["data"], client, shipped_slices(risk["data"]), artifact_location=str(tmp_path / name / "artifacts"), seed=0, threads=1
            )
            for uri, client, name in ((a_uri, a, "a"), (b_uri, b, "b"))
        }
        for uri, client, other in ((a_uri, a, b_uri), (b_uri, b, a_uri)):
            result = trained[uri]
            runs = {r.info.run_id for r in _runs(client, result.experiment_id)}
            assert result.run_id in runs and trained[other].run_id not in runs
            [version] = client.search_model_versions(f"name = '{NAME}'")
            assert version.run_id == result.run_id
            assert Path(client.get_model_version_download_uri(NAME, version.version)).is_relative_to(Path(uri.removeprefix("sqlite:///")).parent)
            assert load_model(client, TAG, version.version).predict_proba(risk["data"].part("test")[0].head(3)).shape == (3, len(risk["tag"].classes))
        assert mlflow.get_tracking_uri() == decoy  # tagml never set it
        decoy_client = MlflowClient(tracking_uri=decoy, registry_uri=decoy)
        assert [e.name for e in decoy_client.search_experiments()] == ["Default"] and not decoy_client.search_registered_models()
    finally:
        mlflow.set_tracking_uri(before)
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.slow
def test_pruned_trials_are_recorded_as_pruned_not_failed(risk, tmp_path):
    _uri, client = _store(tmp_path)
    tag, _ = _tag(
        tmp_path,
        trials=8,
        search_space={
            "n_estimators": {"low": 60, "high": 120, "integer": True},
            "learning_rate": {"low": 0.005, "high": 0.5, "log": True},
            "max_depth": {"low": 1, "high": 6, "integer": True},
        },
    )
    result = train_tag(tag, risk["data"], client, shipped_slices(risk["data"]), artifact_location=str(tmp_path / "artifacts"), seed=0, threads=1)
    parent = client.get_run(result.run_id)
    trials = [r for r in _runs(client, result.experiment_id) if r.info.run_name.startswith("trial-")]
    pruned = [r for r in trials if r.data.tags.get("trial_state") == "pruned"]
    assert parent.data.metrics["trials_pruned"] >= 1, "the search space is meant to prune some trials"
    assert len(pruned) == parent.data.metrics["trials_pruned"]
    assert len(trials) - len(pruned) == parent.data.metrics["trials_completed"] == len([r for r in trials if r.data.tags["trial_state"] == "complete"])
    assert {r.info.status for r in trials} == {"FINISHED"}  # the old code ended every pruned trial FAILED


def test_a_trial_that_really_fails_stays_failed(risk, tmp_path):
    _uri, client = _store(tmp_path)
    tag, _ = _tag(tmp_path, trials=1, params={"max_bin": 1})  # xgboost refuses max_bin < 2
    with pytest.raises(Exception, match="max_bin"):
        train_tag(tag, risk["data"], client, shipped_slices(risk["data"]), artifact_location=str(tmp_path / "artifacts"), seed=0, threads=1)
    experiment = client.get_experiment_by_name(f"tagml/{TAG}")
    [trial] = [r for r in _runs(client, experiment.experiment_id) if r.info.run_name.startswith("trial-")]
    assert (trial.info.status, trial.data.tags["trial_state"]) == ("FAILED", "failed")


TRAIN_AND_DIE = textwrap.dedent(
    """
    import os, signal, sys
    from mlflow.tracking import MlflowClient
    import tagml.training.train
    from tagml.training.catalog import load_catalog
    from tagml.training.dataset import load_training_set
    from tagml.training.tracking import connect_tracking

    def die():  # as an OOM killer or `kill -9` would
        os.kill(os.getpid(), signal.SIGKILL)

    uri, catalog, snapshot, artifacts, where = sys.argv[1:]
    if where == "after_version":
        create = MlflowClient.create_model_version

        def create_then_die(self, *args, **kwargs):
            create(self, *args, **kwargs)
            die()

        MlflowClient.create_model_version = create_then_die
    else:  # inside the first Optuna trial, its nested run open
        tagml.training.train.core_metrics = lambda *args, **kwargs: die()
    tag = load_catalog(catalog).get("risk_appetite")
    tagml.training.train.train_tag(tag, load_training_set(snapshot, tag), connect_tracking(uri), {}, artifact_location=artifacts, threads=1)
    """
)


def _train_and_die(risk, tmp_path, where: str) -> tuple[str, MlflowClient, int]:
    uri, client = _store(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    child = subprocess.Popen(
        [sys.executable, "-c", TRAIN_AND_DIE, uri, str(risk["catalog"]), str(risk["data"].snapshot_path), str(tmp_path / "artifacts"), where],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == -9, stderr[-2000:]
    return uri, client, child.pid


@pytest.mark.slow
def test_a_training_killed_inside_a_trial_leaves_runs_the_next_training_marks_killed(risk, tmp_path):
    _uri, client, pid = _train_and_die(risk, tmp_path, "in_trial")
    experiment = client.get_experiment_by_name(f"tagml/{TAG}")
    orphans = {r.info.run_name: r for r in _runs(client, experiment.experiment_id)}
    assert set(orphans) == {f"{TAG}-train", "trial-0"}
    assert {r.info.status for r in orphans.values()} == {"RUNNING"}
    assert {r.data.tags["tagml.pid"] for r in orphans.values()} == {str(pid)}
    assert not client.search_model_versions(f"name = '{NAME}'")
    result = train_tag(risk["tag"], risk["data"], client, shipped_slices(risk["data"]), artifact_location=str(tmp_path / "artifacts"), threads=1)
    assert {client.get_run(r.info.run_id).info.status for r in orphans.values()} == {"KILLED"}
    assert client.get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_training_killed_after_creating_its_version_leaves_nothing_promotable_and_the_next_one_cleans_up(risk, tmp_path):
    _uri, client, pid = _train_and_die(risk, tmp_path, "after_version")
    artifacts = str(tmp_path / "artifacts")
    [killed] = client.search_model_versions(f"name = '{NAME}'")
    assert killed.tags == {REGISTRATION_TAG: "pending"}  # created, then nothing: says so itself
    experiment = client.get_experiment_by_name(f"tagml/{TAG}")
    [orphan] = [r for r in _runs(client, experiment.experiment_id) if r.info.run_name == f"{TAG}-train"]
    assert orphan.info.status == "RUNNING"
    assert orphan.data.tags["tagml.pid"] == str(pid)

    with pytest.raises(IncompleteRegistrationError, match=f"{NAME}/{killed.version}: its registration is 'pending', never completed"):
        promote(client, TAG, killed.version, by="ops")
    with pytest.raises(IncompleteRegistrationError):
        evaluate_gate(client, risk["tag"], killed.version, risk["data"], shipped_slices(risk["data"]))
    assert alias_version(client, TAG, "challenger") is None

    # the next training (the killed one's lock was released with its process) marks the orphan KILLED
    result = train_tag(risk["tag"], risk["data"], client, shipped_slices(risk["data"]), artifact_location=artifacts, threads=1)
    orphan = client.get_run(orphan.info.run_id)
    assert orphan.info.status == "KILLED"
    assert "marked KILLED by a later training" in orphan.data.tags["tagml.stale"]
    assert client.get_run(result.run_id).info.status == "FINISHED"
    assert str(alias_version(client, TAG, "challenger").version) == result.version
    assert client.get_model_version(NAME, result.version).tags[REGISTRATION_TAG] == "complete"
    decision = apply_gate(client, evaluate_gate(client, risk["tag"], result.version, risk["data"], shipped_slices(risk["data"])))
    assert decision.promoted and champion_version(client, TAG) == result.version


def test_a_second_training_of_a_tag_fails_by_name_while_one_is_running(risk, tmp_path):
    uri, client = _store(tmp_path)
    lock = training_lock_path(uri, TAG)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(120)",
            str(lock),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with pytest.raises(TrainingInProgressError, match=f"another training of tag '{TAG}' is running on this MLflow store \\(lock {lock}\\)"):
            train_tag(
                risk["tag"],
                risk["data"],
                client,
                shipped_slices(risk["data"]),
                artifact_location=str(tmp_path / "artifacts"),
                threads=1,
                lock_timeout_seconds=1,
            )
        assert time.perf_counter() - started < 30
        assert client.get_experiment_by_name(f"tagml/{TAG}") is None  # nothing logged
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_processes_opening_a_fresh_sqlite_store_together_all_succeed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
    code = "import sys; from tagml.training.tracking import connect_tracking; connect_tracking(sys.argv[1]); print('ok')"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [subprocess.Popen([sys.executable, "-c", code, uri], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outcomes = [child.communicate(timeout=300) for child in children]
    # without the schema lock, 3 of 4 such processes died with "table ... already exists" or an alembic migration error
    assert [out.strip() for out, _ in outcomes] == ["ok"] * 3, [err[-500:] for _, err in outcomes]


# ---- Dagster: run id on the MLflow runs, links in the metadata ------------------------------------------


def test_tag_model_asset_records_the_dagster_run_id_and_links_to_mlflow(bank, tmp_path):
    import shutil

    from tagml.orchestration.resources import MlflowResource, WarehouseResource
    from tagml.orchestration.training_assets import build_training_assets

    tag, catalog_path = _tag(tmp_path, trials=1)
    warehouse_dir = tmp_path / "warehouse"
    shutil.copytree(bank["staged"], warehouse_dir / "raw")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resources = {
        "warehouse": WarehouseResource(
            raw_dir=str(tmp_path / "raw"), warehouse_dir=str(warehouse_dir), duckdb_path=str(tmp_path / "w.duckdb"), threads=1, memory_limit="1GB"
        ),
        "mlflow_store": MlflowResource(tracking_uri=uri, artifact_location=str(tmp_path / "artifacts"), ui_url="http://mlflow.example:5000/"),
    }
    result = dg.materialize(build_training_assets(tag, load_catalog(catalog_path)), resources=resources, instance=dg.DagsterInstance.ephemeral())
    assert result.success
    metadata = result.asset_materializations_for_node("risk_appetite__tag_model")[0].metadata
    run_id, version = metadata["mlflow_run_id"].value, metadata["model_version"].value
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["dagster_run_id"] == result.run_id
    trials = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert trials and {r.data.tags["dagster_run_id"] for r in trials} == {result.run_id}
    assert client.get_model_version(NAME, version).tags["dagster_run_id"] == result.run_id
    assert isinstance(metadata["mlflow_run"], dg.UrlMetadataValue)
    assert metadata["mlflow_run"].value == f"http://mlflow.example:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}"
    assert metadata["mlflow_model_version"].value == f"http://mlflow.example:5000/#/models/{NAME}/versions/{version}"
