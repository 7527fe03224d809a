"""Score stability for a version's model card: the PSI of its predictions between its training data and the
newest customer_features partition (which one is said), with drift's PSI formula (tagml.monitoring.psi)."""

from datetime import date
from typing import Any

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from tagml.core.storage import PartitionedTable, connect, quote, sql_literal
from tagml.monitoring.psi import distribution_psi
from tagml.training.catalog import TagSpec
from tagml.training.dataset import load_training_set
from tagml.training.inference import decide, model_input
from tagml.training.registry import get_version, load_model, version_info

MAX_CURRENT_ROWS = 200_000  # a repeatable sample of a larger partition: PSI over deciles needs no more
PROBABILITY_BINS = 10


def score_stability(client: MlflowClient, tag: TagSpec, version: str, features: PartitionedTable, as_of: date | None = None) -> dict[str, Any]:
    """PSI of the predicted classes and of each class's probability (reference deciles), training snapshot vs the
    `as_of` (default: newest) partition of `features`; a `status` other than "measured" says why not."""
    if tag.label is None or tag.label.feature_source != "customer_features":
        return {"status": "not measured", "note": "not measured: the tag reads a bank's own table (drift monitors it on every scoring run)"}
    partitions = features.partitions()
    as_of = as_of or (max(partitions) if partitions else None)
    if as_of is None or as_of not in partitions:
        return {"status": "not measured", "note": "not measured: no customer_features partition to compare with yet"}
    found = get_version(client, tag.name, version)
    info = version_info(client, tag.name, found)
    reference = load_training_set(info.snapshot_path, tag).frame
    current = _features(features, as_of, info.features)
    model = load_model(client, tag.name, version)
    ref_proba, cur_proba = (np.asarray(model.predict_proba(model_input(f, info)), dtype="float64") for f in (reference, current))
    counts = [np.bincount(decide(p, info.decision_threshold), minlength=len(info.classes)) for p in (ref_proba, cur_proba)]
    return {
        "status": "measured",
        "reference": f"training snapshot {info.snapshot_path.stem} ({len(reference)} rows)",
        "current": f"customer_features as_of {as_of.isoformat()} ({len(current)} rows{', sampled' if len(current) == MAX_CURRENT_ROWS else ''})",
        "prediction_psi": distribution_psi(*({c: int(n) for c, n in zip(info.classes, k)} for k in counts)),
        "probability_psi": {c: _probability_psi(ref_proba[:, i], cur_proba[:, i]) for i, c in enumerate(info.classes)},
        "threshold": tag.drift.prediction_psi,
    }


def _features(features: PartitionedTable, as_of: date, columns: tuple[str, ...]) -> pd.DataFrame:
    con = connect(threads=1, memory_limit="1GB")
    try:
        cols = ", ".join(quote(c) for c in columns)
        sample = f"USING SAMPLE reservoir({MAX_CURRENT_ROWS} ROWS) REPEATABLE (0)"
        return con.execute(f"SELECT {cols} FROM read_parquet({sql_literal(features.path(as_of))}) {sample}").df()
    finally:
        con.close()


def _probability_psi(reference: np.ndarray, current: np.ndarray) -> float:
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, PROBABILITY_BINS + 1)[1:-1]))
    ref, cur = (np.bincount(np.digitize(p, edges), minlength=len(edges) + 1) for p in (reference, current))
    return distribution_psi({str(b): int(n) for b, n in enumerate(ref)}, {str(b): int(n) for b, n in enumerate(cur)})
