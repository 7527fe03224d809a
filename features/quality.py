"""Data-quality checks of a feature snapshot, as plain results that orchestration turns into asset checks."""

from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from tagml.core.files import check_parquet
from tagml.core.storage import latest_staged_files, quote, sql_literal, staged_path, staged_relation
from tagml.features.checks import CheckOutcome, QualityCheck
from tagml.features.contract import CUSTOMERS, TABLES_BY_NAME
from tagml.features.customer_features import balance_month_end_sql
from tagml.features.delivery import current_generation
from tagml.features.dictionary import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURES, KEY_COLUMNS

MAX_NULL_RATE = 0.995
MAX_DATA_LAG_DAYS = 3
MAX_UNSEEN_VALUES_SHOWN = 5

ROW_COUNT = QualityCheck("row_count", "One row per customer onboarded on or before as_of.")
UNIQUE_CUSTOMERS = QualityCheck("unique_customers", "customer_id is unique.")
SCHEMA = QualityCheck("schema", "Columns match the feature dictionary.")
NULL_RATES = QualityCheck(
    "null_rates",
    f"Features that are never null have no nulls; no other feature is more than {MAX_NULL_RATE:.1%} null, except those without enough history yet.",
)
UNSEEN_CATEGORIES = QualityCheck(
    "unseen_categories", "Categorical features take only the contract's allowed values (others are scored as unknown).", blocking=False
)
CONSTANT_FEATURES = QualityCheck("constant_features", "No feature has the same value for every customer.", blocking=False)
FRESHNESS = QualityCheck(
    "freshness",
    f"The newest transaction on or before as_of is at most {MAX_DATA_LAG_DAYS} days old (the raw data is not stale).",
    blocking=False,
)
# every check `check_feature_snapshot` runs, in the order it runs them
FEATURE_CHECKS = (ROW_COUNT, UNIQUE_CUSTOMERS, SCHEMA, NULL_RATES, UNSEEN_CATEGORIES, CONSTANT_FEATURES, FRESHNESS)


def null_rates(con: duckdb.DuckDBPyConnection, relation: str, names: list[str]) -> dict[str, float]:
    """Share of null values per feature over `relation` (aggregates only)."""
    if not names:
        return {}
    sql = ", ".join(f"avg(({quote(n)} IS NULL)::DOUBLE)" for n in names)
    return {n: float(r) for n, r in zip(names, con.execute(f"SELECT {sql} FROM {relation}").fetchall()[0]) if r is not None}


# the staged table each feature source reads (its contract event time bounds the history)
SOURCE_TABLES = {"balances": "balances", "transactions": "transactions", "loans": "loans", "digital": "digital_events"}


def features_without_history(con: duckdb.DuckDBPyConnection, staged_dir: Path, as_of: date) -> list[str]:
    """Features that are null for everyone at `as_of` because the staged source does not reach far
    enough back (`Feature.history_months`): early partitions of a bank new to tagml."""
    d = f"DATE {sql_literal(as_of)}"
    snap = balance_month_end_sql(d)
    out = []
    for f in (f for f in FEATURES if f.history_months):
        table = TABLES_BY_NAME[SOURCE_TABLES[f.source]]
        back = f"{snap if table.name == 'balances' else d} - INTERVAL {int(f.history_months)} MONTH"
        needed = f"last_day({back})" if table.name == "balances" else f"({back})::DATE"
        reaches = con.execute(
            f"SELECT coalesce(min({quote(table.event_time)})::DATE <= {needed}, false) FROM {staged_relation(staged_dir, table.name)}"
        ).fetchall()[0][0]
        if not reaches:
            out.append(f.name)
    return out


def check_null_rates(rates: dict[str, float], exempt: list[str]) -> CheckOutcome:
    """Blocking: a feature that must never be null has nulls, or one that may be null is (almost)
    entirely null -- a source or column that went empty -- unless it cannot exist yet (`exempt`)."""
    by_name = {f.name: f for f in FEATURES}
    nulls_where_never = sorted(n for n, r in rates.items() if r > 0 and not by_name[n].may_be_null)
    empty = sorted(n for n, r in rates.items() if r > MAX_NULL_RATE and by_name[n].may_be_null and n not in exempt)
    failed = nulls_where_never + empty
    return NULL_RATES.outcome(
        not failed,
        finding=f"Failed: {', '.join(failed)}." if failed else "",
        metadata={
            "never_null_features_with_nulls": nulls_where_never,
            "empty_features": empty,
            "not_yet_available": sorted(exempt),
            "highest_null_rates": dict(sorted(((k, round(v, 4)) for k, v in rates.items()), key=lambda kv: -kv[1])[:8]),
        },
    )


def check_unseen_categories(con: duckdb.DuckDBPyConnection, relation: str, columns: list[str]) -> CheckOutcome:
    """Non-blocking: values of categorical features outside the contract's allowed values. The models
    score them as unknown (the same as missing), silently; this counts and flags them."""
    counts: dict[str, int] = {}
    shown: dict[str, list[str]] = {}
    for name in (n for n in CATEGORICAL_FEATURES if n in columns):
        allowed = CUSTOMERS.column(name).allowed or ()
        predicate = f"{quote(name)} IS NOT NULL AND {quote(name)} NOT IN ({', '.join(sql_literal(v) for v in allowed)})"
        rows = con.execute(f"SELECT {quote(name)}::VARCHAR, count(*) FROM {relation} WHERE {predicate} GROUP BY 1 ORDER BY 2 DESC, 1").fetchall()
        if rows:
            counts[name] = int(sum(n for _, n in rows))
            # category values, never customer-level: truncated so a free-text column cannot dump data
            shown[name] = [str(v)[:30] for v, _ in rows[:MAX_UNSEEN_VALUES_SHOWN]]
    finding = f"Unseen values in: {', '.join(sorted(counts))}." if counts else ""
    return UNSEEN_CATEGORIES.outcome(not counts, {"unseen_rows": counts, "unseen_values": shown}, finding)


def check_constant_features(con: duckdb.DuckDBPyConnection, relation: str, names: list[str]) -> CheckOutcome:
    """Non-blocking: features with one value for every customer (e.g. AUM 0 for everyone when the
    balances stopped arriving: counts and sums are filled with 0, so they never look null). A bank
    may legitimately lack a source or a category, so this warns rather than blocks."""
    constant: dict[str, Any] = {}
    if names:
        parts = ", ".join(f"min({quote(n)})::VARCHAR, max({quote(n)})::VARCHAR, count({quote(n)})" for n in names)
        row = con.execute(f"SELECT {parts}, count(*) FROM {relation}").fetchall()[0]
        if row[-1] > 1:
            for i, name in enumerate(names):
                lo, hi, n = row[3 * i : 3 * i + 3]
                if n and lo == hi:
                    constant[name] = lo[:30]  # the one value everybody has: an aggregate
    finding = f"Constant: {', '.join(constant)}." if constant else ""
    return CONSTANT_FEATURES.outcome(not constant, {"constant_features": constant}, finding)


def check_feature_snapshot(con: duckdb.DuckDBPyConnection, path: Path, staged_dir: Path, as_of: date) -> list[CheckOutcome]:
    """Row count, schema, uniqueness, null rates, unseen categories and freshness of one `customer_features` snapshot."""
    check_parquet(path, f"re-materialize the customer_features partition {as_of.isoformat()}")
    staged_dir = current_generation(staged_dir)
    snap = f"read_parquet({sql_literal(path)})"
    customers = f"read_parquet({sql_literal(staged_path(staged_dir, 'customers'))})"
    d = f"DATE {sql_literal(as_of)}"
    rows, distinct = con.execute(f"SELECT count(*), count(DISTINCT customer_id) FROM {snap}").fetchall()[0]
    expected = con.execute(f"SELECT count(*) FROM {customers} WHERE onboarding_date <= {d}").fetchall()[0][0]
    columns = _columns(con, snap)
    outcomes = [
        ROW_COUNT.outcome(rows == expected and rows > 0, {"rows": rows, "expected_rows": expected}),
        UNIQUE_CUSTOMERS.outcome(distinct == rows, {"duplicates": rows - distinct}),
        SCHEMA.outcome(
            columns == [*KEY_COLUMNS, *FEATURE_NAMES],
            {"missing": sorted(set(FEATURE_NAMES) - set(columns)), "unexpected": sorted(set(columns) - {*KEY_COLUMNS, *FEATURE_NAMES})},
        ),
    ]
    present = [f.name for f in FEATURES if f.name in columns]
    rates = null_rates(con, snap, present) if rows else {}
    outcomes.append(check_null_rates(rates, features_without_history(con, staged_dir, as_of)))
    outcomes.append(check_unseen_categories(con, snap, columns))
    outcomes.append(check_constant_features(con, snap, present))
    # the latest day's file only (not every day of history): freshness must not cost more as history grows
    latest = latest_staged_files(staged_dir, "transactions", as_of)
    latest_txn = (
        con.execute(
            f"SELECT max(txn_ts)::DATE FROM read_parquet([{', '.join(sql_literal(f) for f in latest)}]) WHERE txn_ts < {d} + INTERVAL 1 DAY"
        ).fetchall()[0][0]
        if latest
        else None
    )
    lag = (as_of - latest_txn).days if latest_txn else None
    outcomes.append(FRESHNESS.outcome(lag is not None and lag <= MAX_DATA_LAG_DAYS, {"latest_transaction_date": str(latest_txn), "lag_days": lag}))
    return outcomes


def feature_summary(con: duckdb.DuckDBPyConnection, path: Path) -> list[dict[str, Any]]:
    """Per numeric feature: min, median, max and null share; per categorical: distinct values and
    null share. Aggregates only -- what orchestration may show instead of customer rows."""
    snap = f"read_parquet({sql_literal(path)})"
    columns = set(_columns(con, snap))
    parts, layout = [], []
    for f in FEATURES:
        if f.name not in columns:
            continue
        q = quote(f.name)
        if f.kind == "categorical":
            parts += [f"count(DISTINCT {q})", f"avg(({q} IS NULL)::DOUBLE)"]
        else:
            parts += [f"min({q})::DOUBLE", f"median({q})::DOUBLE", f"max({q})::DOUBLE", f"avg(({q} IS NULL)::DOUBLE)"]
        layout.append(f)
    if not parts:
        return []
    values = iter(con.execute(f"SELECT {', '.join(parts)} FROM {snap}").fetchall()[0])
    out = []
    for f in layout:
        if f.kind == "categorical":
            n, null = next(values), next(values)
            out.append({"feature": f.name, "distinct": n, "null_share": round(null or 0.0, 4)})
        else:
            lo, med, hi, null = next(values), next(values), next(values), next(values)
            out.append({"feature": f.name, "min": _round(lo), "median": _round(med), "max": _round(hi), "null_share": round(null or 0.0, 4)})
    return out


def _columns(con: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    return [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)
