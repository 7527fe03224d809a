"""A validator's re-run of a model version from its card: the recorded snapshot (checked against its sha256), the
recorded catalog entry (checked against its hash), seed, threads and trial budget, trained into a scratch MLflow
store (the bank's registry is not touched), and the test metrics compared with the card's."""

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tagml.core.files import file_sha256
from tagml.core.settings import resolve_home_path
from tagml.training.catalog import TagSpec
from tagml.training.dataset import load_training_set
from tagml.training.registration import code_version
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag


class ReproductionError(RuntimeError):
    """A card's recorded inputs cannot be used as they are (named snapshot, hash or field)."""


@dataclass(frozen=True)
class Reproduction:
    model: str
    recorded: dict[str, float]  # the card's test metrics
    reproduced: dict[str, float]
    differences: dict[str, float]  # metric -> |reproduced - recorded| beyond the tolerance
    code_version_recorded: str | None
    code_version_now: str

    @property
    def matches(self) -> bool:
        return not self.differences


def reproduce_from_card(card: dict[str, Any], scratch_dir: Path, tolerance: float = 1e-9) -> Reproduction:
    """Retrain the version a card (its record, tagml.training.model_card.read_card_record) describes, in a scratch
    store under `scratch_dir`, and compare every test metric the retraining measures with the card's."""
    name, rep, data = f"{card['model']}/{card['version']}", card.get("reproduction") or {}, card["data"]
    missing = [k for k in ("seed", "threads", "trials", "slices", "catalog_entry") if rep.get(k) is None]
    if missing or not data.get("sha256"):
        raise ReproductionError(f"{name}: the card does not record {missing or ['the snapshot sha256']}; it predates reproducible cards")
    snapshot = resolve_home_path(data["snapshot"])
    if not snapshot.exists():
        raise ReproductionError(f"{name}: training snapshot {snapshot} does not exist (removed, or the home moved without it)")
    actual = file_sha256(snapshot)
    if actual != data["sha256"]:
        raise ReproductionError(
            f"{name}: training snapshot {snapshot} no longer matches the card (sha256 {actual[:12]}..., recorded {data['sha256'][:12]}...): "
            "it was rewritten since training (an erasure rewrites snapshots), so the recorded metrics cannot be reproduced from it"
        )
    tag = TagSpec.model_validate(rep["catalog_entry"])
    if tag.content_hash() != card["catalog_hash"]:
        raise ReproductionError(f"{name}: the recorded catalog entry hashes to {tag.content_hash()}, the version records {card['catalog_hash']}")
    training = load_training_set(snapshot, tag)
    scratch_dir.mkdir(parents=True, exist_ok=True)
    client = connect_tracking(f"sqlite:///{scratch_dir / 'mlflow.db'}")
    result = train_tag(
        tag,
        training,
        client,
        rep["slices"],
        artifact_location=str(scratch_dir / "artifacts"),
        seed=int(rep["seed"]),
        threads=int(rep["threads"]),
        trials=int(rep["trials"]),
    )
    recorded = {k: float(v) for k, v in card["metrics"]["test"].items()}
    reproduced = {k: float(v) for k, v in result.metrics.items()}
    differences = {k: abs(v - recorded.get(k, math.nan)) for k, v in reproduced.items() if not _close(v, recorded.get(k), tolerance)}
    return Reproduction(name, recorded, reproduced, differences, card.get("code_version"), code_version())


def _close(value: float, recorded: float | None, tolerance: float) -> bool:
    if recorded is None:
        return False
    if math.isnan(value) or math.isnan(recorded):
        return math.isnan(value) and math.isnan(recorded)
    return math.isclose(value, recorded, rel_tol=tolerance, abs_tol=tolerance)
