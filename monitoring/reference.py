"""What a model version is monitored against: the population it was trained to tag.

The registry records each version's training snapshot (`data_snapshot`): the labelled customers,
each with features at their own label date, taken on `train_as_of`. That snapshot is *not* the
population the model scores: labels come from the customers who answered a questionnaire or were
recorded by KYC (mostly investors for risk appetite) and its rows are spread over the months before
training (12-month windows are shorter early on). Measured on the 20,000-customer demo bank, the
snapshot against the full population of its own training date already has 23% (risk_appetite) to
33% (churn_90d) of features above PSI 0.2: a gap that exists the day the model is promoted, that
retraining cannot close, and that would make every tag look drifted forever (and re-evaluate it
every cooldown period).

So the reference is the *population at the snapshot's train_as_of*: every customer's point-in-time
features on that date (the customer_features partition if it exists, otherwise computed from the
staged raw tables, which only uses data dated on or before that day), scored by the same version.
The snapshot still defines the reference (its date, the version's feature list) and the gap
between the two is recorded (`training_gap_share`) so the selection effect stays visible.

Per (tag, version) the reference is profiled once and cached under the drift directory: class counts
and probability histograms of the version's predictions, overall and per slice, and a fixed sample
of feature rows with predictions for the Evidently report (features only, never a customer id).
"""

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from tagml.core.storage import PartitionedTable, WarehouseLayout, atomic_replace, file_identity, quote, sql_literal, write_parquet_atomically
from tagml.core.suppression import Suppression
from tagml.features.own_table import OwnTableSnapshotError
from tagml.features.snapshot import build_feature_snapshot
from tagml.monitoring.psi import EDGE_ROWS, MISSING, BinCounter, Bins, ReferenceCounts, feature_psi, parquet, reference_counts
from tagml.scoring.sources import own_features_table, own_source, write_own_features
from tagml.training.catalog import TagSpec
from tagml.training.inference import infer, model_input
from tagml.training.registry import get_version, load_model, version_info
from tagml.training.versions import ModelVersionInfo, registered_model_name

PROBABILITY_BINS = 10  # fixed-width bins of each class probability
SAMPLE_SALT = "tagml-drift-sample"  # the Evidently sample is the rows with the smallest hash(id, salt)
PROFILE_VERSION = 2  # bump when the cached profile's content changes (2: a digest, the population file's identity)
FEATURE_COUNTS_VERSION = 2  # bump when the cached feature bins or counts change (2: a digest)


class DriftInputError(ValueError):
    """Drift cannot be computed from what is stored (named tag, version, partition or file); nothing was written."""


def monitored_model(client: MlflowClient, tag: TagSpec, version: str) -> ModelVersionInfo:
    """A registered version with what drift needs of it: a finished registration, its training snapshot
    on disk and the training date read from the snapshot's name."""
    name = registered_model_name(tag.name)
    # only "does not exist" is a missing version; other registry errors raise RegistryUnavailableError
    mv = get_version(client, tag.name, str(version))
    if mv is None:
        raise DriftInputError(f"tag {tag.name!r}: registered model {name!r} has no version {version}")
    info = version_info(client, tag.name, mv)
    if info.problem:
        raise DriftInputError(f"tag {tag.name!r}: {name}/{version}: {info.problem}; it cannot be monitored")
    snapshot = info.snapshot_path
    assert snapshot is not None  # a finished registration has its data_snapshot
    if not snapshot.exists():
        raise DriftInputError(
            f"tag {tag.name!r}: the training snapshot of {name}/{version} ({snapshot}) does not exist; "
            "drift has no reference (restore the snapshot or retrain the tag)"
        )
    if info.train_as_of is None:
        raise DriftInputError(f"tag {tag.name!r}: cannot read the training date from snapshot name {snapshot.name!r}")
    return info


def reference_population(
    con: duckdb.DuckDBPyConnection,
    tag: TagSpec,
    model: ModelVersionInfo,
    warehouse_dir: Path,
    staged_dir: Path,
    cache_dir: Path,
    suppression: Suppression | None = None,
) -> Path:
    """Every customer's features on the version's train_as_of: the stored partition, or built once into the cache.

    A bring-your-own tag's population is its own table's snapshot on that date, taken by the scorer's
    function (`write_own_features`): the stored partition when it holds the version's features.
    """
    if own_source(tag) is not None:
        return _own_reference_population(con, tag, model, warehouse_dir, cache_dir, suppression)
    stored = WarehouseLayout(warehouse_dir).customer_features.path(model.train_as_of)
    if stored.exists():
        return stored
    cached = PartitionedTable(cache_dir / "customer_features").path(model.train_as_of)
    if not cached.exists():
        # point in time: only raw rows dated on or before train_as_of are read, so this is the
        # population as it was on that day even if the raw tables have grown since
        build_feature_snapshot(con, staged_dir, model.train_as_of, cached)
    return cached


def _own_reference_population(
    con: duckdb.DuckDBPyConnection, tag: TagSpec, model: ModelVersionInfo, warehouse_dir: Path, cache_dir: Path, suppression: Suppression | None
) -> Path:
    stored = own_features_table(warehouse_dir, tag.name).path(model.train_as_of)
    if stored.exists() and set(model.features) <= set(pq.read_schema(stored).names):
        return stored
    # per version: another version may use other columns of the same table. A table without an as_of
    # column cannot say what it held on train_as_of: the cache keeps it as first seen after training
    cached = PartitionedTable(cache_dir / "own_features" / tag.name / f"v{model.version}").path(model.train_as_of)
    if not cached.exists():
        try:
            write_own_features(con, tag, model, model.train_as_of, cached, suppression)
        except OwnTableSnapshotError as err:
            raise DriftInputError(f"{err} (the reference population of {model.producer} on its training date)") from err
    return cached


@dataclass(frozen=True)
class ReferenceProfile:
    """The version's predictions on its reference population, aggregated, and the report sample."""

    population_path: Path
    rows: int
    class_counts: pd.DataFrame  # slice_column, slice, class, n
    probability_bins: pd.DataFrame  # class, bin, n  (bin k = [k/10, (k+1)/10))
    probability_sums: dict[str, float]  # class -> sum of P(class) over the rows
    training_gap_share: float  # share of features with PSI > feature_psi between snapshot and population
    sample_path: Path


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _atomic_json(path: Path, payload: dict[str, Any]) -> None:
    """Write a cache file with the digest of its content, which `_read_cache` checks before trusting a number of it."""
    plain = json.loads(json.dumps(payload, default=str))  # the payload exactly as it will read back
    with atomic_replace(path) as tmp:
        tmp.write_text(json.dumps({**plain, "digest": _digest(plain)}, indent=1))


def _read_cache(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """A cache file's payload when it was written whole by `_atomic_json` for the same inputs (`key`), else None.

    Anything else (a truncated or hand-edited file, another version's format) is recomputed by the caller:
    a cache may cost a recount, never a wrong PSI.
    """
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(payload, dict) or payload.get("key") != key:
        return None
    digest = payload.pop("digest", None)
    return payload if digest == _digest(payload) else None


def sample_sql(path: Path | str, columns: list[str], rows: int) -> str:
    """A fixed sample: the `rows` customers with the smallest salted hash (same rows every run)."""
    cols = ", ".join(quote(c) for c in columns)
    return f"SELECT {cols} FROM {parquet(path)} ORDER BY hash(customer_id, {sql_literal(SAMPLE_SALT)}), customer_id LIMIT {int(rows)}"


def _profile_predictions(
    con: duckdb.DuckDBPyConnection, model: Any, mm: ModelVersionInfo, tag: TagSpec, population: Path, slices: dict[str, str], batch_rows: int
) -> tuple[int, pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """(rows, class counts overall and per slice, probability bins, probability sums) of the version's
    predictions on every row of the population, streamed in batches."""
    slice_cols = ", ".join(f"coalesce(({expr})::VARCHAR, {sql_literal(MISSING)}) AS {quote('_slice_' + name)}" for name, expr in slices.items())
    select = ", ".join(quote(f) for f in mm.features)
    # a cursor of its own: the stream must not be interrupted by (or interrupt) other queries on `con`
    stream = con.cursor()
    reader = stream.sql(f"SELECT {slice_cols + ', ' if slice_cols else ''}{select} FROM {parquet(population)}").to_arrow_reader(batch_rows)
    counts: dict[tuple[str, str, str], int] = {}
    bins = np.zeros((len(mm.classes), PROBABILITY_BINS), dtype=np.int64)
    sums = np.zeros(len(mm.classes))
    rows = 0
    for batch in reader:
        frame = batch.to_pandas()
        inference = infer(model, model_input(frame, mm), mm, tag.min_confidence)
        inferred, proba = inference.values, inference.proba
        rows += len(frame)
        sums += proba.sum(axis=0)
        which = np.minimum((proba * PROBABILITY_BINS).astype(int), PROBABILITY_BINS - 1)
        for k in range(len(mm.classes)):
            bins[k] += np.bincount(which[:, k], minlength=PROBABILITY_BINS)
        groups = [("(all)", pd.Series("(all)", index=frame.index))] + [(name, frame[f"_slice_{name}"]) for name in slices]
        for column, values in groups:
            tally = pd.DataFrame({"slice": values.to_numpy(), "class": inferred}).value_counts()
            for (slice_value, cls), n in tally.items():
                counts[(column, slice_value, cls)] = counts.get((column, slice_value, cls), 0) + int(n)
    stream.close()
    if rows == 0:
        raise DriftInputError(f"tag {tag.name!r}: the reference population {population} has no rows")
    class_counts = pd.DataFrame([(c, s, k, n) for (c, s, k), n in counts.items()], columns=["slice_column", "slice", "class", "n"])
    probability_bins = pd.DataFrame(
        [(cls, b, int(bins[k, b])) for k, cls in enumerate(mm.classes) for b in range(PROBABILITY_BINS)], columns=["class", "bin", "n"]
    )
    probability_sums = {cls: float(sums[k]) for k, cls in enumerate(mm.classes)}
    return rows, class_counts, probability_bins, probability_sums


def _cached_profile(meta_path: Path, sample_path: Path, key: dict[str, Any], population: Path) -> ReferenceProfile | None:
    """The cached profile when it was computed with the same inputs (`key`), else None."""
    if not sample_path.exists():
        return None
    meta = _read_cache(meta_path, key)
    if meta is None:
        return None
    try:
        class_counts = _counts_frame(meta["class_counts"], ["slice_column", "slice", "class"])
        probability_bins = _counts_frame(meta["probability_bins"], ["class", "bin"], ("bin",))
        probability_sums = {str(c): _finite(v) for c, v in meta["probability_sums"].items()}
        rows, gap = meta["rows"], _finite(meta["training_gap_share"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if type(rows) is not int or rows <= 0:
        return None
    return ReferenceProfile(population, rows, class_counts, probability_bins, probability_sums, gap, sample_path)


def _finite(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    return float(value)


def _counts_frame(columns: Any, keys: list[str], integer_keys: tuple[str, ...] = ()) -> pd.DataFrame:
    """A cached counts table (column -> list): the `keys` as text (the `integer_keys` as integers) and `n` as non-negative integers, all of one length."""
    if not isinstance(columns, dict) or set(columns) != {*keys, "n"}:
        raise ValueError("not a counts table")
    lengths = {len(v) if isinstance(v, list) else -1 for v in columns.values()}
    if len(lengths) != 1 or -1 in lengths:
        raise ValueError("columns of different lengths")
    if not all(type(v) is (int if k in integer_keys else str) for k in keys for v in columns[k]):
        raise ValueError("a key of the wrong type")
    if not all(type(n) is int and n >= 0 for n in columns["n"]):
        raise ValueError("a count that is not a non-negative integer")
    return pd.DataFrame({c: columns[c] for c in [*keys, "n"]}).astype({"n": "int64"})


def reference_profile(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient,
    mm: ModelVersionInfo,
    tag: TagSpec,
    population: Path,
    slices: dict[str, str],
    cache_dir: Path,
    sample_rows: int,
    batch_rows: int = 100_000,
) -> ReferenceProfile:
    """Profile (or read the cached profile of) a version's predictions on its reference population."""
    folder = cache_dir / tag.name / f"v{mm.version}"
    meta_path, sample_path = folder / "profile.json", folder / "sample.parquet"
    key = {
        "profile_version": PROFILE_VERSION,
        "population": _population_key(population, cache_dir),
        "population_file": file_identity(population)._asdict(),
        "slices": slices,
        "sample_rows": sample_rows,
        "min_confidence": tag.min_confidence,
        "feature_psi": tag.drift.feature_psi,
    }
    cached = _cached_profile(meta_path, sample_path, key, population)
    if cached is not None:
        return cached

    model = load_model(client, tag.name, mm.version)
    rows, class_counts, probability_bins, probability_sums = _profile_predictions(con, model, mm, tag, population, slices, batch_rows)

    # the labelled training snapshot against the population of its date: the selection gap
    gap = feature_psi(con, mm.snapshot_path, population, mm.kinds)
    training_gap_share = float((gap["psi"] > tag.drift.feature_psi).mean())

    sample = con.execute(sample_sql(population, list(mm.features), sample_rows)).df()
    sample["prediction"] = infer(model, model_input(sample, mm), mm, tag.min_confidence).values
    con.register("_reference_sample", sample)
    try:
        write_parquet_atomically(con, "SELECT * FROM _reference_sample", sample_path)
    finally:
        con.unregister("_reference_sample")
    _atomic_json(
        meta_path,
        {
            "key": key,
            "tag": tag.name,
            "version": mm.version,
            "train_as_of": mm.train_as_of.isoformat(),
            "rows": rows,
            "class_counts": class_counts.to_dict(orient="list"),
            "probability_bins": probability_bins.to_dict(orient="list"),
            "probability_sums": probability_sums,
            "training_gap_share": training_gap_share,
        },
    )
    return ReferenceProfile(population, rows, class_counts, probability_bins, probability_sums, training_gap_share, sample_path)


def _population_key(population: Path, cache_dir: Path) -> str:
    """The population as a cache key names it: relative to the cache when built into it, so that a moved or copied
    drift directory (a restored backup, bench_drift's copies) keeps its caches; the file's identity guards the content."""
    try:
        return "cache:" + Path(population).relative_to(cache_dir).as_posix()
    except ValueError:
        return str(population)


def reference_feature_counts(
    con: duckdb.DuckDBPyConnection,
    mm: ModelVersionInfo,
    tag: TagSpec,
    population: Path,
    slices: dict[str, str],
    cache_dir: Path,
    bin_counter: BinCounter | None = None,
) -> ReferenceCounts:
    """The feature PSI's reference side for a version (its bins and the population's counts in them, overall and
    per slice), computed once and cached next to its profile: every night after the first only counts the current side.

    The cache is keyed by the population file's size and mtime as well as its path, so a rewritten
    reference partition (a restated day) is counted again rather than compared against stale counts.
    """
    path = cache_dir / tag.name / f"v{mm.version}" / "feature_counts.json"
    key = {
        "feature_counts_version": FEATURE_COUNTS_VERSION,
        "population": _population_key(population, cache_dir),
        "population_file": file_identity(population)._asdict(),
        "features": dict(mm.kinds),
        "slices": slices,
        "edge_rows": EDGE_ROWS,
    }
    cached = _read_cache(path, key)
    if cached is not None:
        try:
            return _cached_counts(cached, mm.kinds)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a payload of another shape under a matching key and digest: counted again below
    computed = reference_counts(con, population, mm.kinds, slices, bin_counter)
    counts = computed.counts[["slice_column", "slice", "feature", "bin", "n"]]
    _atomic_json(
        path,
        {
            "key": key,
            "tag": tag.name,
            "version": mm.version,
            # floats as Python writes them (repr): read back to exactly the same edges
            "edges": {name: {"edges": list(b.edges), "mass": b.mass} for name, b in computed.edges.items()},
            "counts": {column: counts[column].tolist() for column in counts.columns},
        },
    )
    return computed


def _cached_counts(cached: dict[str, Any], kinds: dict[str, str]) -> ReferenceCounts:
    """The bins and counts of a cache file, checked against the version's features; ValueError (or a KeyError, TypeError) if they do not fit."""
    edges = {}
    for name, spec in cached["edges"].items():
        if kinds.get(name) in (None, "categorical") or set(spec) != {"edges", "mass"} or not isinstance(spec["edges"], list):
            raise ValueError(f"the bins of {name!r} are not a numeric feature's")
        values = tuple(_finite(e) for e in spec["edges"])
        if list(values) != sorted(set(values)):
            raise ValueError(f"the edges of {name!r} are not increasing")
        edges[name] = Bins(values, None if spec["mass"] is None else _finite(spec["mass"]))
    counts = _counts_frame(cached["counts"], ["slice_column", "slice", "feature", "bin"])
    if set(counts["feature"]) - set(kinds):
        raise ValueError("counts of a feature the version does not use")
    return ReferenceCounts(edges, counts)
