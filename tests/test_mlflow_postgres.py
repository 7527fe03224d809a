"""MLflow's tracking server on a PostgreSQL backend store, as a bank runs it: the registry lives in Postgres
and the artifacts in the root the server serves, so a restarted (or upgraded, or second) server process on
the same two continues with the same champion and serves its model to scoring.

Training, the gate, promote, rollback and scoring against a Postgres-backed server are the tests of
tests/test_mlflow_server.py, run there for both backend stores."""

import pandas as pd
import pytest

from tagml.scoring.score import score_partition
from tagml.training.registry import apply_gate, champion_version, evaluate_gate
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag
from tagml.training.versions import registered_model_name
from tests.conftest import WINDOW_END, shipped_slices
from tests.postgres import mlflow_postgres, postgres, running_mlflow_server  # noqa: F401 (fixtures)
from tests.test_mlflow_server import TAG, world  # noqa: F401 (the fixture: training set and features of the session bank)

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.slow]

NAME = registered_model_name(TAG)


def test_the_session_server_keeps_its_registry_in_postgres(mlflow_postgres, postgres):  # noqa: F811
    client = connect_tracking(mlflow_postgres.url)
    client.create_registered_model(registered_model_name("postgres_probe"))
    database = mlflow_postgres.backend_store_uri.rsplit("/", 1)[1]
    with postgres.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT name FROM registered_models")
        assert registered_model_name("postgres_probe") in {row[0] for row in cursor.fetchall()}


def test_a_restarted_server_on_the_same_store_keeps_the_champion_and_serves_its_model(postgres, world, tmp_path):  # noqa: F811
    store = postgres.url(postgres.create_database("mlflow_restart"))
    tag, data = world["tag"], world["data"]
    with running_mlflow_server(tmp_path, store, postgres.secret_env()) as first_server:
        client = connect_tracking(first_server.url)
        trained = train_tag(tag, data, client, shipped_slices(data), seed=0, threads=1, lock_dir=tmp_path)
        assert apply_gate(client, evaluate_gate(client, tag, trained.version, data, shipped_slices(data))).promoted
    with postgres.connect("mlflow_restart") as connection, connection.cursor() as cursor:
        cursor.execute("SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'", (NAME,))
        assert cursor.fetchall() == [(int(trained.version),)]
        cursor.execute("SELECT artifact_location FROM experiments WHERE experiment_id = %s", (int(trained.experiment_id),))
        assert cursor.fetchone()[0].startswith("mlflow-artifacts:")  # served by whichever server process runs, not a path of the first

    with running_mlflow_server(tmp_path, store, postgres.secret_env()) as second_server:  # a new process, another port: the same store and artifact root
        client = connect_tracking(second_server.url)
        assert champion_version(client, TAG) == trained.version
        target = tmp_path / "tags" / "data.parquet"
        summary = score_partition(world["con"], client, world["catalog"], world["features"], world["staged"], WINDOW_END, target, with_reasons=False)
    scored = pd.read_parquet(target)
    assert summary.customers == len(scored) > 0
    assert set(scored.model_version) == {trained.version} and set(scored.mlflow_run_id) == {trained.run_id}
