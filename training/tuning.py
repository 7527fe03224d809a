"""Optuna tuning of one tag: a study optimising its tuning objective on the validation part, one nested MLflow
run per trial, xgboost trials pruned on that same objective."""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
from sklearn.pipeline import Pipeline

from tagml.training.catalog import LOWER_IS_BETTER, TagSpec
from tagml.training.tracking import create_run, log_metrics, log_params, set_tags

if TYPE_CHECKING:
    from tagml.training.train import Fitting


def _suggest(trial: optuna.Trial, tag: TagSpec) -> dict[str, Any]:
    assert tag.model is not None
    params: dict[str, Any] = dict(tag.model.params)
    for name, dim in tag.model.search_space.items():
        if dim.integer:
            params[name] = trial.suggest_int(name, int(dim.low), int(dim.high), log=dim.log)
        else:
            params[name] = trial.suggest_float(name, dim.low, dim.high, log=dim.log)
    return params


@dataclass(frozen=True)
class Tuned:
    params: dict[str, Any]  # the best trial's parameters, with the catalog's fixed ones
    pipeline: Any  # the best trial's model behind the shared preprocessing, fitted on the training part (a refit would repeat it)


def tune(fit: "Fitting", trials: int) -> Tuned:
    """An Optuna study optimising the tag's tuning objective (its promotion metric unless model.objective says
    otherwise) on the validation part, one nested run per trial; the best trial."""
    tag = fit.tag
    assert tag.model is not None
    started = time.perf_counter()
    objective_name = tag.tuning_objective
    prunable = tag.model.family == "xgboost"  # boosting rounds are its steps; a logistic regression has none to report
    # preprocessing does not depend on the tuned parameters: fit it once for every trial
    prepare = fit.pipeline(tag.model.family, tag.model.params).named_steps["prepare"].fit(fit.X_train)
    Xt_train, Xt_valid = prepare.transform(fit.X_train), prepare.transform(fit.X_valid)
    lower_is_better = objective_name in LOWER_IS_BETTER
    best: dict[str, Any] = {}  # the first trial with the best value, as Optuna's best_trial is

    def objective(trial: optuna.Trial) -> float:
        params = _suggest(trial, tag)
        model = fit.pipeline(tag.model.family, params).named_steps["model"]
        fit_kwargs: dict[str, Any] = {"sample_weight": fit.weights}
        if prunable:
            model.set_params(callbacks=[_objective_reporter(trial, fit, Xt_valid, objective_name)])
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
            value = valid[objective_name]
            if "value" not in best or (value < best["value"] if lower_is_better else value > best["value"]):
                best.update(value=value, model=model.set_params(callbacks=None) if prunable else model)
            return value
        except optuna.TrialPruned:
            status, state = "FINISHED", "pruned"
            raise
        finally:
            set_tags(fit.client, trial_id, {"trial_state": state})
            fit.client.set_terminated(trial_id, status)

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # before the study: creating one logs at INFO
    study = optuna.create_study(
        direction="minimize" if lower_is_better else "maximize",
        sampler=optuna.samplers.TPESampler(seed=fit.seed),
        pruner=_pruner(trials) if prunable else optuna.pruners.NopPruner(),
        study_name=f"{tag.name}-{fit.parent_id}",
    )
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
    return Tuned(best_params, Pipeline([("prepare", prepare), ("model", best["model"])]))


def _objective_reporter(trial: optuna.Trial, fit: "Fitting", Xt_valid: Any, objective: str) -> Any:
    """An xgboost callback that reports the trial's own objective on the validation part every PRUNE_EVERY
    rounds, and prunes the trial when the pruner says so. (xgboost's own evaluation log has only log loss:
    an intermediate value of a different metric than the one the study compares is not a valid one.)"""
    from xgboost.callback import TrainingCallback

    class ReportObjective(TrainingCallback):
        def after_iteration(self, model: Any, epoch: int, evals_log: Any) -> bool:
            if (epoch + 1) % PRUNE_EVERY:
                return False
            proba = np.asarray(model.inplace_predict(Xt_valid), dtype="float64")
            if proba.ndim == 1:  # binary:logistic gives the positive class only
                proba = np.column_stack([1 - proba, proba])
            trial.report(fit.valid_objective(proba, objective), epoch + 1)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after {epoch + 1} rounds")
            return False

    return ReportObjective()


PRUNE_EVERY = 10  # boosting rounds between two reports of the objective to the pruner


def _pruner(trials: int) -> optuna.pruners.BasePruner:
    """A median pruner that lets a third of the budget (at least 5 trials) run in full before it compares, and
    judges a trial only after 30 boosting rounds: the old 3 trials / 20 rounds completed 3-6 of 15 trials."""
    return optuna.pruners.MedianPruner(n_startup_trials=max(5, trials // 3), n_warmup_steps=30)
