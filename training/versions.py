"""What a registered model version is, read from its registry tags in one place: its name, lineage,
feature list and kinds, classes, training snapshot and whether its registration finished.

Light on purpose (no trainer, no Optuna): scoring and monitoring read versions through it.
"""

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from functools import cached_property
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion

from tagml.core.settings import resolve_home_path

# A version is created with registration=pending and gets registration=complete only after every other
# tag is set: a training killed in between leaves a version that says so, and registry/scoring refuse it.
REGISTRATION_TAG, REGISTRATION_PENDING, REGISTRATION_COMPLETE = "tagml.registration", "pending", "complete"
REQUIRED_VERSION_TAGS = ("data_snapshot", "snapshot_id", "feature_list", "classes")
DECISION_THRESHOLD_TAG = "decision_threshold"  # a binary tag's threshold (tagml.training.inference.decide)
BASELINE_COMPARISON_TAG = "baseline_comparison"  # test improvement over the baseline with its bootstrap interval (JSON)
# a training snapshot is named <tag>-<train_as_of>-<hash>.parquet (tagml.training.dataset)
SNAPSHOT_NAME = re.compile(r"^(?P<tag>[a-z][a-z0-9_]*)-(?P<as_of>\d{4}-\d{2}-\d{2})-[0-9a-f]+$")


def registered_model_name(tag: str) -> str:
    return f"tagml-{tag}"


def registration_problem(tags: Mapping[str, str]) -> str | None:
    """Why a version's registry tags are not a finished registration, or None when they are."""
    state = tags.get(REGISTRATION_TAG)
    if state not in (None, REGISTRATION_COMPLETE):
        return f"its registration is {state!r}, never completed"
    missing = [k for k in REQUIRED_VERSION_TAGS if k not in tags]
    if missing:  # versions registered before the registration tag existed are judged by their content
        return f"it lacks the registry tags {missing}"
    return None


@dataclass(frozen=True)
class ModelVersionInfo:
    """A registered version as scoring and monitoring use it. The content fields are empty when
    `problem` says the registration never finished (callers refuse such a version by name)."""

    tag: str
    version: str
    run_id: str | None
    model_id: str | None
    problem: str | None
    features: tuple[str, ...] = ()
    # feature -> numeric | categorical, as recorded at registration; None for versions registered before
    # feature types were recorded (the registry then reads them from the model's signature)
    recorded_kinds: Mapping[str, str] | None = None
    classes: tuple[str, ...] = ()
    data_snapshot: str | None = None  # as stored (home-relative); `snapshot_path` resolves it
    catalog_hash: str | None = None
    promotion_metric: str | None = None
    test_metrics: Mapping[str, float] = field(default_factory=dict)  # metric -> value recorded on the test set
    # the slices (rule tags or feature columns) its gate judged: tagml.scoring.rules.slice_expressions(..., sources=slices);
    # None for versions registered before slices were recorded
    slices: tuple[str, ...] | None = None
    # a binary tag's positive class is decided at or above this probability (DecisionSpec); None: the most probable class
    decision_threshold: float | None = None

    @property
    def name(self) -> str:
        return registered_model_name(self.tag)

    @property
    def producer(self) -> str:
        return f"{self.name}/{self.version}"

    # computed once per instance (the fields are frozen): `categorical` read `kinds` once per feature and
    # `model_input` reads both per batch, which profiled at 62k rebuilds (1.7 s) in one night's drift.
    # Callers must not mutate the dict they get; `with_kinds` makes a new instance with its own.
    @cached_property
    def kinds(self) -> dict[str, str]:
        recorded = self.recorded_kinds or {}
        return {f: recorded.get(f, "numeric") for f in self.features}

    @cached_property
    def categorical(self) -> tuple[str, ...]:
        kinds = self.kinds
        return tuple(f for f in self.features if kinds[f] == "categorical")

    @property
    def snapshot_path(self) -> Path | None:
        return resolve_home_path(self.data_snapshot) if self.data_snapshot else None

    @property
    def train_as_of(self) -> date | None:
        """The training date, read from the snapshot's name (None when the name does not say it)."""
        path = self.snapshot_path
        match = SNAPSHOT_NAME.match(path.stem) if path is not None else None
        return date.fromisoformat(match["as_of"]) if match else None

    def with_kinds(self, kinds: Mapping[str, str]) -> "ModelVersionInfo":
        return replace(self, recorded_kinds=dict(kinds))


def parse_version(tag: str, mv: ModelVersion) -> ModelVersionInfo:
    """The one parser of a version's registry tags."""
    tags = dict(mv.tags)
    problem = registration_problem(tags)
    base = {"tag": tag, "version": str(mv.version), "run_id": mv.run_id, "model_id": getattr(mv, "model_id", None), "problem": problem}
    if problem:
        return ModelVersionInfo(**base)
    types = json.loads(tags.get("feature_types", "{}"))
    return ModelVersionInfo(
        **base,
        features=tuple(json.loads(tags["feature_list"])),
        recorded_kinds=types or None,
        classes=tuple(json.loads(tags["classes"])),
        data_snapshot=tags["data_snapshot"],
        catalog_hash=tags.get("catalog_hash"),
        promotion_metric=tags.get("promotion_metric"),
        test_metrics={k.removeprefix("test_"): float(v) for k, v in tags.items() if k.startswith("test_") and _is_number(v)},
        slices=tuple(json.loads(tags["slices"])) if "slices" in tags else None,
        decision_threshold=float(tags[DECISION_THRESHOLD_TAG]) if tags.get(DECISION_THRESHOLD_TAG) else None,
    )


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
