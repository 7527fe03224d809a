"""Champion/challenger registry on MLflow aliases: the promotion gate, manual promotion and rollback.

Every decision is recorded twice: as tags on the model version (`gate.*`) and in the registered
model's `champion_history` tag (JSON list), which is what `rollback` walks back through.
"""

import getpass
import json
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.tracking import MlflowClient

from tagml.core.settings import resolve_home_path
from tagml.training.catalog import LOWER_IS_BETTER, TagSpec
from tagml.training.dataset import TrainingSet
from tagml.training.evaluate import core_metrics, evaluation_slices, slice_metrics
from tagml.training.inference import decide
from tagml.training.tracking import describe, download_artifacts, is_missing
from tagml.training.versions import BASELINE_COMPARISON_TAG, ModelVersionInfo, parse_version, registered_model_name, registration_problem

CHAMPION, CHALLENGER = "champion", "challenger"


class RegistryError(RuntimeError):
    """The registry cannot do what was asked (named model, version or alias)."""


class RegistryUnavailableError(RegistryError):
    """The registry answered with an error other than "does not exist" (an outage, a 5xx, a permission):
    nothing can be concluded about champions, so nothing is decided or moved."""


class IncompleteRegistrationError(RegistryError):
    """A model version whose registration never finished (its training was killed): it has no lineage
    or feature list and is neither promotable, gateable nor scorable."""


class GateOverrideRequiredError(RegistryError):
    """A person asked to promote a version the promotion gate rejected without forcing it with a reason."""


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


def os_user() -> str:
    """Who is at the keyboard, for `by` of a manual promotion or rollback (recorded as given)."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        return "unknown"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _unavailable(what: str, exc: MlflowException) -> RegistryUnavailableError:
    return RegistryUnavailableError(f"{what} failed ({describe(exc)}); the registry is not answering normally, so nothing was decided or changed")


def alias_version(client: MlflowClient, tag: str, alias: str) -> ModelVersion | None:
    """The version behind `alias` of the tag's registered model; None only when the model or the alias
    does not exist. Any other registry error is raised by name: read as "no champion", a 503 would send
    the gate down the first-model path and replace a better champion."""
    name = registered_model_name(tag)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise _unavailable(f"looking up the {alias!r} alias of registered model {name!r}", exc) from exc


def get_version(client: MlflowClient, tag: str, version: str) -> ModelVersion | None:
    """A version of the tag's registered model; None only when it does not exist (other errors raise by name)."""
    name = registered_model_name(tag)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if is_missing(exc):
            return None
        raise _unavailable(f"reading {name}/{version}", exc) from exc


def require_complete(version: ModelVersion) -> ModelVersion:
    """`version` itself, or IncompleteRegistrationError naming it when its registration never finished."""
    problem = registration_problem(version.tags)
    if problem:
        raise IncompleteRegistrationError(
            f"{version.name}/{version.version}: {problem}; its training was interrupted, so it cannot be gated, promoted or scored (train the tag again)"
        )
    return version


def version_info(client: MlflowClient, tag: str, mv: ModelVersion) -> ModelVersionInfo:
    """`mv` as scoring and monitoring use it. Versions registered before feature types were recorded get
    them from the model's signature (text inputs are categorical), so every reader sees the same kinds."""
    info = parse_version(tag, mv)
    if info.problem is None and info.recorded_kinds is None:
        inputs = load_model_metadata(client, tag, info.version).signature.inputs
        info = info.with_kinds({col.name: ("categorical" if col.type.name == "string" else "numeric") for col in inputs.inputs})
    return info


def champion_version(client: MlflowClient, tag: str) -> str | None:
    """The version behind the `champion` alias, or None when the tag has no champion yet."""
    version = alias_version(client, tag, CHAMPION)
    return str(version.version) if version is not None else None


@contextmanager
def model_files(client: MlflowClient, tag: str, version: str) -> Iterator[Path]:
    """A local copy of a version's model directory (MLmodel and files), downloaded through `client`'s
    stores (never the process-global registry URI), removed when the block ends."""
    uri = client.get_model_version_download_uri(registered_model_name(tag), str(version))
    with tempfile.TemporaryDirectory(prefix="tagml-model-") as tmp:
        yield Path(download_artifacts(client, uri, tmp))


def load_model(client: MlflowClient, tag: str, version: str) -> Any:
    """The version's sklearn model, loaded from a copy downloaded through `client`."""
    with model_files(client, tag, version) as path:
        return mlflow.sklearn.load_model(str(path))


def load_model_metadata(client: MlflowClient, tag: str, version: str) -> Model:
    """The MLmodel metadata (signature, flavors) of a version."""
    with model_files(client, tag, version) as path:
        return Model.load(str(path / MLMODEL_FILE_NAME))


def _history(client: MlflowClient, tag: str) -> list[dict[str, Any]]:
    model = client.get_registered_model(registered_model_name(tag))
    return json.loads(model.tags.get("champion_history", "[]"))


def _action(entry: dict[str, Any]) -> str:
    # entries written before actions were recorded: rollbacks are the ones whose reason says "(from vN)"
    return entry.get("action") or ("rollback" if "(from v" in entry.get("reason", "") else "promote")


def champion_stack(history: list[dict[str, Any]]) -> list[str]:
    """The champions still to return to, oldest first: every promotion pushes, every rollback pops.
    Replaying the record (rather than looking for "the last other version") is what keeps a second
    rollback from re-promoting the version the first one rolled back from."""
    stack: list[str] = []
    for entry in history:
        if _action(entry) == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:  # an older record out of step: trust what it says
                stack.append(entry["version"])
        else:
            stack.append(entry["version"])
    return stack


def _set_champion(client: MlflowClient, tag: str, version: str, by: str, reason: str, action: str, override: bool = False, **extra: Any) -> None:
    name = registered_model_name(tag)
    history = _history(client, tag)
    entry: dict[str, Any] = {"version": str(version), "at": _now(), "by": by, "reason": reason, "action": action, **extra}
    if override:
        entry["override"] = True
    history.append(entry)
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, "champion_history", json.dumps(history))
    client.set_model_version_tag(name, str(version), "champion_since", entry["at"])
    client.set_model_version_tag(name, str(version), "champion_by", by)
    if override:
        for key, value in (("override", "true"), ("override.by", by), ("override.reason", reason), ("override.at", entry["at"])):
            client.set_model_version_tag(name, str(version), key, value)


def _better(metric: str, challenger: float, champion: float, margin: float) -> bool:
    if metric in LOWER_IS_BETTER:
        return challenger <= champion - margin
    return challenger >= champion + margin


def evaluate_gate(client: MlflowClient, tag: TagSpec, challenger: str, data: TrainingSet, slices: Mapping[str, str]) -> GateDecision:
    """Decide whether `challenger` should become champion, on the challenger's held-out test set.
    `slices`: the tag's slices as drift defines them (tagml.scoring.rules.slice_expressions), whose values
    must each keep the promotion metric above the catalog's slice floor. Class decisions are the version's
    (a binary tag's decision threshold, tagml.training.inference.decide)."""
    found = get_version(client, tag.name, challenger)
    if found is None:
        raise RegistryError(f"{registered_model_name(tag.name)} has no version {challenger} to evaluate")
    threshold = parse_version(tag.name, require_complete(found)).decision_threshold
    X_test, y_test = data.part("test")
    y = y_test.map({c: i for i, c in enumerate(tag.classes)}).to_numpy()
    n_classes, metric, rules = len(tag.classes), tag.promotion.metric, tag.promotion
    proba = load_model(client, tag.name, challenger).predict_proba(X_test)
    scores = core_metrics(y, proba, n_classes, threshold)
    expressions = evaluation_slices(slices, data.feature_names)
    slice_scores = slice_metrics(X_test, y, proba, metric, n_classes, expressions, threshold)
    predicted = set(np.unique(decide(proba, threshold)))
    never = [c for k, c in enumerate(tag.classes) if k not in predicted]
    passed, reasons = _absolute_checks(tag, scores, never, threshold)
    low_slices = {k: round(v, 4) for k, v in slice_scores.items() if v < rules.slice_floor}
    if not slice_scores:
        reasons.append(f"no slices checked ({f'no value of {sorted(expressions)} has 30 test rows' if expressions else 'the tag has no slices'})")
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
        champion = get_version(client, tag.name, current)
        champion_threshold = parse_version(tag.name, champion).decision_threshold if champion is not None else None
        champion_proba = load_model(client, tag.name, current).predict_proba(X_test)
        champion_score = core_metrics(y, champion_proba, n_classes, champion_threshold)[metric]
        verdict = "beats" if _better(metric, scores[metric], champion_score, rules.margin) else "does not beat"
        passed = passed and verdict == "beats"
        reasons.append(f"{metric} {scores[metric]:.4f} {verdict} champion v{current} ({champion_score:.4f}) by the margin {rules.margin}")
    baseline_ok, baseline_reason, baseline_checks = _baseline_check(found.tags, tag, scores[metric])
    passed = passed and baseline_ok
    reasons.append(baseline_reason)
    if passed:
        reasons.append("absolute checks passed (classes predicted, calibration, plausibility, slices, baseline)")
    return GateDecision(
        tag=tag.name,
        challenger_version=str(challenger),
        champion_version=current,
        promoted=passed,
        reasons=reasons,
        metric=metric,
        challenger_metric=scores[metric],
        champion_metric=champion_score,
        checks={
            "metrics": scores,
            "slices": slice_scores,
            "never_predicted": never,
            "baseline": baseline_checks,
            "decision_threshold": threshold,
            "champion": {"version": current, metric: champion_score},
        },
    )


def _absolute_checks(tag: TagSpec, scores: Mapping[str, float], never: list[str], threshold: float | None) -> tuple[bool, list[str]]:
    """(passed, reasons) of the checks that need no other model: classes predicted, calibration, plausibility."""
    rules, metric = tag.promotion, tag.promotion.metric
    passed, reasons = True, []
    positive = tag.classes[1] if len(tag.classes) == 2 else None
    if positive in never:  # a binary tag that never says "yes" is no tag at all, whatever require_all_classes_predicted says
        passed = False
        how = f"at its decision threshold {threshold:.4f}" if threshold is not None else "by the more probable class (decision.policy argmax)"
        fix = "" if threshold is not None else ": give the tag a decision policy (threshold or top_share) to make it a score"
        reasons.append(f"the positive class {positive!r} is never predicted on the test set {how}{fix}")
    elif rules.require_all_classes_predicted and never:
        passed = False
        reasons.append(f"classes never predicted on the test set: {never}")
    if scores["calibration_error_debiased"] > rules.max_calibration_error:
        passed = False
        reasons.append(
            f"calibration error {scores['calibration_error_debiased']:.4f} (debiased; raw {scores['calibration_error']:.4f}) > {rules.max_calibration_error}"
        )
    if rules.is_implausible(scores[metric]):
        side = "<=" if metric in LOWER_IS_BETTER else ">="
        verdict = f"test {metric} {scores[metric]:.4f} is implausibly good ({side} {rules.implausible_bound}): a feature probably leaks the label"
        if rules.allow_implausible:
            reasons.append(f"{verdict}; promoted anyway because promotion.allow_implausible is set")
        else:
            passed = False
            reasons.append(
                f"{verdict} (a copy of it, or something known only after it); exclude it, or set promotion.allow_implausible if the tag is really this easy"
            )
    return passed, reasons


def _baseline_check(version_tags: Mapping[str, str], tag: TagSpec, score: float) -> tuple[bool, str, dict[str, Any]]:
    """(passed, reason, checks): the registered model against the logistic baseline on the test part, by
    promotion.baseline_margin, unless the registered model is the baseline itself. A shortfall passes only
    when the paired bootstrap interval recorded at training still reaches the margin (sampling noise, said
    so in the reason); a model the baseline beats beyond that noise is refused."""
    metric, margin = tag.promotion.metric, tag.promotion.baseline_margin
    selection = json.loads(version_tags.get("candidate_selection", "{}"))
    valid = ", ".join(f"{role} {value:.4f}" for role, value in selection.get("valid", {}).items())
    if version_tags.get("model_candidate") == "baseline":
        reason = f"the registered model is the logistic baseline itself: it beat the tuned {tag.model.family} on validation {metric} ({valid}); no baseline margin applies"
        return True, reason, {"registered": "baseline", **selection}
    recorded = version_tags.get(f"baseline_test_{metric}")
    if recorded is None:
        return True, "no baseline was trained (model.baseline is off): not compared with one", {"registered": "tuned"}
    baseline = float(recorded)
    beats = _better(metric, score, baseline, margin)
    checks = {"registered": "tuned", "baseline_test": baseline, "margin": margin, **selection}
    reason = f"{metric} {score:.4f} {'beats' if beats else 'does not beat'} the logistic baseline ({baseline:.4f}) by the baseline margin {margin}"
    reason += f" (validation: {valid})" if valid else ""
    interval = json.loads(version_tags.get(BASELINE_COMPARISON_TAG, "null"))
    if beats or interval is None:
        return beats, reason, checks
    checks["improvement_interval"] = interval
    bounds = f"improvement {interval['improvement']:+.4f}, {interval['level']:.0%} paired bootstrap interval {interval['low']:+.4f} to {interval['high']:+.4f}"
    if interval["high"] >= margin:
        # validation chose the tuned model; a shortfall on test that sampling alone explains is not a verdict against it
        return True, f"{reason}, but within the test set's sampling noise ({bounds}): the validation choice stands", checks
    return False, f"{reason}, beyond sampling noise ({bounds})", checks


def apply_gate(client: MlflowClient, decision: GateDecision) -> GateDecision:
    """Record the decision on the challenger version and move the champion alias if it passed."""
    name = registered_model_name(decision.tag)
    v = decision.challenger_version
    client.set_model_version_tag(name, v, "gate.decision", "promoted" if decision.promoted else "rejected")
    client.set_model_version_tag(name, v, "gate.reasons", json.dumps(decision.reasons))
    client.set_model_version_tag(name, v, "gate.at", _now())
    client.set_model_version_tag(name, v, "gate.checks", json.dumps(decision.checks, default=float)[:5000])
    if decision.promoted:
        _set_champion(client, decision.tag, v, by="gate", reason="; ".join(decision.reasons), action="gate")
    return decision


def promote(client: MlflowClient, tag: str, version: str, by: str, reason: str | None = None, force: bool = False) -> bool:
    """Make `version` the champion by hand, recorded with who and why; returns whether it overrode the gate.

    A version the gate rejected needs `force` and a reason: it is then recorded as an override (in
    champion_history and as `override*` version tags). A version whose registration never finished is
    refused whatever the flags."""
    name = registered_model_name(tag)
    found = get_version(client, tag, version)
    if found is None:
        raise RegistryError(f"{name} has no version {version}")
    require_complete(found)
    rejected = found.tags.get("gate.decision") == "rejected"
    if force and not (reason and reason.strip()):
        raise RegistryError(f"{name}/{version}: forcing a promotion needs a reason (who asked for it and why is recorded)")
    if rejected and not force:
        reasons = "; ".join(json.loads(found.tags.get("gate.reasons", "[]")))
        raise GateOverrideRequiredError(
            f"{name}/{version} was rejected by the promotion gate ({reasons}); to promote it anyway, force it "
            "with a reason (tagml promote --force --reason ...): it is recorded as an override"
        )
    extra = {} if "gate.decision" in found.tags else {"gate": "not evaluated"}
    _set_champion(
        client,
        tag,
        str(version),
        by=by,
        reason=(reason or "manual promotion").strip(),
        action="override" if rejected else "promote",
        override=rejected,
        **extra,
    )
    return rejected


def rollback(client: MlflowClient, tag: str, by: str, reason: str = "rollback") -> str:
    """Restore the champion that preceded the current one; returns the restored version. Repeated
    rollbacks walk further back through the champions (a stack), never forward again."""
    name = registered_model_name(tag)
    current = champion_version(client, tag)
    if current is None:
        raise RegistryError(f"{name} has no champion to roll back")
    stack = champion_stack(_history(client, tag))
    # the alias may also have been moved outside tagml: then the last recorded champion is the one to restore
    while stack and stack[-1] == current:
        stack.pop()
    if not stack:
        raise RegistryError(f"{name}: v{current} is the first champion on record; nothing to roll back to")
    previous = stack[-1]
    _set_champion(client, tag, previous, by=by, reason=f"{reason} (from v{current})", action="rollback", **{"from": current})
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
    found = alias_version(client, tag.name, CHALLENGER)
    challenger = str(found.version) if found is not None else None
    rows = []
    for run in runs:
        version = versions.get(run.info.run_id)
        v = str(version.version) if version else None
        rows.append(
            {
                "run_id": run.info.run_id,
                "started": datetime.fromtimestamp(run.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
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
    return {
        "model": f"{registered_model_name(tag)}/{v.version}",
        "mlflow_run_id": v.run_id,
        **{k: v.tags.get(k) for k in keys},
        "data_snapshot": str(resolve_home_path(v.tags["data_snapshot"])) if "data_snapshot" in v.tags else None,
    }
