"""A bank's own customer table (bring your own, BYO) as a tag's feature source.

A customer-level "wide" table the bank already has (one row per customer, or one per customer and
`as_of` snapshot), given by path in the catalog entry of the tag (`label.feature_source`). Read with
DuckDB's readers; the path reaches SQL only as a bound literal (`sql_literal`/`glob_literal`).
"""

from collections.abc import Mapping
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa

from tagml.core.storage import glob_literal, quote, sql_literal, write_parquet_atomically
from tagml.core.suppression import Suppression

SUPPRESSED_OWN_VIEW = "suppressed_own_customers"


def table_relation(path: str) -> str:
    """A DuckDB relation reading a BYO table or labels file: a CSV file, a Parquet file or a folder of Parquet files."""
    if path.lower().endswith(".csv"):
        return f"read_csv({sql_literal(path)}, header = true)"
    if Path(path).is_dir():
        return f"read_parquet({glob_literal(path, '*.parquet')})"
    return f"read_parquet({sql_literal(path)})"


# ---- snapshots (scoring, drift) ----


class OwnTableSnapshotError(ValueError):
    """A BYO table cannot give the feature snapshot of an as_of (named tag, file and column); nothing was written."""


def own_table_snapshot(
    con: duckdb.DuckDBPyConnection,
    tag: str,
    path: str,
    id_column: str,
    features: Mapping[str, str],
    as_of: date,
    target: Path,
    suppression: Suppression | None = None,
) -> int:
    """Write the feature snapshot of a BYO table on `as_of` to `target` atomically; returns its rows.

    The bank's table is not tagml's to rewrite: the customers of `suppression` (erased) are dropped here,
    so no snapshot brings them back.

    `customer_id` (the id column as VARCHAR), `as_of`, and only the `features` given (name -> numeric |
    categorical, cast as training casts them): a table's other columns (PII among them) never reach the
    warehouse. A table with an `as_of` column gives, per id, its latest row dated on or before `as_of`
    (point in time); a table without one is taken whole and must have one row per id.
    """
    if not Path(path).exists():
        raise OwnTableSnapshotError(f"tag {tag!r}: feature table {path} does not exist")
    relation = table_relation(path)
    try:
        columns = {name for name, *_ in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()}
    except duckdb.Error as exc:
        raise OwnTableSnapshotError(f"tag {tag!r}: cannot read feature table {path}: {str(exc).splitlines()[0]}") from exc
    if id_column not in columns:
        raise OwnTableSnapshotError(f"tag {tag!r}: feature table {path} has no id column {id_column!r}")
    missing = [f for f in features if f not in columns]
    if missing:
        raise OwnTableSnapshotError(f"tag {tag!r}: feature table {path} lacks {len(missing)} feature column(s) the model uses: {missing[:10]}")
    cols = ", ".join(f"{quote(f)}::{'VARCHAR' if kind == 'categorical' else 'DOUBLE'} AS {quote(f)}" for f, kind in features.items())
    rows = f"SELECT * FROM {relation} WHERE {quote(id_column)} IS NOT NULL"
    if suppression is not None and suppression.hashes:
        con.register(SUPPRESSED_OWN_VIEW, pa.table({"customer_hash": pa.array(sorted(suppression.hashes), pa.string())}))
        # the salt is 64 hex characters (checked when read): the same hash as staging's
        hashed = f"sha256({sql_literal(suppression.salt)} || {quote(id_column)}::VARCHAR)"
        rows += f" AND {hashed} NOT IN (SELECT customer_hash FROM {SUPPRESSED_OWN_VIEW})"
    if "as_of" in columns:
        # point in time: per id the newest snapshot on or before as_of (rank keeps ties, counted as duplicates)
        rows = (
            f"{rows} AND as_of::DATE <= DATE {sql_literal(as_of)} QUALIFY rank() OVER (PARTITION BY {quote(id_column)}::VARCHAR ORDER BY as_of::DATE DESC) = 1"
        )
    sql = f"SELECT {quote(id_column)}::VARCHAR AS customer_id, DATE {sql_literal(as_of)} AS as_of, {cols} FROM ({rows}) ORDER BY customer_id"

    def check(candidate: Path) -> None:
        n, ids = con.execute(f"SELECT count(*), count(DISTINCT customer_id) FROM read_parquet({sql_literal(candidate)})").fetchall()[0]
        if n == 0:
            dated = " dated on or before" if "as_of" in columns else " for"
            raise OwnTableSnapshotError(f"tag {tag!r}: feature table {path} has no rows{dated} {as_of}")
        if n != ids:
            which = f"on their latest as_of on or before {as_of}" if "as_of" in columns else "(the table has no as_of column)"
            raise OwnTableSnapshotError(f"tag {tag!r}: feature table {path} has {n - ids:,} duplicate row(s) of {id_column!r} {which}")

    try:
        return write_parquet_atomically(con, sql, target, validate=check)
    except duckdb.Error as exc:
        raise OwnTableSnapshotError(f"tag {tag!r}: cannot read feature table {path}: {str(exc).splitlines()[0]}") from exc
