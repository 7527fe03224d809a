"""The feature catalogue and the feature snapshot of the synthetic bank: declared once, documented,
free of PII, complete, and with values in their natural ranges."""

import re
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from conftest import MID_MONTH_DAY, MID_MONTH_END

from tagml.core.storage import sql_literal
from tagml.features.contract import CUSTOMERS, RAW_TABLES, TABLES_BY_NAME, contract_markdown
from tagml.features.customer_features import features_sql, snapshot_spine_sql
from tagml.features.dictionary import CATEGORICAL_FEATURES, FEATURE_NAMES, FEATURES, KEY_COLUMNS, SOURCES, feature_dictionary, feature_dictionary_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"
PII_COLUMNS = sorted({c.name for spec in RAW_TABLES for c in spec.columns if c.pii})
SHARE_FEATURES = [f.name for f in FEATURES if "share" in f.name and "change" not in f.name] + ["invest_sell_ratio_3m"]
FILLED = [f for f in FEATURES if f.fill is not None]


def snapshot(con, path: Path) -> pd.DataFrame:
    return con.execute(f"SELECT * FROM read_parquet({sql_literal(path)})").df()


@pytest.fixture(scope="module", params=[MID_MONTH_END, MID_MONTH_DAY], ids=["month_end", "mid_month"])
def features_at(request, bank_features):
    con = duckdb.connect()
    try:
        df = snapshot(con, bank_features[request.param])
    finally:
        con.close()
    return request.param, df


# ---- the declarations -----------------------------------------------------------------------


def test_at_least_forty_uniquely_named_features():
    assert len(FEATURES) >= 40
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert not set(FEATURE_NAMES) & set(KEY_COLUMNS)
    for name in FEATURE_NAMES:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name


def test_every_feature_is_in_the_dictionary():
    entries = feature_dictionary()
    assert [e["name"] for e in entries] == list(FEATURE_NAMES)
    for e in entries:
        assert e["description"].strip() and e["window"].strip() and e["group"].strip(), e
        assert e["source"] in SOURCES
        assert e["kind"] in ("numeric", "categorical")
    markdown = feature_dictionary_markdown()
    for name in FEATURE_NAMES:
        assert f"| `{name}` |" in markdown


def test_categorical_features_come_from_contract_columns_with_allowed_values():
    for name in CATEGORICAL_FEATURES:
        column = CUSTOMERS.column(name)
        assert column.allowed and not column.pii


def test_fill_values_only_for_counts_and_sums():
    for f in FILLED:
        assert f.kind == "numeric" and f.source not in ("customer", "derived"), f.name
        assert f.fill == 0, f"{f.name}: a missing count/sum is zero"
        assert "share" not in f.name and "ratio" not in f.name and "days_since" not in f.name, f.name


def test_no_pii_column_in_the_features_sql(bank):
    sql = features_sql(bank["staged"], snapshot_spine_sql(bank["staged"], MID_MONTH_END), MID_MONTH_END, MID_MONTH_END)
    for column in PII_COLUMNS:
        assert not re.search(rf"\b{column}\b", sql), f"PII column {column} appears in the features SQL"
    for f in FEATURES:
        for column in PII_COLUMNS:
            assert not re.search(rf"\b{column}\b", f.sql), f"{f.name} reads {column}"
            assert column not in f.name


@pytest.mark.parametrize(
    "doc, generate",
    [("FEATURES.md", feature_dictionary_markdown), ("DATA_CONTRACT.md", contract_markdown)],
    ids=["features", "data_contract"],
)
def test_committed_docs_are_up_to_date(doc, generate):
    path = DOCS / doc
    if not path.exists():
        pytest.skip(f"docs/{doc} is not there yet")
    assert path.read_text() == generate(), f"docs/{doc} is stale: regenerate it (tagml features / tagml contract)"


# ---- the snapshot of the synthetic bank ---------------------------------------------------------


def test_snapshot_has_one_row_per_onboarded_customer(features_at, bank, con):
    as_of, df = features_at
    assert list(df.columns) == [*KEY_COLUMNS, *FEATURE_NAMES]
    customers = f"read_parquet({sql_literal(bank['staged'] / 'customers.parquet')})"
    expected = con.execute(f"SELECT count(*) FROM {customers} WHERE onboarding_date <= DATE {sql_literal(as_of)}").fetchone()[0]
    assert len(df) == expected
    assert df["customer_id"].is_unique
    assert (df["as_of"].dt.date == as_of).all()
    assert not set(df.columns) & set(PII_COLUMNS)


def test_fill_valued_features_are_never_null(features_at):
    _, df = features_at
    rates = {f.name: df[f.name].isna().mean() for f in FILLED}
    assert all(rate == 0 for rate in rates.values()), {k: v for k, v in rates.items() if v}


def test_every_feature_carries_information(features_at):
    """No feature is (almost) entirely null or constant on a 3,000-customer bank."""
    _, df = features_at
    for name in FEATURE_NAMES:
        values = df[name]
        assert values.notna().mean() > 0.3, f"{name} is mostly null"
        assert values.nunique() >= 2, f"{name} is constant"


def test_types(features_at):
    _, df = features_at
    for f in FEATURES:
        if f.kind == "categorical":
            assert df[f.name].dropna().map(type).eq(str).all(), f.name
        else:
            assert pd.api.types.is_numeric_dtype(df[f.name]), f"{f.name} has dtype {df[f.name].dtype}"


def test_categorical_values_are_allowed(features_at):
    _, df = features_at
    for name in CATEGORICAL_FEATURES:
        allowed = set(TABLES_BY_NAME["customers"].column(name).allowed)
        assert set(df[name].dropna()) <= allowed, name


def test_value_ranges(features_at):
    _, df = features_at
    eps = 1e-9
    for name in SHARE_FEATURES:
        values = df[name].dropna()
        assert values.between(-eps, 1 + eps).all(), f"{name} outside [0, 1]: {values.min()}..{values.max()}"
    for f in FILLED:
        assert (df[f.name] >= 0).all(), f.name
    assert df["age"].between(18, 91).all()
    assert (df["tenure_months"] >= 0).all()
    assert df["days_since_last_txn"].dropna().between(0, 366).all()
    assert df["days_since_last_login"].dropna().between(0, 366).all()
    assert df["months_with_balance_12m"].between(0, 12).all()
    assert df["active_months_12m"].between(0, 13).all()  # a 12-month window can touch 13 calendar months
    assert df["n_products_held"].between(0, 8).all()
    assert df["city_tier"].between(1, 4).all()
    assert df["has_mortgage"].isin([0, 1]).all() and df["has_mortgage_payment_3m"].isin([0, 1]).all()
    assert (df["txn_count_1m"] <= df["txn_count_3m"]).all() and (df["txn_count_3m"] <= df["txn_count_12m"]).all()
    assert (df["spend_1m"] <= df["spend_3m"] + eps).all() and (df["spend_3m"] <= df["spend_12m"] + eps).all()
    assert (df["logins_1m"] <= df["logins_3m"]).all()
    assert (df["invest_buy_count_3m"] + df["invest_sell_count_3m"] <= df["invest_trade_count_12m"]).all()


def test_product_shares_add_up(features_at):
    _, df = features_at
    held = df[df["aum_total"] > 0]
    products = [c for c in FEATURE_NAMES if c.startswith("share_")]
    assert len(held) > 1000
    pd.testing.assert_series_equal(held[products].sum(axis=1), pd.Series(1.0, index=held.index), check_exact=False, rtol=1e-9)
    assert ((held["share_mutual_fund"] + held["share_equity"] - held["risky_share"]).abs() < 1e-9).all()
    categories = [c for c in FEATURE_NAMES if c.startswith("spend_share_")]
    spenders = df[df["spend_12m"] > 0]
    assert (spenders[categories].sum(axis=1) <= 1 + 1e-9).all()
    assert spenders[categories].notna().all().all()  # a spender's share of a category they never buy is 0


def test_derived_features_agree_with_their_inputs(features_at):
    _, df = features_at
    both = df[(df["salary_income_3m"] > 0)]
    pd.testing.assert_series_equal(both["debt_to_income"], both["monthly_debt_payment"] / both["salary_income_3m"], check_names=False, rtol=1e-12)
    assert df.loc[df["salary_income_3m"] == 0, "debt_to_income"].isna().all()
    limit = df[df["credit_limit"] > 0]
    pd.testing.assert_series_equal(limit["card_utilisation"], limit["credit_card_balance"] / limit["credit_limit"], check_names=False, rtol=1e-12)


def test_age_is_measured_at_as_of(features_at, bank, con):
    as_of, df = features_at
    births = con.execute(f"SELECT customer_id, birth_date FROM read_parquet({sql_literal(bank['staged'] / 'customers.parquet')})").df()
    merged = df[["customer_id", "age"]].merge(births, on="customer_id")
    expected = (pd.Timestamp(as_of) - pd.to_datetime(merged["birth_date"])).dt.days / 365.25
    pd.testing.assert_series_equal(merged["age"], expected, check_names=False, rtol=1e-12)


def test_snapshots_at_different_dates_differ(bank_features, con):
    a, b = (snapshot(con, bank_features[d]).set_index("customer_id") for d in (MID_MONTH_END, MID_MONTH_DAY))
    common = a.index.intersection(b.index)
    assert (a.loc[common, "txn_count_1m"] != b.loc[common, "txn_count_1m"]).mean() > 0.3
    assert (a.loc[common, "aum_total"] != b.loc[common, "aum_total"]).mean() > 0.3  # different month ends
