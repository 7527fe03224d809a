"""Train one tag: an Optuna study (one nested MLflow run per trial), a baseline, the best configuration
refit and calibrated, evaluated on the held-out test set, logged and registered as the challenger."""

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.tracking import MlflowClient
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.pipeline import Pipeline
from sklearn.utils.class_weight import compute_sample_weight

from tagml.settings import home_relative
from training.catalog import TagSpec
from training.dataset import TrainingSet
from training.evaluate import core_metrics, per_class_metrics, plot_calibration, plot_confusion, plot_importance, slice_metrics
from training.models import build_pipeline
from training.tracking import connect_tracking

PIP_REQUIREMENTS = ["scikit-learn>=1.6,<2", "xgboost>=3.0,<3.3", "pandas>=2.2,<3", "numpy>=2.0,<2.5"]


def registered_model_name(tag: str) -> str:
    return f"tagml-{tag}"


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
    tracking_uri: str,
    artifact_location: str | None = None,
    seed: int = 0,
    threads: int = 1,
    trials: int | None = None,
) -> TrainResult:
    """Tune, fit, calibrate, evaluate, log and register a model for `tag`; the new version becomes `challenger`."""
    assert tag.model is not None
    client = connect_tracking(tracking_uri)
    experiment_name = f"tagml/{tag.name}"
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name, artifact_location=artifact_location)

    classes, n_classes = tag.classes, len(tag.classes)
    categorical = list(data.categorical)
    numeric = [n for n in data.feature_names if n not in data.categorical]
    X_train, y_train = data.part("train")
    X_valid, y_valid = data.part("valid")
    X_test, y_test = data.part("test")
    y_train, y_valid, y_test = (_encode(y, classes) for y in (y_train, y_valid, y_test))
    weights = compute_sample_weight("balanced", y_train) if tag.model.class_weight == "balanced" else None
    timings: dict[str, float] = {}

    with mlflow.start_run(experiment_id=experiment_id, run_name=f"{tag.name}-train") as parent:
        mlflow.set_tags({"tag": tag.name, "catalog_hash": tag.content_hash(), "code_version": code_version(), "data_snapshot": data.snapshot_id})
        mlflow.log_params({"family": tag.model.family, "train_rows": len(X_train), "valid_rows": len(X_valid), "test_rows": len(X_test), "n_features": len(data.feature_names), "seed": seed})

        started = time.perf_counter()
        # preprocessing does not depend on the tuned parameters: fit it once for every trial
        base = build_pipeline(tag.model.family, tag.model.params, categorical, numeric, n_classes, seed, threads)
        prepare = base.named_steps["prepare"].fit(X_train)
        Xt_train, Xt_valid = prepare.transform(X_train), prepare.transform(X_valid)

        def objective(trial: optuna.Trial) -> float:
            params = _suggest(trial, tag)
            model = build_pipeline(tag.model.family, params, categorical, numeric, n_classes, seed, threads).named_steps["model"]
            fit_kwargs: dict[str, Any] = {"sample_weight": weights}
            if tag.model.family == "xgboost":
                from optuna_integration import XGBoostPruningCallback

                metric = "mlogloss" if n_classes > 2 else "logloss"
                model.set_params(callbacks=[XGBoostPruningCallback(trial, f"validation_0-{metric}")])
                fit_kwargs.update(eval_set=[(Xt_valid, y_valid)], verbose=False)
            with mlflow.start_run(experiment_id=experiment_id, run_name=f"trial-{trial.number}", nested=True):
                mlflow.log_params(params)
                fit_started = time.perf_counter()
                try:
                    model.fit(Xt_train, y_train, **fit_kwargs)
                    proba_valid = model.predict_proba(Xt_valid)
                finally:
                    timings["model_fit"] = timings.get("model_fit", 0.0) + time.perf_counter() - fit_started
                valid = core_metrics(y_valid, proba_valid, n_classes)
                mlflow.log_metrics({f"valid_{k}": v for k, v in valid.items()})
            return valid["log_loss"]

        sampler = optuna.samplers.TPESampler(seed=seed)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=20)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner, study_name=f"{tag.name}-{parent.info.run_id}")
        study.optimize(objective, n_trials=trials or tag.model.trials, timeout=tag.model.timeout_seconds)
        timings["tuning"] = time.perf_counter() - started
        best_params = {**tag.model.params, **study.best_params}
        mlflow.log_params({f"best_{k}": v for k, v in best_params.items()})
        mlflow.log_metric("trials_completed", len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]))

        started = time.perf_counter()
        pipeline = build_pipeline(tag.model.family, best_params, categorical, numeric, n_classes, seed, threads)
        fit_started = time.perf_counter()
        pipeline.fit(X_train, y_train, model__sample_weight=weights)
        timings["model_fit"] = timings.get("model_fit", 0.0) + time.perf_counter() - fit_started
        model: Any = pipeline
        if tag.model.calibration != "none":
            model = CalibratedClassifierCV(FrozenEstimator(pipeline), method=tag.model.calibration).fit(X_valid, y_valid)
        timings["refit"] = time.perf_counter() - started
        proba = model.predict_proba(X_test)
        metrics = {**core_metrics(y_test, proba, n_classes), **per_class_metrics(y_test, proba, classes)}
        slice_values = slice_metrics(X_test, y_test, proba, tag.promotion.metric, n_classes)
        metrics["min_slice_" + tag.promotion.metric] = min(slice_values.values()) if slice_values else float("nan")
        mlflow.log_metrics({f"test_{k}": v for k, v in metrics.items()})
        mlflow.log_metrics({f"slice_{k.replace('=', '_').replace('<', 'lt').replace('+', 'plus')}": v for k, v in slice_values.items()})

        baseline_metrics: dict[str, float] = {}
        if tag.model.baseline:
            with mlflow.start_run(experiment_id=experiment_id, run_name="baseline-logistic_regression", nested=True):
                baseline = build_pipeline("logistic_regression", {}, categorical, numeric, n_classes, seed, threads)
                baseline.fit(X_train, y_train, model__sample_weight=weights)
                baseline_metrics = core_metrics(y_test, baseline.predict_proba(X_test), n_classes)
                mlflow.log_metrics({f"test_{k}": v for k, v in baseline_metrics.items()})
            mlflow.log_metrics({f"baseline_test_{k}": v for k, v in baseline_metrics.items()})

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp)
            plot_confusion(y_test, proba, classes, tmp_path / "confusion_matrix.png")
            plot_calibration(y_test, proba, tmp_path / "calibration_curve.png")
            names = list(pipeline.named_steps["prepare"].get_feature_names_out())
            importance = getattr(pipeline.named_steps["model"], "feature_importances_", None)
            if importance is not None:
                plot_importance(names, np.asarray(importance), tmp_path / "feature_importance.png")
            (tmp_path / "features.json").write_text(json.dumps({"features": list(data.feature_names), "categorical": categorical, "classes": list(classes)}))
            (tmp_path / "slice_metrics.json").write_text(json.dumps(slice_values, indent=2))
            mlflow.log_artifacts(tmp, artifact_path="evaluation")

        example = X_test.head(5)  # features only: no customer ids or PII reach MLflow
        signature = model_signature(data, n_classes)
        logged = mlflow.sklearn.log_model(
            model,
            name="model",
            signature=signature,
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
            serialization_format="cloudpickle",
            pyfunc_predict_fn="predict_proba",
        )
        version = _register(client, tag, logged.model_uri, parent.info.run_id, data, metrics)
        timings["logging"] = time.perf_counter() - started
        mlflow.log_metrics({f"seconds_{k}": v for k, v in timings.items()})
    return TrainResult(tag.name, parent.info.run_id, logged.model_uri, version, metrics, baseline_metrics, best_params, slice_values, timings)


def model_signature(data: TrainingSet, n_classes: int) -> ModelSignature:
    """Every feature optional (missing values are normal in bank data) and typed as in training:
    text for categorical, double for numeric. Inferring it from a few example rows would mark columns
    required and reject tomorrow's nulls."""
    inputs = Schema([ColSpec("string" if n in data.categorical else "double", n, required=False) for n in data.feature_names])
    return ModelSignature(inputs=inputs, outputs=Schema([TensorSpec(np.dtype("float64"), (-1, n_classes))]))


def _register(client: MlflowClient, tag: TagSpec, model_uri: str, run_id: str, data: TrainingSet, metrics: dict[str, float]) -> str:
    name = registered_model_name(tag.name)
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description=tag.description, tags={"owner": tag.owner, "sensitivity": tag.sensitivity})
    version = client.create_model_version(name, model_uri, run_id=run_id).version
    tags = {
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
    client.set_registered_model_alias(name, "challenger", version)
    return str(version)
