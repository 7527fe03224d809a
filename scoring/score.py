"""Batch scoring of every customer into one tag-store partition.

Each tag is scored from its own feature source (scoring/sources.py): rule and contract model tags
from the as_of's customer_features, a bring-your-own tag from its own snapshot. Snapshots are
streamed in batches (memory does not grow with the number of customers); model tags use their
`champion` (resolved by alias when the run starts), rule tags their SQL bands, the suitability tag
the staged holdings against the valid assessments (scoring/suitability.py). An observed label wins
over the inference only while it is valid (`label.valid_days`): an expired one stays on the row
(`observed_value`, `assessed_on`, `assessment`). Every row records what produced it.

The partition is all or nothing: every tag's inputs are resolved and checked before anything is
written, and one error names every tag that cannot be scored and why. All tags go to one temporary
Parquet file that replaces the partition only when everything succeeded and the file passed the
coverage check. Tags left out on purpose (`skip`, with a reason) are not expected by the check.
"""

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from tagml.core.files import CorruptFileError, check_parquet
from tagml.core.storage import atomic_replace, sql_literal
from tagml.features.snapshot import open_feature_snapshot
from tagml.scoring.coverage import Coverage, check_coverage
from tagml.scoring.reasons import ReasonExplainer, explains, snapshot_medians
from tagml.scoring.refresh import CARRY_OFF, CarriedInference, plan_carry
from tagml.scoring.reuse import REUSE_OFF, SCORED_FROM_KEY, TagReuse, plan_reuse, scored_from_entry
from tagml.scoring.rules import RuleInputError, rule_batches, rule_case_sql, rule_version
from tagml.scoring.sources import known_labels_sql, labels_input, own_source
from tagml.scoring.suitability import holdings_month, suitability_batches
from tagml.training.catalog import UNKNOWN, Catalog, TagSpec
from tagml.training.inference import Inference, infer, inference_of, model_input
from tagml.training.registry import CHAMPION, IncompleteRegistrationError, alias_version, load_model, require_complete, version_info
from tagml.training.versions import ModelVersionInfo, registered_model_name

DEFAULT_BATCH_ROWS = 100_000

TAG_ROW_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("as_of", pa.date32()),
        ("tag", pa.string()),
        ("value", pa.string()),
        ("probability", pa.float64()),
        ("probabilities", pa.map_(pa.string(), pa.float64())),
        ("reasons", pa.list_(pa.string())),
        ("source", pa.string()),  # model | rule | observed
        ("inferred_value", pa.string()),
        ("observed_value", pa.string()),
        ("observed_mismatch", pa.bool_()),
        ("assessment", pa.string()),  # valid | expired | none where the tag's labels expire (label.valid_days), else NULL
        ("assessed_on", pa.date32()),  # the label_date of the newest observed label (NULL when none)
        ("producer", pa.string()),  # registered model/version, or rule version
        ("model_version", pa.string()),
        ("mlflow_run_id", pa.string()),
        ("scored_at", pa.timestamp("s", tz="UTC")),
        # the as_of of the features the value was inferred from: the partition's own, or an earlier night's where the
        # tag's catalog refresh (weekly, monthly, ...) carried the period's inference (scoring/refresh.py)
        ("inferred_as_of", pa.date32()),
    ]
)


class ScoringError(RuntimeError):
    """Scoring cannot proceed (missing champion, features not matching the model); nothing was written."""


class UnscorableTagsError(ScoringError):
    """One or more tags cannot be scored (`problems`: tag -> why); nothing was written."""

    def __init__(self, as_of: date, problems: dict[str, str]):
        self.problems = problems
        super().__init__(
            f"customer_tags {as_of}: {len(problems)} tag(s) cannot be scored, nothing was written "
            "(skip_tags publishes the partition without them): " + "; ".join(f"tag {t!r}: {why}" for t, why in problems.items())
        )


class CoverageError(ScoringError):
    """The scored file does not cover the snapshot; it was not published and the old partition stays."""

    def __init__(self, as_of: date, coverage: Coverage):
        self.coverage = coverage
        problems = coverage.problems
        super().__init__(
            f"customer_tags {as_of}: coverage check failed, the partition was not replaced: "
            + "; ".join(problems[:8])
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        )


@dataclass(frozen=True)
class Champion:
    info: ModelVersionInfo  # the version behind the alias, as registered
    model: Any


@dataclass
class ScoringSummary:
    as_of: date
    path: Path
    rows: int
    customers: int
    seconds: float
    per_tag: dict[str, dict[str, Any]] = field(default_factory=dict)
    coverage: Coverage | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # tag -> why it was left out of the partition


def resolve_champion(client: MlflowClient, tag: TagSpec) -> Champion:
    """The champion of a model tag, with the feature list and classes recorded at registration."""
    name = registered_model_name(tag.name)
    # only "does not exist" means no champion; any other registry error raises RegistryUnavailableError
    version = alias_version(client, tag.name, CHAMPION)
    if version is None:
        raise ScoringError(f"tag {tag.name!r}: no '{CHAMPION}' alias on registered model {name!r}; train and promote a model first")
    try:
        require_complete(version)
    except IncompleteRegistrationError as exc:
        raise ScoringError(f"tag {tag.name!r}: the champion {exc}") from exc
    info = version_info(client, tag.name, version)
    return Champion(info, load_model(client, tag.name, info.version))


@dataclass(frozen=True)
class ObservedLabels:
    """Per customer, the newest observed label within the tag's classes known on as_of and its label date,
    and how many customers had labels outside the classes (a source's data error: never stored as a tag value)."""

    labels: pd.Series
    outside_classes: dict[str, int]
    dates: pd.Series


def observed_labels(con: duckdb.DuckDBPyConnection, staged_dir: Path | None, tag: TagSpec, as_of: date) -> ObservedLabels:
    """The newest observed label per customer known on `as_of` (within the tag's max label age, unless its labels expire).

    Labels outside the tag's classes are left out (counted per value): the customer then keeps the
    model's inference, or an older label that is valid.
    """
    source = f"({known_labels_sql(tag, as_of, staged_dir)})"
    classes = list(tag.classes)
    # a DataFrame, not Python tuples: a delayed-label tag has an outcome for most customers
    rows = con.execute(
        f"SELECT customer_id::VARCHAR AS customer_id, arg_max(label, label_date) AS label, max(label_date) AS label_date FROM {source} "
        "WHERE list_contains(?, label) GROUP BY 1",
        [classes],
    ).df()
    outside = con.execute(
        f"SELECT label, count(DISTINCT customer_id) FROM {source} WHERE NOT list_contains(?, label) GROUP BY label ORDER BY label",
        [classes],
    ).fetchall()
    index = pd.Index(rows["customer_id"].to_numpy(dtype=object))
    days = pd.Series(rows["label_date"].dt.date.to_numpy(dtype=object), index=index, dtype=object)  # datetime.date, as the validity rule compares
    return ObservedLabels(pd.Series(rows["label"].to_numpy(dtype=object), index=index, dtype=object), {str(label): int(n) for label, n in outside}, days)


def _feature_problem(path: Path, champion: Champion, own: bool) -> str | None:
    available = set(pq.read_schema(path).names)
    missing = [f for f in champion.info.features if f not in available]
    if not missing:
        return None
    hint = f"; re-materialize {champion.info.tag}/own_features for the partition" if own else ""
    return f"feature table {path} lacks {len(missing)} column(s) the champion {champion.info.producer} was trained on: {missing[:10]}{hint}"


@dataclass(frozen=True)
class ModelTagJob:
    """What one model tag's rows need besides the model and the features; picklable, so a Spark job
    ships it to its workers once (the model itself is loaded there from the registry)."""

    tag: TagSpec
    info: ModelVersionInfo  # the champion version, resolved once on the driver
    observed: pd.Series  # customer_id -> observed label (observed_labels)
    observed_on: pd.Series  # customer_id -> that label's label_date
    explainer: ReasonExplainer | None
    as_of: date
    scored_at: datetime
    top_reasons: int
    reuse: TagReuse | None = None  # last night's output for customers whose model input did not move (scoring/reuse.py)
    carry: CarriedInference | None = None  # the refresh period's inferences, kept tonight (scoring/refresh.py)

    @property
    def columns(self) -> list[str]:
        """The snapshot columns each batch must hold."""
        return ["customer_id", *self.info.features]

    @cached_property
    def observed_labels(self) -> pa.Array:
        return pa.array(self.observed.to_numpy(dtype=object), pa.string())

    @cached_property
    def observed_dates(self) -> pa.Array:
        return pa.array(self.observed_on.to_numpy(dtype=object), pa.date32())

    @cached_property
    def observed_class(self) -> np.ndarray:
        """Per observed label, its index in the champion's classes (observed_labels keeps only labels of the classes)."""
        return pd.Index(self.info.classes).get_indexer(self.observed.to_numpy(dtype=object))

    @cached_property
    def label_valid(self) -> np.ndarray | None:
        """Per observed label (in `observed`'s order): still valid on as_of; None where the tag's labels do not expire."""
        valid_from = self.tag.label.valid_from(self.as_of) if self.tag.label is not None else None
        if valid_from is None:
            return None
        return np.array([d >= valid_from for d in self.observed_on.to_numpy()], dtype=bool)


ASSESSMENTS = pa.array(["valid", "expired", "none"], pa.string())
EXPIRED = 1
SOURCES = pa.array(["model", "observed"], pa.string())


@dataclass(frozen=True)
class Assessed:
    """One batch's observed labels: per customer the label (null when none) and its date as Arrow arrays, whether one
    exists and its class index (numpy), and the assessment (valid | expired | none; null where labels do not expire)."""

    seen: pa.Array
    assessed_on: pa.Array
    has_observed: np.ndarray
    seen_class: np.ndarray
    assessment: pa.Array
    expired: np.ndarray


def _assessments(job: ModelTagJob, customers: np.ndarray) -> Assessed:
    """The observed labels of a batch's customers, looked up once and kept in Arrow (no per-row Python objects)."""
    n = len(customers)
    positions = job.observed.index.get_indexer(customers)
    has_observed = positions >= 0
    lookup = pa.array(positions, pa.int64(), mask=~has_observed)
    seen_class = np.where(has_observed, job.observed_class[np.maximum(positions, 0)], -1) if len(job.observed) else np.full(n, -1)
    label_valid = job.label_valid
    if label_valid is None:
        assessment, expired = pa.nulls(n, pa.string()), np.zeros(n, dtype=bool)
    else:
        valid = np.zeros(n, dtype=bool)
        valid[has_observed] = label_valid[positions[has_observed]]
        codes = np.where(valid, 0, np.where(has_observed, EXPIRED, 2))
        assessment, expired = ASSESSMENTS.take(pa.array(codes, pa.int8())), codes == EXPIRED
    return Assessed(job.observed_labels.take(lookup), job.observed_dates.take(lookup), has_observed, seen_class, assessment, expired)


def model_tag_batches(batches: Iterable[pa.RecordBatch], model: Any, job: ModelTagJob) -> Iterator[pa.RecordBatch]:
    """The one scorer of a model tag, batch by batch (feature columns in, TAG_ROW_SCHEMA out): probabilities,
    `unknown` below min_confidence, observed-label precedence (an expired assessment never wins) and reason
    codes. DuckDB's path feeds it a ParquetFile's batches, Spark's the batches of mapInArrow."""
    tag, info = job.tag, job.info
    classes = len(info.classes)
    class_names = pa.array(info.classes, pa.string())
    values = pa.array([*info.classes, UNKNOWN], pa.string())  # indexed by Inference.value_index, UNKNOWN last
    observed_wins = tag.label is not None and tag.label.observed_wins
    for batch in batches:
        n = batch.num_rows
        customers = batch.column("customer_id").cast(pa.string())
        customer_ids = customers.to_numpy(zero_copy_only=False)
        if job.carry is None:
            inference, reasons = _inferred(model, model_input(batch.to_pandas(), info), customers, job)
            scored_at, inferred_as_of = _constant(job.scored_at, pa.timestamp("s", tz="UTC"), n), _constant(job.as_of, pa.date32(), n)
        else:
            inference, reasons, scored_at, inferred_as_of = _carrying(model, batch, customer_ids, job, job.carry)
        proba = inference.proba
        observed = _assessments(job, customer_ids)
        inferred = values.take(pa.array(np.where(inference.value_index < 0, classes, inference.value_index), pa.int64()))
        wins = observed.has_observed & observed_wins & ~observed.expired
        # the probability of the stored value: its class's, or the top class's confidence for `unknown`
        column = np.where(wins, observed.seen_class, np.where(inference.value_index < 0, -1, inference.top)).astype(np.int64)
        prob_of_value = np.where(column >= 0, proba[np.arange(n), np.maximum(column, 0)], inference.confidence)
        yield pa.RecordBatch.from_arrays(
            [
                customers,
                _constant(job.as_of, pa.date32(), n),
                _constant(tag.name, pa.string(), n),
                pc.if_else(pa.array(wins), observed.seen, inferred),
                pa.array(prob_of_value, pa.float64()),
                pa.MapArray.from_arrays(
                    pa.array(np.arange(0, (n + 1) * classes, classes), pa.int32()),
                    class_names.take(pa.array(np.tile(np.arange(classes, dtype=np.int32), n))),
                    pa.array(proba.astype("float64").ravel()),
                ),
                reasons,
                SOURCES.take(pa.array(wins.astype(np.int8))),
                inferred,
                observed.seen,
                pc.not_equal(observed.seen, inferred),  # null where no label was observed
                observed.assessment,
                observed.assessed_on,
                _constant(info.producer, pa.string(), n),
                _constant(info.version, pa.string(), n),
                _constant(info.run_id, pa.string(), n),
                scored_at,
                inferred_as_of,
            ],
            schema=TAG_ROW_SCHEMA,
        )


def _no_reasons(n: int) -> pa.Array:
    return pa.array([[]] * n, pa.list_(pa.string()))


def _inferred(model: Any, X: pd.DataFrame, customers: pa.Array, job: ModelTagJob) -> tuple[Inference, pa.Array]:
    """Tonight's inference and reasons of a batch (reusing last night's output of unchanged customers where on)."""
    if job.reuse is not None:
        return _reusing(model, X, customers, job, job.reuse)
    inference = infer(model, X, job.info, job.tag.min_confidence)
    return inference, job.explainer.reason_codes(X, inference.top, job.top_reasons) if job.explainer else _no_reasons(len(X))


def _carrying(
    model: Any, batch: pa.RecordBatch, customer_ids: np.ndarray, job: ModelTagJob, carry: CarriedInference
) -> tuple[Inference, pa.Array, pa.Array, pa.Array]:
    """A batch's inference, reasons, scored_at and inferred_as_of: the period's carried inference where a customer has
    one, tonight's for the others (only their rows are converted and prepared for the model)."""
    n = batch.num_rows
    positions = carry.positions(customer_ids)
    kept = np.nonzero(positions >= 0)[0]
    fresh = np.nonzero(positions < 0)[0]
    carry.carried += kept.size
    carry.inferred += fresh.size
    proba = np.empty((n, len(job.info.classes)), np.float64)
    proba[kept] = carry.proba[positions[kept]]
    parts_reasons = [carry.reasons.take(positions[kept])]
    parts_scored = [carry.scored_at.take(positions[kept])]
    parts_inferred = [carry.inferred_as_of.take(positions[kept])]
    if fresh.size:
        subset = batch if fresh.size == n else batch.take(pa.array(fresh))
        fresh_inference, fresh_reasons = _inferred(model, model_input(subset.to_pandas(), job.info), subset.column("customer_id").cast(pa.string()), job)
        proba[fresh] = fresh_inference.proba
        parts_reasons.append(fresh_reasons)
        parts_scored.append(_constant(job.scored_at, pa.timestamp("s", tz="UTC"), fresh.size))
        parts_inferred.append(_constant(job.as_of, pa.date32(), fresh.size))
    # rows were laid out kept first, then fresh: put each back at its place in the batch
    order = np.empty(n, np.int64)
    order[np.concatenate([kept, fresh])] = np.arange(n)
    back = pa.array(order)

    def placed(parts: list[pa.Array]) -> pa.Array:
        return pa.concat_arrays([p.combine_chunks() if isinstance(p, pa.ChunkedArray) else p for p in parts]).take(back)

    inference = inference_of(proba, job.info, job.tag.min_confidence)
    return inference, placed(parts_reasons), placed(parts_scored), placed(parts_inferred)


def _reusing(model: Any, X: pd.DataFrame, customers: pa.Array, job: ModelTagJob, reuse: TagReuse) -> tuple[Inference, pa.Array]:
    """A batch's inference and reasons, last night's for the rows whose split codes did not move and the model's
    for the rest; the reason text is tonight's for every row."""
    n = len(X)
    values = np.ascontiguousarray(reuse.prepare.transform(X), dtype=np.float32)
    same, positions = reuse.previous.match(customers.to_numpy(zero_copy_only=False), reuse.intervals.codes(values))
    fresh = np.nonzero(~same)[0]
    kept = np.nonzero(same)[0]
    reuse.reused += kept.size
    reuse.rescored += fresh.size
    proba = np.empty((n, len(job.info.classes)), np.float64)
    proba[kept] = reuse.previous.proba[positions[kept]]
    if fresh.size:
        proba[fresh] = model.predict_proba(X.iloc[fresh])
    inference = inference_of(proba, job.info, job.tag.min_confidence)
    if job.explainer is None:
        return inference, _no_reasons(n)
    features = np.full((n, job.top_reasons), -1, np.int64)
    features[kept] = reuse.previous.reason_features[positions[kept]]
    if fresh.size:
        features[fresh] = job.explainer.reason_features(X.iloc[fresh], inference.top[fresh], job.top_reasons, values[fresh])
    return inference, job.explainer.codes(X, features)


def _constant(value: Any, type_: pa.DataType, n: int) -> pa.Array:
    """One value on every row of a batch (lineage and partition columns)."""
    return pa.repeat(pa.scalar(value, type_), n)


def _model_batches(path: Path, model: Any, job: ModelTagJob, batch_rows: int) -> Iterator[pa.RecordBatch]:
    # row group by row group: a dataset scan reads ahead and its memory grew with the file
    yield from model_tag_batches(pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=job.columns), model, job)


def rule_tag_sql(tag: TagSpec, as_of: date, scored_at: datetime) -> str:
    """A rule tag's rows in TAG_ROW_SCHEMA's columns, over a relation `features` (customer_id and the rule's columns)."""
    return (
        f"SELECT customer_id::VARCHAR AS customer_id, DATE {sql_literal(as_of)} AS as_of, {sql_literal(tag.name)} AS tag, "
        f"{rule_case_sql(tag)} AS value, NULL::DOUBLE AS probability, NULL::MAP(VARCHAR, DOUBLE) AS probabilities, "
        f"[]::VARCHAR[] AS reasons, 'rule' AS source, NULL::VARCHAR AS inferred_value, NULL::VARCHAR AS observed_value, "
        f"NULL::BOOLEAN AS observed_mismatch, NULL::VARCHAR AS assessment, NULL::DATE AS assessed_on, {sql_literal(rule_version(tag))} AS producer, NULL::VARCHAR AS model_version, "
        f"NULL::VARCHAR AS mlflow_run_id, TIMESTAMPTZ {sql_literal(scored_at.isoformat())} AS scored_at, DATE {sql_literal(as_of)} AS inferred_as_of "
        "FROM features"
    )


def as_tag_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """Rule rows as TAG_ROW_SCHEMA batches (DuckDB hands back its own timestamp unit)."""
    for batch in batches:
        yield batch.cast(TAG_ROW_SCHEMA) if batch.schema != TAG_ROW_SCHEMA else batch


def _rule_batches(con: duckdb.DuckDBPyConnection, path: Path, tag: TagSpec, as_of: date, scored_at: datetime, batch_rows: int) -> Iterator[pa.RecordBatch]:
    # on a sandboxed connection (no file access) over the snapshot's columns as Arrow batches
    try:
        yield from as_tag_rows(rule_batches(con, path, tag, rule_tag_sql(tag, as_of, scored_at), batch_rows))
    except (duckdb.Error, RuleInputError) as exc:
        raise ScoringError(f"rule tag {tag.name!r}: its bands do not evaluate on {path}: {str(exc).splitlines()[0]}") from exc


def rule_tag_rows(
    con: duckdb.DuckDBPyConnection, catalog: Catalog, tag: TagSpec, path: Path, staged_dir: Path | None, as_of: date, scored_at: datetime, batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """A rule tag's rows on DuckDB: its bands over the snapshot, or, for a suitability tag, the holdings against the assessments
    (`catalog`: the whole catalog, where the assessment tag is declared even when it is skipped)."""
    if tag.suitability is None:
        yield from _rule_batches(con, path, tag, as_of, scored_at, batch_rows)
        return
    assert staged_dir is not None  # plan_scoring refuses a suitability tag without one
    try:
        yield from as_tag_rows(suitability_batches(con, catalog, tag, path, staged_dir, as_of, scored_at, batch_rows))
    except duckdb.Error as exc:
        raise ScoringError(f"rule tag {tag.name!r}: suitability does not evaluate on the staged holdings and products: {str(exc).splitlines()[0]}") from exc


def rule_tag_summary(con: duckdb.DuckDBPyConnection, tag: TagSpec, staged_dir: Path | None, as_of: date) -> dict[str, Any]:
    """What a rule tag's step reports: its producer and, for suitability, the holdings month it read."""
    summary: dict[str, Any] = {"producer": rule_version(tag)}
    if tag.suitability is not None and staged_dir is not None:
        month = holdings_month(con, staged_dir, as_of)
        summary["holdings_month_end"] = month.isoformat() if month else "no holdings delivered"
    return summary


@dataclass(frozen=True)
class ScoringPlan:
    """What a partition is scored from, every tag resolved and checked: nothing is written before it exists."""

    catalog: Catalog  # the catalog's tags to score (without the skipped ones)
    sources: dict[str, Path]  # tag -> the snapshot it is scored from
    champions: dict[str, Champion]
    skipped: dict[str, str]  # tag -> the reason it was left out


def _snapshot_problem(path: Path | None, tag: TagSpec, as_of: date) -> str | None:
    own = own_source(tag) is not None
    asset = f"{tag.name}/own_features" if own else "customer_features"
    if path is None or not path.exists():
        return f"no {'own ' if own else ''}feature snapshot for as_of {as_of}{f' at {path}' if path else ''}; materialize {asset} first"
    try:
        if own:
            check_parquet(path, f"re-materialize {asset} for the partition {as_of.isoformat()}")
        else:
            open_feature_snapshot(path, as_of)
    except CorruptFileError as err:
        return str(err)
    return None


def _labels_problem(tag: TagSpec, staged_dir: Path | None) -> str | None:
    path = labels_input(tag, staged_dir)
    if path is None:
        return "its observed labels are the staged tag_labels, and no staged directory was given"
    if path.exists():
        return None
    source = own_source(tag)
    own_file = source is not None and source.labels_path is not None
    return f"no labels file at {path}" + ("" if own_file else "; run the raw ingest (raw_ingest_job) first")


def _tag_problem(
    client: MlflowClient, catalog: Catalog, tag: TagSpec, path: Path | None, staged_dir: Path | None, as_of: date, champions: dict[str, Champion]
) -> str | None:
    problem = _snapshot_problem(path, tag, as_of)
    if problem is None and tag.suitability is not None:
        # the assessments are the assessment tag's observed labels, read even when that tag is skipped
        problem = _labels_problem(catalog.get(tag.suitability.assessment_tag), staged_dir)
    if problem or tag.kind == "rule":
        return problem
    problem = _labels_problem(tag, staged_dir)
    if problem:
        return problem
    try:
        champion = resolve_champion(client, tag)
    except ScoringError as err:
        return str(err).removeprefix(f"tag {tag.name!r}: ")
    champions[tag.name] = champion
    return _feature_problem(path, champion, own_source(tag) is not None)


def plan_scoring(
    client: MlflowClient | None,
    catalog: Catalog,
    features_path: Path | None,
    own_features: Mapping[str, Path],
    staged_dir: Path | None,
    as_of: date,
    skip: Mapping[str, str],
) -> ScoringPlan:
    """Resolve every tag not skipped (its snapshot, labels, champion and the champion's features); one
    `UnscorableTagsError` names every tag that fails and why."""
    unknown = sorted(set(skip) - {t.name for t in catalog.tags})
    if unknown:
        raise ScoringError(f"skip_tags names {unknown}, not tags of the catalog (known: {[t.name for t in catalog.tags]})")
    active = tuple(t for t in catalog.tags if t.name not in skip)
    if not active:
        raise ScoringError("skip_tags leaves no tag to score")
    if any(t.kind == "model" for t in active) and client is None:
        raise ScoringError("model tags need an MLflow client to resolve their champions")
    sources = {t.name: (own_features.get(t.name) if own_source(t) else features_path) for t in active}
    champions: dict[str, Champion] = {}
    problems = {t.name: p for t in active if (p := _tag_problem(client, catalog, t, sources[t.name], staged_dir, as_of, champions))}
    if problems:
        raise UnscorableTagsError(as_of, problems)
    return ScoringPlan(catalog.model_copy(update={"tags": active}), sources, champions, dict(skip))


def _shared_medians(con: duckdb.DuckDBPyConnection, plan: ScoringPlan) -> dict[Path, dict[str, float]]:
    """Per snapshot, the medians of every numeric feature some explained champion scored from it uses: one pass each."""
    wanted: dict[Path, set[str]] = {}
    for tag in plan.catalog.model_tags:
        champion = plan.champions[tag.name]
        numeric = wanted.setdefault(plan.sources[tag.name], set())
        if explains(champion.model):
            numeric.update(f for f in champion.info.features if f not in champion.info.categorical)
    return {path: snapshot_medians(con, path, sorted(names)) for path, names in wanted.items()}


def score_partition(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient | None,
    catalog: Catalog,
    features_path: Path | None,
    staged_dir: Path | None,
    as_of: date,
    target: Path,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    top_reasons: int = 3,
    with_reasons: bool = True,
    own_features: Mapping[str, Path] | None = None,
    skip: Mapping[str, str] | None = None,
    previous_partition: Path | None = None,
    honour_refresh: bool = True,
    reuse_unchanged: bool = False,
) -> ScoringSummary:
    """Score every catalog tag (but the `skip`ped: tag -> reason) for every customer of its snapshot and replace `target` atomically.

    `features_path` is the as_of's customer_features (None when no tag reads it); `own_features` the
    snapshot of each bring-your-own tag; `staged_dir` holds the staged tag_labels (observed labels).
    `previous_partition`: the newest earlier tag partition. With `honour_refresh`, a model tag whose catalog
    refresh is weekly, monthly or quarterly keeps that partition's inferences made within tonight's period and
    infers only the customers without one (scoring/refresh.py); with `reuse_unchanged`, the customers inferred
    tonight whose tree-model input crossed no split since reuse its output exactly (scoring/reuse.py).
    None infers every customer.
    """
    started = time.perf_counter()
    plan = plan_scoring(client, catalog, features_path, own_features or {}, staged_dir, as_of, skip or {})
    scored_at = datetime.now(UTC).replace(microsecond=0)
    per_tag: dict[str, dict[str, Any]] = {}
    rows = 0
    scored_from = {t.name: scored_from_entry(plan.sources[t.name], plan.champions[t.name].info, top_reasons, with_reasons) for t in plan.catalog.model_tags}
    schema = TAG_ROW_SCHEMA.with_metadata({SCORED_FROM_KEY: json.dumps(scored_from).encode()})
    medians = _shared_medians(con, plan) if with_reasons else {}
    with atomic_replace(target) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for tag in plan.catalog.rule_tags:
                t0 = time.perf_counter()
                for batch in rule_tag_rows(con, catalog, tag, plan.sources[tag.name], staged_dir, as_of, scored_at, batch_rows):
                    writer.write_batch(batch)
                    rows += batch.num_rows
                per_tag[tag.name] = {**rule_tag_summary(con, tag, staged_dir, as_of), "seconds": time.perf_counter() - t0}
            for tag in plan.catalog.model_tags:
                t0 = time.perf_counter()
                champion, path = plan.champions[tag.name], plan.sources[tag.name]
                info = champion.info
                explainer = ReasonExplainer.for_model(con, champion.model, info.features, info.categorical, path, medians[path]) if with_reasons else None
                observed = observed_labels(con, staged_dir, tag, as_of)
                reasons_kept = top_reasons if with_reasons else 0
                carry, no_carry = plan_carry(previous_partition, tag, info, reasons_kept, as_of) if honour_refresh else (None, CARRY_OFF)
                reuse, no_reuse = (
                    plan_reuse(previous_partition, tag.name, info, champion.model, reasons_kept, batch_rows) if reuse_unchanged else (None, REUSE_OFF)
                )
                job = ModelTagJob(tag, info, observed.labels, observed.dates, explainer, as_of, scored_at, top_reasons, reuse, carry)
                for batch in _model_batches(path, champion.model, job, batch_rows):
                    writer.write_batch(batch)
                    rows += batch.num_rows
                per_tag[tag.name] = {
                    "producer": info.producer,
                    "seconds": time.perf_counter() - t0,
                    "observed_labels_outside_classes": observed.outside_classes,
                    "reuse": reuse.summary() if reuse else {"off": no_reuse},
                    "refresh": {"cadence": tag.refresh, **(carry.summary() if carry else {"inferred_rows": "all", "why": no_carry})},
                }
        # the blocking check runs on the file about to be published: readers never see a partition that fails it
        coverage = check_coverage(con, tmp, plan.catalog, plan.sources)
        if not coverage.passed:
            raise CoverageError(as_of, coverage)
    return ScoringSummary(as_of, target, rows, coverage.customers, time.perf_counter() - started, per_tag, coverage, plan.skipped)
