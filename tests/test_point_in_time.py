"""Point-in-time correctness of customer features.

The key property: features as of D are identical whether or not data dated after D exists. It is
checked on the synthetic bank (full history vs. every table truncated to D) at a month end and at a
mid-month day, and on a tiny hand-written bank whose feature values are worked out by hand.
"""

import math
from datetime import date, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MID_MONTH_DAY, MID_MONTH_END, make_connection, raw_glob, stage_all

from tagml.core.storage import sql_literal
from tagml.features.contract import CUSTOMERS, TABLES_BY_NAME
from tagml.features.customer_features import build_customer_features, features_for_spine
from tagml.features.dictionary import FEATURE_NAMES, FEATURES, KEY_COLUMNS
from tagml.features.validation import validate_and_stage

# How to keep only what was known on D, table by table.
TRUNCATE = {
    "customers": ("*", "onboarding_date <= {d}"),
    "transactions": ("*", "txn_ts::DATE <= {d}"),
    "digital_events": ("*", "event_ts::DATE <= {d}"),
    "balances": ("*", "month_end <= {d}"),
    "loans": ("* REPLACE (CASE WHEN close_date > {d} THEN NULL ELSE close_date END AS close_date)", "open_date <= {d}"),
    "tag_labels": ("*", "known_date <= {d}"),
}


def read_features(con, path: Path) -> pd.DataFrame:
    return con.execute(f"SELECT * FROM read_parquet({sql_literal(path)}) ORDER BY customer_id, as_of").df()


def truncate_bank(con, raw: Path, out: Path, as_of: date) -> dict[str, int]:
    """Write every raw table with only the rows dated on or before `as_of`; returns rows dropped."""
    d = f"DATE {sql_literal(as_of)}"
    dropped = {}
    for table, (select, where) in TRUNCATE.items():
        (out / table).mkdir(parents=True)
        src = f"read_parquet({sql_literal(raw_glob(raw, table))})"
        con.execute(
            f"COPY (SELECT {select.format(d=d)} FROM {src} WHERE {where.format(d=d)}) TO {sql_literal(out / table / 'part-00000.parquet')} (FORMAT PARQUET)"
        )
        total = con.execute(f"SELECT count(*) FROM {src}").fetchone()[0]
        kept = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(out / table / '*.parquet')})").fetchone()[0]
        dropped[table] = total - kept
    return dropped


@pytest.mark.parametrize("as_of", [MID_MONTH_END, MID_MONTH_DAY], ids=["month_end", "mid_month"])
def test_features_ignore_data_dated_after_as_of(as_of, bank, bank_features, con, tmp_path):
    dropped = truncate_bank(con, bank["raw"], tmp_path / "raw", as_of)
    # the truncation is not vacuous: every table loses its future
    assert all(n > 0 for n in dropped.values()), dropped
    stage_all(con, tmp_path / "raw", tmp_path / "staged")
    rows = build_customer_features(con, tmp_path / "staged", as_of, tmp_path / "features.parquet")

    full = read_features(con, bank_features[as_of])
    truncated = read_features(con, tmp_path / "features.parquet")
    assert rows == len(full) > 1000
    assert list(full.columns) == [*KEY_COLUMNS, *FEATURE_NAMES]
    pd.testing.assert_frame_equal(full, truncated, check_exact=False, rtol=1e-12, atol=0)


def test_features_for_a_mixed_spine_equal_the_snapshots(bank, con, tmp_path):
    """Each customer at its own as_of (as for labels at their label dates) gets exactly the features
    of the snapshot for that date: the scan bounds of a multi-date spine do not leak or lose rows."""
    dates = [date(2026, 2, 28), MID_MONTH_DAY, date(2026, 10, 31)]
    staged = bank["staged"]
    customers = f"read_parquet({sql_literal(staged / 'customers.parquet')})"
    picks = " ".join(f"WHEN {i} THEN DATE {sql_literal(d)}" for i, d in enumerate(dates))
    spine = (
        f"SELECT customer_id, CASE hash(customer_id) % {len(dates)} {picks} END AS as_of FROM {customers} "
        f"WHERE onboarding_date <= CASE hash(customer_id) % {len(dates)} {picks} END"
    )
    mixed = features_for_spine(con, staged, spine).df().sort_values(["customer_id", "as_of"]).reset_index(drop=True)
    parts = []
    for d in dates:
        build_customer_features(con, staged, d, tmp_path / f"{d}.parquet")
        parts.append(read_features(con, tmp_path / f"{d}.parquet"))
    snapshots = pd.concat(parts).merge(mixed[["customer_id", "as_of"]], on=["customer_id", "as_of"])
    snapshots = snapshots.sort_values(["customer_id", "as_of"]).reset_index(drop=True)
    assert len(mixed) == len(snapshots) > 1000
    assert mixed["as_of"].nunique() == len(dates)
    pd.testing.assert_frame_equal(mixed, snapshots, check_exact=False, rtol=1e-12, atol=0)


# ---- a bank small enough to check by hand ---------------------------------------------------

AS_OF = date(2026, 6, 30)


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def d(text: str) -> date:
    return date.fromisoformat(text)


def annuity_payment(principal: float, rate: float, term: int) -> float:
    i = rate / 12
    return principal * i / (1 - (1 + i) ** -term)


MORTGAGE = {"principal": 120_000.0, "rate": 0.06, "term": 120}
MORTGAGE_PAYMENT = round(annuity_payment(MORTGAGE["principal"], MORTGAGE["rate"], MORTGAGE["term"]), 2)


def write_hand_bank(raw: Path) -> None:
    raw.mkdir()
    # customers as CSV, PII included (it must be dropped); C is onboarded after AS_OF
    header = ",".join(c.name for c in CUSTOMERS.columns)
    rows = [
        "A,SECRET A,13800000001,ID-A,1 Road,1990-06-30,F,married,1,bachelor,employee,east,1,2020-01-15,branch",
        "B,SECRET B,13800000002,ID-B,2 Road,1960-01-01,M,,,secondary,retired,north,3,2021-03-01,",
        "C,SECRET C,13800000003,ID-C,3 Road,2000-01-01,F,single,0,postgraduate,student,south,2,2026-07-15,online",
    ]
    (raw / "customers.csv").write_text("\n".join([header, *rows]) + "\n")

    txns = [
        # txn_id, customer, ts, amount, direction, category, channel
        ("t01", "A", "2026-06-30 23:59:59", 100.0, "debit", "groceries", "pos"),  # on as_of: every window
        ("t02", "A", "2026-05-30 12:00:00", 200.0, "debit", "dining", "mobile"),  # as_of - 1 month: 3m, 12m
        ("t03", "A", "2026-05-31 00:00:00", 50.0, "debit", "dining", "mobile"),  # first instant of the 1m window
        ("t04", "A", "2026-07-01 00:00:00", 5000.0, "debit", "travel", "online"),  # after as_of: never
        ("t05", "A", "2026-03-31 09:00:00", 9000.0, "credit", "salary", "online"),  # first day of the 3m window
        ("t06", "A", "2026-03-30 09:00:00", 9000.0, "credit", "salary", "online"),  # just before it: 12m only
        ("t07", "A", "2025-07-01 00:00:00", 300.0, "debit", "childcare", "branch"),  # first day of the 12m window
        ("t08", "A", "2025-06-30 23:00:00", 999.0, "debit", "childcare", "branch"),  # before it: never
        ("t09", "A", "2026-06-10 10:00:00", 1000.0, "debit", "investment_buy", "mobile"),
        ("t10", "A", "2026-05-15 10:00:00", 500.0, "credit", "investment_sell", "mobile"),
        ("t11", "C", "2026-06-20 10:00:00", 10.0, "debit", "groceries", "pos"),  # C is not in the snapshot
    ]
    pq.write_table(
        pa.table(
            {
                "txn_id": [t[0] for t in txns],
                "customer_id": [t[1] for t in txns],
                "txn_ts": pa.array([ts(t[2]) for t in txns], pa.timestamp("s")),
                "amount": [t[3] for t in txns],
                "direction": [t[4] for t in txns],
                "category": [t[5] for t in txns],
                "channel": [t[6] for t in txns],
            }
        ),
        raw / "transactions.parquet",
    )

    balances = [
        ("A", "2026-03-31", "current_deposit", 1000.0),
        ("A", "2026-04-30", "current_deposit", 2000.0),
        ("A", "2026-05-31", "current_deposit", 3000.0),
        ("A", "2026-06-30", "current_deposit", 6000.0),
        ("A", "2026-06-30", "mutual_fund", 3000.0),
        ("A", "2026-06-30", "equity", 1000.0),
        ("A", "2026-06-30", "credit_card", 500.0),
        ("A", "2026-07-31", "current_deposit", 99_999.0),  # after as_of
    ]
    pq.write_table(
        pa.table(
            {
                "customer_id": [b[0] for b in balances],
                "month_end": pa.array([d(b[1]) for b in balances], pa.date32()),
                "product": [b[2] for b in balances],
                "balance": [b[3] for b in balances],
            }
        ),
        raw / "balances.parquet",
    )

    loans = [
        # loan_id, customer, type, open, close, principal, term, rate, payment
        (
            "L1",
            "A",
            "mortgage",
            "2020-06-30",
            "2026-08-01",
            MORTGAGE["principal"],
            MORTGAGE["term"],
            MORTGAGE["rate"],
            MORTGAGE_PAYMENT,
        ),  # closed after as_of: open
        ("L2", "A", "personal", "2025-01-01", "2026-05-01", 5000.0, 12, 0.09, 437.25),  # closed before as_of
        ("L3", "A", "credit_card", "2024-01-01", None, 20_000.0, None, 0.18, 0.0),
        ("L4", "A", "auto", "2026-07-10", None, 80_000.0, 36, 0.055, 2415.0),  # opened after as_of
        ("L5", "A", "personal", "2026-01-31", None, 12_000.0, 12, 0.0, 1000.0),  # interest-free
        ("L6", "A", "personal", "2025-06-30", "2026-06-30", 6000.0, 12, 0.09, 524.7),  # closed on as_of: not open
    ]
    pq.write_table(
        pa.table(
            {
                "loan_id": [x[0] for x in loans],
                "customer_id": [x[1] for x in loans],
                "loan_type": [x[2] for x in loans],
                "open_date": pa.array([d(x[3]) for x in loans], pa.date32()),
                "close_date": pa.array([d(x[4]) if x[4] else None for x in loans], pa.date32()),
                "principal": [x[5] for x in loans],
                "term_months": pa.array([x[6] for x in loans], pa.int64()),
                "interest_rate": [x[7] for x in loans],
                "monthly_payment": [x[8] for x in loans],
            }
        ),
        raw / "loans.parquet",
    )

    events = [
        ("A", "2026-06-30 08:00:00", "login", "app"),
        ("A", "2026-05-30 08:00:00", "login", "app"),  # as_of - 1 month: 3m only
        ("A", "2026-06-01 08:00:00", "view_fund", "web"),
        ("A", "2026-07-02 08:00:00", "login", "app"),  # after as_of
    ]
    pq.write_table(
        pa.table(
            {
                "customer_id": [e[0] for e in events],
                "event_ts": pa.array([ts(e[1]) for e in events], pa.timestamp("s")),
                "event_type": [e[2] for e in events],
                "channel": [e[3] for e in events],
            }
        ),
        raw / "digital_events.parquet",
    )


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hand_bank")


@pytest.fixture(scope="module")
def hand_bank(hand_dir) -> Path:
    """The hand-written bank, staged through the real loader (customers from CSV, the rest Parquet)."""
    raw, staged = hand_dir / "raw", hand_dir / "staged"
    write_hand_bank(raw)
    connection = make_connection(hand_dir)
    try:
        for table in ("customers", "balances", "loans", "transactions", "digital_events"):
            validate_and_stage(connection, TABLES_BY_NAME[table], raw, staged)
    finally:
        connection.close()
    return staged


@pytest.fixture(scope="module")
def hand_features(hand_bank, hand_dir) -> dict[str, dict]:
    target = hand_dir / "features.parquet"
    connection = make_connection(hand_dir)
    try:
        assert build_customer_features(connection, hand_bank, AS_OF, target) == 2
        df = read_features(connection, target)
    finally:
        connection.close()
    return {row["customer_id"]: row for row in df.to_dict("records")}


def mortgage_outstanding(months_paid: int) -> float:
    i = MORTGAGE["rate"] / 12
    remaining = MORTGAGE["term"] - months_paid
    return MORTGAGE_PAYMENT * (1 - (1 + i) ** -remaining) / i


EXPECTED_A = {
    # demographics and tenure
    "age": (AS_OF - date(1990, 6, 30)).days / 365.25,
    "tenure_months": (AS_OF - date(2020, 1, 15)).days / 30.44,
    "gender": "F",
    "city_tier": 1,
    # transaction windows: 1m = (2026-05-31, 2026-06-30], 3m from 2026-03-31, 12m from 2025-07-01
    "txn_count_1m": 3,  # t01, t03, t09
    "txn_count_3m": 6,  # + t02, t05, t10
    "txn_count_12m": 8,  # + t06, t07
    "spend_1m": 150.0,
    "spend_3m": 350.0,
    "spend_12m": 650.0,
    "spend_share_groceries_12m": 100 / 650,
    "spend_share_dining_12m": 250 / 650,
    "spend_share_childcare_12m": 300 / 650,
    "spend_share_travel_12m": 0.0,  # spends, but not on travel: a share of 0, not unknown
    "spend_childcare_3m": 0.0,
    "salary_income_3m": 3000.0,
    "inflow_3m": 9500 / 3,
    "outflow_3m": 1350 / 3,
    "invest_buy_count_3m": 1,
    "invest_sell_count_3m": 1,
    "invest_trade_count_12m": 2,
    "invest_buy_amount_3m": 1000.0,
    "invest_sell_ratio_3m": 500 / 1500,
    "days_since_last_txn": 0,
    "active_months_12m": 4,  # 2025-07, 2026-03, 2026-05, 2026-06
    "digital_txn_share_3m": 5 / 6,
    "branch_txn_share_12m": 1 / 8,
    "has_mortgage_payment_3m": 0,
    # balances at the 2026-06-30 month end; the 3-month average is over Apr, May and Jun
    "aum_total": 10_000.0,
    "aum_avg_3m": (2000 + 3000 + 10_000) / 3,
    "aum_avg_12m": (1000 + 2000 + 3000 + 10_000) / 12,
    "aum_growth_3m": 10_000 / 1000 - 1,
    "share_current_deposit": 0.6,
    "share_mutual_fund": 0.3,
    "share_equity": 0.1,
    "share_time_deposit": 0.0,
    "investment_share": 0.4,
    "risky_share": 0.4,
    "risky_share_change_3m": 0.4,
    "n_products_held": 4,
    "months_with_balance_12m": 4,
    "credit_card_balance": 500.0,
    # loans: L1 (closed after as_of) and L5 (interest-free) are open; L2, L6 closed; L4 not yet opened
    "n_active_loans": 2,
    "has_mortgage": 1,
    "loan_outstanding": mortgage_outstanding(72) + 12_000 * (12 - 5) / 12,
    "monthly_debt_payment": MORTGAGE_PAYMENT + 1000.0,
    "credit_limit": 20_000.0,
    "months_since_last_loan": (AS_OF - date(2026, 1, 31)).days / 30.44,
    # digital
    "logins_1m": 1,
    "logins_3m": 2,
    "fund_equity_views_3m": 1,
    "days_since_last_login": 0,
    # derived
    "debt_to_income": (MORTGAGE_PAYMENT + 1000.0) / 3000.0,
    "card_utilisation": 500 / 20_000,
    "txn_trend_1m_vs_3m": 3 / (6 / 3),
    "spend_to_income_3m": (350 / 3) / (9500 / 3),
}


@pytest.mark.parametrize("feature", list(EXPECTED_A))
def test_hand_bank_feature_values(feature, hand_features):
    actual = hand_features["A"][feature]
    expected = EXPECTED_A[feature]
    if isinstance(expected, str):
        assert actual == expected
    else:
        assert actual is not None and not pd.isna(actual), f"{feature} is null, expected {expected}"
        assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12), feature


def test_hand_bank_snapshot_has_only_onboarded_customers(hand_features):
    assert sorted(hand_features) == ["A", "B"]  # C is onboarded after as_of, although it has a transaction
    assert all(row["as_of"].date() == AS_OF for row in hand_features.values())


def test_customer_without_activity_gets_fill_values(hand_features):
    b = hand_features["B"]
    filled = [f for f in FEATURES if f.fill is not None]
    assert len(filled) >= 20
    for f in filled:
        assert b[f.name] == f.fill, f"{f.name}: {b[f.name]} != fill {f.fill}"
    # without any rows, windows-without-data features are unknown, not zero
    for name in (
        "days_since_last_txn",
        "share_equity",
        "risky_share",
        "spend_share_travel_12m",
        "aum_growth_3m",
        "months_since_last_loan",
        "debt_to_income",
        "days_since_last_login",
    ):
        assert pd.isna(b[name]), name
    assert b["age"] == pytest.approx((AS_OF - date(1960, 1, 1)).days / 365.25)
    assert pd.isna(b["marital_status"]) and pd.isna(b["num_children"])


def test_hand_bank_mid_month_as_of_uses_the_previous_month_end(con, hand_bank, hand_features):
    spine = "SELECT * FROM (VALUES ('A', DATE '2026-06-15'), ('A', DATE '2026-06-30'), ('B', DATE '2026-06-15')) s(customer_id, as_of)"
    rows = features_for_spine(con, hand_bank, spine).df()
    by_key = {(r["customer_id"], r["as_of"].date()): r for r in rows.to_dict("records")}
    assert len(by_key) == 3
    mid = by_key[("A", date(2026, 6, 15))]
    assert mid["aum_total"] == 3000.0  # the 2026-05-31 balances; June's month end is not known yet
    assert mid["aum_avg_3m"] == pytest.approx((1000 + 2000 + 3000) / 3)
    assert pd.isna(mid["aum_growth_3m"])  # no balance at 2026-02-28
    assert mid["n_products_held"] == 1
    assert mid["txn_count_1m"] == 3  # t02, t03, t09: window (2026-05-15, 2026-06-15]
    assert mid["txn_count_3m"] == 6  # + t05, t06, t10 (t01 is in the future)
    assert mid["logins_3m"] == 1
    assert mid["n_active_loans"] == 3  # L1, L5 and L6 (closed only on 2026-06-30)
    # the same (customer, as_of) gets the same features from a spine as from the snapshot
    for name in FEATURE_NAMES:
        a, b = by_key[("A", AS_OF)][name], hand_features["A"][name]
        assert (pd.isna(a) and pd.isna(b)) or a == b or (isinstance(a, float) and math.isclose(a, b, rel_tol=1e-12)), name


def test_pii_never_reaches_features(con, hand_bank, hand_features):
    for row in hand_features.values():
        assert not any(isinstance(v, str) and "SECRET" in v for v in row.values())
    staged = (hand_bank / "customers.parquet").read_bytes()
    assert b"SECRET" not in staged and b"13800000001" not in staged


@pytest.mark.parametrize("layout", ["whole", "by_period"])
def test_hand_bank_incremental_features_equal_the_full_recompute(layout, hand_bank, tmp_path):
    """The snapshot from monthly aggregates plus the windows' edge days is the full recompute's, value for
    value (==), on the hand bank at its month end, mid-month, the month end before and the first of a month."""
    from test_incremental_features import write_period_bank

    from tagml.features.aggregates import incremental_snapshot_plan, update_monthly_aggregates
    from tagml.features.customer_features import features_sql, snapshot_spine_sql

    con = make_connection(tmp_path)
    try:
        staged = hand_bank if layout == "whole" else write_period_bank(con, hand_bank, tmp_path / "staged")
        update = update_monthly_aggregates(con, staged, tmp_path / "aggregates")
        assert update.built["transactions"][-1] == date(2026, 6, 1)  # July has one day staged: not complete
        for as_of in (AS_OF, date(2026, 6, 15), date(2026, 5, 31), date(2026, 7, 1)):
            full = con.sql(features_sql(staged, snapshot_spine_sql(staged, as_of), as_of, as_of)).df()
            plan = incremental_snapshot_plan(con, staged, as_of, tmp_path / "aggregates")
            assert plan.months["transactions"], as_of
            pd.testing.assert_frame_equal(full, con.sql(plan.sql).df(), check_exact=True)
    finally:
        con.close()
