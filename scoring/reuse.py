"""Exact reuse of the previous night's model output for customers whose model input did not move.

A tree ensemble's output for a row depends only on which side of every split each feature value
falls. Per feature, the distinct thresholds of every tree cut the float32 axis into intervals; a
row's *split codes* are the interval of each feature value (NaN its own code). Two rows with the
same codes reach the same leaves in every tree, so the model gives them the same probabilities and
the same path contributions, hence the same predicted class and the same reason features. A
customer whose codes tonight equal last night's (same champion version, same reason settings) keeps
last night's probabilities and reason features without being scored again; the reason *text*
(`feature high` is relative to tonight's median) and everything after the model (observed labels,
assessments, lineage) are computed tonight for every customer, so the partition is the one a full
scoring writes.

Last night's side is read from what it actually used: the tag partition records, per model tag, the
features file it was scored from (its path and file identity), the champion version and the reason
settings; if any of them differs tonight, or the file was rewritten since, nothing is reused and
the summary says why. A row that partition carried from an earlier night of its refresh period
(`inferred_as_of` before its as_of, scoring/refresh.py) was not computed from that file and is never
reused. Only xgboost pipelines are eligible: a linear model's output moves with every input value,
and it is cheap to recompute.
"""

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagml.core.files import CorruptFileError, check_parquet
from tagml.core.storage import file_identity
from tagml.scoring.reasons import code_features, unwrap_pipeline
from tagml.training.inference import model_input
from tagml.training.versions import ModelVersionInfo

SCORED_FROM_KEY = b"tagml.scored_from"  # the tag partition's Parquet key-value metadata
NAN_CODE = -1
NO_PREVIOUS = "no earlier tag partition to reuse"
REUSE_OFF = "customer_tags config reuse_unchanged is false: every customer inferred tonight goes through the model"


def scored_from_entry(source: Path, info: ModelVersionInfo, top_reasons: int, with_reasons: bool) -> dict[str, Any]:
    """What a model tag's rows were computed from, as recorded with its partition."""
    return {
        "source": str(source),
        "source_identity": file_identity(source)._asdict(),
        "model_version": info.version,
        "run_id": info.run_id,
        "top_reasons": top_reasons if with_reasons else 0,
    }


def read_scored_from(partition: Path) -> dict[str, dict[str, Any]]:
    """Per model tag, what the partition's rows were computed from ({} for a partition written before it was recorded)."""
    metadata = pq.read_schema(partition).metadata or {}
    raw = metadata.get(SCORED_FROM_KEY)
    if raw is None:
        return {}
    loaded = json.loads(raw)
    return loaded if isinstance(loaded, dict) else {}


@dataclass(frozen=True)
class SplitIntervals:
    """Per booster input column: the sorted distinct float32 thresholds of its numeric splits, or exact
    comparison for a column with a categorical split (its code is then the value's bit pattern)."""

    thresholds: tuple[np.ndarray, ...]
    exact: np.ndarray  # bool per column
    used: np.ndarray  # column indices that appear in any split (the others cannot change the output)

    @classmethod
    def from_booster(cls, booster: Any, columns: int) -> "SplitIntervals":
        model = json.loads(booster.save_raw(raw_format="json"))
        trees = model["learner"]["gradient_booster"]["model"]["trees"]
        cuts: list[list[np.ndarray]] = [[] for _ in range(columns)]
        exact = np.zeros(columns, bool)
        for tree in trees:
            inner = np.asarray(tree["left_children"]) >= 0
            features = np.asarray(tree["split_indices"], np.int64)[inner]
            conditions = np.asarray(tree["split_conditions"], np.float32)[inner]
            types = np.asarray(tree.get("split_type", [0] * len(inner)), np.int64)[inner]
            exact[np.unique(features[types != 0])] = True
            numeric = types == 0
            for feature in np.unique(features[numeric]):
                cuts[feature].append(conditions[numeric & (features == feature)])
        thresholds = tuple(np.unique(np.concatenate(c)).astype(np.float32) if c else np.empty(0, np.float32) for c in cuts)
        used = np.array([j for j in range(columns) if exact[j] or thresholds[j].size], dtype=np.int64)
        return cls(thresholds, exact, used)

    def codes(self, values: np.ndarray) -> np.ndarray:
        """(rows, used columns) int32 codes of the model's float32 input: equal codes = the same side of every split."""
        out = np.empty((values.shape[0], self.used.size), np.int32)
        for position, column in enumerate(self.used):
            x = np.ascontiguousarray(values[:, column], dtype=np.float32)
            missing = np.isnan(x)
            if self.exact[column]:
                # xgboost compares categories exactly; NaN payloads all mean missing
                code = np.where(missing, np.float32(np.nan), x).view(np.int32)
            else:
                # the split goes left when x < threshold: the count of thresholds <= x fixes every comparison
                code = np.searchsorted(self.thresholds[column], x, side="right").astype(np.int32)
                code[missing] = NAN_CODE
            out[:, position] = code
        return out


@dataclass
class PreviousOutput:
    """Last night's model output of one tag, by customer: its split codes, probabilities and reason features."""

    index: pd.Index  # customer_id
    codes: np.ndarray  # (customers, used columns)
    proba: np.ndarray  # (customers, classes)
    reason_features: np.ndarray  # (customers, top) booster column index, -1 past the last reason
    reusable: np.ndarray  # bool per customer: a model row of the same version was found for it

    def match(self, customers: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of tonight's batch whose output is last night's (bool), and their positions in last night's arrays."""
        positions = self.index.get_indexer(customers)
        found = positions >= 0
        same = np.zeros(len(customers), bool)
        rows = np.nonzero(found)[0]
        if rows.size:
            prior = positions[rows]
            same[rows] = self.reusable[prior] & (self.codes[prior] == codes[rows]).all(axis=1)
        return same, positions


def _reason_features(reasons: pa.ListArray, names: list[str], categorical: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, top) feature index of each stored reason code, -1 past the last; and per row whether every code was understood."""
    numeric, categorical_names = code_features(names, categorical)
    offsets = reasons.offsets.to_numpy()
    flat = pd.Series(reasons.values.to_numpy(zero_copy_only=False), dtype=object)
    index = flat.map(numeric)
    unmatched = index.isna() & flat.notna()
    if unmatched.any():
        prefix = flat[unmatched].str.split("=", n=1).str[0]
        index[unmatched] = prefix.map(categorical_names)
    understood_flat = index.notna().to_numpy()
    index = index.fillna(-1).to_numpy(dtype=np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    out = np.full((n, max(top, 1)), -1, np.int64)
    ok = lengths <= top
    row_of = np.repeat(np.arange(n), lengths)
    slot = np.arange(len(flat)) - np.repeat(offsets[:-1], lengths)
    keep = slot < out.shape[1]
    out[row_of[keep], slot[keep]] = index[keep]
    bad = np.zeros(n, bool)
    np.logical_or.at(bad, row_of, ~understood_flat)
    return out[:, :top], ok & ~bad


def _transform_batches(features: Path, info: ModelVersionInfo, prepare: Any, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in pq.ParquetFile(features).iter_batches(batch_size=batch_rows, columns=["customer_id", *info.features]):
        frame = batch.to_pandas()
        yield frame["customer_id"].astype(str).to_numpy(dtype=object), np.asarray(prepare.transform(model_input(frame, info)), dtype=np.float32)


def load_previous_output(
    partition: Path,
    tag: str,
    info: ModelVersionInfo,
    recorded: Mapping[str, Any],
    prepare: Any,
    intervals: SplitIntervals,
    names: list[str],
    categorical: np.ndarray,
    top_reasons: int,
    batch_rows: int,
) -> PreviousOutput:
    """Last night's output of `tag` from its partition and the split codes of the features file it was scored from."""
    columns = ["customer_id", "as_of", "tag", "probabilities", "reasons", "model_version"]
    carried_possible = "inferred_as_of" in pq.read_schema(partition).names
    rows = pq.read_table(partition, columns=columns + (["inferred_as_of"] if carried_possible else []), filters=[("tag", "=", tag)])
    customers = rows.column("customer_id").to_numpy(zero_copy_only=False).astype(object)
    index = pd.Index(customers)
    proba = class_ordered_proba(rows.column("probabilities").combine_chunks(), info.classes)
    if top_reasons:
        reason_features, understood = _reason_features(rows.column("reasons").combine_chunks(), names, categorical, top_reasons)
    else:
        reason_features, understood = np.full((len(rows), 0), -1, np.int64), np.ones(len(rows), bool)
    same_version = (rows.column("model_version").to_numpy(zero_copy_only=False) == info.version) & understood
    if carried_possible:
        # a row carried from an earlier night of its refresh period was not computed from the recorded features file
        inferred_that_night = pc.fill_null(pc.equal(rows.column("inferred_as_of"), rows.column("as_of").cast(pa.date32())), False)
        same_version &= inferred_that_night.to_numpy(zero_copy_only=False)
    codes = np.zeros((len(rows), intervals.used.size), np.int32)
    seen = np.zeros(len(rows), bool)
    for batch_customers, values in _transform_batches(Path(recorded["source"]), info, prepare, batch_rows):
        positions = index.get_indexer(batch_customers)
        found = positions >= 0
        codes[positions[found]] = intervals.codes(values[found])
        seen[positions[found]] = True
    return PreviousOutput(index, codes, proba, reason_features, same_version & seen)


def champion_output_problem(partition: Path, tag: str, info: ModelVersionInfo, top_reasons: int) -> tuple[str | None, dict[str, Any]]:
    """Why `partition`'s rows of `tag` are not tonight's champion's output with tonight's reason settings (None when
    they are), and what the partition recorded for the tag: what both reuse and the refresh carry require."""
    try:
        check_parquet(partition, "")
        recorded = read_scored_from(partition).get(tag)
    except (CorruptFileError, OSError, ValueError) as exc:
        return f"the previous partition {partition} is unreadable ({str(exc).splitlines()[0]})", {}
    if not recorded:
        return "the previous partition does not record what this tag was scored from", {}
    if recorded.get("model_version") != info.version or recorded.get("run_id") != info.run_id:
        return f"the champion changed (previous night: version {recorded.get('model_version')}, tonight {info.version})", recorded
    if recorded.get("top_reasons") != top_reasons:
        return f"the reason settings changed (top {recorded.get('top_reasons')} then, {top_reasons} now)", recorded
    return None, recorded


def class_ordered_proba(probabilities: pa.MapArray, classes: tuple[str, ...]) -> np.ndarray:
    """(rows, classes) probabilities of stored tag rows; ValueError unless every row's map holds `classes` in order
    (checked per position in Arrow: 6M Python strings at 1M customers cost seconds)."""
    keys = probabilities.keys
    well_formed = bool((np.diff(probabilities.offsets.to_numpy()) == len(classes)).all()) and all(
        pc.all(pc.equal(keys.take(pa.array(np.arange(k, len(keys), len(classes)))), pa.scalar(name, pa.string()))).as_py() is not False
        for k, name in enumerate(classes)
    )
    if not well_formed:
        raise ValueError("its probabilities are not in the champion's class order")
    return probabilities.items.to_numpy(zero_copy_only=False).reshape(len(probabilities), len(classes))


def reuse_problem(partition: Path | None, tag: str, info: ModelVersionInfo, top_reasons: int) -> tuple[str | None, dict[str, Any]]:
    """Why last night's output of `tag` cannot be reused (None when it can), and what the partition recorded for it."""
    if partition is None:
        return NO_PREVIOUS, {}
    problem, recorded = champion_output_problem(partition, tag, info, top_reasons)
    if problem:
        return problem, recorded
    source = Path(str(recorded.get("source", "")))
    if not source.is_file():
        return f"the previous night's features file {source} is gone", recorded
    if file_identity(source)._asdict() != recorded.get("source_identity"):
        return f"the previous night's features file {source} was rewritten after that night was scored", recorded
    return None, recorded


@dataclass
class TagReuse:
    """One tag's reuse for tonight: its split intervals, last night's output and how many rows each way."""

    intervals: SplitIntervals
    prepare: Any
    previous: PreviousOutput
    reused: int = 0
    rescored: int = 0

    def summary(self) -> dict[str, int]:
        return {"reused_rows": self.reused, "rescored_rows": self.rescored}


def plan_reuse(partition: Path | None, tag: str, info: ModelVersionInfo, model: Any, top_reasons: int, batch_rows: int) -> tuple[TagReuse | None, str | None]:
    """Tonight's reuse of last night's output of `tag` from `partition`, or None and why not. Never raises:
    reuse only saves work, so a night whose previous partition cannot be used is scored in full."""
    if partition is None:
        return None, NO_PREVIOUS
    pipeline = unwrap_pipeline(model)
    if pipeline is None or type(pipeline.named_steps.get("model")).__name__ != "XGBClassifier":
        return None, "only tree models (xgboost) reuse unchanged customers' output"
    problem, recorded = reuse_problem(partition, tag, info, top_reasons)
    if problem:
        return None, problem
    prepare = pipeline.named_steps["prepare"]
    names = list(prepare.get_feature_names_out())
    categorical = np.array([n in info.categorical for n in names])
    try:
        intervals = SplitIntervals.from_booster(pipeline.named_steps["model"].get_booster(), len(names))
        previous = load_previous_output(partition, tag, info, recorded, prepare, intervals, names, categorical, top_reasons, batch_rows)
    except (ValueError, KeyError, OSError, pa.ArrowException) as exc:
        return None, f"the previous night's output is not usable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return TagReuse(intervals, prepare, previous), None
