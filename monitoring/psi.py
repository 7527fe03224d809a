"""Population stability index (PSI), set-based in DuckDB, for every feature of a tag at once.

PSI = sum over bins of (cur - ref) * ln(cur / ref), with `ref`/`cur` the share of rows in each bin.
Numeric features are binned on the *reference* deciles, with a value that holds at least 10% of the
reference (usually 0) in a bin of its own (`reference_bins`); categorical features use one bin per
category. A missing value is a bin of its own in both cases, so a jump in the missing rate counts as
drift.

Each population is scanned once, whatever the number of features: every feature's bin is computed in
one projection and counted with one `histogram()` aggregate per feature, grouped by an integer code of
the finest slice combination; overall and per-slice counts are sums of those groups. This keeps
1,000,000 customers x 79 features at seconds on two cores (bench/bench_drift.py).

Conventional reading of PSI: < 0.1 stable, 0.1-0.25 moderate shift, > 0.25 major shift. With B bins
and n rows per side, sampling alone gives PSI of about (B - 1) * (1/n_ref + 1/n_cur); for 10 bins
and a 1,000-row reference that is ~0.01, far below the flag thresholds. PSI weighs a shift by the
share of customers who change bins: a few heavy traders doubling their trades hardly move it, while
a distance on the values (Evidently's Wasserstein) sees them.
"""

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from tagml.core.storage import quote, sql_literal

DECILES = tuple(round(q / 10, 1) for q in range(1, 10))
MISSING = "(missing)"
ALL = "(all)"
# A bin empty on one side would make ln() infinite; the usual floor. A category that is new in the
# current data with share s then adds about s * ln(s / 1e-4) (0.05 for 1%, 0.5 for 7%).
SHARE_FLOOR = 1e-4
EDGE_ROWS = 200_000
MASS_SHARE = 0.1  # a value holding this share of the reference gets its own bin
MASS_BIN = 99


def parquet(path: Path | str) -> str:
    return f"read_parquet({sql_literal(str(path))})"


def _number(value: float) -> str:
    """A bin edge or point mass as an SQL DOUBLE literal; only a finite float can become one.

    Scientific notation with 17 significant digits is a DOUBLE in DuckDB, parsed to exactly this float;
    a plain decimal literal is a DECIMAL, converted with a rounding of its own, so a value lying exactly
    on an edge could land in another bin than the same edge puts it in on Spark (spark_psi.py).
    """
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"a bin edge must be finite, not {number}")
    return f"{number:.17e}"


@dataclass(frozen=True)
class Bins:
    """Numeric binning of one feature: an optional point-mass value with a bin of its own, then edges."""

    edges: tuple[float, ...]
    mass: float | None = None  # a value holding >= MASS_SHARE of the reference (typically 0)


def reference_bins(con: duckdb.DuckDBPyConnection, path: Path | str, numeric: Sequence[str], max_rows: int = EDGE_ROWS) -> dict[str, Bins]:
    """Bins of each numeric feature from the reference: deciles, with a point mass set apart.

    Many features are zero for most customers (trade counts, shares of a product, views). Plain
    deciles of such a feature collapse into 3-4 bins with everything above the 90th percentile in
    one bin, so a shift in how much the active customers do stays invisible (tests/test_drift.py:
    the active 30% trading twice as much is PSI > 0.2 with this binning, under half that without).
    So the most frequent value, when it holds at least MASS_SHARE of the reference, gets its own bin
    and the deciles are taken over the other values.

    A large reference is read at every k-th row (at most `max_rows`, by row number, so the bins are
    the same on every run): any fixed bins give a valid PSI as long as both sides use them, and
    sorting 72 columns of 1M rows for exact quantiles cost more than the rest of the computation.
    """
    if not numeric:
        return {}
    rows = con.execute(f"SELECT count(*) FROM {parquet(path)}").fetchall()[0][0]
    step = max(1, math.ceil(rows / max_rows))
    where = f"WHERE file_row_number % {step} = 0" if step > 1 else ""
    # one scan of the reference into a temporary table; the three aggregate passes then read that
    source = f"_bins_{uuid.uuid4().hex[:8]}"
    columns = ", ".join(quote(n) for n in numeric)
    con.execute(f"CREATE TEMP TABLE {source} AS SELECT {columns} FROM read_parquet({sql_literal(str(path))}, file_row_number = true) {where}")
    try:
        return _bins_from(con, source, numeric)
    finally:
        con.execute(f"DROP TABLE IF EXISTS {source}")


def _bins_from(con: duckdb.DuckDBPyConnection, source: str, numeric: Sequence[str]) -> dict[str, Bins]:

    def finite(n: str) -> str:
        return f"CASE WHEN isfinite({quote(n)}::DOUBLE) THEN {quote(n)}::DOUBLE END"

    modes = con.execute("SELECT " + ", ".join(f"mode({finite(n)}), count({finite(n)})" for n in numeric) + f" FROM {source}").fetchall()[0]
    mode_of = {n: (modes[2 * i], modes[2 * i + 1]) for i, n in enumerate(numeric)}
    shares = con.execute(
        "SELECT "
        + ", ".join(f"count(*) FILTER (WHERE {finite(n)} = {_number(mode_of[n][0])})" if mode_of[n][0] is not None else "0" for n in numeric)
        + f" FROM {source}"
    ).fetchall()[0]
    masses = {n: mode_of[n][0] if mode_of[n][1] and shares[i] / mode_of[n][1] >= MASS_SHARE else None for i, n in enumerate(numeric)}
    quantiles = ", ".join(
        f"quantile_cont({finite(n)}, {list(DECILES)})" + (f" FILTER (WHERE {finite(n)} != {_number(masses[n])})" if masses[n] is not None else "")
        for n in numeric
    )
    row = con.execute(f"SELECT {quantiles} FROM {source}").fetchall()[0]
    out = {}
    for name, values in zip(numeric, row):
        edges = sorted({float(v) for v in (values or []) if v is not None and np.isfinite(v)})
        out[name] = Bins(tuple(edges), None if masses[name] is None else float(masses[name]))
    return out


def categorical_bin_sql(name: str) -> str:
    """A categorical feature's bin: its value as text, a missing value in a bin of its own."""
    return f"coalesce({quote(name)}::VARCHAR, {sql_literal(MISSING)})"


def _bin_expression(name: str, kind: str, bins: Mapping[str, Bins]) -> str:
    column = quote(name)
    if kind == "categorical":
        return categorical_bin_sql(name)
    value = f"{column}::DOUBLE"
    spec = bins.get(name, Bins(()))
    # bin k holds edge[k-1] < x <= edge[k]; DuckDB evaluates each WHEN only on the rows still
    # unmatched, which measured faster than a sum of comparisons or a nested binary search
    mass = f"WHEN {value} = {_number(spec.mass)} THEN {MASS_BIN} " if spec.mass is not None else ""
    whens = " ".join(f"WHEN {value} <= {_number(edge)} THEN {k}" for k, edge in enumerate(spec.edges))
    return f"CASE WHEN {column} IS NULL OR isnan({value}) THEN -1 {mass}{whens} ELSE {len(spec.edges)} END"


def slice_value_sql(expr: str) -> str:
    """A slice expression's value as text, with a missing value in a bin of its own (the same on both sides)."""
    return f"coalesce(({expr})::VARCHAR, {sql_literal(MISSING)})"


def slice_values(con: duckdb.DuckDBPyConnection, paths: Sequence[Path | str], slices: Mapping[str, str]) -> dict[str, list[str]]:
    """The distinct values of each slice expression over all `paths` (a cheap pass over a few columns)."""
    values: dict[str, set[str]] = {name: set() for name in slices}
    for path in paths:
        for name, expr in slices.items():
            rows = con.execute(f"SELECT DISTINCT {slice_value_sql(expr)} FROM {parquet(path)}").fetchall()
            values[name].update(r[0] for r in rows)
    return {name: sorted(v) for name, v in values.items()}


def bin_counts(
    con: duckdb.DuckDBPyConnection,
    path: Path | str,
    features: Mapping[str, str],
    edges: Mapping[str, Bins],
    slices: Mapping[str, str],
    values: Mapping[str, list[str]],
) -> pd.DataFrame:
    """Rows per (slice_column, slice, feature, bin); slice_column = slice = '(all)' for the whole population.

    One scan: a `histogram()` per feature, grouped by one integer code of the finest combination of
    the slices (e.g. 7 regions x 4 tiers = 28 groups); the overall and per-slice counts are sums of
    those groups. This never materialises the rows x features long table, and grouping by an integer
    code costs a fraction of GROUPING SETS or grouping by the slice strings (measured at 1M rows).
    """
    # the slice values come from the data (a region may be Xi'an): they are bound as parameters
    code, params, multiplier = [], [], 1
    for name, expr in slices.items():
        known = values[name]
        position = f"coalesce(list_position(?::VARCHAR[], {slice_value_sql(expr)}), 0)"
        code.append(f"{position} * {multiplier}")
        params.append(list(known))
        multiplier *= len(known) + 1
    code_sql = " + ".join(code) if code else "0"
    bins = ", ".join(f"{_bin_expression(n, k, edges)} AS {quote(n)}" for n, k in features.items())
    histograms = ", ".join(f"histogram({quote(n)})" for n in features)
    wide = con.execute(
        f"SELECT _code, {histograms} FROM (SELECT ({code_sql})::INTEGER AS _code, {bins} FROM {parquet(path)}) GROUP BY _code", params
    ).fetchall()
    records = []
    for combo, *maps in wide:
        keys, rest = [], combo
        for name in slices:  # decode the mixed-radix code back into slice values
            base = len(values[name]) + 1
            keys.append(values[name][rest % base - 1] if rest % base else MISSING)
            rest //= base
        for feature, histogram in zip(features, maps):
            for bin_value, n in (histogram or {}).items():
                records.append((*keys, feature, MISSING if bin_value == -1 else ("mass" if bin_value == MASS_BIN else str(bin_value)), n))
    return rollup(pd.DataFrame(records, columns=[*slices, "feature", "bin", "n"]), list(slices), ["feature", "bin"])


def rollup(finest: pd.DataFrame, slices: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """Counts per (slice_column, slice, *keys) from counts per (each slice..., *keys, n): overall, then each slice on its own."""
    parts = [finest.groupby(list(keys), as_index=False)["n"].sum().assign(slice_column=ALL, slice=ALL)]
    for name in slices:
        part = finest.groupby([name, *keys], as_index=False)["n"].sum().rename(columns={name: "slice"})
        parts.append(part.assign(slice_column=name))
    return pd.concat(parts, ignore_index=True)[["slice_column", "slice", *keys, "n"]]


def psi_from_counts(reference: pd.DataFrame, current: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """PSI per `keys` group from bin counts (columns: *keys, bin, n) of the two populations."""
    merged = reference.merge(current, on=[*keys, "bin"], how="outer", suffixes=("_ref", "_cur")).fillna({"n_ref": 0, "n_cur": 0})
    totals = merged.groupby(list(keys))[["n_ref", "n_cur"]].transform("sum")
    ref = np.maximum(merged["n_ref"] / totals["n_ref"].where(totals["n_ref"] > 0), SHARE_FLOOR)
    cur = np.maximum(merged["n_cur"] / totals["n_cur"].where(totals["n_cur"] > 0), SHARE_FLOOR)
    merged["term"] = (cur - ref) * np.log(cur / ref)
    merged["missing_ref"] = np.where(merged["bin"] == MISSING, merged["n_ref"], 0)
    merged["missing_cur"] = np.where(merged["bin"] == MISSING, merged["n_cur"], 0)
    out = merged.groupby(list(keys), as_index=False).agg(
        psi=("term", "sum"),
        reference_rows=("n_ref", "sum"),
        current_rows=("n_cur", "sum"),
        bins=("bin", "count"),
        missing_ref=("missing_ref", "sum"),
        missing_cur=("missing_cur", "sum"),
    )
    out["reference_missing_share"] = out["missing_ref"] / out["reference_rows"].where(out["reference_rows"] > 0)
    out["current_missing_share"] = out["missing_cur"] / out["current_rows"].where(out["current_rows"] > 0)
    return out.drop(columns=["missing_ref", "missing_cur"])


# (con, path, features, edges, slices, slice values) -> counts per (slice_column, slice, feature, bin):
# `bin_counts` in DuckDB, or the same counts computed by another engine (monitoring/spark_psi.py)
BinCounter = Callable[[duckdb.DuckDBPyConnection, Path | str, Mapping[str, str], Mapping[str, Bins], Mapping[str, str], Mapping[str, list[str]]], pd.DataFrame]


@dataclass(frozen=True)
class ReferenceCounts:
    """The reference side of a feature PSI: the bins (from the reference) and the reference's counts in them.

    Both depend on the reference alone, so drift computes them once per model version and reuses
    them every night (monitoring/reference.py `reference_feature_counts`).
    """

    edges: dict[str, Bins]
    counts: pd.DataFrame  # slice_column, slice, feature, bin, n


def reference_counts(
    con: duckdb.DuckDBPyConnection,
    reference: Path | str,
    features: Mapping[str, str],
    slices: Mapping[str, str] | None = None,
    bin_counter: BinCounter | None = None,
) -> ReferenceCounts:
    """The bins of every numeric feature from `reference` and the reference's counts in them, overall and per slice.

    Each side's counts need only its own slice values: a value one side lacks has no rows there to count.
    """
    count = bin_counter or bin_counts
    slices = dict(slices or {})
    edges = reference_bins(con, reference, [n for n, k in features.items() if k != "categorical"])
    return ReferenceCounts(edges, count(con, reference, features, edges, slices, slice_values(con, [reference], slices)))


def psi_table(reference: pd.DataFrame, current: pd.DataFrame, features: Mapping[str, str], slices: Mapping[str, str]) -> pd.DataFrame:
    """`feature_psi`'s table from the two sides' counts (slice_column, slice, feature, bin, n) in the same bins.

    The order the counts come in does not matter: `psi_from_counts`'s outer merge sorts the keys before any sum.
    """
    out = psi_from_counts(reference, current, ["slice_column", "slice", "feature"])
    out["kind"] = out["feature"].map(dict(features))
    feature_order = {n: i for i, n in enumerate(features)}
    slice_order = {ALL: -1, **{n: i for i, n in enumerate(slices)}}
    out["_f"], out["_s"] = out["feature"].map(feature_order), out["slice_column"].map(slice_order)
    out = out.sort_values(["_s", "slice", "_f"]).drop(columns=["_f", "_s"])
    return out.reset_index(drop=True)


def feature_psi(
    con: duckdb.DuckDBPyConnection,
    reference: Path | str,
    current: Path | str,
    features: Mapping[str, str],
    slices: Mapping[str, str] | None = None,
    bin_counter: BinCounter | None = None,
) -> pd.DataFrame:
    """PSI of every feature between two Parquet files (reference, current), overall and per slice.

    `features` maps name -> 'numeric' | 'categorical'; `slices` maps a slice name to a SQL expression
    over the relations' columns (e.g. {"region": '"region"'}). Returns one row per (slice_column,
    slice, feature) with the PSI, row counts, number of bins and missing shares; slice_column and
    slice are '(all)' for the whole population. The bins come from the reference (DuckDB, a fixed
    sample); `bin_counter` counts both populations in them (default `bin_counts`, DuckDB).
    """
    count = bin_counter or bin_counts
    slices = dict(slices or {})
    ref = reference_counts(con, reference, features, slices, count)
    cur = count(con, current, features, ref.edges, slices, slice_values(con, [current], slices))
    return psi_table(ref.counts, cur, features, slices)


def distribution_psi(reference: Mapping[str, float], current: Mapping[str, float]) -> float:
    """PSI between two categorical distributions given as {class: count or share}."""
    ref = pd.DataFrame({"bin": list(reference), "n": list(reference.values())})
    cur = pd.DataFrame({"bin": list(current), "n": list(current.values())})
    ref["k"], cur["k"] = 0, 0
    return float(psi_from_counts(ref, cur, ["k"])["psi"].iloc[0])
