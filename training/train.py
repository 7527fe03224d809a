"""Train one tag: an Optuna study (one nested MLflow run per trial), a baseline, the best configuration
refit and calibrated, evaluated on the held-out test set, logged and registered as the challenger."""

import json
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.utils.class_weight import compute_sample_weight

from tagml.core.settings import home_relative
from tagml.training.catalog import LOWER_IS_BETTER, TagSpec
from tagml.training.concurrency import mark_stale_runs, owner_tags, training_lock
from tagml.training.dataset import TrainingSet
from tagml.training.evaluate import (
    core_metrics,
    evaluation_slices,
    per_class_metrics,
    plot_calibration,
    plot_confusion,
    plot_importance,
    slice_metrics,
)
from tagml.training.models import build_pipeline
from tagml.training.tracking import (
    LoggedSklearnModel,
    create_run,
    is_local_store,
    is_missing,
    log_metrics,
    log_params,
    log_sklearn_model,
    set_tags,
    tracked_run,
)
from tagml.training.versions import REGISTRATION_COMPLETE, REGISTRATION_PENDING, REGISTRATION_TAG, registered_model_name

PIP_REQUIREMENTS = ["scikit-learn>=1.6,<2", "xgboost>=3.0,<3.3", "pandas>=2.2,<3", "numpy>=2.0,<2.5"]


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
    seconds: dict[str, float] = field(default_factory=dict)
    experiment_id: str = ""


def _encode(y: pd.Series, classes: tuple[str, ...]) -> np.ndarray:
    return y.map({c: i for i, c in enumerate(classes)}).to_numpy()


def _suggest(trial: optuna.Trial, tag: TagSpec) -> dict[str, Any]:
    assert tag.model is not None
    params: dict[str, Any] = dict(tag.model.params)
    for name, dim in tag.model.search_space.items():
        if dim.integer:
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params


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
) -> TrainResult:
    """Tune, fit, calibrate, evaluate, log and register a model for `tag`; the new version becomes `challenger`.

    `slices` are the catalog's slices as drift defines them (tagml.scoring.rules.slice_expressions over the
    training set's features): the test metric is also measured per slice value and logged.
    `artifact_location` applies to local stores only (a server chooses its own artifact store).
    `run_tags` (e.g. the Dagster run id) go on the MLflow runs and the model version. One training of a tag
    runs at a time per store: a second one waits `lock_timeout_seconds`, then fails by name."""
    assert tag.model is not None
    tracking_uri = client.tracking_uri
    with training_lock(tracking_uri, tag.name, lock_dir, lock_timeout_seconds):
        experiment_id = _experiment(client, tag.name, artifact_location if is_local_store(tracking_uri) else None)
        mark_stale_runs(client, experiment_id, local=is_local_store(tracking_uri))
        return _train(client, tag, data, slices, experiment_id, seed, threads, trials, dict(run_tags or {}))


def _experiment(client: MlflowClient, tag: str, artifact_location: str | None) -> str:
    name = f"tagml/{tag}"
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifact_location)


@dataclass
class _Fitting:
    """What every step of one training shares: the data split and encoded, and the MLflow run it logs to."""

    client: MlflowClient
    tag: TagSpec
    data: TrainingSet
    slices: dict[str, str]  # SQL per evaluation slice (tagml.training.evaluate.evaluation_slices)
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
        """The metrics of validation probabilities, as tuning and candidate selection compare them."""
        return core_metrics(self.y_valid, proba_valid, self.n_classes)

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
) -> TrainResult:
    assert tag.model is not None
    with tracked_run(client, experiment_id, f"{tag.name}-train", {**run_tags, **owner_tags()}) as parent_id:
        fit = _Fitting(client, tag, data, evaluation_slices(slices, data.feature_names), experiment_id, parent_id, run_tags, seed, threads)
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
        best_params = tune(fit, trials or tag.model.trials)
        pipeline, model = fit_and_calibrate(fit, best_params)
        proba, metrics, slice_values = evaluate(fit, model)
        baseline_metrics = _baseline(fit) if tag.model.baseline else {}
        started = time.perf_counter()
        _log_evaluation(fit, pipeline, proba, slice_values)
        logged, version = register(fit, model, metrics)
        fit.add_time("logging", started)
        log_metrics(client, parent_id, {f"seconds_{k}": v for k, v in fit.timings.items()})
    return TrainResult(tag.name, parent_id, logged.model_uri, version, metrics, baseline_metrics, best_params, slice_values, fit.timings, experiment_id)


def tune(fit: _Fitting, trials: int) -> dict[str, Any]:
    """An Optuna study optimising the tag's tuning objective (its promotion metric unless model.objective says
    otherwise) on the validation part, one nested run per trial; the best parameters."""
    tag = fit.tag
    assert tag.model is not None
    started = time.perf_counter()
    objective_name = tag.tuning_objective
    # xgboost reports validation log loss while it boosts: a valid intermediate value only when log loss is the objective
    prunable = tag.model.family == "xgboost" and objective_name == "log_loss"
    # preprocessing does not depend on the tuned parameters: fit it once for every trial
    prepare = fit.pipeline(tag.model.family, tag.model.params).named_steps["prepare"].fit(fit.X_train)
    Xt_train, Xt_valid = prepare.transform(fit.X_train), prepare.transform(fit.X_valid)

    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, tag)
        model = fit.pipeline(tag.model.family, params).named_steps["model"]
        fit_kwargs: dict[str, Any] = {"sample_weight": fit.weights}
        if prunable:
            from optuna_integration import XGBoostPruningCallback

            metric = "mlogloss" if fit.n_classes > 2 else "logloss"
            model.set_params(callbacks=[XGBoostPruningCallback(trial, f"validation_0-{metric}")])
            fit_kwargs.update(eval_set=[(Xt_valid, fit.y_valid)], verbose=False)
        # not a `with` block: it would end a pruned trial FAILED, and a pruned trial is a normal outcome
        trial_id = create_run(fit.client, fit.experiment_id, f"trial-{trial.number}", fit.tags_on_runs, parent_run_id=fit.parent_id)
        status, state = "FAILED", "failed"
        try:
            log_params(fit.client, trial_id, params)
            fit_started = time.perf_counter()
            try:
                model.fit(Xt_train, fit.y_train, **fit_kwargs)
                proba_valid = model.predict_proba(Xt_valid)
            finally:
                fit.add_time("model_fit", fit_started)
            valid = fit.valid_metrics(proba_valid)
            log_metrics(fit.client, trial_id, {f"valid_{k}": v for k, v in valid.items()})
            status, state = "FINISHED", "complete"
            return valid[objective_name]
        except optuna.TrialPruned:
            status, state = "FINISHED", "pruned"
            raise
        finally:
            set_tags(fit.client, trial_id, {"trial_state": state})
            fit.client.set_terminated(trial_id, status)

    study = optuna.create_study(
        direction="minimize" if objective_name in LOWER_IS_BETTER else "maximize",
        sampler=optuna.samplers.TPESampler(seed=fit.seed),
        pruner=_pruner(trials) if prunable else optuna.pruners.NopPruner(),
        study_name=f"{tag.name}-{fit.parent_id}",
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=trials, timeout=tag.model.timeout_seconds)
    fit.timings["tuning"] = time.perf_counter() - started
    best_params = {**tag.model.params, **study.best_params}
    log_params(fit.client, fit.parent_id, {"tuning_objective": objective_name, "tuning_pruning": prunable, **{f"best_{k}": v for k, v in best_params.items()}})
    states = [t.state for t in study.trials]
    log_metrics(
        fit.client,
        fit.parent_id,
        {
            f"best_valid_{objective_name}": study.best_value,
            "trials_completed": states.count(optuna.trial.TrialState.COMPLETE),
            "trials_pruned": states.count(optuna.trial.TrialState.PRUNED),
        },
    )
    return best_params


def _pruner(trials: int) -> optuna.pruners.BasePruner:
    """A median pruner that lets a third of the budget (at least 5 trials) run in full before it compares, and
    judges a trial only after 30 boosting rounds, every 10: the old 3 trials / 20 rounds pruned most trials."""
    return optuna.pruners.MedianPruner(n_startup_trials=max(5, trials // 3), n_warmup_steps=30, interval_steps=10)


def fit_and_calibrate(fit: _Fitting, best_params: dict[str, Any]) -> tuple[Any, Any]:
    """(the pipeline refit on the training part with the best parameters, the model to register: the
    pipeline calibrated on the validation part unless the catalog says `calibration: none`)."""
    assert fit.tag.model is not None
    started = time.perf_counter()
    pipeline = fit.pipeline(fit.tag.model.family, best_params)
    fit_started = time.perf_counter()
    pipeline.fit(fit.X_train, fit.y_train, model__sample_weight=fit.weights)
    fit.add_time("model_fit", fit_started)
    model: Any = pipeline
    if fit.tag.model.calibration != "none":
        model = CalibratedClassifierCV(FrozenEstimator(pipeline), method=fit.tag.model.calibration).fit(fit.X_valid, fit.y_valid)
    fit.timings["refit"] = time.perf_counter() - started
    return pipeline, model


def evaluate(fit: _Fitting, model: Any) -> tuple[np.ndarray, dict[str, float], dict[str, float]]:
    """(test probabilities, test metrics, slice metrics) of `model`, logged on the training run."""
    metric = fit.tag.promotion.metric
    proba = model.predict_proba(fit.X_test)
    metrics = {**core_metrics(fit.y_test, proba, fit.n_classes), **per_class_metrics(fit.y_test, proba, fit.tag.classes)}
    slice_values = slice_metrics(fit.X_test, fit.y_test, proba, metric, fit.n_classes, fit.slices)
    metrics["min_slice_" + metric] = min(slice_values.values()) if slice_values else float("nan")
    log_metrics(fit.client, fit.parent_id, {f"test_{k}": v for k, v in metrics.items()})
    log_metrics(fit.client, fit.parent_id, {f"slice_{k.replace('=', '_').replace('<', 'lt').replace('+', 'plus')}": v for k, v in slice_values.items()})
    return proba, metrics, slice_values


def _baseline(fit: _Fitting) -> dict[str, float]:
    """A plain logistic regression on the same split, for comparison (its own nested run)."""
    with tracked_run(fit.client, fit.experiment_id, "baseline-logistic_regression", fit.tags_on_runs, parent_run_id=fit.parent_id) as baseline_id:
        baseline = fit.pipeline("logistic_regression", {})
        baseline.fit(fit.X_train, fit.y_train, model__sample_weight=fit.weights)
        metrics = core_metrics(fit.y_test, baseline.predict_proba(fit.X_test), fit.n_classes)
        log_metrics(fit.client, baseline_id, {f"test_{k}": v for k, v in metrics.items()})
    log_metrics(fit.client, fit.parent_id, {f"baseline_test_{k}": v for k, v in metrics.items()})
    return metrics


def _log_evaluation(fit: _Fitting, pipeline: Any, proba: np.ndarray, slice_values: dict[str, float]) -> None:
    """Plots, the feature list and slice metrics as the run's `evaluation/` artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        plot_confusion(fit.y_test, proba, fit.tag.classes, tmp_path / "confusion_matrix.png")
        plot_calibration(fit.y_test, proba, tmp_path / "calibration_curve.png")
        names = list(pipeline.named_steps["prepare"].get_feature_names_out())
        importance = getattr(pipeline.named_steps["model"], "feature_importances_", None)
        if importance is not None:
            plot_importance(names, np.asarray(importance), tmp_path / "feature_importance.png")
        features = {"features": list(fit.data.feature_names), "categorical": fit.categorical, "classes": list(fit.tag.classes)}
        (tmp_path / "features.json").write_text(json.dumps(features))
        (tmp_path / "slice_metrics.json").write_text(json.dumps(slice_values, indent=2))
        fit.client.log_artifacts(fit.parent_id, tmp, artifact_path="evaluation")


def register(fit: _Fitting, model: Any, metrics: dict[str, float]) -> tuple[LoggedSklearnModel, str]:
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
    version = _register(fit.client, fit.tag, logged.artifact_location, logged.model_id, fit.parent_id, fit.data, metrics, fit.run_tags)
    return logged, version


def model_signature(data: TrainingSet, n_classes: int) -> ModelSignature:
    """Every feature optional (missing values are normal in bank data) and typed as in training:
    text for categorical, double for numeric. Inferring it from a few example rows would mark columns
    required and reject tomorrow's nulls."""
    inputs = Schema([ColSpec("string" if n in data.categorical else "double", n, required=False) for n in data.feature_names])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("float64"), (-1, n_classes))]))


def _register(
    client: MlflowClient, tag: TagSpec, source: str, model_id: str, run_id: str, data: TrainingSet, metrics: dict[str, float], run_tags: dict[str, str]
) -> str:
    name = registered_model_name(tag.name)
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
        client.create_registered_model(name, description=tag.description, tags={"owner": tag.owner, "sensitivity": tag.sensitivity})
    # the source is the logged model's own artifact location with its model id: a server checks the two
    # belong together, and a `models:/m-...` source would make a SQLite store resolve it through
    # MLflow's process-global tracking URI
    version = client.create_model_version(name, source, run_id=run_id, model_id=model_id, tags={REGISTRATION_TAG: REGISTRATION_PENDING}).version
    tags = {
        **run_tags,
        "data_snapshot": home_relative(data.snapshot_path),
        "snapshot_id": data.snapshot_id,
        "feature_list": json.dumps(list(data.feature_names)),
        "feature_types": json.dumps(data.feature_types or {n: ("categorical" if n in data.categorical else "numeric") for n in data.feature_names}),
        "classes": json.dumps(list(tag.classes)),
        "catalog_hash": tag.content_hash(),
        "code_version": code_version(),
        "promotion_metric": tag.promotion.metric,
        f"test_{tag.promotion.metric}": f"{metrics[tag.promotion.metric]:.6f}",
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_model_version_tag(name, version, REGISTRATION_TAG, REGISTRATION_COMPLETE)  # last: everything above is in place
    client.set_registered_model_alias(name, "challenger", version)
    return str(version)
