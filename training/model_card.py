"""The model-risk evidence pack: one model card per registered version, built only from what its training run and
the registry recorded (never recomputed another way), rendered as markdown and HTML and logged on the version's run.

Training records the evidence the card needs (`record_evidence`: intervals, reliability bins, label counts, the
catalog entry, the inputs a validator needs to reproduce it, fairness slices) and logs the first card at
registration (gate pending). The training asset logs the next revision once the gate has decided and the score
stability is measured; `tagml card` shows the card as the records stand now. No customer id or PII reaches a card:
only names, counts and aggregates.
"""

import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tagml.features.contract import RAW_TABLES
from tagml.training.dataset import LABEL_COLUMN, SPLIT_COLUMN
from tagml.training.evaluate import INTERVAL_METRICS, metric_interval, reliability_bins, slice_intervals
from tagml.training.fairness import fairness_slices
from tagml.training.model_card_sections import card_sections
from tagml.training.model_card_template import render_html, render_markdown
from tagml.training.registration import SNAPSHOT_HASH_TAG
from tagml.training.registry import CHAMPION, get_version, require_complete
from tagml.training.tracking import describe, is_missing, log_metrics
from tagml.training.versions import registered_model_name

if TYPE_CHECKING:
    from tagml.training.train import Fitting

CARD_DIR, EVIDENCE_DIR, FAIRNESS_DIR = "model_card", "evidence", "fairness"
CARD_REVISION_TAG, CARD_GATE_TAG, CARD_AT_TAG = "model_card.revision", "model_card.gate", "model_card.generated_at"
PENDING = "pending"
TAG_NAME = re.compile(r"[a-z][a-z0-9_]*")  # the catalog's tag name pattern


class ModelCardError(RuntimeError):
    """A version has no card, or its card cannot be built (named model and version)."""


@dataclass(frozen=True)
class ModelCard:
    tag: str
    version: str
    record: dict[str, Any]  # every number and name the card shows (logged as model_card.json)
    markdown: str
    html: str

    @property
    def revision(self) -> int:
        return int(self.record["revision"])


def record_evidence(fit: "Fitting", proba: np.ndarray, threshold: float | None, reproduction: Mapping[str, Any], demographics: pd.DataFrame | None) -> None:
    """Log on the training run what the card shows beyond the run's metrics: bootstrap intervals (overall and per
    slice), reliability bins, label counts, the catalog entry, the reproduction inputs and the fairness slices."""
    metric, y = fit.tag.promotion.metric, fit.y_test
    intervals = {
        m: metric_interval(y, proba, fit.n_classes, m, threshold if m not in ("log_loss", "roc_auc_ovr") else None, fit.seed) for m in INTERVAL_METRICS
    }
    frame = fit.data.frame
    labels = {
        "sources": list(fit.tag.label.sources) if fit.tag.label else [],
        "by_split": {s: {str(k): int(v) for k, v in g[LABEL_COLUMN].value_counts().sort_index().items()} for s, g in frame.groupby(SPLIT_COLUMN)},
        "as_of_range": [str(pd.Timestamp(frame["as_of"].min()).date()), str(pd.Timestamp(frame["as_of"].max()).date())],
        "dropped": dict(fit.data.dropped_labels),
    }
    test = frame.loc[frame[SPLIT_COLUMN] == "test", ["customer_id", "as_of"]]
    fairness = fairness_slices(test, y, proba, fit.tag.classes, metric, threshold, demographics)
    files = {
        f"{EVIDENCE_DIR}/intervals.json": {
            "overall": intervals,
            "slices": slice_intervals(fit.X_test, y, proba, metric, fit.n_classes, fit.slices, threshold, fit.seed),
        },
        f"{EVIDENCE_DIR}/reliability.json": reliability_bins(y, proba),
        f"{EVIDENCE_DIR}/labels.json": labels,
        f"{EVIDENCE_DIR}/catalog_entry.json": fit.tag.model_dump(mode="json"),
        f"{EVIDENCE_DIR}/reproduction.json": dict(reproduction),
        f"{FAIRNESS_DIR}/fairness.json": fairness.as_dict(),
    }
    _log_json(fit.client, fit.parent_id, files)
    log_metrics(fit.client, fit.parent_id, fairness.metrics())


def _log_json(client: MlflowClient, run_id: str, files: Mapping[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, payload in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=1, ensure_ascii=False, default=float))
        for folder in {name.split("/")[0] for name in files}:
            client.log_artifacts(run_id, str(Path(tmp) / folder), artifact_path=folder)


def _run_json(client: MlflowClient, run_id: str, folders: tuple[str, ...]) -> dict[str, Any]:
    """The JSON artifacts under `folders` of a run, by path ("evidence/labels.json"); absent folders give nothing."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for folder in folders:
            if not client.list_artifacts(run_id, folder):
                continue
            local = Path(client.download_artifacts(run_id, folder, tmp))
            for path in sorted(local.rglob("*.json")):
                out[f"{folder}/{path.relative_to(local).as_posix()}"] = json.loads(path.read_text())
    return out


def build_model_card(client: MlflowClient, tag: str, version: str, stability: Mapping[str, Any] | None = None, revision: int | None = None) -> ModelCard:
    """The card of `tag` version `version` from its records: the run's metrics, params and evidence, the version's
    registry tags (gate decision, overrides) and the alias history. `stability`: tagml.monitoring.stability's
    measurement (else the last logged card's)."""
    found = get_version(client, tag, version)
    if found is None:
        raise ModelCardError(f"{registered_model_name(tag)} has no version {version}")
    mv = require_complete(found)
    run = client.get_run(mv.run_id)
    artifacts = _run_json(client, mv.run_id, (EVIDENCE_DIR, FAIRNESS_DIR, "evaluation", CARD_DIR))
    previous = artifacts.get(f"{CARD_DIR}/model_card.json")
    revision = revision if revision is not None else int(mv.tags.get(CARD_REVISION_TAG, "0")) + 1
    stability = dict(stability) if stability is not None else (previous or {}).get("stability")
    record = card_record(client, tag, mv, run, artifacts, stability, revision)
    sections = card_sections(record)
    title = f"Model card: {record['model']} version {version}"
    return ModelCard(tag, str(version), record, render_markdown(title, sections), render_html(title, sections))


def card_record(client: MlflowClient, tag: str, mv: Any, run: Any, artifacts: Mapping[str, Any], stability: Mapping[str, Any] | None, revision: int) -> dict:
    """Every fact of the card as one JSON-able record (the rendering reads nothing else)."""
    tags, metrics, params = dict(mv.tags), dict(run.data.metrics), dict(run.data.params)
    entry = artifacts.get(f"{EVIDENCE_DIR}/catalog_entry.json") or {}
    intervals = artifacts.get(f"{EVIDENCE_DIR}/intervals.json", {})
    metric = tags.get("promotion_metric", "")
    test = {k.removeprefix("test_"): v for k, v in metrics.items() if k.startswith("test_") and not k.endswith("_over_baseline")}
    checks = _json(tags.get("gate.checks"), {})
    return {
        "model": registered_model_name(tag),
        "tag": tag,
        "version": str(mv.version),
        "run_id": mv.run_id,
        "revision": revision,
        "generated_at": pd.Timestamp.now(tz="UTC").isoformat(timespec="seconds"),
        "code_version": tags.get("code_version"),
        "catalog_hash": tags.get("catalog_hash"),
        "use": {k: entry.get(k) for k in ("description", "intended_use", "limitations", "owner", "sensitivity", "refresh", "kind", "classes")},
        "data": {
            "snapshot": tags.get("data_snapshot"),
            "snapshot_id": tags.get("snapshot_id"),
            "sha256": tags.get(SNAPSHOT_HASH_TAG),
            "rows": {s: _int(params.get(f"{s}_rows")) for s in ("train", "valid", "test")},
            "labels": artifacts.get(f"{EVIDENCE_DIR}/labels.json"),
        },
        "features": _features(tags, artifacts.get("evaluation/columns.json", {}), entry),
        "method": {
            "family": tags.get("model_family"),
            "candidate": tags.get("model_candidate"),
            "selection": _json(tags.get("candidate_selection"), {}),
            **{k: (entry.get("model") or {}).get(k) for k in ("calibration", "class_weight", "search_space", "params")},
            "decision_policy": tags.get("decision_policy"),
            "decision_threshold": _float(tags.get("decision_threshold")),
        },
        "tuning": {
            "objective": params.get("tuning_objective"),
            "trials_completed": _int(metrics.get("trials_completed")),
            "trials_pruned": _int(metrics.get("trials_pruned")),
            "best_valid": metrics.get(f"best_valid_{params.get('tuning_objective')}"),
            "best_params": {k.removeprefix("best_"): v for k, v in params.items() if k.startswith("best_")},
        },
        "metrics": {"promotion_metric": metric, "test": test, "intervals": intervals.get("overall", {}), "slices": intervals.get("slices", {})},
        "calibration": {
            "ece": test.get("calibration_error"),
            "ece_debiased": test.get("calibration_error_debiased"),
            "max_allowed": (entry.get("promotion") or {}).get("max_calibration_error"),
            "bins": artifacts.get(f"{EVIDENCE_DIR}/reliability.json", []),
        },
        "comparison": {
            "baseline": {k.removeprefix("baseline_test_"): v for k, v in metrics.items() if k.startswith("baseline_test_")},
            "baseline_interval": _json(tags.get("baseline_comparison"), None),
            "champion": checks.get("champion") if isinstance(checks, dict) else None,
        },
        "fairness": artifacts.get(f"{FAIRNESS_DIR}/fairness.json"),
        "stability": stability,
        "gate": {"decision": tags.get("gate.decision", PENDING), "at": tags.get("gate.at"), "reasons": _json(tags.get("gate.reasons"), [])},
        "overrides": _history(client, tag),
        "monitoring": entry.get("drift"),
        "reproduction": {**(artifacts.get(f"{EVIDENCE_DIR}/reproduction.json") or {}), "catalog_entry": entry or None},
    }


def _features(tags: Mapping[str, str], columns: Mapping[str, Mapping[str, Any]], entry: Mapping[str, Any]) -> dict[str, Any]:
    """Used and excluded features with the audit's reasons, the contract's PII columns and the leakage guard's scores."""
    kinds = _json(tags.get("feature_types"), {})
    excluded = [{"column": c, "reason": d.get("reason")} for c, d in columns.items() if d.get("use") == "excluded"]
    scored = sorted(((c, d["single_feature_auc"]) for c, d in columns.items() if d.get("single_feature_auc") is not None), key=lambda x: -x[1])
    return {
        "used": [{"name": n, "kind": kinds.get(n)} for n in _json(tags.get("feature_list"), [])],
        "excluded": excluded,
        # how many, not which: the names are in the data contract, and no PII column name needs to reach MLflow
        "pii_dropped_at_staging": {t.name: len(t.pii_columns) for t in RAW_TABLES if t.pii_columns},
        "leakage": {"max_single_feature_auc": (entry.get("leakage") or {}).get("max_single_feature_auc"), "highest": scored[:5]},
    }


def _history(client: MlflowClient, tag: str) -> list[dict[str, Any]]:
    """The tag's champion history (gate promotions, manual promotions, overrides, rollbacks: who, when, why)."""
    model = client.get_registered_model(registered_model_name(tag))
    return _json(model.tags.get("champion_history"), [])


def _json(value: str | None, default: Any) -> Any:
    try:
        return json.loads(value) if value else default
    except json.JSONDecodeError:
        return default


def _int(value: Any) -> int | None:
    return int(float(value)) if value is not None else None


def _float(value: str | None) -> float | None:
    return float(value) if value else None


def log_model_card(client: MlflowClient, tag: str, version: str, stability: Mapping[str, Any] | None = None) -> ModelCard:
    """Build the card and log it on the version's run as `model_card/model_card.{md,html,json}` (each revision also
    kept as `model_card/revisions/r<N>.md`); the version's tags say which revision and gate decision it shows."""
    card = build_model_card(client, tag, version, stability)
    name = registered_model_name(tag)
    files = {
        f"{CARD_DIR}/model_card.md": card.markdown,
        f"{CARD_DIR}/model_card.html": card.html,
        f"{CARD_DIR}/model_card.json": card.record,
        f"{CARD_DIR}/revisions/r{card.revision}.md": card.markdown,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for path, payload in files.items():
            target = Path(tmp) / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(payload if isinstance(payload, str) else json.dumps(payload, indent=1, ensure_ascii=False, default=float))
        client.log_artifacts(card.record["run_id"], str(Path(tmp) / CARD_DIR), artifact_path=CARD_DIR)
    for key, value in ((CARD_REVISION_TAG, str(card.revision)), (CARD_GATE_TAG, card.record["gate"]["decision"]), (CARD_AT_TAG, card.record["generated_at"])):
        client.set_model_version_tag(name, str(version), key, value)
    return card


def card_location(client: MlflowClient, tag: str, version: str) -> str:
    """Where the version's logged card (HTML) is: the run's artifact URI (a local path for a local store)."""
    run_id = client.get_model_version(registered_model_name(tag), str(version)).run_id
    return f"{client.get_run(run_id).info.artifact_uri}/{CARD_DIR}/model_card.html"


def read_card_record(client: MlflowClient, tag: str, version: str) -> dict[str, Any]:
    """The logged card of a version as its record (model_card.json), or ModelCardError naming it."""
    found = get_version(client, tag, version)
    if found is None:
        raise ModelCardError(f"{registered_model_name(tag)} has no version {version}")
    try:
        record = _run_json(client, found.run_id, (CARD_DIR,)).get(f"{CARD_DIR}/model_card.json")
    except MlflowException as exc:
        if not is_missing(exc):
            raise ModelCardError(f"reading the card of {registered_model_name(tag)}/{version} failed ({describe(exc)})") from exc
        record = None
    if record is None:
        raise ModelCardError(f"{registered_model_name(tag)}/{version} has no logged model card (trained before model cards were generated?)")
    return record


def card_version(client: MlflowClient, tag: str, version: str | None) -> str:
    """`version`, or the champion's, or the newest version's when there is no champion (ModelCardError if none)."""
    if version is not None:
        return str(version)
    if not TAG_NAME.fullmatch(tag):  # it goes into a registry search filter below
        raise ModelCardError(f"{tag!r} is not a tag name (lowercase letters, digits and '_')")
    name = registered_model_name(tag)
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if not is_missing(exc):
            raise
    versions = client.search_model_versions(f"name = '{name}'") if _exists(client, name) else []
    if not versions:
        raise ModelCardError(f"{name} has no registered version: train the tag first")
    return str(max(int(v.version) for v in versions))


def _exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if is_missing(exc):
            return False
        raise
    return True
