"""Champion/challenger registry on MLflow aliases: the promotion gate, manual promotion and rollback.

Every decision is recorded twice: as tags on the model version (`gate.*`) and in the registered
model's `champion_history` tag (JSON list), which is what `rollback` walks back through.
"""

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tagml.settings import resolve_home_path
from training.catalog import TagSpec
from training.dataset import TrainingSet
from training.evaluate import core_metrics, slice_metrics
from training.train import registered_model_name

CHAMPION, CHALLENGER = "champion", "challenger"
LOWER_IS_BETTER = {"log_loss"}


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (named model, version or alias)."""


@dataclass
class GateDecision:
    tag: str
    challenger_version: str
    champion_version: str | None
    promoted: bool
    reasons: list[str]
    metric: str
    challenger_metric: float
    champion_metric: float | None
    checks: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT promoted"
        return f"{self.tag} v{self.challenger_version} {verdict}: " + "; ".join(self.reasons)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def champion_version(client: MlflowClient, tag: str) -> str | None:
    """The version behind the `champion` alias, or None when the tag has no champion yet."""
    try:
        return str(client.get_model_version_by_alias(registered_model_name(tag), CHAMPION).version)
    except MlflowException:
        return None


def load_model(tag: str, version: str) -> Any:
    return mlflow.sklearn.load_model(f"models:/{registered_model_name(tag)}/{version}")


def _history(client: MlflowClient, tag: str) -> list[dict[str, Any]]:
    model = client.get_registered_model(registered_model_name(tag))
    return json.loads(model.tags.get("champion_history", "[]"))


def _set_champion(client: MlflowClient, tag: str, version: str, by: str, reason: str) -> None:
    name = registered_model_name(tag)
    history = _history(client, tag)
    history.append({"version": str(version), "at": _now(), "by": by, "reason": reason})
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, "champion_history", json.dumps(history))
    client.set_model_version_tag(name, str(version), "champion_since", history[-1]["at"])


def _better(metric: str, challenger: float, champion: float, margin: float) -> bool:
    if metric in LOWER_IS_BETTER:
        return challenger <= champion - margin
    return challenger >= champion + margin


def evaluate_gate(client: MlflowClient, tag: TagSpec, challenger: str, data: TrainingSet) -> GateDecision:
    """Decide whether `challenger` should become champion, on the challenger's held-out test set."""
    X_test, y_test = data.part("test")
    y = y_test.map({c: i for i, c in enumerate(tag.classes)}).to_numpy()
    n_classes, metric, rules = len(tag.classes), tag.promotion.metric, tag.promotion
    proba = load_model(tag.name, challenger).predict_proba(X_test)
    scores = core_metrics(y, proba, n_classes)
    slices = slice_metrics(X_test, y, proba, metric, n_classes)
    predicted = set(np.unique(proba.argmax(axis=1)))
    never = [c for k, c in enumerate(tag.classes) if k not in predicted]
    reasons: list[str] = []
    passed = True
    if rules.require_all_classes_predicted and never:
        passed = False
        reasons.append(f"classes never predicted on the test set: {never}")
    if scores["calibration_error_debiased"] > rules.max_calibration_error:
        passed = False
        reasons.append(
            f"calibration error {scores['calibration_error_debiased']:.4f} (debiased; raw {scores['calibration_error']:.4f}) > {rules.max_calibration_error}"
        )
    low_slices = {k: round(v, 4) for k, v in slices.items() if v < rules.slice_floor}
    if low_slices:
        passed = False
        reasons.append(f"slices below the {metric} floor {rules.slice_floor}: {low_slices}")
    current = champion_version(client, tag.name)
    champion_score = None
    if current is None:
        reasons.append(f"first model of the tag ({metric} {scores[metric]:.4f}): absolute checks only")
    elif current == str(challenger):
        passed = False
        reasons.append(f"v{challenger} is already the champion")
    else:
        champion_proba = load_model(tag.name, current).predict_proba(X_test)
        champion_score = core_metrics(y, champion_proba, n_classes)[metric]
        verdict = "beats" if _better(metric, scores[metric], champion_score, rules.margin) else "does not beat"
        passed = passed and verdict == "beats"
        reasons.append(f"{metric} {scores[metric]:.4f} {verdict} champion v{current} ({champion_score:.4f}) by the margin {rules.margin}")
    if passed:
        reasons.append("absolute checks passed (classes predicted, calibration, slices)")
    return GateDecision(
        tag=tag.name,
        challenger_version=str(challenger),
        champion_version=current,
        promoted=passed,
        reasons=reasons,
        metric=metric,
        challenger_metric=scores[metric],
        champion_metric=champion_score,
        checks={"metrics": scores, "slices": slices, "never_predicted": never},
    )


def apply_gate(client: MlflowClient, decision: GateDecision) -> GateDecision:
    """Record the decision on the challenger version and move the champion alias if it passed."""
    name = registered_model_name(decision.tag)
    v = decision.challenger_version
    client.set_model_version_tag(name, v, "gate.decision", "promoted" if decision.promoted else "rejected")
    client.set_model_version_tag(name, v, "gate.reasons", json.dumps(decision.reasons))
    client.set_model_version_tag(name, v, "gate.at", _now())
    client.set_model_version_tag(name, v, "gate.checks", json.dumps(decision.checks, default=float)[:5000])
    if decision.promoted:
        _set_champion(client, decision.tag, v, by="gate", reason="; ".join(decision.reasons))
    return decision


def promote(client: MlflowClient, tag: str, version: str, by: str, reason: str = "manual promotion") -> None:
    """Make `version` the champion by hand (recorded with who and why)."""
    name = registered_model_name(tag)
    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise RegistryError(f"{name} has no version {version}") from exc
    _set_champion(client, tag, str(version), by=by, reason=reason)


def rollback(client: MlflowClient, tag: str, by: str, reason: str = "rollback") -> str:
    """Restore the champion that preceded the current one; returns the restored version."""
    current = champion_version(client, tag)
    if current is None:
        raise RegistryError(f"{registered_model_name(tag)} has no champion to roll back")
    earlier = [h["version"] for h in _history(client, tag) if h["version"] != current]
    if not earlier:
        raise RegistryError(f"{registered_model_name(tag)}: v{current} is the only champion there has been; nothing to roll back to")
    previous = earlier[-1]
    _set_champion(client, tag, previous, by=by, reason=f"{reason} (from v{current})")
    return previous


def leaderboard(client: MlflowClient, tag: TagSpec, limit: int = 20) -> pd.DataFrame:
    """Training runs of a tag ranked by the promotion metric on their test sets, with versions and aliases."""
    experiment = client.get_experiment_by_name(f"tagml/{tag.name}")
    if experiment is None:
        return pd.DataFrame()
    metric = tag.promotion.metric
    order = "ASC" if metric in LOWER_IS_BETTER else "DESC"
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.mlflow.runName LIKE '%-train'",
        order_by=[f"metrics.test_{metric} {order}"],
        max_results=limit,
    )
    name = registered_model_name(tag.name)
    versions = {v.run_id: v for v in client.search_model_versions(f"name = '{name}'")}
    champion = champion_version(client, tag.name)
    try:
        challenger = str(client.get_model_version_by_alias(name, CHALLENGER).version)
    except MlflowException:
        challenger = None
    rows = []
    for run in runs:
        version = versions.get(run.info.run_id)
        v = str(version.version) if version else None
        rows.append(
            {
                "run_id": run.info.run_id,
                "started": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M"),
                "version": v,
                "alias": ",".join(a for a, hit in ((CHAMPION, v == champion), (CHALLENGER, v == challenger)) if hit and v),
                metric: run.data.metrics.get(f"test_{metric}"),
                "accuracy": run.data.metrics.get("test_accuracy"),
                "calibration_error": run.data.metrics.get("test_calibration_error"),
                "baseline_" + metric: run.data.metrics.get(f"baseline_test_{metric}"),
                "gate": version.tags.get("gate.decision") if version else None,
                **{k.removeprefix("best_"): v for k, v in run.data.params.items() if k.startswith("best_")},
            }
        )
    return pd.DataFrame(rows)


def lineage(client: MlflowClient, tag: str, version: str) -> dict[str, Any]:
    """What a model version came from: MLflow run, training snapshot, catalog hash, code, gate decision."""
    v = client.get_model_version(registered_model_name(tag), str(version))
    keys = ("snapshot_id", "data_snapshot", "catalog_hash", "code_version", "gate.decision", "champion_since")
    return {"model": f"{registered_model_name(tag)}/{v.version}", "mlflow_run_id": v.run_id, **{k: v.tags.get(k) for k in keys}, "data_snapshot": str(resolve_home_path(v.tags["data_snapshot"])) if "data_snapshot" in v.tags else None}
