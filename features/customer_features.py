"""Point-in-time customer features, declared once and computed set-based in DuckDB (or Spark).

Every feature is a `Feature` of the feature dictionary (tagml.features.dictionary): its SQL, meaning,
window and type. The query here and docs/FEATURES.md are both generated from that list. The query is
DuckDB SQL inside the portable subset (tagml.features.portable_sql) over relations passed in, so
Spark runs the same text over temporary views (tagml.features.spark_features).

Features are computed over a *spine* of (customer_id, as_of) pairs: one as_of for a nightly
partition, or each label's date for a training set. For a pair, only rows dated on or before
as_of are read (transactions and events by timestamp, balances by month end, loans by open date;
a loan closed after as_of counts as open, as it was on that day). Balances come from the latest
month end on or before as_of.
"""

from collections.abc import Mapping
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa

from tagml.core.storage import connect, sql_literal, staged_relation, write_parquet_atomically
from tagml.features.contract import PRODUCTS
from tagml.features.delivery import current_generation
from tagml.features.dictionary import FEATURE_NAMES, FEATURES, event_rows, source_measures


def _block(source: str, relation: str) -> str:
    exprs = [f"    {f.sql} AS {f.name}" for f in FEATURES if f.source == source]
    return f"{source}_features AS (\n  SELECT customer_id, as_of,\n" + ",\n".join(exprs) + f"\n  FROM {relation}\n  GROUP BY customer_id, as_of\n)"


WINDOW_FLAGS = {1: "w1", 3: "w3", 12: "true"}  # the flags of `_windowed_events_cte` (its rows are the 12 months)
EVENT_SOURCES = {"transactions": ("transactions", "txn_ts"), "digital": ("digital_events", "event_ts")}  # source -> staged table, time column


def measures_cte(source: str, rows: str) -> str:
    """`<source>_measures`: every measure the source's features read, per (customer_id, as_of), over the
    windowed event rows `rows` (flagged w1/w3)."""
    cols = [f"    {x.over_rows(WINDOW_FLAGS[k])} AS m_{x.name}_w{k}" for x, k in source_measures(source)]
    return f"{source}_measures AS (\n  SELECT customer_id, as_of,\n" + ",\n".join(cols) + f"\n  FROM {rows}\n  GROUP BY customer_id, as_of\n)"


def measure_features_cte(source: str) -> str:
    """`<source>_features`: the source's features, each an expression over its measures (`<source>_measures`)."""
    exprs = [f"    {f.sql} AS {f.name}" for f in FEATURES if f.source == source]
    return f"{source}_features AS (\n  SELECT customer_id, as_of,\n" + ",\n".join(exprs) + f"\n  FROM {source}_measures\n)"


def balance_month_end_sql(day: str) -> str:
    """The month end whose balances a feature reads on `day` (a DATE expression): the latest month
    end on or before it. Balances are month-end series; the quality checks use the same rule."""
    return f"CASE WHEN {day} = last_day({day}) THEN {day} ELSE last_day({day} - INTERVAL 1 MONTH) END"


STAGED_TABLES = ("customers", "balances", "loans", "transactions", "digital_events")


def staged_relations(staged_dir: Path, first: date | None = None, last: date | None = None) -> dict[str, str]:
    """The staged tables as DuckDB relations, all from the current generation: every table from one
    delivery, even if another is swapped in while the query is built or run. A table staged by period
    is read from its files within [`first`, `last`] only (`staged_relation`)."""
    generation = current_generation(staged_dir)
    return {t: staged_relation(generation, t, first, last) for t in STAGED_TABLES}


def features_select(relations: Mapping[str, str], spine_sql: str, first_as_of: date, last_as_of: date) -> str:
    """The SELECT computing every feature for each (customer_id, as_of) row of `spine_sql`, over
    `relations` (staged table -> a relation: `read_parquet(...)` on DuckDB, a temporary view on Spark).

    One DuckDB-dialect text for both engines, inside the portable subset (`check_portable`).
    `first_as_of`/`last_as_of` bound the spine's dates so that Parquet scans skip rows that no
    as_of can use.
    """
    bounds = (f"DATE {sql_literal(first_as_of)} - INTERVAL 12 MONTH", f"DATE {sql_literal(last_as_of)} + INTERVAL 1 DAY")
    one_as_of = first_as_of if first_as_of == last_as_of else None
    ctes = [
        *base_ctes(relations, spine_sql, first_as_of, last_as_of),
        _windowed_events_cte("txn", "t", relations["transactions"], "transactions", *bounds, one_as_of=one_as_of),
        measures_cte("transactions", "txn"),
        measure_features_cte("transactions"),
        _windowed_events_cte("dig", "e", relations["digital_events"], "digital", *bounds, one_as_of=one_as_of),
        measures_cte("digital", "dig"),
        measure_features_cte("digital"),
    ]
    return "WITH " + ",\n".join(ctes) + joined_select()


def base_ctes(relations: Mapping[str, str], spine_sql: str, first_as_of: date, last_as_of: date, balances: str | None = None) -> list[str]:
    """The spine and the customers, balances and loans features (every path computes these the same way).

    `balances`: a relation of stored balances features per customer for the spine's one snap (columns
    customer_id and the balances features) to reuse instead of aggregating the balances again."""
    bounds = (f"DATE {sql_literal(first_as_of)} - INTERVAL 12 MONTH", f"DATE {sql_literal(last_as_of)} + INTERVAL 1 DAY")
    customer_cols = ",\n    ".join(f"{f.sql} AS {f.name}" for f in FEATURES if f.source == "customer")
    if balances is None:
        balance_ctes = [*_balance_ctes(relations["balances"], *bounds), _block("balances", "bal")]
    else:
        names = ", ".join(f"b.{f.name}" for f in FEATURES if f.source == "balances")
        balance_ctes = [
            f"balances_features AS (\n  SELECT s.customer_id, s.as_of, {names}\n  FROM spine s JOIN {balances} b ON b.customer_id = s.customer_id\n)"
        ]
    return [
        (f"spine AS (\n  SELECT DISTINCT customer_id, as_of::DATE AS as_of,\n    {balance_month_end_sql('as_of::DATE')} AS snap\n  FROM ({spine_sql})\n)"),
        f"customer_features AS (\n  SELECT s.customer_id, s.as_of,\n    {customer_cols}\n  FROM spine s JOIN {relations['customers']} c USING (customer_id)\n)",
        *balance_ctes,
        _loan_cte(relations["loans"]),
        _block("loans", "loan"),
    ]


def balances_select(relations: Mapping[str, str], snap: date) -> str:
    """The balances features of every customer with staged balances at the month end `snap`: what any as_of whose
    latest month end is `snap` gets (they depend on as_of only through it).

    The spine is the balances' own customers, not the customers table: the features of a customer depend only on
    their balance rows, and the snapshot's join from its spine drops anyone it does not have. So the result (and
    its stored copy's identity) does not change when the customers file does, which is every night."""
    spine = f"SELECT DISTINCT customer_id, DATE {sql_literal(snap)} AS as_of FROM {relations['balances']}"
    names = ", ".join(f.name for f in FEATURES if f.source == "balances")
    ctes = base_ctes(relations, spine, snap, snap)
    return "WITH " + ",\n".join(ctes) + f"\nSELECT customer_id, {names} FROM balances_features ORDER BY customer_id"


def history_start(first_as_of: date) -> date:
    """The first day any feature of `first_as_of` can read (the 12-month windows, rounded down to a
    whole month with a month to spare): period files before it are not opened at all."""
    months = first_as_of.year * 12 + first_as_of.month - 1 - 13
    return date(months // 12, months % 12 + 1, 1)


def features_sql(staged_dir: Path, spine_sql: str, first_as_of: date, last_as_of: date) -> str:
    """`features_select` over the staged Parquet files of `staged_dir` (DuckDB)."""
    return features_select(staged_relations(staged_dir, history_start(first_as_of), last_as_of), spine_sql, first_as_of, last_as_of)


def _balance_ctes(balances: str, lo: str, hi: str) -> list[str]:
    """One row per customer, as_of and month end (products pivoted to columns), then AUM."""
    product_cols = ",\n      ".join(f"sum(CAST(balance AS DECIMAL(18,2))) FILTER (WHERE product = {sql_literal(p)}) AS p_{p}" for p in PRODUCTS)
    return [
        (
            f"bal_month AS (\n  SELECT s.customer_id, s.as_of, s.snap, b.month_end,\n      {product_cols},\n      count(*) AS n_products\n"
            f"  FROM spine s JOIN {balances} b ON b.customer_id = s.customer_id\n"
            f"    AND b.month_end <= s.snap AND b.month_end > s.snap - INTERVAL 12 MONTH\n"
            f"    AND b.month_end > {lo} AND b.month_end < {hi}\n  GROUP BY ALL\n)"
        ),
        (
            f"bal AS (\n  SELECT customer_id, as_of, snap, month_end, n_products,\n    {', '.join(f'coalesce(p_{p}, 0) AS p_{p}' for p in PRODUCTS)},\n"
            f"    {' + '.join(f'coalesce(p_{p}, 0)' for p in PRODUCTS if p != 'credit_card')} AS aum\n  FROM bal_month\n)"
        ),
    ]


def _windowed_events_cte(name: str, alias: str, relation: str, source: str, lo: str, hi: str, one_as_of: date | None = None) -> str:
    """The events of `relation` in the 12 months up to each as_of (inclusive), as the measures read them
    (`event_rows`), flagged `w1`/`w3` when in the last 1 or 3 months; `lo`/`hi` let the Parquet scan skip
    what no as_of can use.

    With `one_as_of` (every spine row has that date: a snapshot), the rows are not joined to the spine: the
    windows are constant bounds, so the scan filters by them alone, and the features' final LEFT JOIN from the
    spine drops any customer outside it. Joining ~10M event rows to the spine was a third of the full build."""
    ts = EVENT_SOURCES[source][1]
    if one_as_of is not None:
        d = f"DATE {sql_literal(one_as_of)}"
        return (
            f"{name} AS (\n  SELECT customer_id, {d} AS as_of, {', '.join(event_rows(source))},\n"
            f"    {ts} >= {d} - INTERVAL 1 MONTH + INTERVAL 1 DAY AS w1,\n"
            f"    {ts} >= {d} - INTERVAL 3 MONTH + INTERVAL 1 DAY AS w3\n"
            f"  FROM {relation}\n  WHERE {ts} < {d} + INTERVAL 1 DAY AND {ts} >= {d} - INTERVAL 12 MONTH + INTERVAL 1 DAY\n)"
        )
    t = f"{alias}.{ts}"
    return (
        f"{name} AS (\n  SELECT s.customer_id, s.as_of, {', '.join(event_rows(source))},\n"
        f"    {t} >= s.as_of - INTERVAL 1 MONTH + INTERVAL 1 DAY AS w1,\n"
        f"    {t} >= s.as_of - INTERVAL 3 MONTH + INTERVAL 1 DAY AS w3\n"
        f"  FROM spine s JOIN {relation} {alias} ON {alias}.customer_id = s.customer_id\n"
        f"    AND {t} < s.as_of + INTERVAL 1 DAY AND {t} >= s.as_of - INTERVAL 12 MONTH + INTERVAL 1 DAY\n"
        f"    AND {t} >= {lo} AND {t} < {hi}\n)"
    )


def _loan_cte(loans: str) -> str:
    """Loans open at each as_of, with the principal outstanding on an annuity schedule."""
    # calendar months between the dates (what DuckDB's date_diff('month') counts; Spark's counts whole months)
    paid = "(year(s.as_of) * 12 + month(s.as_of)) - (year(l.open_date) * 12 + month(l.open_date))"
    left = f"greatest(l.term_months - ({paid}), 0)"
    rate = "CAST(l.interest_rate AS DOUBLE) / 12"
    return (
        f"loan AS (\n  SELECT s.customer_id, s.as_of, l.loan_type, l.open_date, l.principal, l.monthly_payment,\n"
        f"    CASE WHEN l.term_months IS NULL THEN NULL\n"
        f"         WHEN l.interest_rate = 0 THEN CAST(l.principal * {left} AS DOUBLE) / l.term_months\n"
        f"         ELSE CAST(l.monthly_payment * (1 - pow(1 + {rate}, -{left})) AS DOUBLE) / ({rate})\n"
        f"    END AS outstanding\n"
        f"  FROM spine s JOIN {loans} l ON l.customer_id = s.customer_id\n"
        f"    AND l.open_date <= s.as_of AND (l.close_date IS NULL OR l.close_date > s.as_of)\n)"
    )


def joined_select() -> str:
    """Every source's features joined to the customers (a customer without rows gets each feature's
    `fill`), the derived features on top, in dictionary order."""
    joined_cols = []
    for f in FEATURES:
        if f.source in ("customer", "derived"):
            continue
        col = f"{f.source}_features.{f.name}"
        joined_cols.append(f"coalesce({col}, {f.fill}) AS {f.name}" if f.fill is not None else f"{col} AS {f.name}")
    joins = "\n".join(f"LEFT JOIN {s}_features USING (customer_id, as_of)" for s in ("balances", "transactions", "loans", "digital"))
    customer_names = ", ".join(f.name for f in FEATURES if f.source == "customer")
    base = f"SELECT customer_id, as_of, {customer_names},\n  " + ",\n  ".join(joined_cols) + f"\nFROM customer_features\n{joins}"
    derived = ", ".join(f"{f.sql} AS {f.name}" for f in FEATURES if f.source == "derived")
    ordered = ", ".join(FEATURE_NAMES)
    return (
        f",\nbase AS (\n{base}\n),\nwith_derived AS (SELECT *, {derived} FROM base)\n"
        + f"SELECT customer_id, as_of, {ordered} FROM with_derived ORDER BY customer_id, as_of"
    )


def snapshot_spine_select(customers: str, as_of: date) -> str:
    """Every customer of the `customers` relation onboarded on or before `as_of`."""
    return f"SELECT customer_id, DATE {sql_literal(as_of)} AS as_of FROM {customers} WHERE onboarding_date <= DATE {sql_literal(as_of)}"


def snapshot_select(relations: Mapping[str, str], as_of: date) -> str:
    """The SELECT of the feature snapshot for `as_of`: every onboarded customer's features (either engine)."""
    return features_select(relations, snapshot_spine_select(relations["customers"], as_of), as_of, as_of)


def snapshot_schema(staged_dir: Path, as_of: date) -> pa.Schema:
    """The column names, order and types of the snapshot the DuckDB path writes (no rows are computed):
    the schema any engine's snapshot is stored with."""
    con = connect(threads=1, memory_limit="256MB")
    try:
        return con.sql(f"SELECT * FROM ({snapshot_select(staged_relations(staged_dir), as_of)}) LIMIT 0").to_arrow_table().schema
    finally:
        con.close()


def snapshot_spine_sql(staged_dir: Path, as_of: date) -> str:
    """`snapshot_spine_select` over the staged customers of `staged_dir` (DuckDB)."""
    return snapshot_spine_select(staged_relations(staged_dir)["customers"], as_of)


def build_customer_features(con: duckdb.DuckDBPyConnection, staged_dir: Path, as_of: date, target: Path) -> int:
    """Compute the feature snapshot for `as_of` and write it atomically to `target` (Parquet). Returns rows."""
    return write_parquet_atomically(con, snapshot_select(staged_relations(staged_dir), as_of), target)


def spine_features_sql(con: duckdb.DuckDBPyConnection, staged_dir: Path, spine_sql: str) -> str:
    """SQL of the features for arbitrary (customer_id, as_of) pairs, e.g. each label at its label date."""
    first, last = con.execute(f"SELECT min(as_of)::DATE, max(as_of)::DATE FROM ({spine_sql})").fetchall()[0]
    if first is None:
        raise ValueError("the spine is empty: no (customer_id, as_of) rows to compute features for")
    return features_sql(staged_dir, spine_sql, first, last)


def features_for_spine(con: duckdb.DuckDBPyConnection, staged_dir: Path, spine_sql: str) -> duckdb.DuckDBPyRelation:
    """Features for arbitrary (customer_id, as_of) pairs as a DuckDB relation."""
    return con.sql(spine_features_sql(con, staged_dir, spine_sql))
