"""Batch scoring on Spark (TAGML_ENGINE=spark): the same plan and the same per-batch scorers as scoring/score.py.

Nothing about a tag row is decided here. `plan_scoring` resolves every tag (all or nothing, the same
`UnscorableTagsError`) and each champion alias to one version on the driver, so every worker scores
that version. Spark reads the feature snapshot and runs, per partition in `mapInArrow`, the scorer the
DuckDB path runs: `model_tag_batches` (the model loaded once per Python worker from the registry; the
observed labels and the reason explainer, built on the driver as the DuckDB path builds them, shipped
once as a broadcast) and, for rule tags, `evaluate_rule` on a sandboxed DuckDB inside the worker. Suitability (a join of staged holdings,
products and labels, not a feature rule) is the one DuckDB step on the driver: scoring/suitability.py's rows, as one part.
Each tag's job writes its own part files into a temporary
directory beside the partition; the coverage check runs on those parts and only then are they committed
as the one atomic `data.parquet` of the tag store (`commit_parquet_parts`): readers see the old
partition or the new one, with the same schema as the DuckDB path writes.
"""

import glob
import itertools
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from tagml.core.storage import commit_parquet_parts
from tagml.scoring.coverage import check_coverage
from tagml.scoring.reasons import ReasonExplainer
from tagml.scoring.refresh import CARRY_OFF, CarriedInference, carried_counts, plan_carry
from tagml.scoring.rules import evaluate_rule, rule_columns, rule_version, sandbox_limits
from tagml.scoring.score import (
    DEFAULT_BATCH_ROWS,
    TAG_ROW_SCHEMA,
    Champion,
    CoverageError,
    ModelTagJob,
    ScoringError,
    ScoringSummary,
    as_tag_rows,
    model_tag_batches,
    observed_labels,
    plan_scoring,
    rule_tag_rows,
    rule_tag_sql,
    rule_tag_summary,
)
from tagml.training.catalog import Catalog, TagSpec
from tagml.training.registry import load_model
from tagml.training.tracking import connect_tracking
from tagml.training.versions import registered_model_name

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

# Spark's Arrow exchange carries timestamps in microseconds; the commit casts back to TAG_ROW_SCHEMA
SPARK_TAG_ROW_SCHEMA = pa.schema([pa.field(f.name, pa.timestamp("us", tz="UTC")) if f.name == "scored_at" else f for f in TAG_ROW_SCHEMA])

# per Python worker: model version URI -> model, so a worker loads a champion once whatever its number of tasks
_WORKER_MODELS: dict[tuple[str, str], Any] = {}


def worker_model(tracking_uri: str, tag: str, version: str) -> Any:
    """The model of `tag`'s `version`, loaded from the registry at `tracking_uri` on this worker's first call."""
    key = (tracking_uri, f"models:/{registered_model_name(tag)}/{version}")
    if key not in _WORKER_MODELS:
        _WORKER_MODELS[key] = load_model(connect_tracking(tracking_uri), tag, version)
    return _WORKER_MODELS[key]


def _column(name: str) -> Any:
    from pyspark.sql import functions as F

    return F.col("`" + name.replace("`", "``") + "`")


def _spark_rows(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield batch.cast(SPARK_TAG_ROW_SCHEMA)


def _spark_schema() -> Any:
    from pyspark.sql.pandas.types import from_arrow_schema

    return from_arrow_schema(SPARK_TAG_ROW_SCHEMA, prefer_timestamp_ntz=False)


def _snapshot(spark: "SparkSession", path: Path, columns: list[str], what: str) -> "DataFrame":
    frame = spark.read.parquet(str(path))
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ScoringError(f"{what}: the feature table {path} lacks the column(s) {missing[:10]}")
    return frame.select(*[_column(c) for c in columns])


def _failure(exc: Exception) -> str:
    """The line of a Spark failure that names it: a worker's traceback ends with the Python error raised there."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
    return (raised[-1] if raised else lines[0] if lines else type(exc).__name__)[:500]


def _write(frame: "DataFrame", parts: Path, order: int, what: str) -> None:
    """Write one tag's rows and move its part files into `parts`, numbered so the commit takes tags in order."""
    out = parts / f"tag-{order:04d}"
    try:
        frame.write.parquet(str(out))
    except Exception as exc:  # py4j and pyspark raise several types for a failed task
        raise ScoringError(f"{what}: the Spark scoring job failed, nothing was written: {_failure(exc)}") from exc
    for k, part in enumerate(sorted(out.glob("part-*.parquet"))):
        part.rename(parts / f"part-{order:04d}-{k:05d}.parquet")
    shutil.rmtree(out)


@dataclass(frozen=True)
class _Run:
    """What every tag of one partition's run shares."""

    spark: "SparkSession"
    con: duckdb.DuckDBPyConnection
    parts: Path
    as_of: date
    scored_at: datetime
    batch_rows: int


def _score_rule_tag(run: _Run, tag: TagSpec, path: Path, order: int) -> dict[str, Any]:
    started = time.perf_counter()
    frame = _snapshot(run.spark, path, ["customer_id", *rule_columns(tag)], f"rule tag {tag.name!r}: its bands do not evaluate on {path}")
    sql, batch_rows = rule_tag_sql(tag, run.as_of, run.scored_at), run.batch_rows
    _, memory_limit = sandbox_limits(run.con)

    def evaluate(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        first = next(batches, None)
        if first is None:
            return
        # one DuckDB thread per worker: Spark already runs a worker per core
        features = pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], batches))
        yield from _spark_rows(as_tag_rows(evaluate_rule(features, sql, 1, memory_limit, batch_rows)))

    _write(frame.mapInArrow(evaluate, _spark_schema()), run.parts, order, f"rule tag {tag.name!r}")
    return {"producer": rule_version(tag), "seconds": time.perf_counter() - started}


def _score_suitability_tag(run: _Run, catalog: Catalog, tag: TagSpec, path: Path, staged_dir: Path | None, order: int) -> dict[str, Any]:
    """Suitability joins the staged holdings, products and labels per customer: a DuckDB step on the driver (as on the DuckDB
    path, so the rows are the same), written as one part file committed with the other tags' parts."""
    started = time.perf_counter()
    batches = rule_tag_rows(run.con, catalog, tag, path, staged_dir, run.as_of, run.scored_at, run.batch_rows)
    with pq.ParquetWriter(run.parts / f"part-{order:04d}-00000.parquet", TAG_ROW_SCHEMA, compression="zstd") as writer:
        for batch in batches:
            writer.write_batch(batch)
    return {**rule_tag_summary(run.con, tag, staged_dir, run.as_of), "seconds": time.perf_counter() - started}


def _score_model_tag(
    run: _Run,
    tracking_uri: str,
    tag: TagSpec,
    champion: Champion,
    path: Path,
    staged_dir: Path | None,
    top_reasons: int,
    with_reasons: bool,
    order: int,
    carry: CarriedInference | None,
    no_carry: str | None,
) -> dict[str, Any]:
    started = time.perf_counter()
    info = champion.info
    frame = _snapshot(run.spark, path, ["customer_id", *info.features], f"model tag {tag.name!r}")
    # the explainer's medians: the DuckDB path's own pass over the snapshot, so both engines explain alike
    explainer = ReasonExplainer.for_model(run.con, champion.model, info.features, info.categorical, path) if with_reasons else None
    observed = observed_labels(run.con, staged_dir, tag, run.as_of)
    # one copy per worker (a broadcast), not one per task; the model is loaded there from the registry
    job = ModelTagJob(tag, info, observed.labels, observed.dates, explainer, run.as_of, run.scored_at, top_reasons, carry=carry)
    shipped = run.spark.sparkContext.broadcast(job)

    def score(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        job = shipped.value
        yield from _spark_rows(model_tag_batches(batches, worker_model(tracking_uri, job.tag.name, job.info.version), job))

    try:
        _write(frame.mapInArrow(score, _spark_schema()), run.parts, order, f"model tag {tag.name!r}")
    finally:
        shipped.destroy()
    summary = {"producer": info.producer, "seconds": time.perf_counter() - started, "observed_labels_outside_classes": observed.outside_classes}
    if carry is None:
        return {**summary, "refresh": {"cadence": tag.refresh, "inferred_rows": "all", "why": no_carry}}
    # the workers' counts stay on the workers: count what the tag's parts hold
    carry.carried, carry.inferred = carried_counts(run.con, Path(glob.escape(str(run.parts))) / f"part-{order:04d}-*.parquet")
    return {**summary, "refresh": {"cadence": tag.refresh, **carry.summary()}}


def score_partition_spark(
    spark: "SparkSession",
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
) -> ScoringSummary:
    """`score_partition` on Spark: the same arguments (and `spark`), the same rows, schema, checks and atomic replace of `target`.

    `con` (DuckDB, on the driver) reads the observed labels and the explainer's medians and runs the
    coverage check on Spark's parts before they are committed; rule bands run on a sandboxed DuckDB in each worker with `con`'s memory limit.
    """
    started = time.perf_counter()
    plan = plan_scoring(client, catalog, features_path, own_features or {}, staged_dir, as_of, skip or {})
    target.parent.mkdir(parents=True, exist_ok=True)
    per_tag: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.spark-", dir=target.parent) as tmp:
        run = _Run(spark, con, Path(tmp), as_of, datetime.now(UTC).replace(microsecond=0), batch_rows)
        for order, tag in enumerate(plan.catalog.rule_tags):
            if tag.suitability is not None:
                per_tag[tag.name] = _score_suitability_tag(run, catalog, tag, plan.sources[tag.name], staged_dir, order)
            else:
                per_tag[tag.name] = _score_rule_tag(run, tag, plan.sources[tag.name], order)
        for order, tag in enumerate(plan.catalog.model_tags, start=len(plan.catalog.rule_tags)):
            assert client is not None  # plan_scoring refuses model tags without one
            champion, path = plan.champions[tag.name], plan.sources[tag.name]
            reasons_kept = top_reasons if with_reasons else 0
            carry, no_carry = plan_carry(previous_partition, tag, champion.info, reasons_kept, as_of) if honour_refresh else (None, CARRY_OFF)
            per_tag[tag.name] = _score_model_tag(run, client.tracking_uri, tag, champion, path, staged_dir, top_reasons, with_reasons, order, carry, no_carry)
        # the blocking check runs on the parts about to be committed: readers never see a partition that fails it
        coverage = check_coverage(con, Path(glob.escape(tmp)) / "part-*.parquet", plan.catalog, plan.sources)
        if not coverage.passed:
            raise CoverageError(as_of, coverage)
        rows = commit_parquet_parts(run.parts, target, TAG_ROW_SCHEMA)
    return ScoringSummary(as_of, target, rows, coverage.customers, time.perf_counter() - started, per_tag, coverage, plan.skipped)
