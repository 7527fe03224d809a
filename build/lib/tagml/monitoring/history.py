"""The drift history: three Parquet tables partitioned by as_of, queried with DuckDB.

    <drift_dir>/drift_summary/as_of=YYYY-MM-DD/data.parquet      one row per tag: the decision and its numbers
    <drift_dir>/drift_features/as_of=YYYY-MM-DD/data.parquet     one row per tag, slice and feature: PSI and flag
    <drift_dir>/drift_predictions/as_of=YYYY-MM-DD/data.parquet  one row per tag, slice and class: shares, PSI

The three tables of a partition are one *generation*: every write stamps a new generation id in
all three, writes the details under new names (`drift_features/as_of=D/data-<generation>.parquet`,
the same for predictions) and commits by replacing the summary last, atomically. The summary names
its generation and readers take the details of exactly that generation, so a writer killed between
the files leaves the previous generation whole (never the details of one run next to the summary of
another). Writers of one partition take turns (a file lock); the generation before the current one
is kept for readers still on it, older and orphaned ones are deleted by the next write. Re-running
a partition for some tags keeps the other tags' rows (copied into the new generation).
"""

import uuid
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
from filelock import FileLock

from tagml.core.storage import PARTITION_FILE, PartitionedTable, quote, sql_literal, write_parquet_atomically

SUMMARY, FEATURES, PREDICTIONS = "drift_summary", "drift_features", "drift_predictions"
TABLES = (FEATURES, PREDICTIONS, SUMMARY)  # write order: the summary last

# Explicit column types: a column that is all NULL in one partition (no realised performance yet,
# no report) must still union with the others.
SCHEMAS: dict[str, dict[str, str]] = {
    SUMMARY: {
        "as_of": "DATE",
        "tag": "VARCHAR",
        "model_version": "VARCHAR",
        "producer": "VARCHAR",
        "reference_as_of": "DATE",
        "reference_snapshot": "VARCHAR",
        "reference_population": "VARCHAR",
        "reference_rows": "BIGINT",
        "current_rows": "BIGINT",
        "n_features": "INTEGER",
        "drifted_features": "VARCHAR[]",
        "drifted_feature_share": "DOUBLE",
        "feature_psi_threshold": "DOUBLE",
        "drifted_feature_share_threshold": "DOUBLE",
        "critical_features_drifted": "VARCHAR[]",
        "feature_drift": "BOOLEAN",
        "prediction_psi": "DOUBLE",
        "prediction_psi_threshold": "DOUBLE",
        "prediction_drift": "BOOLEAN",
        "probability_psi": "DOUBLE",
        "max_slice_prediction_psi": "DOUBLE",
        "max_slice": "VARCHAR",
        "performance_status": "VARCHAR",
        "performance_metric": "VARCHAR",
        "performance_partition": "DATE",
        "performance_labels": "BIGINT",
        "performance_version": "VARCHAR",
        "realised_metric": "DOUBLE",
        "expected_metric": "DOUBLE",
        "performance_drop": "DOUBLE",
        "performance_drop_threshold": "DOUBLE",
        "performance_drift": "BOOLEAN",
        "performance_note": "VARCHAR",
        "training_gap_share": "DOUBLE",
        "drifted": "BOOLEAN",
        "reasons": "VARCHAR[]",
        "report_path": "VARCHAR",
        "report_sample_rows": "INTEGER",
        "evidently_drifted_share": "DOUBLE",
        "evidently_drifted_columns": "INTEGER",
        "computed_at": "TIMESTAMPTZ",
        "seconds": "DOUBLE",
        "generation": "VARCHAR",
    },
    FEATURES: {
        "as_of": "DATE",
        "tag": "VARCHAR",
        "model_version": "VARCHAR",
        "slice_column": "VARCHAR",
        "slice": "VARCHAR",
        "feature": "VARCHAR",
        "kind": "VARCHAR",
        "psi": "DOUBLE",
        "threshold": "DOUBLE",
        "drifted": "BOOLEAN",
        "reference_rows": "BIGINT",
        "current_rows": "BIGINT",
        "bins": "INTEGER",
        "reference_missing_share": "DOUBLE",
        "current_missing_share": "DOUBLE",
        "evidently_method": "VARCHAR",
        "evidently_value": "DOUBLE",
        "evidently_drifted": "BOOLEAN",
        "generation": "VARCHAR",
    },
    PREDICTIONS: {
        "as_of": "DATE",
        "tag": "VARCHAR",
        "model_version": "VARCHAR",
        "slice_column": "VARCHAR",
        "slice": "VARCHAR",
        "class": "VARCHAR",
        "reference_count": "BIGINT",
        "current_count": "BIGINT",
        "reference_share": "DOUBLE",
        "current_share": "DOUBLE",
        "slice_psi": "DOUBLE",
        "reference_mean_probability": "DOUBLE",
        "current_mean_probability": "DOUBLE",
        "probability_psi": "DOUBLE",
        "generation": "VARCHAR",
    },
}


class DriftHistoryError(LookupError):
    """The requested drift partition or tag is not in the history."""


class DriftHistory:
    def __init__(self, root: Path):
        self.root = Path(root)

    def table(self, name: str) -> PartitionedTable:
        """One of the three tables; the summary's partition files are `data.parquet`, the details' `data-<generation>.parquet`."""
        return PartitionedTable(self.root / name)

    def path(self, table: str, as_of: date, generation: str | None = None) -> Path:
        """The summary file, or the details of `generation` (default: the one the summary names)."""
        if table == SUMMARY:
            return self.table(SUMMARY).path(as_of)
        directory = self.table(table).directory(as_of)
        generation = generation if generation is not None else self.generation(as_of)
        # histories written before generations had one unstamped file per table
        return directory / (f"data-{generation}.parquet" if generation else PARTITION_FILE)

    def generation(self, as_of: date) -> str | None:
        """The generation the partition's summary commits (None: none yet, or written before generations)."""
        summary = self.path(SUMMARY, as_of)
        if not summary.exists() or "generation" not in pq.read_schema(summary).names:
            return None
        values = set(pq.read_table(summary, columns=["generation"]).column("generation").to_pylist())
        if len(values) != 1:
            raise DriftHistoryError(f"drift_summary of {as_of} at {summary} names generations {sorted(map(str, values))}, expected one")
        return values.pop()

    def partitions(self) -> list[date]:
        return self.table(SUMMARY).partitions()

    def write(self, con: duckdb.DuckDBPyConnection, as_of: date, frames: dict[str, pd.DataFrame]) -> dict[str, Path]:
        """Replace the partition's rows of the tags in `frames` (other tags' rows are kept), as one new generation."""
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_dir / f"as_of={as_of.isoformat()}.lock")):
            previous = self.generation(as_of)
            generation = uuid.uuid4().hex
            tags = sorted(set(frames[SUMMARY]["tag"]))
            written = {}
            for table in TABLES:  # the summary last: writing it commits the generation
                target = self.path(table, as_of, generation)
                old = self.path(table, as_of, previous)
                frame = frames[table].copy()
                schema = SCHEMAS[table]
                for column in schema:
                    if column not in frame:
                        frame[column] = None
                frame["generation"] = generation
                con.register("_drift_new", frame)
                try:
                    sql = "SELECT " + ", ".join(f"{quote(c)}::{t} AS {quote(c)}" for c, t in schema.items()) + " FROM _drift_new"
                    params: list = []
                    if old.exists():
                        # the other tags' rows move into the new generation (older files may lack newer columns)
                        have = set(pq.read_schema(old).names)
                        kept = ", ".join(
                            f"{quote(c)}::{t} AS {quote(c)}"
                            if c in have and c != "generation"
                            else f"{'?' if c == 'generation' else 'NULL'}::{t} AS {quote(c)}"
                            for c, t in schema.items()
                        )
                        sql = f"SELECT {kept} FROM read_parquet({sql_literal(old)}) WHERE NOT list_contains(?::VARCHAR[], tag) UNION ALL BY NAME {sql}"
                        params = [generation, tags]
                    write_parquet_atomically(con, f"SELECT * FROM ({sql}) ORDER BY tag", target, params=params)
                finally:
                    con.unregister("_drift_new")
                written[table] = target
            self._remove_generations(as_of, keep={generation, previous})
        return written

    def _remove_generations(self, as_of: date, keep: set[str | None]) -> None:
        """Details no summary names any more: older generations and those of killed writers."""
        for table in (FEATURES, PREDICTIONS):
            for path in self.table(table).directory(as_of).glob("data*.parquet"):
                name = path.stem.removeprefix("data").removeprefix("-") or None
                if name not in keep:
                    path.unlink(missing_ok=True)

    def _read(self, table: str, as_of: date | None) -> str:
        if as_of is None:
            if not self.partitions():
                raise DriftHistoryError(f"no drift results in {self.root} yet; materialize tag_drift (or run `tagml demo`) first")
            return self.table(table).read_all_sql(union_by_name=True)
        path = self.path(table, as_of)
        if not path.exists():
            have = [d.isoformat() for d in self.partitions()][-5:]
            raise DriftHistoryError(f"no drift results for as_of {as_of} (have: {have})")
        return f"read_parquet({sql_literal(path)})"

    def latest(self) -> date:
        partitions = self.partitions()
        if not partitions:
            raise DriftHistoryError(f"no drift results in {self.root} yet; materialize tag_drift (or run `tagml demo`) first")
        return partitions[-1]

    def summary(self, con: duckdb.DuckDBPyConnection, as_of: date | None = None, tag: str | None = None) -> pd.DataFrame:
        """Summary rows (all partitions when as_of is None), oldest first."""
        where = "WHERE tag = ?" if tag else ""
        frame = con.execute(f"SELECT * FROM {self._read(SUMMARY, as_of)} {where} ORDER BY as_of, tag", [tag] if tag else []).df()
        if tag and frame.empty:
            raise DriftHistoryError(f"no drift results for tag {tag!r}" + (f" on {as_of}" if as_of else ""))
        return frame

    def features(self, con: duckdb.DuckDBPyConnection, as_of: date, tag: str, slice_column: str = "(all)") -> pd.DataFrame:
        """Per-feature PSI of one tag and partition, most drifted first."""
        return con.execute(
            f"SELECT * FROM {self._read(FEATURES, as_of)} WHERE tag = ? AND slice_column = ? ORDER BY psi DESC, feature",
            [tag, slice_column],
        ).df()

    def predictions(self, con: duckdb.DuckDBPyConnection, as_of: date, tag: str) -> pd.DataFrame:
        return con.execute(f"SELECT * FROM {self._read(PREDICTIONS, as_of)} WHERE tag = ? ORDER BY slice_column, slice, class", [tag]).df()
