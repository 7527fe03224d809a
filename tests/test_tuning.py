"""Tuning follows the promotion metric (or model.objective), and pruning happens only where it is valid, on
real MLflow SQLite stores and a small generated customer table."""

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tagml.training.catalog import TagSpec
from tagml.training.dataset import TrainingSet
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag

SEARCH = {
    "learning_rate": {"low": 0.001, "high": 0.5, "log": True},
    "n_estimators": {"low": 5, "high": 60, "integer": True},
    "max_depth": {"low": 1, "high": 4, "integer": True},
}


def binary_set(tmp, n: int = 1500, seed: int = 0, bumpy: bool = False, cut: float = 0.8, noise: float = 1.0) -> TrainingSet:
    """A customer table with a binary label driven by three of its four features, split 70/15/15 at random;
    `bumpy`: also by a band of visits, which trees find and a logistic regression cannot; a higher `cut` and
    `noise` make the positive class rarer and harder to tell."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "customer_id": [f"K{i:05d}" for i in range(n)],
            "as_of": pd.Timestamp("2026-06-30"),
            "spend": rng.gamma(2.0, 1000.0, n),
            "visits": rng.poisson(4, n).astype(float),
            "noise": rng.normal(size=n),
            "segment": rng.choice(["gold", "silver", "bronze"], n),
        }
    )
    logit = (frame["spend"] - 2000) / 800 + 0.4 * (frame["segment"] == "gold") - 0.2 * frame["visits"] + rng.normal(0, noise, n)
    if bumpy:
        logit += 3.0 * frame["visits"].between(3, 5) - 1.5
    frame["label"] = np.where(logit > cut, "yes", "no")
    frame["split"] = rng.choice(["train", "valid", "test"], n, p=[0.7, 0.15, 0.15])
    path = tmp / "table.parquet"
    frame.drop(columns=["label", "split"]).to_parquet(path)
    return TrainingSet(
        tag="buyer",
        frame=frame,
        feature_names=("spend", "visits", "noise", "segment"),
        categorical=("segment",),
        snapshot_path=tmp / "buyer-2026-06-30-abc.parquet",
        snapshot_id="abc",
        dropped_labels={},
        feature_types={"spend": "numeric", "visits": "numeric", "noise": "numeric", "segment": "categorical"},
    )


def binary_tag(tmp, promotion: dict | None = None, model: dict | None = None, **fields) -> TagSpec:
    entry = {
        "name": "buyer",
        "description": "A generated binary tag on a customer table.",
        "kind": "model",
        "classes": ["no", "yes"],
        "owner": "tests",
        "label": {"feature_source": {"path": str(tmp / "table.parquet"), "labels_path": str(tmp / "labels.csv")}},
        "model": {"family": "xgboost", "trials": 4, "timeout_seconds": 120, "search_space": SEARCH, "baseline": None, **(model or {})},
        "promotion": {"max_calibration_error": 0.5, **(promotion or {})},
        **fields,
    }
    return TagSpec.model_validate(entry)


def _trials(client: MlflowClient, run_id: str, experiment_id: str) -> list:
    runs = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return [r for r in runs if r.info.run_name.startswith("trial-")]


def _best_trial(trials: list, metric: str, lower_is_better: bool):
    done = [t for t in trials if t.data.tags["trial_state"] == "complete"]
    return (min if lower_is_better else max)(done, key=lambda t: t.data.metrics[f"valid_{metric}"])


@pytest.fixture
def client(tmp_path) -> MlflowClient:
    return connect_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_two_entries_differing_only_in_the_promotion_metric_choose_their_own_best_trial(tmp_path, client):
    """Both studies sample the same 4 configurations (same seed); each picks the trial best at its own metric.
    The old study always minimised validation log loss: the two entries gave byte-identical models. On this
    table the trial with the best validation log loss (trial 0) is not the one with the best ROC AUC (trial 3)."""
    data = binary_set(tmp_path, seed=1)
    chosen = {}
    for metric in ("log_loss", "roc_auc_ovr"):
        tag = binary_tag(tmp_path, promotion={"metric": metric})
        result = train_tag(tag, data, client, {}, artifact_location=str(tmp_path / "artifacts"), threads=1)
        trials = _trials(client, result.run_id, result.experiment_id)
        best = _best_trial(trials, metric, metric == "log_loss")
        assert {k: float(v) for k, v in best.data.params.items()} == pytest.approx({k: float(v) for k, v in result.best_params.items()})
        parent = client.get_run(result.run_id).data
        assert parent.params["tuning_objective"] == metric
        assert parent.metrics[f"best_valid_{metric}"] == pytest.approx(best.data.metrics[f"valid_{metric}"])
        chosen[metric] = result.best_params
    assert chosen["log_loss"] != chosen["roc_auc_ovr"]


def test_model_objective_overrides_the_promotion_metric(tmp_path, client):
    data = binary_set(tmp_path)
    tag = binary_tag(tmp_path, promotion={"metric": "macro_f1"}, model={"objective": "log_loss", "trials": 2})
    assert tag.tuning_objective == "log_loss"
    result = train_tag(tag, data, client, {}, artifact_location=str(tmp_path / "artifacts"), threads=1)
    run = client.get_run(result.run_id).data
    assert run.params["tuning_objective"] == "log_loss"
    assert run.metrics["best_valid_log_loss"] == min(t.data.metrics["valid_log_loss"] for t in _trials(client, result.run_id, result.experiment_id))


def test_trials_are_pruned_on_their_own_objective_and_recorded_as_pruned_not_failed(tmp_path, client):
    """The pruner compares the study's objective (here ROC AUC, reported every 10 rounds), not xgboost's log
    loss; a pruned trial ends FINISHED with trial_state=pruned, and the first max(5, trials // 3) run in full."""
    data = binary_set(tmp_path, n=3000)
    space = {
        "learning_rate": {"low": 0.0005, "high": 0.5, "log": True},
        "n_estimators": {"low": 60, "high": 80, "integer": True},
        "max_depth": {"low": 1, "high": 4, "integer": True},
    }
    tag = binary_tag(tmp_path, promotion={"metric": "roc_auc_ovr"}, model={"trials": 12, "search_space": space})
    result = train_tag(tag, data, client, {}, artifact_location=str(tmp_path / "artifacts"), threads=1)
    run = client.get_run(result.run_id).data
    trials = sorted(_trials(client, result.run_id, result.experiment_id), key=lambda t: int(t.info.run_name.split("-")[1]))
    states = [t.data.tags["trial_state"] for t in trials]
    assert run.params["tuning_pruning"] == "True"
    assert states[:5] == ["complete"] * 5  # the pruner's start-up trials
    assert 1 <= states.count("pruned") == run.metrics["trials_pruned"] and states.count("complete") == run.metrics["trials_completed"]
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert all("valid_roc_auc_ovr" not in t.data.metrics for t in trials if t.data.tags["trial_state"] == "pruned")


def test_the_registered_model_is_the_best_trial_and_a_refit_from_its_recorded_parameters_reproduces_it(tmp_path, client):
    """Training keeps the best trial's fitted model rather than fitting it again: a data scientist refitting
    the version's best_* parameters on its training part gets the same probabilities."""
    from tagml.training.models import build_pipeline
    from tagml.training.registry import load_model

    data = binary_set(tmp_path)
    tag = binary_tag(tmp_path, promotion={"metric": "roc_auc_ovr"}, model={"calibration": "none", "trials": 3})
    result = train_tag(tag, data, client, {}, artifact_location=str(tmp_path / "artifacts"), threads=1)
    X_train, y_train = data.part("train")
    refit = build_pipeline("xgboost", result.best_params, ["segment"], ["spend", "visits", "noise"], 2, seed=0, threads=1)
    refit.fit(X_train, (y_train == "yes").astype(int).to_numpy())
    X_test, _ = data.part("test")
    assert np.array_equal(load_model(client, tag.name, result.version).predict_proba(X_test), refit.predict_proba(X_test))
