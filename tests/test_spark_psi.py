"""Feature PSI with Spark's bin counts (real local[2]) against DuckDB's: the same counts, PSI within 1e-9."""

import numpy as np
import pandas as pd
import pytest

from tagml.features.dictionary import CATEGORICAL_FEATURES, FEATURE_NAMES
from tagml.monitoring.psi import ALL, MISSING, bin_counts, feature_psi, reference_bins, slice_values
from tagml.monitoring.spark_psi import spark_bin_counter
from tagml.scoring.rules import slice_expressions
from tagml.training.catalog import load_catalog
from tests.conftest import MID_MONTH_DAY, MID_MONTH_END

pytestmark = [pytest.mark.spark, pytest.mark.slow]  # a JVM start (~15 s) and Spark jobs: out of the inner loop

KEYS = ["slice_column", "slice", "feature"]


def _compare(con, spark, reference, current, kinds, slices) -> pd.DataFrame:
    """Both engines' PSI tables, checked equal; returned for the caller's checks of what they cover."""
    duck = feature_psi(con, reference, current, kinds, slices)
    on_spark = feature_psi(con, reference, current, kinds, slices, bin_counter=spark_bin_counter(spark))
    assert len(duck) == len(on_spark) and duck[KEYS].equals(on_spark[KEYS])
    assert np.allclose(duck["psi"], on_spark["psi"], rtol=0, atol=1e-9), (duck["psi"] - on_spark["psi"]).abs().max()
    for column in ("reference_rows", "current_rows", "bins", "reference_missing_share", "current_missing_share"):
        pd.testing.assert_series_equal(duck[column], on_spark[column], check_exact=True)
    return duck


def _populations(tmp_path, con):
    rng = np.random.default_rng(7)
    n_ref, n_cur = 4000, 3000

    def population(n: int, shift: float) -> pd.DataFrame:
        amount = rng.lognormal(8 + shift, 1.0, n)
        amount[rng.random(n) < 0.05] = np.nan
        counts = np.where(rng.random(n) < 0.4 - shift / 4, 0, rng.integers(1, 20, n)).astype(float)  # a point mass at 0, integer edges
        return pd.DataFrame(
            {
                "customer_id": [f"C{i:05d}" for i in range(n)],
                "amount": amount,
                "trades": counts,
                "tenure": pd.array(np.where(rng.random(n) < 0.1, None, rng.integers(0, 120, n)), dtype="Int64"),
                "dormant": np.zeros(n),  # all one value: a point mass and no edges
                "segment": rng.choice(["retail", "premier", None], n, p=[0.6, 0.3, 0.1]),
                "region": rng.choice(["east", "west", "Xi'an", None], n, p=[0.4, 0.3, 0.2, 0.1]),
                "aum_total": rng.choice([0.0, 49_999.0, 50_000.0, 1_000_000.0, 7_000_000.0], n),
            }
        )

    reference, current = population(n_ref, 0.0), population(n_cur, 0.3)
    edges = reference_bins(con, _write(tmp_path, "reference", reference), ["amount", "trades", "tenure"])
    # the current population holds every reference edge exactly, values beyond the outer edges, infinities and new categories
    on_edges = [*edges["amount"].edges, *edges["trades"].edges]
    current.loc[: len(on_edges) - 1, "amount"] = on_edges
    current.loc[100:109, "amount"] = [-1e12, 1e12, np.inf, -np.inf, 0.0, -0.0, 1e-300, 5e300, np.nan, np.nan]
    current.loc[200:203, "dormant"] = [1.0, -1.0, np.nan, 0.0]
    current.loc[300:349, "segment"] = "private"
    current.loc[400:409, "region"] = "north"
    return reference, current, edges


def _write(tmp_path, name, frame):
    path = tmp_path / f"{name}.parquet"
    frame.to_parquet(path, index=False)
    return path


def test_spark_counts_the_same_bins_on_edges_beyond_them_missing_and_new_categories(spark, con, tmp_path):
    reference, current, edges = _populations(tmp_path, con)
    ref_path, cur_path = _write(tmp_path, "reference", reference), _write(tmp_path, "current", current)
    kinds = {"amount": "numeric", "trades": "numeric", "tenure": "numeric", "dormant": "numeric", "segment": "categorical"}
    slices = {"region": '"region"', "value_tier": slice_expressions(load_catalog(), {"aum_total"}, sources=["value_tier"])["value_tier"]}
    assert edges["trades"].mass == 0.0 and all(float(e).is_integer() for e in edges["trades"].edges)
    # the counts themselves, bin by bin, on the current population
    values = slice_values(con, [ref_path, cur_path], slices)
    all_edges = reference_bins(con, ref_path, [n for n, k in kinds.items() if k == "numeric"])
    duck = bin_counts(con, cur_path, kinds, all_edges, slices, values).sort_values([*KEYS, "bin"]).reset_index(drop=True)
    on_spark = spark_bin_counter(spark)(con, cur_path, kinds, all_edges, slices, values).sort_values([*KEYS, "bin"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(duck, on_spark, check_dtype=False)
    # what the comparison covers: the edge values, the outliers, the missing and the new categories are there
    overall = duck[duck.slice_column == ALL]
    assert {MISSING, "0", str(len(all_edges["amount"].edges))} <= set(overall[overall.feature == "amount"].bin)
    assert {"private", MISSING} <= set(overall[overall.feature == "segment"].bin)
    assert set(overall[overall.feature == "dormant"].bin) == {"mass", "0", MISSING}
    assert {"north", "Xi'an", MISSING} <= set(duck[duck.slice_column == "region"].slice)
    psi = _compare(con, spark, ref_path, cur_path, kinds, slices)
    assert set(psi.slice_column) == {ALL, "region", "value_tier"} and (psi[psi.slice_column == ALL].psi > 0).all()


def test_spark_psi_of_every_feature_of_the_bank_matches_duckdb(spark, con, bank_features):
    columns = set(FEATURE_NAMES) | {"aum_total", "region"}
    kinds = {n: ("categorical" if n in CATEGORICAL_FEATURES else "numeric") for n in FEATURE_NAMES}
    slices = slice_expressions(load_catalog(), columns)
    psi = _compare(con, spark, bank_features[MID_MONTH_END], bank_features[MID_MONTH_DAY], kinds, slices)
    assert set(psi[psi.slice_column == ALL].feature) == set(FEATURE_NAMES) and len(FEATURE_NAMES) >= 79
    assert set(psi.slice_column) == {ALL, *slices}
