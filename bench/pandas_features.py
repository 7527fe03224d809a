"""The 79 customer features of features/customer_features.py, written in plain pandas.

This is "the obvious alternative" the DuckDB build is benchmarked against: one as_of snapshot,
the staged Parquet files read with `pandas.read_parquet` (column selection and row filters pushed
down to the reader), customer ids factorised once against the spine, and every feature computed
with vectorised groupby / unstack over small wide intermediates (no row-wise Python).

Semantics follow features/customer_features.py exactly, including its quirks:

* windows are (as_of - N months, as_of], i.e. timestamps >= as_of - N months + 1 day and
  < as_of + 1 day, with calendar-month arithmetic clamped to month end (as DuckDB intervals);
* balances are read at `snap` = as_of if it is a month end, else the previous month end, over
  month ends in (snap - 12 months, snap]; the 3-month balance window is month ends after
  last_day(snap - 3 months);
* a loan is open at as_of if open_date <= as_of and (close_date is null or close_date > as_of),
  outstanding from the annuity schedule with date_diff('month') = calendar-month difference;
* `sum(...) FILTER (...)` over no rows is NULL (NaN here), count is 0; a share is
  coalesce(numerator, 0) / nullif(denominator, 0); features with a `fill` are coalesced after the
  per-source blocks are joined, derived features use the filled values.

Run as a script to build one snapshot: `python bench/pandas_features.py STAGED_DIR AS_OF OUT.parquet`.
"""

import sys
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.tseries.offsets import MonthEnd

from tagml.features.contract import INVESTMENT_PRODUCTS, PRODUCTS, SPEND_CATEGORIES
from tagml.features.dictionary import FEATURE_NAMES, FEATURES

NON_CARD = tuple(p for p in PRODUCTS if p != "credit_card")
SHARE_CATEGORIES = (
    "groceries",
    "dining",
    "shopping",
    "luxury",
    "travel",
    "entertainment",
    "rent",
    "childcare",
    "education",
    "medical",
    "insurance_premium",
)
FILLS = {f.name: f.fill for f in FEATURES if f.fill is not None}
DAY = pd.Timedelta(days=1)


def _months_back(ts: pd.Timestamp, months: int) -> pd.Timestamp:
    """`ts - INTERVAL n MONTH` (day clamped to the end of the target month, as DuckDB does)."""
    return ts - pd.DateOffset(months=months)


def _last_day(ts: pd.Timestamp) -> pd.Timestamp:
    return ts + MonthEnd(0)


def _nullif0(s: pd.Series) -> pd.Series:
    return s.where(s != 0)


def _share(num: pd.Series, den: pd.Series) -> pd.Series:
    """`coalesce(num, 0) / nullif(den, 0)`: 0 when nothing matched the numerator, NULL without a denominator."""
    return num.fillna(0) / _nullif0(den)


def _read(staged_dir: Path, table: str, columns: list[str], filters=None) -> pd.DataFrame:
    return pd.read_parquet(staged_dir / f"{table}.parquet", columns=columns, filters=filters)


def _codes(ids: pd.Index, customer_id: pd.Series) -> np.ndarray:
    """Position of each row's customer in the (sorted) spine, -1 if not in the spine."""
    return ids.get_indexer(customer_id)


def _window_bucket(ts: pd.Series, w1_lo: pd.Timestamp, w3_lo: pd.Timestamp) -> np.ndarray:
    """0: only in the 12-month window, 1: in the 3-month but not the 1-month window, 2: last month."""
    v = ts.to_numpy()
    return np.where(v >= np.datetime64(w1_lo), 2, np.where(v >= np.datetime64(w3_lo), 1, 0)).astype(np.int8)


# ---------------------------------------------------------------------------------------------
def customer_block(customers: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    out = pd.DataFrame(index=customers.index)
    out["age"] = (as_of - pd.to_datetime(customers["birth_date"])).dt.days / 365.25
    for col in ("gender", "marital_status", "num_children", "education", "occupation", "region", "city_tier", "acquisition_channel"):
        out[col] = customers[col]
    out["tenure_months"] = (as_of - pd.to_datetime(customers["onboarding_date"])).dt.days / 30.44
    return out


def balances_block(staged_dir: Path, ids: pd.Index, as_of: pd.Timestamp, snap: pd.Timestamp) -> pd.DataFrame:
    lo12 = _months_back(snap, 12)
    b = _read(
        staged_dir,
        "balances",
        ["customer_id", "month_end", "product", "balance"],
        filters=[
            ("month_end", "<=", snap.date()),
            ("month_end", ">", lo12.date()),
            ("month_end", ">", _months_back(as_of, 12).date()),
            ("month_end", "<", (as_of + DAY).date()),
        ],
    )
    b["cid"] = _codes(ids, b.pop("customer_id"))
    b = b[b["cid"] >= 0]
    b["month_end"] = pd.to_datetime(b["month_end"])
    b["product"] = pd.Categorical(b["product"], categories=PRODUCTS)
    # one row per customer and month end, products as columns (the bal_month CTE)
    g = b.groupby(["cid", "month_end", "product"], observed=True)["balance"].sum()
    m = g.unstack("product", fill_value=0.0).reindex(columns=list(PRODUCTS), fill_value=0.0)
    m.columns = [f"p_{p}" for p in PRODUCTS]
    m["n_products"] = b.groupby(["cid", "month_end"]).size()
    aum = m[f"p_{NON_CARD[0]}"].copy()
    for p in NON_CARD[1:]:
        aum = aum + m[f"p_{p}"]
    m["aum"] = aum
    m = m.reset_index()

    latest = m[m["month_end"] == snap].set_index("cid")
    ago = m[m["month_end"] == _last_day(_months_back(snap, 3))].set_index("cid")
    by = m.groupby("cid")
    out = pd.DataFrame(index=by.size().index)
    l_aum = latest["aum"].reindex(out.index)
    a_aum = ago["aum"].reindex(out.index)
    out["aum_total"] = l_aum
    out["aum_avg_3m"] = m[m["month_end"] > _last_day(_months_back(snap, 3))].groupby("cid")["aum"].sum() / 3
    out["aum_avg_12m"] = by["aum"].sum() / 12
    out["aum_growth_3m"] = l_aum / _nullif0(a_aum) - 1
    for p in NON_CARD:
        out[f"share_{p}"] = _share(latest[f"p_{p}"].reindex(out.index), l_aum)
    invest = latest[f"p_{INVESTMENT_PRODUCTS[0]}"].copy()
    for p in INVESTMENT_PRODUCTS[1:]:
        invest = invest + latest[f"p_{p}"]
    out["investment_share"] = _share(invest.reindex(out.index), l_aum)
    l_risky = (latest["p_mutual_fund"] + latest["p_equity"]).reindex(out.index)
    a_risky = (ago["p_mutual_fund"] + ago["p_equity"]).reindex(out.index)
    out["risky_share"] = _share(l_risky, l_aum)
    out["risky_share_change_3m"] = _share(l_risky, l_aum) - _share(a_risky, a_aum)
    out["n_products_held"] = latest["n_products"].reindex(out.index)
    out["months_with_balance_12m"] = (m["aum"] > 0).groupby(m["cid"]).sum()
    out["credit_card_balance"] = latest["p_credit_card"].reindex(out.index)
    return out


def transactions_block(staged_dir: Path, ids: pd.Index, as_of: pd.Timestamp) -> pd.DataFrame:
    lo, hi = _months_back(as_of, 12) + DAY, as_of + DAY
    t = _read(
        staged_dir,
        "transactions",
        ["customer_id", "txn_ts", "amount", "direction", "category", "channel"],
        filters=[("txn_ts", ">=", lo), ("txn_ts", "<", hi)],
    )
    t["cid"] = _codes(ids, t.pop("customer_id"))
    t = t[t["cid"] >= 0]
    t["bucket"] = _window_bucket(t["txn_ts"], _months_back(as_of, 1) + DAY, _months_back(as_of, 3) + DAY)
    for col in ("direction", "category", "channel"):
        t[col] = t[col].astype("category")

    # amount and count per customer x window bucket x category x direction, as wide columns
    agg = t.groupby(["cid", "bucket", "category", "direction"], observed=True)["amount"].agg(["sum", "count"])
    wide = agg.unstack(["bucket", "category", "direction"], fill_value=0)
    S, N = wide["sum"], wide["count"]
    buckets = S.columns.get_level_values("bucket")
    cats = S.columns.get_level_values("category")
    dirs = S.columns.get_level_values("direction")
    W = {"1m": (2,), "3m": (1, 2), "12m": (0, 1, 2)}

    def sel(window: str, categories=None, direction=None) -> np.ndarray:
        mask = np.isin(buckets, W[window])
        if categories is not None:
            mask &= np.isin(cats, list(categories))
        if direction is not None:
            mask &= dirs == direction
        return mask

    def tsum(window: str, categories=None, direction=None) -> pd.Series:
        """sum(amount) FILTER (...): NULL when no row matches."""
        mask = sel(window, categories, direction)
        return S.loc[:, mask].sum(axis=1).where(N.loc[:, mask].sum(axis=1) > 0)

    def tcount(window: str, categories=None, direction=None) -> pd.Series:
        return N.loc[:, sel(window, categories, direction)].sum(axis=1)

    ch = t.groupby(["cid", "bucket", "channel"], observed=True).size().unstack(["bucket", "channel"], fill_value=0)
    ch_b, ch_c = ch.columns.get_level_values("bucket"), ch.columns.get_level_values("channel")

    def ccount(window: str, channels) -> pd.Series:
        return ch.loc[:, np.isin(ch_b, W[window]) & np.isin(ch_c, list(channels))].sum(axis=1)

    out = pd.DataFrame(index=S.index)
    out["salary_income_3m"] = tsum("3m", ("salary", "pension")) / 3
    out["inflow_3m"] = tsum("3m", direction="credit") / 3
    out["outflow_3m"] = tsum("3m", direction="debit") / 3
    for w in ("1m", "3m", "12m"):
        out[f"spend_{w}"] = tsum(w, SPEND_CATEGORIES, "debit")
    for c in SHARE_CATEGORIES:
        out[f"spend_share_{c}_12m"] = _share(tsum("12m", (c,), "debit"), out["spend_12m"])
    for c in ("childcare", "education", "medical", "travel"):
        out[f"spend_{c}_3m"] = tsum("3m", (c,), "debit")
    out["has_mortgage_payment_3m"] = (tcount("3m", ("mortgage_payment",)) > 0).astype(np.int32)
    for w in ("1m", "3m", "12m"):
        out[f"txn_count_{w}"] = tcount(w)
    last_day = t.groupby("cid")["txn_ts"].max().dt.floor("D")
    out["days_since_last_txn"] = (as_of - last_day).dt.days
    months = pd.DataFrame({"cid": t["cid"].to_numpy(), "m": t["txn_ts"].to_numpy().astype("datetime64[M]")})
    out["active_months_12m"] = months.drop_duplicates().groupby("cid").size()
    out["digital_txn_share_3m"] = _share(ccount("3m", ("mobile", "online")), out["txn_count_3m"])
    out["branch_txn_share_12m"] = _share(ccount("12m", ("branch", "atm")), out["txn_count_12m"])
    out["invest_buy_count_3m"] = tcount("3m", ("investment_buy",))
    out["invest_sell_count_3m"] = tcount("3m", ("investment_sell",))
    out["invest_trade_count_12m"] = tcount("12m", ("investment_buy", "investment_sell"))
    out["invest_buy_amount_3m"] = tsum("3m", ("investment_buy",))
    out["invest_sell_ratio_3m"] = _share(tsum("3m", ("investment_sell",)), tsum("3m", ("investment_buy", "investment_sell")))
    return out


def loans_block(staged_dir: Path, ids: pd.Index, as_of: pd.Timestamp) -> pd.DataFrame:
    cols = ["customer_id", "loan_type", "open_date", "close_date", "principal", "term_months", "interest_rate", "monthly_payment"]
    loans = _read(staged_dir, "loans", cols, filters=[("open_date", "<=", as_of.date())])
    loans["cid"] = _codes(ids, loans.pop("customer_id"))
    close = pd.to_datetime(loans["close_date"])
    loans = loans[(loans["cid"] >= 0) & (close.isna() | (close > as_of))].copy()
    opened = pd.to_datetime(loans["open_date"])
    month_diff = (as_of.year - opened.dt.year) * 12 + (as_of.month - opened.dt.month)
    term = loans["term_months"].astype("float64")
    remaining = (term - month_diff).clip(lower=0)
    r = loans["interest_rate"] / 12
    annuity = loans["monthly_payment"] * (1 - (1 + r) ** (-remaining)) / r.where(r != 0)
    linear = loans["principal"] * remaining / term
    loans["outstanding"] = np.where(term.isna(), np.nan, np.where(loans["interest_rate"] == 0, linear, annuity))
    card = loans["loan_type"] == "credit_card"
    loans["non_card"] = (~card).astype(np.int64)
    loans["mortgage"] = (loans["loan_type"] == "mortgage").astype(np.int64)
    loans["out_nc"] = loans["outstanding"].where(~card)
    loans["pay_nc"] = loans["monthly_payment"].where(~card)
    loans["limit_card"] = loans["principal"].where(card)
    loans["opened"] = opened
    by = loans.groupby("cid")
    out = pd.DataFrame(index=by.size().index)
    out["n_active_loans"] = by["non_card"].sum()
    out["has_mortgage"] = (by["mortgage"].sum() > 0).astype(np.int32)
    out["loan_outstanding"] = by["out_nc"].sum(min_count=1)
    out["monthly_debt_payment"] = by["pay_nc"].sum(min_count=1)
    out["credit_limit"] = by["limit_card"].sum(min_count=1)
    out["months_since_last_loan"] = (as_of - by["opened"].max()).dt.days / 30.44
    return out


def digital_block(staged_dir: Path, ids: pd.Index, as_of: pd.Timestamp) -> pd.DataFrame:
    lo, hi = _months_back(as_of, 12) + DAY, as_of + DAY
    e = _read(staged_dir, "digital_events", ["customer_id", "event_ts", "event_type"], filters=[("event_ts", ">=", lo), ("event_ts", "<", hi)])
    e["cid"] = _codes(ids, e.pop("customer_id"))
    e = e[e["cid"] >= 0]
    e["bucket"] = _window_bucket(e["event_ts"], _months_back(as_of, 1) + DAY, _months_back(as_of, 3) + DAY)
    e["event_type"] = e["event_type"].astype("category")
    wide = e.groupby(["cid", "bucket", "event_type"], observed=True).size().unstack(["bucket", "event_type"], fill_value=0)
    wb, wt = wide.columns.get_level_values("bucket"), wide.columns.get_level_values("event_type")

    def ecount(window_buckets, types) -> pd.Series:
        return wide.loc[:, np.isin(wb, window_buckets) & np.isin(wt, list(types))].sum(axis=1)

    out = pd.DataFrame(index=wide.index)
    out["logins_1m"] = ecount((2,), ("login",))
    out["logins_3m"] = ecount((1, 2), ("login",))
    out["fund_equity_views_3m"] = ecount((1, 2), ("view_fund", "view_equity"))
    out["deposit_views_3m"] = ecount((1, 2), ("view_deposit",))
    out["app_trades_3m"] = ecount((1, 2), ("trade",))
    out["loan_insurance_views_3m"] = ecount((1, 2), ("view_loan", "view_insurance"))
    out["support_chats_3m"] = ecount((1, 2), ("support_chat",))
    last_login = e.loc[e["event_type"] == "login"].groupby("cid")["event_ts"].max().dt.floor("D")
    out["days_since_last_login"] = (as_of - last_login).dt.days
    return out


def build_pandas_features(staged_dir: Path, as_of: date) -> pd.DataFrame:
    """One row per customer onboarded on or before `as_of`, columns customer_id, as_of, FEATURE_NAMES."""
    staged_dir = Path(staged_dir)
    as_of_ts = pd.Timestamp(as_of)
    snap = as_of_ts if as_of_ts.is_month_end else _last_day(_months_back(as_of_ts, 1))

    customers = _read(staged_dir, "customers", None, filters=[("onboarding_date", "<=", as_of_ts.date())])
    customers = customers.drop_duplicates("customer_id").sort_values("customer_id", ignore_index=True)
    ids = pd.Index(customers["customer_id"])

    blocks = [
        customer_block(customers, as_of_ts),
        balances_block(staged_dir, ids, as_of_ts, snap),
        transactions_block(staged_dir, ids, as_of_ts),
        loans_block(staged_dir, ids, as_of_ts),
        digital_block(staged_dir, ids, as_of_ts),
    ]
    # left-join every source block onto the spine (positions 0..n-1), then coalesce the fills
    base = pd.concat([b.reindex(pd.RangeIndex(len(ids))) for b in blocks], axis=1)
    for name, fill in FILLS.items():
        base[name] = base[name].fillna(fill)
        if float(fill).is_integer() and isinstance(fill, int):
            base[name] = base[name].astype(np.int64 if name not in ("has_mortgage", "has_mortgage_payment_3m") else np.int32)

    base["debt_to_income"] = base["monthly_debt_payment"] / _nullif0(base["salary_income_3m"])
    base["card_utilisation"] = base["credit_card_balance"] / _nullif0(base["credit_limit"])
    base["txn_trend_1m_vs_3m"] = base["txn_count_1m"] / _nullif0(base["txn_count_3m"] / 3.0)
    base["spend_to_income_3m"] = (base["spend_3m"] / 3) / _nullif0(base["inflow_3m"])

    base.insert(0, "customer_id", ids.to_numpy())
    base.insert(1, "as_of", as_of_ts.date())
    return base[["customer_id", "as_of", *FEATURE_NAMES]]


def main(argv: list[str]) -> None:
    staged, as_of, target = argv
    df = build_pandas_features(Path(staged), date.fromisoformat(as_of))
    df.to_parquet(target, index=False)
    print(f"{len(df)} rows -> {target}")


if __name__ == "__main__":
    main(sys.argv[1:])
