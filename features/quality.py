"""Data-quality checks of a feature snapshot, as plain results that orchestration turns into asset checks."""

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from features.customer_features import FEATURES, FEATURE_NAMES, KEY_COLUMNS
from features.warehouse import sql_literal, staged_path

MAX_NULL_RATE = 0.995
MAX_DATA_LAG_DAYS = 3


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    description: str
    blocking: bool = True
    metadata: dict[str, Any] = field(default_factory=dict)


def check_feature_snapshot(con: duckdb.DuckDBPyConnection, path: Path, staged_dir: Path, as_of: date) -> list[CheckOutcome]:
    """Row count, schema, uniqueness, null rates and freshness of one `customer_features` snapshot."""
    snap = f"read_parquet({sql_literal(path)})"
    customers = f"read_parquet({sql_literal(staged_path(staged_dir, 'customers'))})"
    d = f"DATE {sql_literal(as_of)}"
    rows, distinct = con.execute(f"SELECT count(*), count(DISTINCT customer_id) FROM {snap}").fetchall()[0]
    expected = con.execute(f"SELECT count(*) FROM {customers} WHERE onboarding_date <= {d}").fetchall()[0][0]
    columns = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {snap}").fetchall()]
    outcomes = [
        CheckOutcome(
            "row_count",
            rows == expected and rows > 0,
            "One row per customer onboarded on or before as_of.",
            metadata={"rows": rows, "expected_rows": expected},
        ),
        CheckOutcome("unique_customers", distinct == rows, "customer_id is unique.", metadata={"duplicates": rows - distinct}),
        CheckOutcome(
            "schema",
            columns == [*KEY_COLUMNS, *FEATURE_NAMES],
            "Columns match the feature dictionary.",
            metadata={"missing": sorted(set(FEATURE_NAMES) - set(columns)), "unexpected": sorted(set(columns) - {*KEY_COLUMNS, *FEATURE_NAMES})},
        ),
    ]
    present = [f for f in FEATURES if f.name in columns]
    null_sql = ", ".join(f"avg(({f.name} IS NULL)::DOUBLE)" for f in present)
    rates = dict(zip((f.name for f in present), con.execute(f"SELECT {null_sql} FROM {snap}").fetchall()[0])) if rows else {}
    filled_with_nulls = [f.name for f in present if f.fill is not None and rates.get(f.name)]
    all_null = [n for n, r in rates.items() if r is not None and r > MAX_NULL_RATE]
    outcomes.append(
        CheckOutcome(
            "null_rates",
            not filled_with_nulls and not all_null,
            f"Count/sum features are never null; no feature is more than {MAX_NULL_RATE:.1%} null.",
            metadata={
                "filled_features_with_nulls": filled_with_nulls,
                "mostly_null_features": all_null,
                "highest_null_rates": dict(sorted(((k, round(v or 0, 4)) for k, v in rates.items()), key=lambda kv: -kv[1])[:8]),
            },
        )
    )
    latest_txn = con.execute(
        f"SELECT max(txn_ts)::DATE FROM read_parquet({sql_literal(staged_path(staged_dir, 'transactions'))}) WHERE txn_ts < {d} + INTERVAL 1 DAY"
    ).fetchall()[0][0]
    lag = (as_of - latest_txn).days if latest_txn else None
    outcomes.append(
        CheckOutcome(
            "freshness",
            lag is not None and lag <= MAX_DATA_LAG_DAYS,
            f"The newest transaction on or before as_of is at most {MAX_DATA_LAG_DAYS} days old (the raw data is not stale).",
            blocking=False,
            metadata={"latest_transaction_date": str(latest_txn), "lag_days": lag},
        )
    )
    return outcomes
