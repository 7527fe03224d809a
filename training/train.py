"""Train one tag: an Optuna study (one nested MLflow run per trial), a baseline, the best configuration
refit and calibrated, evaluated on the held-out test set, logged and registered as the challenger."""

import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from filelock import FileLock, Timeout
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec
from sklearn.calibration import CalibratedClassifierCV
from sklearn.frozen import FrozenEstimator
from sklearn.utils.class_weight import compute_sample_weight

from tagml.core.settings import home_relative
from training.catalog import TagSpec
from training.dataset import TrainingSet
from training.evaluate import (
    core_metrics,
    per_class_metrics,
    plot_calibration,
    plot_confusion,
    plot_importance,
    slice_metrics,
)
from training.models import build_pipeline
from training.tracking import create_run, is_local_store, is_missing, log_metrics, log_params, log_sklearn_model, set_tags, sqlite_path, tracked_run
from training.versions import REGISTRATION_COMPLETE, REGISTRATION_PENDING, REGISTRATION_TAG, registered_model_name

PIP_REQUIREMENTS = ["scikit-learn>=1.6,<2", "xgboost>=3.0,<3.3", "pandas>=2.2,<3", "numpy>=2.0,<2.5"]

# which process owns a run: a later training marks the runs of a process that is gone as KILLED
OWNER_PID, OWNER_HOST = "tagml.pid", "tagml.host"


class TrainingInProgressError(RuntimeError):
    """Another training of the same tag holds the tag's training lock on this store; nothing was logged."""


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
    artifact_location: str | None = None,
    seed: int = 0,
    threads: int = 1,
    trials: int | None = None,
    run_tags: Mapping[str, str] | None = None,
    lock_dir: Path | None = None,
    lock_timeout_seconds: float = 0,
) -> TrainResult:
    """Tune, fit, calibrate, evaluate, log and register a model for `tag`; the new version becomes `challenger`.

    `artifact_location` applies to local stores only (a server chooses its own artifact store).
    `run_tags` (e.g. the Dagster run id) go on the MLflow runs and the model version. One training of a tag
    runs at a time per store: a second one waits `lock_timeout_seconds`, then fails by name."""
    assert tag.model is not None
    tracking_uri = client.tracking_uri
    with training_lock(tracking_uri, tag.name, lock_dir, lock_timeout_seconds):
        experiment_id = _experiment(client, tag.name, artifact_location if is_local_store(tracking_uri) else None)
        mark_stale_runs(client, experiment_id, local=is_local_store(tracking_uri))
        return _train(client, tag, data, experiment_id, seed, threads, trials, dict(run_tags or {}))


def training_lock_path(tracking_uri: str, tag: str, lock_dir: Path | None = None) -> Path:
    """The lock file serialising trainings of `tag`: next to a SQLite store, else under `lock_dir` or the
    temp dir (for a server this serialises the trainings started on this machine)."""
    db = sqlite_path(tracking_uri)
    if lock_dir is None:
        lock_dir = db.parent if db is not None else Path(tempfile.gettempdir()) / "tagml-locks"
    stem = db.name if db is not None else "".join(c if c.isalnum() else "_" for c in tracking_uri)
    return Path(lock_dir) / f"{stem}.train-{tag}.lock"


@contextmanager
def training_lock(tracking_uri: str, tag: str, lock_dir: Path | None = None, timeout_seconds: float = 0) -> Iterator[Path]:
    """Hold the tag's training lock (released by the OS if the holder is killed)."""
    path = training_lock_path(tracking_uri, tag, lock_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout_seconds)
    except Timeout:
        raise TrainingInProgressError(
            f"another training of tag {tag!r} is running on this MLflow store (lock {path}); "
            "wait for it to finish or stop it, then train again"
        ) from None
    try:
        yield path
    finally:
        lock.release()


def _experiment(client: MlflowClient, tag: str, artifact_location: str | None) -> str:
    name = f"tagml/{tag}"
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name, artifact_location=artifact_location)


def _owner_tags() -> dict[str, str]:
    return {OWNER_PID: str(os.getpid()), OWNER_HOST: socket.gethostname()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def mark_stale_runs(client: MlflowClient, experiment_id: str, local: bool) -> list[str]:
    """Set KILLED the runs of the experiment left RUNNING by a process that is gone (SIGKILL, OOM, power).

    Called while holding the tag's training lock, so no live training of this tag on this host owns a
    RUNNING run. A run records its owner's pid and host: it is stale when the host is this one and the
    pid is gone. Runs without owner tags (older ones) are stale only on a local store, where every
    writer shares this lock."""
    host, stale = socket.gethostname(), []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        pid, owner_host = run.data.tags.get(OWNER_PID), run.data.tags.get(OWNER_HOST)
        if pid and owner_host:
            if owner_host != host or (int(pid) != os.getpid() and _alive(int(pid))):
                continue
        elif not local:
            continue
        client.set_tag(run.info.run_id, "tagml.stale", "its process ended without closing it; marked KILLED by a later training")
        client.set_terminated(run.info.run_id, "KILLED")
        stale.append(run.info.run_id)
    return stale


def _train(
    client: MlflowClient, tag: TagSpec, data: TrainingSet, experiment_id: str, seed: int, threads: int, trials: int | None, run_tags: dict[str, str]
) -> TrainResult:
    assert tag.model is not None

    classes, n_classes = tag.classes, len(tag.classes)
    categorical = list(data.categorical)
    numeric = [n for n in data.feature_names if n not in data.categorical]
    X_train, y_train = data.part("train")
    X_valid, y_valid = data.part("valid")
    X_test, y_test = data.part("test")
    y_train, y_valid, y_test = (_encode(y, classes) for y in (y_train, y_valid, y_test))
    weights = compute_sample_weight("balanced", y_train) if tag.model.class_weight == "balanced" else None
    timings: dict[str, float] = {}

    owner = _owner_tags()
    with tracked_run(client, experiment_id, f"{tag.name}-train", {**run_tags, **owner}) as parent_id:
        set_tags(client, parent_id, {"tag": tag.name, "catalog_hash": tag.content_hash(), "code_version": code_version(), "data_snapshot": data.snapshot_id})
        log_params(client, parent_id, {"family": tag.model.family, "train_rows": len(X_train), "valid_rows": len(X_valid), "test_rows": len(X_test), "n_features": len(data.feature_names), "seed": seed})

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
            # not a `with` block: it would end a pruned trial FAILED, and a pruned trial is a normal outcome
            trial_id = create_run(client, experiment_id, f"trial-{trial.number}", {**run_tags, **owner}, parent_run_id=parent_id)
            status, state = "FAILED", "failed"
            try:
                log_params(client, trial_id, params)
                fit_started = time.perf_counter()
                try:
                    model.fit(Xt_train, y_train, **fit_kwargs)
                    proba_valid = model.predict_proba(Xt_valid)
                finally:
                    timings["model_fit"] = timings.get("model_fit", 0.0) + time.perf_counter() - fit_started
                valid = core_metrics(y_valid, proba_valid, n_classes)
                log_metrics(client, trial_id, {f"valid_{k}": v for k, v in valid.items()})
                status, state = "FINISHED", "complete"
                return valid["log_loss"]
            except optuna.TrialPruned:
                status, state = "FINISHED", "pruned"
                raise
            finally:
                set_tags(client, trial_id, {"trial_state": state})
                client.set_terminated(trial_id, status)

        sampler = optuna.samplers.TPESampler(seed=seed)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=20)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner, study_name=f"{tag.name}-{parent_id}")
        study.optimize(objective, n_trials=trials or tag.model.trials, timeout=tag.model.timeout_seconds)
        timings["tuning"] = time.perf_counter() - started
        best_params = {**tag.model.params, **study.best_params}
        log_params(client, parent_id, {f"best_{k}": v for k, v in best_params.items()})
        log_metrics(client, parent_id, {
            "trials_completed": len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]),
            "trials_pruned": len([t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]),
        })

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
        log_metrics(client, parent_id, {f"test_{k}": v for k, v in metrics.items()})
        log_metrics(client, parent_id, {f"slice_{k.replace('=', '_').replace('<', 'lt').replace('+', 'plus')}": v for k, v in slice_values.items()})

        baseline_metrics: dict[str, float] = {}
        if tag.model.baseline:
            with tracked_run(client, experiment_id, "baseline-logistic_regression", {**run_tags, **owner}, parent_run_id=parent_id) as baseline_id:
                baseline = build_pipeline("logistic_regression", {}, categorical, numeric, n_classes, seed, threads)
                baseline.fit(X_train, y_train, model__sample_weight=weights)
                baseline_metrics = core_metrics(y_test, baseline.predict_proba(X_test), n_classes)
                log_metrics(client, baseline_id, {f"test_{k}": v for k, v in baseline_metrics.items()})
            log_metrics(client, parent_id, {f"baseline_test_{k}": v for k, v in baseline_metrics.items()})

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
            client.log_artifacts(parent_id, tmp, artifact_path="evaluation")

        example = X_test.head(5)  # features only: no customer ids or PII reach MLflow
        signature = model_signature(data, n_classes)
        logged = log_sklearn_model(
            client,
            experiment_id,
            parent_id,
            model,
            signature=signature,
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
            serialization_format="cloudpickle",
            pyfunc_predict_fn="predict_proba",
        )
        version = _register(client, tag, logged.artifact_location, logged.model_id, parent_id, data, metrics, run_tags)
        timings["logging"] = time.perf_counter() - started
        log_metrics(client, parent_id, {f"seconds_{k}": v for k, v in timings.items()})
    return TrainResult(tag.name, parent_id, logged.model_uri, version, metrics, baseline_metrics, best_params, slice_values, timings, experiment_id)


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
