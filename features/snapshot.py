"""Build a feature snapshot behind its quality gate: a snapshot that fails a blocking check never
replaces the stored partition."""

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import duckdb

from tagml.core.files import check_parquet
from tagml.core.storage import atomic_replace, write_parquet_atomically
from tagml.features.customer_features import features_sql, snapshot_spine_sql
from tagml.features.quality import CheckOutcome, check_feature_snapshot


class FeatureQualityError(RuntimeError):
    """A blocking data-quality check failed; the previous snapshot (if any) was kept."""

    def __init__(self, as_of: date, outcomes: list[CheckOutcome]):
        self.outcomes = outcomes
        failed = [f"{o.name}: {o.description} {o.metadata}" for o in outcomes if o.blocking and not o.passed]
        super().__init__(f"customer_features for {as_of} failed blocking checks; nothing was replaced:\n  " + "\n  ".join(failed))


@dataclass(frozen=True)
class FeatureSnapshot:
    as_of: date
    path: Path
    rows: int
    checks: list[CheckOutcome]


def build_feature_snapshot(
    con: duckdb.DuckDBPyConnection, staged_dir: Path, as_of: date, target: Path, write: Callable[[Path], int] | None = None
) -> FeatureSnapshot:
    """Compute features for every customer at `as_of`, check them, and only then swap them into `target`.

    `write(candidate)` computes the snapshot into the candidate file on another engine (returns rows);
    by default DuckDB computes it. The checks run on the candidate either way.
    """
    outcomes: list[CheckOutcome] = []

    def gate(candidate: Path) -> None:
        outcomes.extend(check_feature_snapshot(con, candidate, staged_dir, as_of))
        if any(o.blocking and not o.passed for o in outcomes):
            raise FeatureQualityError(as_of, outcomes)

    if write is None:
        sql = features_sql(staged_dir, snapshot_spine_sql(staged_dir, as_of), as_of, as_of)
        rows = write_parquet_atomically(con, sql, target, validate=gate)
    else:
        with atomic_replace(target) as candidate:
            rows = write(candidate)
            gate(candidate)
    return FeatureSnapshot(as_of, target, rows, outcomes)


def open_feature_snapshot(path: Path, as_of: date) -> Path:
    """The stored snapshot for `as_of`, checked readable: a truncated or missing partition raises
    `CorruptFileError` naming the file and the partition to re-materialize, instead of a bare
    Arrow/DuckDB error wherever it is read (scoring, drift, exports)."""
    check_parquet(path, f"re-materialize the customer_features partition {as_of.isoformat()} (materialize the customer_features asset for that partition)")
    return Path(path)
