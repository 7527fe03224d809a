"""Batch scoring of every customer into one tag-store partition.

The feature snapshot is streamed in batches (memory does not grow with the number of customers);
model tags use their `champion` (resolved by alias when the run starts), rule tags their SQL bands.
Every row records what produced it. All tags of a partition go to one temporary Parquet file that
replaces the partition only when everything succeeded and the file passed the coverage check.
"""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from tagml.core.files import CorruptFileError
from tagml.core.storage import atomic_replace, sql_literal, staged_path
from tagml.features.snapshot import open_feature_snapshot
from tagml.scoring.reasons import ReasonExplainer
from tagml.scoring.rules import RuleInputError, rule_batches, rule_case_sql, rule_version
from tagml.training.catalog import UNKNOWN, Catalog, TagSpec
from tagml.training.dataset import label_conditions
from tagml.training.inference import infer, model_input
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
        ("producer", pa.string()),  # registered model/version, or rule version
        ("model_version", pa.string()),
        ("mlflow_run_id", pa.string()),
        ("scored_at", pa.timestamp("s", tz="UTC")),
    ]
)


class ScoringError(RuntimeError):
    """Scoring cannot proceed (missing champion, features not matching the model); nothing was written."""


@dataclass(frozen=True)
class TagCoverage:
    """How one catalog tag covers the snapshot's customers in a scored file (counts only, no customer values)."""

    tag: str
    rows: int
    customers_covered: int
    duplicate_rows: int
    rows_of_unknown_customers: int
    invalid_values: int
    invalid_examples: tuple[str, ...]

    def problems(self, customers: int) -> list[str]:
        out = []
        if self.customers_covered < customers:
            out.append(f"{customers - self.customers_covered:,} of {customers:,} customers have no {self.tag!r} row")
        if self.duplicate_rows:
            out.append(f"{self.duplicate_rows:,} duplicate {self.tag!r} rows")
        if self.rows_of_unknown_customers:
            out.append(f"{self.rows_of_unknown_customers:,} {self.tag!r} rows of customers not in the snapshot")
        if self.invalid_values:
            out.append(f"{self.invalid_values:,} {self.tag!r} rows with a value outside its classes (e.g. {list(self.invalid_examples)})")
        return out


@dataclass(frozen=True)
class Coverage:
    """The coverage check of a scored file: every snapshot customer has every catalog tag exactly once,
    with a value among the tag's classes (or `unknown` where the tag has a min_confidence)."""

    customers: int
    tags: tuple[TagCoverage, ...]
    rows: int
    rows_of_other_tags: int

    @property
    def expected_rows(self) -> int:
        return self.customers * len(self.tags)

    @property
    def problems(self) -> list[str]:
        out = [p for t in self.tags for p in t.problems(self.customers)]
        if self.rows_of_other_tags:
            out.append(f"{self.rows_of_other_tags:,} rows of tags not in the catalog")
        return out

    @property
    def passed(self) -> bool:
        return not self.problems

    def metadata(self) -> dict[str, Any]:
        """Aggregates for the asset check (no customer-level values)."""
        return {
            "customers": self.customers,
            "rows": self.rows,
            "expected_rows": self.expected_rows,
            "tags": len(self.tags),
            "missing": sum(max(self.customers - t.customers_covered, 0) for t in self.tags),
            "duplicates": sum(t.duplicate_rows for t in self.tags),
            "invalid_values": sum(t.invalid_values for t in self.tags),
            "rows_of_other_tags": self.rows_of_other_tags,
        }


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


def allowed_values(tag: TagSpec) -> list[str]:
    """The values a tag's rows may hold: its classes, and `unknown` where low confidence is stored as such."""
    return [*tag.classes, *([UNKNOWN] if tag.kind == "model" and tag.min_confidence else [])]


def unstable_tags(changed_share: dict[str, float], catalog: Catalog) -> dict[str, float]:
    """Tags whose share of customers with a changed value since the previous partition exceeds the
    tag's `drift.max_changed_share`: a tag store that moved this much overnight usually means an input
    went wrong (a feature gone empty), not that the customers changed."""
    known = {t.name: t for t in catalog.tags}
    return {tag: share for tag, share in changed_share.items() if tag in known and share > known[tag].drift.max_changed_share}


def check_coverage(con: duckdb.DuckDBPyConnection, tags_path: Path, features_path: Path, catalog: Catalog) -> Coverage:
    """Validate a scored (not yet published) tag file against its feature snapshot, set-based in DuckDB.

    Three small aggregations instead of one join of every row: per tag the rows and distinct
    customers, per tag the rows of customers missing from the snapshot (an anti-join, empty when all
    is well), and per tag and value the counts (values are checked against the classes here).
    """
    tags, features = str(tags_path), str(features_path)
    counts = {
        t: (int(n), int(ids))
        for t, n, ids in con.execute("SELECT tag, count(*), count(DISTINCT customer_id) FROM read_parquet(?) GROUP BY tag", [tags]).fetchall()
    }
    strangers = {
        t: (int(n), int(ids))
        for t, n, ids in con.execute(
            "SELECT t.tag, count(*), count(DISTINCT t.customer_id) FROM read_parquet(?) t "
            "ANTI JOIN read_parquet(?) f ON f.customer_id::VARCHAR = t.customer_id GROUP BY t.tag",
            [tags, features],
        ).fetchall()
    }
    values: dict[str, dict[str | None, int]] = {}
    for tag, value, n in con.execute("SELECT tag, value, count(*) FROM read_parquet(?) GROUP BY ALL", [tags]).fetchall():
        values.setdefault(tag, {})[value] = int(n)
    per_tag = []
    for tag in catalog.tags:
        rows, ids = counts.get(tag.name, (0, 0))
        unknown_rows, unknown_ids = strangers.get(tag.name, (0, 0))
        allowed = set(allowed_values(tag))
        invalid = {v: n for v, n in values.get(tag.name, {}).items() if v not in allowed}
        per_tag.append(
            TagCoverage(
                tag.name,
                rows,
                ids - unknown_ids,
                rows - ids,
                unknown_rows,
                sum(invalid.values()),
                tuple(sorted("NULL" if v is None else v for v in invalid)[:5]),
            )
        )
    customers = con.execute("SELECT count(DISTINCT customer_id) FROM read_parquet(?)", [features]).fetchall()[0][0]
    known = {t.name for t in catalog.tags}
    total = sum(n for n, _ in counts.values())
    other = sum(n for t, (n, _) in counts.items() if t not in known)
    return Coverage(int(customers), tuple(per_tag), total, other)


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
    """Per customer, the newest observed label within the tag's classes known on as_of, and how many
    customers had labels outside the classes (a source's data error: never stored as a tag value)."""

    labels: pd.Series
    outside_classes: dict[str, int]


def observed_labels(con: duckdb.DuckDBPyConnection, staged_dir: Path, tag: TagSpec, as_of: date) -> ObservedLabels:
    """The newest observed label per customer known on `as_of` (within the tag's max label age).

    Labels outside the tag's classes are left out (counted per value): the customer then keeps the
    model's inference, or an older label that is valid.
    """
    where = " AND ".join(label_conditions(tag, as_of))
    source = f"read_parquet({sql_literal(staged_path(staged_dir, 'tag_labels'))})"
    classes = list(tag.classes)
    rows = con.execute(
        f"SELECT customer_id, arg_max(label, label_date) FROM {source} WHERE {where} AND list_contains(?, label) GROUP BY customer_id",
        [classes],
    ).fetchall()
    outside = con.execute(
        f"SELECT label, count(DISTINCT customer_id) FROM {source} WHERE {where} AND NOT list_contains(?, label) GROUP BY label ORDER BY label",
        [classes],
    ).fetchall()
    return ObservedLabels(pd.Series({cid: label for cid, label in rows}, dtype=object), {str(label): int(n) for label, n in outside})


def _check_features(path: Path, champion: Champion) -> None:
    available = set(pq.read_schema(path).names)
    missing = [f for f in champion.info.features if f not in available]
    if missing:
        raise ScoringError(
            f"tag {champion.info.tag!r}: feature table {path} lacks {len(missing)} column(s) the champion "
            f"{champion.info.producer} was trained on: {missing[:10]}"
        )


def _model_batches(
    path: Path,
    tag: TagSpec,
    champion: Champion,
    observed: pd.Series,
    explainer: ReasonExplainer | None,
    as_of: date,
    scored_at: datetime,
    batch_rows: int,
    top_reasons: int,
) -> Iterator[pa.RecordBatch]:
    reader = pq.ParquetFile(path)
    info = champion.info
    classes = np.array(info.classes, dtype=object)
    # row group by row group: a dataset scan reads ahead and its memory grew with the file
    for batch in reader.iter_batches(batch_size=batch_rows, columns=["customer_id", *info.features]):
        frame = batch.to_pandas()
        X = model_input(frame, info)
        inference = infer(champion.model, X, info, tag.min_confidence)
        proba, top, confidence, inferred = inference.proba, inference.top, inference.confidence, inference.values
        seen = observed.reindex(frame["customer_id"]).to_numpy()
        has_observed = pd.notna(seen)
        seen = np.where(has_observed, seen, None)
        observed_wins = tag.label is not None and tag.label.observed_wins
        value = np.where(has_observed & observed_wins, seen, inferred)
        source = np.where(has_observed & observed_wins, "observed", "model")
        mismatch = np.where(has_observed, seen != inferred, None)
        value_index = {c: k for k, c in enumerate(info.classes)}
        prob_of_value = np.array([proba[i, value_index[v]] if v in value_index else confidence[i] for i, v in enumerate(value)])
        reasons = explainer.reasons(X, top, top_reasons) if explainer else [[] for _ in range(len(frame))]
        n = len(frame)
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(frame["customer_id"], pa.string()),
                pa.array([as_of] * n, pa.date32()),
                pa.array([tag.name] * n, pa.string()),
                pa.array(value, pa.string()),
                pa.array(prob_of_value, pa.float64()),
                pa.MapArray.from_arrays(
                    pa.array(np.arange(0, (n + 1) * len(classes), len(classes)), pa.int32()),
                    pa.array(np.tile(classes, n), pa.string()),
                    pa.array(proba.astype("float64").ravel()),
                ),
                pa.array(reasons, pa.list_(pa.string())),
                pa.array(source, pa.string()),
                pa.array(inferred, pa.string()),
                pa.array(seen, pa.string()),
                pa.array(mismatch, pa.bool_()),
                pa.array([info.producer] * n, pa.string()),
                pa.array([info.version] * n, pa.string()),
                pa.array([info.run_id] * n, pa.string()),
                pa.array([scored_at] * n, pa.timestamp("s", tz="UTC")),
            ],
            schema=TAG_ROW_SCHEMA,
        )


def _rule_batches(con: duckdb.DuckDBPyConnection, path: Path, tag: TagSpec, as_of: date, scored_at: datetime, batch_rows: int) -> Iterator[pa.RecordBatch]:
    producer = rule_version(tag)
    sql = (
        f"SELECT customer_id::VARCHAR AS customer_id, DATE {sql_literal(as_of)} AS as_of, {sql_literal(tag.name)} AS tag, "
        f"{rule_case_sql(tag)} AS value, NULL::DOUBLE AS probability, NULL::MAP(VARCHAR, DOUBLE) AS probabilities, "
        f"[]::VARCHAR[] AS reasons, 'rule' AS source, NULL::VARCHAR AS inferred_value, NULL::VARCHAR AS observed_value, "
        f"NULL::BOOLEAN AS observed_mismatch, {sql_literal(producer)} AS producer, NULL::VARCHAR AS model_version, "
        f"NULL::VARCHAR AS mlflow_run_id, TIMESTAMPTZ {sql_literal(scored_at.isoformat())} AS scored_at "
        "FROM features"
    )
    # on a sandboxed connection (no file access) over the snapshot's columns as Arrow batches
    try:
        for batch in rule_batches(con, path, tag, sql, batch_rows):
            yield batch.cast(TAG_ROW_SCHEMA) if batch.schema != TAG_ROW_SCHEMA else batch
    except (duckdb.Error, RuleInputError) as exc:
        raise ScoringError(f"rule tag {tag.name!r}: its bands do not evaluate on {path}: {str(exc).splitlines()[0]}") from exc


def score_partition(
    con: duckdb.DuckDBPyConnection,
    client: MlflowClient | None,
    catalog: Catalog,
    features_path: Path,
    staged_dir: Path,
    as_of: date,
    target: Path,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    top_reasons: int = 3,
    with_reasons: bool = True,
) -> ScoringSummary:
    """Score every catalog tag for every customer of the snapshot and replace `target` atomically."""
    started = time.perf_counter()
    if not features_path.exists():
        raise ScoringError(f"no feature snapshot for as_of {as_of} at {features_path}; materialize customer_features first")
    try:
        open_feature_snapshot(features_path, as_of)
    except CorruptFileError as err:
        raise ScoringError(str(err)) from err
    if catalog.model_tags and client is None:
        raise ScoringError("model tags need an MLflow client to resolve their champions")
    # resolve everything first: a missing champion or mismatched features fails before anything is written
    champions = {tag.name: resolve_champion(client, tag) for tag in catalog.model_tags}
    for champion in champions.values():
        _check_features(features_path, champion)
    scored_at = datetime.now(UTC).replace(microsecond=0)
    per_tag: dict[str, dict[str, Any]] = {}
    rows = 0
    with atomic_replace(target) as tmp:
        with pq.ParquetWriter(tmp, TAG_ROW_SCHEMA, compression="zstd") as writer:
            for tag in catalog.rule_tags:
                t0 = time.perf_counter()
                for batch in _rule_batches(con, features_path, tag, as_of, scored_at, batch_rows):
                    writer.write_batch(batch)
                    rows += batch.num_rows
                per_tag[tag.name] = {"producer": rule_version(tag), "seconds": time.perf_counter() - t0}
            for tag in catalog.model_tags:
                t0 = time.perf_counter()
                champion = champions[tag.name]
                explainer = (
                    ReasonExplainer.for_model(con, champion.model, champion.info.features, champion.info.categorical, features_path) if with_reasons else None
                )
                observed = observed_labels(con, staged_dir, tag, as_of)
                for batch in _model_batches(features_path, tag, champion, observed.labels, explainer, as_of, scored_at, batch_rows, top_reasons):
                    writer.write_batch(batch)
                    rows += batch.num_rows
                per_tag[tag.name] = {
                    "producer": champion.info.producer,
                    "seconds": time.perf_counter() - t0,
                    "observed_labels_outside_classes": observed.outside_classes,
                }
        # the blocking check runs on the file about to be published: readers never see a partition that fails it
        coverage = check_coverage(con, tmp, features_path, catalog)
        if not coverage.passed:
            raise CoverageError(as_of, coverage)
    return ScoringSummary(as_of, target, rows, coverage.customers, time.perf_counter() - started, per_tag, coverage)
