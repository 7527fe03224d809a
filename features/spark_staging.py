"""Stage a delivery on Spark (TAGML_ENGINE=spark): the same contract, rules, errors and generation swap as DuckDB.

Only reading the raw files and running SQL differ. Every check is the DuckDB-dialect SQL of
`tagml.features.validation`, run through `to_spark_sql`; every staged table is written by Spark to a
hidden directory of parts beside the generation being built and committed into it as the one
`<table>.parquet` (`commit_parquet_parts`) that readers expect; the generation becomes current by the
same atomic swap (`tagml.features.delivery.stage_generation`). pyspark is imported inside functions only.

Not reported as on DuckDB: a CSV row with more or fewer fields than its header fails the table with
the file named, but without line numbers (Spark's parser has no rejects table).
"""

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa

from tagml.core.storage import commit_parquet_parts
from tagml.features.contract import CUSTOMERS, PRODUCTS_TABLE, TableSpec
from tagml.features.delivery import SUPPRESSED_VIEW, StagedDelivery, Suppressor, stage_generation
from tagml.features.portable_sql import to_spark_sql
from tagml.features.raw import ContractError, RawSource, Violation, csv_header, locate_source, required_columns_present
from tagml.features.validation import StagedTable, ValidatedTable, validate_source

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

# The Arrow type of each contract type in a staged file: what DuckDB writes, so both engines' files are the same.
STAGED_ARROW_TYPES = {"string": pa.string(), "int": pa.int64(), "double": pa.float64(), "date": pa.date32(), "timestamp": pa.timestamp("us")}


@dataclass(frozen=True)
class SparkRunner:
    """Runs validation's DuckDB SQL on Spark, translated by `to_spark_sql`."""

    spark: "SparkSession"

    def rows(self, sql: str) -> list[tuple]:
        return [tuple(row) for row in self.spark.sql(to_spark_sql(sql)).collect()]

    def binds(self, sql: str) -> bool:
        from pyspark.errors import AnalysisException

        try:
            self.spark.sql(to_spark_sql(sql))  # analysed eagerly: a cast that does not fit fails here
        except AnalysisException:
            return False
        return True

    def create_view(self, name: str, select_sql: str) -> None:
        self.spark.sql(to_spark_sql(select_sql)).createOrReplaceTempView(name)


def staged_schema(spec: TableSpec) -> pa.Schema:
    return pa.schema([(c.name, STAGED_ARROW_TYPES[c.type]) for c in spec.staged_columns])


def _unreadable(spec: TableSpec, location: str, exc: Exception) -> ContractError:
    # the exception's text is not passed on: Spark's parse errors quote the offending record (PII)
    return ContractError([Violation(spec.name, None, "readable", f"cannot read {location} ({type(exc).__name__})")])


def _read_csv(spark: "SparkSession", spec: TableSpec, location: str) -> "DataFrame":
    """The CSV as text columns named after its header (parsed by `csv_header`, as on DuckDB), every row parsed."""
    from pyspark.sql.types import StringType, StructField, StructType

    names, delimiter = csv_header(spec, location)
    schema = StructType([StructField(f"c{i}", StringType()) for i in range(len(names))])
    frame = spark.read.csv(location, schema=schema, header=True, sep=delimiter, quote='"', escape='"', multiLine=True, mode="FAILFAST", encoding="UTF-8")
    contract_names = {c.name for c in spec.columns}
    frame = frame.selectExpr(*[f"c{i} AS `{n}`" for i, n in enumerate(names) if n in contract_names])
    try:
        frame = frame.localCheckpoint()  # parse every row now: a ragged one is this table's error, not a later step's
    except Exception as exc:  # pyspark wraps the parser's failure in several types
        raise ContractError(
            [Violation(spec.name, None, "field_count", f"{location}: some lines do not have the header's {len(names)} fields or cannot be parsed")]
        ) from exc
    return frame


def open_source_spark(spark: "SparkSession", spec: TableSpec, raw_dir: Path) -> RawSource | None:
    """The raw table of `spec` as a Spark temporary view, with every required column present (None: optional, not delivered)."""
    source = locate_source(spec, raw_dir)
    if source is None:
        return None
    kind, location = source
    view = f"src_{spec.name}_{kind}"
    if kind == "csv":
        frame = _read_csv(spark, spec, location)
    else:
        # a directory of parts is listed here (as on DuckDB), not globbed by Spark
        parts = sorted(Path(location).parent.glob("*.parquet")) if location.endswith("*.parquet") else [Path(location)]
        try:
            frame = spark.read.parquet(*[str(p) for p in parts])
            frame.limit(1).collect()
        except Exception as exc:
            raise _unreadable(spec, location, exc) from exc
    frame.createOrReplaceTempView(view)
    contract_names = {c.name for c in spec.columns}
    present = {f.name: f.dataType.simpleString().upper() for f in frame.schema.fields if f.name in contract_names}
    ignored = [f.name for f in frame.schema.fields if f.name not in contract_names]
    return required_columns_present(spec, RawSource(view, location, present, ignored))


def write_staged_spark(spark: "SparkSession", valid: ValidatedTable, target: Path) -> StagedTable:
    """Write a validated table with Spark into parts beside `target`'s directory, then commit them as `target` (one atomic file).

    The parts go to `<directory>.parts/<table>`: for a generation being built (`.building-<id>`) that is
    a hidden sibling no reader lists, and one a crashed run leaves is pruned with stale builds.
    """
    parts_root = target.parent.with_name(target.parent.name + ".parts")
    parts = parts_root / valid.spec.name
    try:
        spark.sql(to_spark_sql(valid.select_sql)).write.mode("overwrite").parquet(str(parts))
        rows = commit_parquet_parts(parts, target, staged_schema(valid.spec))
    finally:
        shutil.rmtree(parts, ignore_errors=True)
        if parts_root.is_dir() and not any(parts_root.iterdir()):
            parts_root.rmdir()
    return StagedTable(valid.spec.name, target, rows, valid.source, valid.dropped_pii, valid.ignored_columns)


def stage_delivery_spark(spark: "SparkSession", raw_dir: Path, staged_dir: Path, delivery_date: date, governance_db: Path | None = None) -> StagedDelivery:
    """`tagml.features.delivery.stage_delivery` on Spark: every table validated and staged together, or none;
    erased customers' rows dropped by the same SQL."""
    runner = SparkRunner(spark)

    def register(hashes: list[str]) -> None:
        spark.createDataFrame([(h,) for h in hashes], "customer_hash string").createOrReplaceTempView(SUPPRESSED_VIEW)

    suppressor = Suppressor(governance_db, runner, register)

    def validate(spec: TableSpec, staged: Mapping[str, Path]) -> ValidatedTable:
        known: dict[str, str] = {}
        for name in (CUSTOMERS.name, PRODUCTS_TABLE.name):
            if name in staged:
                known[name] = f"staged_{name}"
                spark.read.parquet(str(staged[name])).createOrReplaceTempView(known[name])
        source = suppressor.apply(spec, open_source_spark(spark, spec, raw_dir))
        return validate_source(runner, spec, source, delivery_date, known.get(CUSTOMERS.name), known.get(PRODUCTS_TABLE.name))

    def write(valid: ValidatedTable, target: Path) -> StagedTable:
        return write_staged_spark(spark, valid, target)

    delivery = stage_generation(staged_dir, delivery_date, validate, write)
    return replace(delivery, suppressed_rows=suppressor.counts)
