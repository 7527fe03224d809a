"""A bank's own customer table (bring your own, BYO) as a tag's feature source.

A customer-level "wide" table the bank already has (one row per customer, or one per customer and
`as_of` snapshot), given by path in the catalog entry of the tag (`label.feature_source`). Read with
DuckDB's readers; the path reaches SQL only as a bound literal (`sql_literal`/`glob_literal`).
"""

from pathlib import Path

from tagml.core.storage import glob_literal, sql_literal


def table_relation(path: str) -> str:
    """A DuckDB relation reading a BYO table or labels file: a CSV file, a Parquet file or a folder of Parquet files."""
    if path.lower().endswith(".csv"):
        return f"read_csv({sql_literal(path)}, header = true)"
    if Path(path).is_dir():
        return f"read_parquet({glob_literal(path, '*.parquet')})"
    return f"read_parquet({sql_literal(path)})"


# ---- snapshots (scoring, drift) ----
