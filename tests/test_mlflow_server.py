"""The bank set-up: a real `mlflow server` subprocess (SQLite or PostgreSQL backend store, served artifacts,
one worker, 127.0.0.1, a free port) with train -> gate -> promote -> rollback -> score against it.

If the server (or PostgreSQL) cannot start the tests skip, except with CI=true, where they fail."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from tagml.features.customer_features import build_customer_features
from tagml.scoring.score import score_partition
from tagml.training.catalog import load_catalog
from tagml.training.dataset import build_training_set
from tagml.training.registry import (
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
from tests.postgres import postgres, running_mlflow_server  # noqa: F401 (postgres: the fixture)

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
TAG = "risk_appetite"
NAME = registered_model_name(TAG)
# variables that make MLflow itself switch telemetry off (CI and test markers among them)
TELEMETRY_SWITCHES = {
    "MLFLOW_DISABLE_TELEMETRY",
    "DO_NOT_TRACK",
    "PYTEST_CURRENT_TEST",
    "GITHUB_ACTIONS",
    "CI",
    "CIRCLECI",
    "GITLAB_CI",
    "JENKINS_URL",
    "TRAVIS",
    "TF_BUILD",
    "BITBUCKET_BUILD_NUMBER",
    "CODEBUILD_BUILD_ARN",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "CLOUD_RUN_EXECUTION",
    "RUNBOT_HOST_URL",
    "RUNBOT_BUILD_NAME",
    "RUNBOT_WORKER_ID",
    "XDG_CONFIG_HOME",
}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request, tmp_path_factory):
    """The same tests against both backend stores a bank may run the server on: SQLite and PostgreSQL."""
    root = tmp_path_factory.mktemp(f"mlflow_server_{request.param}")
    if request.param == "postgres":
        backend = request.getfixturevalue("postgres")
        store, secret_env = backend.url(backend.create_database(f"mlflow_{root.name.lower()}")), backend.secret_env()
    else:
        store, secret_env = f"sqlite:///{root / 'server.db'}", {}
    with running_mlflow_server(root, store, secret_env) as running:
        yield {"url": running.url, "root": running.root}


@pytest.fixture(scope="module")
def world(bank, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server_world")
    catalog = load_catalog(write_test_catalog(tmp / "catalog.yaml", (TAG,), trials=2, margin=0.01))
    con = make_connection(tmp)
    data = build_training_set(con, bank["staged"], catalog.get(TAG), WINDOW_END, tmp / "sets", seed=0)
    features = tmp / "features" / f"as_of={WINDOW_END}" / "data.parquet"
    build_customer_features(con, bank["staged"], WINDOW_END, features)
    yield {"tmp": tmp, "catalog": catalog, "tag": catalog.get(TAG), "data": data, "features": features, "con": con, "staged": bank["staged"]}
    con.close()


def test_missing_model_and_missing_alias_read_as_no_champion_on_a_server(server):
    client = connect_tracking(server["url"])
    assert alias_version(client, "no_such_tag", "champion") is None  # RESOURCE_DOES_NOT_EXIST
    client.create_registered_model(registered_model_name("aliasless"))
    assert alias_version(client, "aliasless", "champion") is None  # INVALID_PARAMETER_VALUE "... not found"


class _AliasOutage(BaseHTTPRequestHandler):
    """Forwards to the real server, but answers 503 for alias lookups: a registry that is up for some
    calls and failing for the one that decides whether a champion exists."""

    upstream = ""

    def _forward(self) -> None:
        if "/registered-models/alias" in self.path and self.command == "GET":
            self.send_response(503)
            self.end_headers()
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        request = urllib.request.Request(self.upstream + self.path, data=body, method=self.command)
        if self.headers.get("Content-Type"):
            request.add_header("Content-Type", self.headers["Content-Type"])
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, payload, kind = response.status, response.read(), response.headers.get("Content-Type", "application/json")
        except urllib.error.HTTPError as error:
            status, payload, kind = error.code, error.read(), error.headers.get("Content-Type", "application/json")
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args) -> None:
        pass


def test_train_gate_promote_rollback_and_score_against_a_real_server(server, world, tmp_path, monkeypatch):
    client = connect_tracking(server["url"])
    tag, data = world["tag"], world["data"]
    local_artifacts = tmp_path / "local-artifacts"

    first = train_tag(tag, data, client, shipped_slices(data), artifact_location=str(local_artifacts), seed=0, threads=1, lock_dir=tmp_path)
    experiment = client.get_experiment(first.experiment_id)
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server chose it
    assert not local_artifacts.exists()  # the local path is for local stores only
    assert any((server["root"] / "served").rglob("MLmodel"))
    version = client.get_model_version(NAME, first.version)
    assert version.tags[REGISTRATION_TAG] == "complete" and version.run_id == first.run_id
    assert apply_gate(client, evaluate_gate(client, tag, first.version, data, shipped_slices(data))).promoted
    assert champion_version(client, TAG) == first.version

    second = train_tag(tag, data, client, shipped_slices(data), seed=1, threads=1, lock_dir=tmp_path)
    # a 503 on the alias lookup is an outage, not "no champion": the gate must not judge v2 a first model
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), type("Outage", (_AliasOutage,), {"upstream": server["url"]}))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from mlflow.tracking import MlflowClient

    flaky = MlflowClient(tracking_uri=f"http://127.0.0.1:{proxy.server_port}", registry_uri=f"http://127.0.0.1:{proxy.server_port}")
    try:
        assert flaky.get_model_version(NAME, second.version).version == second.version  # the rest of the proxy works
        with pytest.raises(RegistryUnavailableError, match=f"looking up the 'champion' alias of registered model '{NAME}' failed"):
            evaluate_gate(flaky, tag, second.version, data, shipped_slices(data))
    finally:
        proxy.shutdown()
        proxy.server_close()
        monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    assert champion_version(client, TAG) == first.version
    assert "gate.decision" not in client.get_model_version(NAME, second.version).tags

    decision = apply_gate(client, evaluate_gate(client, tag, second.version, data, shipped_slices(data)))
    assert decision.champion_version == first.version  # compared against the champion this time
    if not decision.promoted:
        promote(client, TAG, second.version, by="tester", reason="server tier", force=True)
    assert champion_version(client, TAG) == second.version
    assert rollback(client, TAG, by="tester") == first.version
    history = json.loads(client.get_registered_model(NAME).tags["champion_history"])
    assert [h["version"] for h in history] == [first.version, second.version, first.version]

    target = tmp_path / "tags" / "data.parquet"
    summary = score_partition(world["con"], client, world["catalog"], world["features"], world["staged"], WINDOW_END, target, with_reasons=False)
    scored = pd.read_parquet(target)
    assert summary.customers == len(scored) > 0
    assert set(scored.model_version) == {first.version}
    assert set(scored.mlflow_run_id) == {first.run_id}


def test_connect_tracking_keeps_mlflow_telemetry_off(server, tmp_path):
    """Run as a plain process would be (no CI or pytest variables, which make MLflow switch telemetry off
    by itself): the control without tagml writes ~/.config/mlflow, tagml's connection does not."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_SWITCHES} | {"PYTHONPATH": str(REPO)}
    use = "client.search_experiments(max_results=1); client.search_registered_models(max_results=1)"
    programs = {
        "tagml": f"import sys\nfrom tagml.training.tracking import connect_tracking\nclient = connect_tracking(sys.argv[1])\n{use}",
        "control": f"import sys, mlflow\nclient = mlflow.MlflowClient(sys.argv[1], registry_uri=sys.argv[1])\n{use}",
    }
    written = {}
    for name, program in programs.items():
        home = tmp_path / name
        home.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", program, server["url"]], env={**env, "HOME": str(home)}, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stderr[-2000:]
        written[name] = sorted(str(p.relative_to(home)) for p in home.rglob("*"))
    assert ".config/mlflow/telemetry.json" in written["control"], "the control should show what MLflow writes"
    assert not [p for p in written["tagml"] if p.startswith(".config/mlflow")]
