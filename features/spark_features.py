"""The feature snapshot on Spark (TAGML_ENGINE=spark): the DuckDB path's query text, run by Spark.

Nothing about a feature is written here. The staged tables become temporary views, the snapshot
query of `tagml.features.customer_features` (the same `snapshot_select` text DuckDB runs) is
transpiled by `to_spark_sql`, and Spark's part files are committed as the one atomic
`data.parquet` every reader expects, with the column types the DuckDB path writes.

pyspark is never imported here: the session comes in from the caller (orchestration's resource).
"""

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from tagml.core.files import check_parquet
from tagml.core.storage import commit_parquet_parts, staged_files, staged_path
from tagml.features.customer_features import STAGED_TABLES, snapshot_schema, snapshot_select
from tagml.features.delivery import current_generation
from tagml.features.portable_sql import to_spark_sql

if TYPE_CHECKING:
    from pyspark.sql import SparkSession


def check_staged_tables(generation: Path) -> None:
    """Every staged table is a readable Parquet file, or a `CorruptFileError` naming it and the re-ingest."""
    for table in STAGED_TABLES:
        files = staged_files(generation, table)
        for path in files or [staged_path(generation, table)]:
            check_parquet(path, f"re-run the raw ingest (raw_ingest_job) to stage {table} again")


@contextmanager
def staged_views(spark: "SparkSession", generation: Path) -> Iterator[dict[str, str]]:
    """Temporary views over the staged tables of one generation, table -> view name; dropped after.

    Names are unique per call: builds sharing a session never see each other's views.
    """
    suffix = uuid.uuid4().hex[:12]
    views = {table: f"tagml_staged_{table}_{suffix}" for table in STAGED_TABLES}
    try:
        for table, view in views.items():
            spark.read.parquet(*[str(f) for f in staged_files(generation, table)]).createOrReplaceTempView(view)
        yield views
    finally:
        for view in views.values():
            spark.catalog.dropTempView(view)


def build_customer_features_spark(spark: "SparkSession", staged_dir: Path, as_of: date, target: Path) -> int:
    """`build_customer_features` on Spark: the snapshot for `as_of` written atomically to `target`
    (same path, columns, order and types as DuckDB's). Returns rows; on any error `target` is untouched."""
    generation = current_generation(staged_dir)
    check_staged_tables(generation)  # before any engine reads them: a missing table is named, not a Spark/DuckDB I/O error
    # the DuckDB path's column types: Spark widens some (coalesce(TINYINT, 0) is INT), and one stored schema is what readers see
    schema = snapshot_schema(generation, as_of)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix=f".{target.name}.spark-", dir=target.parent))
    try:
        with staged_views(spark, generation) as views:
            # ORDER BY makes Spark range-partition the rows: part files in name order are customer_id order
            spark.sql(to_spark_sql(snapshot_select(views, as_of))).write.mode("overwrite").parquet(str(parts))
        return commit_parquet_parts(parts, target, schema)
    finally:
        shutil.rmtree(parts, ignore_errors=True)
