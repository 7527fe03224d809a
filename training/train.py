"""Train one tag: an Optuna study (one nested MLflow run per trial), a baseline, the best configuration
refit and calibrated, evaluated on the held-out test set, logged and registered as the challenger."""

import json
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.utils.class_weight import compute_sample_weight

from tagml.training.catalog import LOWER_IS_BETTER, TagSpec
from tagml.training.concurrency import mark_stale_runs, owner_tags, training_lock
from tagml.training.dataset import TrainingSet
from tagml.training.evaluate import (
    DecisionError,
    choose_threshold,
    core_metrics,
    decision_shortfall,
    evaluation_slices,
    improvement_interval,
    metric_value,
    per_class_metrics,
    plot_calibration,
    plot_confusion,
    plot_importance,
    slice_metric_name,
    slice_metrics,
)
from tagml.training.model_card import log_model_card, record_evidence
from tagml.training.models import build_pipeline
from tagml.training.registration import PIP_REQUIREMENTS, code_version, model_signature, register_version
from tagml.training.tracking import (
    LoggedSklearnModel,
    is_local_store,
    log_metrics,
    log_params,
    log_sklearn_model,
    set_tags,
    tracked_run,
)
from tagml.training.tuning import tune
from tagml.training.versions import BASELINE_COMPARISON_TAG, DECISION_THRESHOLD_TAG


@dataclass
class TrainResult:
    tag: str
    run_id: str
    model_uri: str
    version: str
    metrics: dict[str, float]
    baseline_metrics: dict[str, float]
    best_params: dict[str, Any]
    slice_metrics: dict[str, float]
    family: str  # the family registered: the tuned one, or the baseline's when it scored better on validation
    decision_threshold: float | None  # a binary tag's threshold (DecisionSpec), None for argmax
    seconds: dict[str, float] = field(default_factory=dict)
    experiment_id: str = ""


def _encode(y: pd.Series, classes: tuple[str, ...]) -> np.ndarray:
    return y.map({c: i for i, c in enumerate(classes)}).to_numpy()


def train_tag(
    tag: TagSpec,
    data: TrainingSet,
    client: MlflowClient,
    slices: Mapping[str, str],
    artifact_location: str | None = None,
    seed: int = 0,
    threads: int = 1,
    trials: int | None = None,
    run_tags: Mapping[str, str] | None = None,
    lock_dir: Path | None = None,
    lock_timeout_seconds: float = 0,
    demographics: pd.DataFrame | None = None,
) -> TrainResult:
    """Tune, fit, calibrate, evaluate, log and register a model for `tag`; the new version becomes `challenger`.

    `slices` are the catalog's slices as drift defines them (tagml.scoring.rules.slice_expressions over the
    training set's features): the test metric is also measured per slice value and logged.
    `artifact_location` applies to local stores only (a server chooses its own artifact store).
    `run_tags` (e.g. the Dagster run id) go on the MLflow runs and the model version. One training of a tag
    runs at a time per store: a second one waits `lock_timeout_seconds`, then fails by name. `demographics`
    (tagml.training.fairness.load_demographics) gives the fairness slices their gender and birth date; the version's
    model card is logged with it (tagml.training.model_card)."""
    assert tag.model is not None
    tracking_uri = client.tracking_uri
    with training_lock(tracking_uri, tag.name, lock_dir, lock_timeout_seconds):
        experiment_id = _experiment(client, tag.name, artifact_location if is_local_store(tracking_uri) else None)
        mark_stale_runs(client, experiment_id, local=is_local_store(tracking_uri))
        return _train(client, tag, data, slices, experiment_id, seed, threads, trials, dict(run_tags or {}), demographics)


def _experiment(client: MlflowClient, tag: str, artifact_location: str | None) -> str:
    name = f"tagml/{tag}"
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifact_location)


@dataclass
class Fitting:
    """What every step of one training shares: the data split and encoded, and the MLflow run it logs to."""

    client: MlflowClient
    tag: TagSpec
    data: TrainingSet
    slices: dict[str, str]  # SQL per evaluation slice (tagml.training.evaluate.evaluation_slices)
    catalog_slices: list[str]  # the names of the tag's slices (tagml.training.evaluate.slice_sources), recorded on the version
    experiment_id: str
    parent_id: str
    run_tags: dict[str, str]  # the caller's (e.g. the Dagster run id): on every run and on the version
    seed: int
    threads: int
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.tag.model is not None
        # which process owns the runs: a later training marks the runs of a process that is gone KILLED
        self.tags_on_runs = {**self.run_tags, **owner_tags()}
        classes = self.tag.classes
        self.categorical = list(self.data.categorical)
        self.numeric = [n for n in self.data.feature_names if n not in self.data.categorical]
        (self.X_train, y_train), (self.X_valid, y_valid), (self.X_test, y_test) = (self.data.part(p) for p in ("train", "valid", "test"))
        self.y_train, self.y_valid, self.y_test = (_encode(y, classes) for y in (y_train, y_valid, y_test))
        self.weights = compute_sample_weight("balanced", self.y_train) if self.tag.model.class_weight == "balanced" else None

    @property
    def n_classes(self) -> int:
        return len(self.tag.classes)

    def pipeline(self, family: str, params: dict[str, Any]) -> Any:
        return build_pipeline(family, params, self.categorical, self.numeric, self.n_classes, self.seed, self.threads)

    def valid_metrics(self, proba_valid: np.ndarray) -> dict[str, float]:
        """The metrics of validation probabilities, as tuning and candidate selection compare them: a binary tag's
        decisions at the threshold its decision policy chooses on these very probabilities."""
        return core_metrics(self.y_valid, proba_valid, self.n_classes, choose_threshold(self.tag.decision, self.y_valid, proba_valid))

    def valid_objective(self, proba_valid: np.ndarray, metric: str) -> float:
        return metric_value(self.y_valid, proba_valid, self.n_classes, metric, choose_threshold(self.tag.decision, self.y_valid, proba_valid))

    def decision_threshold(self, model: Any) -> float | None:
        """The registered model's threshold, chosen on the validation part; DecisionError when its target is out of reach."""
        proba = model.predict_proba(self.X_valid)
        threshold = choose_threshold(self.tag.decision, self.y_valid, proba)
        shortfall = decision_shortfall(self.tag.decision, self.y_valid, proba, threshold)
        if shortfall:
            raise DecisionError(f"tag {self.tag.name!r}: {shortfall}; lower the target or use another policy (nothing was registered)")
        return threshold

    def add_time(self, key: str, started: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - started


def _train(
    client: MlflowClient,
    tag: TagSpec,
    data: TrainingSet,
    slices: Mapping[str, str],
    experiment_id: str,
    seed: int,
    threads: int,
    trials: int | None,
    run_tags: dict[str, str],
    demographics: pd.DataFrame | None,
) -> TrainResult:
    assert tag.model is not None
    with tracked_run(client, experiment_id, f"{tag.name}-train", {**run_tags, **owner_tags()}) as parent_id:
        fit = Fitting(client, tag, data, evaluation_slices(slices, data.feature_names), list(slices), experiment_id, parent_id, run_tags, seed, threads)
        set_tags(client, parent_id, {"tag": tag.name, "catalog_hash": tag.content_hash(), "code_version": code_version(), "data_snapshot": data.snapshot_id})
        log_params(
            client,
            parent_id,
            {
                "family": tag.model.family,
                "train_rows": len(fit.X_train),
                "valid_rows": len(fit.X_valid),
                "test_rows": len(fit.X_test),
                "n_features": len(data.feature_names),
                "seed": seed,
            },
        )
        best = tune(fit, trials or tag.model.trials)
        tuned = Candidate(tag.model.family, "tuned", best.pipeline, fit.valid_metrics(best.pipeline.predict_proba(fit.X_valid)))
        baseline, baseline_metrics = _baseline(fit) if tag.model.baseline else (None, {})
        chosen = select_candidate(fit, tuned, baseline)
        model = calibrate(fit, chosen.pipeline)
        threshold = fit.decision_threshold(model)
        proba, metrics, slice_values = evaluate(fit, model, threshold)
        against_baseline = _against_baseline(fit, proba, threshold, baseline) if baseline is not None and chosen is not baseline else None
        started = time.perf_counter()
        _log_evaluation(fit, chosen.pipeline, proba, slice_values, threshold)
        evidence_started = time.perf_counter()
        record_evidence(fit, proba, threshold, {"seed": seed, "threads": threads, "trials": trials or tag.model.trials, "slices": dict(slices)}, demographics)
        fit.add_time("evidence", evidence_started)
        logged, version = register(fit, model, metrics, chosen, baseline_metrics, threshold, against_baseline)
        fit.add_time("logging", started)
        started = time.perf_counter()
        log_model_card(client, tag.name, version)
        fit.add_time("model_card", started)
        log_metrics(client, parent_id, {f"seconds_{k}": v for k, v in fit.timings.items()})
    return TrainResult(
        tag.name,
        parent_id,
        logged.model_uri,
        version,
        metrics,
        baseline_metrics,
        best.params,
        slice_values,
        chosen.family,
        threshold,
        fit.timings,
        experiment_id,
    )


@dataclass(frozen=True)
class Candidate:
    """A model family fitted on the training part, with its metrics on the validation part (before calibration)."""

    family: str
    role: str  # "tuned" (the study's best configuration) or "baseline" (the catalog's model.baseline)
    pipeline: Any
    valid: dict[str, float]
    selection: dict[str, Any] = field(default_factory=dict)  # how it was chosen: the metric and each candidate's validation score


def fit_candidate(fit: Fitting, family: str, params: dict[str, Any], role: str) -> Candidate:
    """`family` with `params` fitted on the training part."""
    started = time.perf_counter()
    pipeline = fit.pipeline(family, params)
    pipeline.fit(fit.X_train, fit.y_train, model__sample_weight=fit.weights)
    fit.add_time("model_fit", started)
    fit.add_time("refit", started)
    return Candidate(family, role, pipeline, fit.valid_metrics(pipeline.predict_proba(fit.X_valid)))


def select_candidate(fit: Fitting, tuned: Candidate, baseline: Candidate | None) -> Candidate:
    """The tuned model, unless the baseline scores better at the promotion metric on the VALIDATION part (the test
    part stays for the gate): a tuned model that cannot beat a logistic regression is not the one to register."""
    metric = fit.tag.promotion.metric
    chosen = tuned
    if baseline is not None and _strictly_better(metric, baseline.valid[metric], tuned.valid[metric]):
        chosen = baseline
    scores = {c.role: c.valid[metric] for c in (tuned, baseline) if c is not None}
    log_params(fit.client, fit.parent_id, {"chosen_family": chosen.family, "chosen_candidate": chosen.role})
    log_metrics(fit.client, fit.parent_id, {f"valid_{metric}_{role}": v for role, v in scores.items()})
    return replace(chosen, selection={"metric": metric, "valid": scores, "chosen": chosen.role, "family": chosen.family})


def _strictly_better(metric: str, value: float, than: float) -> bool:
    return value < than if metric in LOWER_IS_BETTER else value > than


def calibrate(fit: Fitting, pipeline: Any) -> Any:
    """The model to register: `pipeline` calibrated on the validation part unless the catalog says `calibration: none`."""
    assert fit.tag.model is not None
    if fit.tag.model.calibration == "none":
        return pipeline
    started = time.perf_counter()
    model = CalibratedClassifierCV(FrozenEstimator(pipeline), method=fit.tag.model.calibration).fit(fit.X_valid, fit.y_valid)
    fit.add_time("refit", started)
    return model


def evaluate(fit: Fitting, model: Any, threshold: float | None) -> tuple[np.ndarray, dict[str, float], dict[str, float]]:
    """(test probabilities, test metrics, slice metrics) of `model` deciding at `threshold`, logged on the training run."""
    metric = fit.tag.promotion.metric
    proba = model.predict_proba(fit.X_test)
    metrics = {**core_metrics(fit.y_test, proba, fit.n_classes, threshold), **per_class_metrics(fit.y_test, proba, fit.tag.classes, threshold)}
    slice_values = slice_metrics(fit.X_test, fit.y_test, proba, metric, fit.n_classes, fit.slices, threshold)
    metrics["min_slice_" + metric] = min(slice_values.values()) if slice_values else float("nan")
    log_metrics(fit.client, fit.parent_id, {f"test_{k}": v for k, v in metrics.items()})
    log_metrics(fit.client, fit.parent_id, {slice_metric_name(k): v for k, v in slice_values.items()})
    return proba, metrics, slice_values


def _baseline(fit: Fitting) -> tuple[Candidate, dict[str, float]]:
    """A plain logistic regression on the same split, in its own nested run: a candidate for registration
    and the bar the gate holds the registered model to on the test part."""
    with tracked_run(fit.client, fit.experiment_id, "baseline-logistic_regression", fit.tags_on_runs, parent_run_id=fit.parent_id) as baseline_id:
        baseline = fit_candidate(fit, "logistic_regression", {}, "baseline")
        test = core_metrics(fit.y_test, baseline.pipeline.predict_proba(fit.X_test), fit.n_classes)
        log_metrics(fit.client, baseline_id, {**{f"valid_{k}": v for k, v in baseline.valid.items()}, **{f"test_{k}": v for k, v in test.items()}})
    log_metrics(fit.client, fit.parent_id, {f"baseline_test_{k}": v for k, v in test.items()})
    return baseline, test


def _against_baseline(fit: Fitting, proba: np.ndarray, threshold: float | None, baseline: Candidate) -> dict[str, float]:
    """The registered model's improvement over the baseline on the test part, with its paired bootstrap interval
    (the baseline scored as its recorded test metric was: uncalibrated, most probable class)."""
    metric = fit.tag.promotion.metric
    comparison = improvement_interval(fit.y_test, proba, baseline.pipeline.predict_proba(fit.X_test), fit.n_classes, metric, threshold, fit.seed)
    log_metrics(fit.client, fit.parent_id, {f"test_{metric}_over_baseline": comparison["improvement"]})
    return comparison


def _log_evaluation(fit: Fitting, pipeline: Any, proba: np.ndarray, slice_values: dict[str, float], threshold: float | None) -> None:
    """Plots, the feature list and slice metrics as the run's `evaluation/` artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        plot_confusion(fit.y_test, proba, fit.tag.classes, tmp_path / "confusion_matrix.png", threshold)
        plot_calibration(fit.y_test, proba, tmp_path / "calibration_curve.png")
        names = list(pipeline.named_steps["prepare"].get_feature_names_out())
        importance = getattr(pipeline.named_steps["model"], "feature_importances_", None)
        if importance is not None:
            plot_importance(names, np.asarray(importance), tmp_path / "feature_importance.png")
        features = {"features": list(fit.data.feature_names), "categorical": fit.categorical, "classes": list(fit.tag.classes)}
        (tmp_path / "features.json").write_text(json.dumps(features))
        (tmp_path / "columns.json").write_text(json.dumps(fit.data.audit.as_dict(), ensure_ascii=False, indent=1))  # names and reasons only
        (tmp_path / "slice_metrics.json").write_text(json.dumps(slice_values, indent=2))
        fit.client.log_artifacts(fit.parent_id, tmp, artifact_path="evaluation")


def register(
    fit: Fitting,
    model: Any,
    metrics: dict[str, float],
    chosen: Candidate,
    baseline_test: dict[str, float],
    threshold: float | None,
    against_baseline: dict[str, float] | None = None,
) -> tuple[LoggedSklearnModel, str]:
    """Log `model` on the training run and register it as the tag's new challenger version."""
    logged = log_sklearn_model(
        fit.client,
        fit.experiment_id,
        fit.parent_id,
        model,
        signature=model_signature(fit.data, fit.n_classes),
        input_example=fit.X_test.head(5),  # features only: no customer ids or PII reach MLflow
        pip_requirements=PIP_REQUIREMENTS,
        serialization_format="cloudpickle",
        pyfunc_predict_fn="predict_proba",
    )
    metric = fit.tag.promotion.metric
    selection = {
        "model_family": chosen.family,
        "model_candidate": chosen.role,
        "candidate_selection": json.dumps(chosen.selection),
        "slices": json.dumps(fit.catalog_slices),  # what the gate and drift slice this version by
        "decision_policy": fit.tag.decision.policy,
    }
    if threshold is not None:
        selection[DECISION_THRESHOLD_TAG] = repr(threshold)
    if baseline_test:
        selection[f"baseline_test_{metric}"] = f"{baseline_test[metric]:.6f}"
    if against_baseline is not None:
        selection[BASELINE_COMPARISON_TAG] = json.dumps(against_baseline)
    version = register_version(fit.client, fit.tag, logged.artifact_location, logged.model_id, fit.parent_id, fit.data, metrics, {**fit.run_tags, **selection})
    return logged, version
