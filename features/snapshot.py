"""Build a feature snapshot behind its quality gate: a snapshot that fails a blocking check never
replaces the stored partition."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import duckdb

from tagml.core.files import check_parquet
from tagml.core.storage import atomic_replace, write_parquet_atomically
from tagml.features.aggregates import AggregatesUpdate, incremental_snapshot_plan, update_monthly_aggregates
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
    # how it was computed: "full" (every event row of the windows), "incremental" (monthly aggregates plus the
    # windows' edge days; `months_from_aggregates` per source: which months came whole from the aggregates,
    # none if no aggregate was fresh), or "engine" (`write` on another engine)
    method: str = "full"
    months_from_aggregates: dict[str, list[date]] = field(default_factory=dict)


def build_feature_snapshot(
    con: duckdb.DuckDBPyConnection,
    staged_dir: Path,
    as_of: date,
    target: Path,
    write: Callable[[Path], int] | None = None,
    *,
    aggregates_dir: Path | None = None,
    update_aggregates: bool = True,
) -> FeatureSnapshot:
    """Compute features for every customer at `as_of`, check them, and only then swap them into `target`.

    `write(candidate)` computes the snapshot into the candidate file on another engine (returns rows);
    by default DuckDB computes it. The checks run on the candidate either way.

    With `aggregates_dir` (DuckDB only), the transactions and digital features come from the monthly aggregates
    there (brought up to date first unless `update_aggregates` is False) plus the staged days at the windows'
    edges; a month whose aggregate is missing or stale is read from the staged rows instead. The snapshot is
    identical to the full recompute's either way (`tagml.features.aggregates`).
    """
    outcomes: list[CheckOutcome] = []

    def gate(candidate: Path) -> None:
        outcomes.extend(check_feature_snapshot(con, candidate, staged_dir, as_of))
        if any(o.blocking and not o.passed for o in outcomes):
            raise FeatureQualityError(as_of, outcomes)

    if write is not None:
        with atomic_replace(target) as candidate:
            rows = write(candidate)
            gate(candidate)
        return FeatureSnapshot(as_of, target, rows, outcomes, method="engine")
    if aggregates_dir is None:
        sql = features_sql(staged_dir, snapshot_spine_sql(staged_dir, as_of), as_of, as_of)
        rows = write_parquet_atomically(con, sql, target, validate=gate)
        return FeatureSnapshot(as_of, target, rows, outcomes)
    if update_aggregates:
        update_monthly_aggregates(con, staged_dir, aggregates_dir)
    plan = incremental_snapshot_plan(con, staged_dir, as_of, aggregates_dir)
    rows = write_parquet_atomically(con, plan.sql, target, validate=gate)
    return FeatureSnapshot(as_of, target, rows, outcomes, method="incremental", months_from_aggregates=plan.months)


def build_feature_snapshots(
    con: duckdb.DuckDBPyConnection, staged_dir: Path, as_ofs: Sequence[date], targets: Sequence[Path], aggregates_dir: Path
) -> tuple[AggregatesUpdate, list[FeatureSnapshot]]:
    """The snapshots of several as_of (a backfill) sharing one update of the monthly aggregates: each is
    `build_feature_snapshot(..., aggregates_dir=...)` behind its own quality gate. A failing gate raises
    `FeatureQualityError` for that as_of; the snapshots before it are already stored."""
    if len(as_ofs) != len(targets):
        raise ValueError(f"{len(as_ofs)} as_of dates but {len(targets)} targets")
    update = update_monthly_aggregates(con, staged_dir, aggregates_dir)
    built = [
        build_feature_snapshot(con, staged_dir, d, t, aggregates_dir=aggregates_dir, update_aggregates=False) for d, t in zip(as_ofs, targets, strict=True)
    ]
    return update, built


def open_feature_snapshot(path: Path, as_of: date) -> Path:
    """The stored snapshot for `as_of`, checked readable: a truncated or missing partition raises
    `CorruptFileError` naming the file and the partition to re-materialize, instead of a bare
    Arrow/DuckDB error wherever it is read (scoring, drift, exports)."""
    check_parquet(path, f"re-materialize the customer_features partition {as_of.isoformat()} (materialize the customer_features asset for that partition)")
    return Path(path)
