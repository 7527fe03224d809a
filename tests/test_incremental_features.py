"""Incremental features (monthly aggregates plus the windows' edge days) equal the full recompute exactly.

Compared with ==: same columns, types, values and nulls. On the session's generated bank staged by period
(one file per day, balances per month end: written here with DuckDB, as H1's staging lays them out) and
staged whole, at month ends, mid-month, short months, the first of a month, a leap day (the bank shifted
two years back), with truncated history, and after a late restatement of one day.
"""

import os
import shutil
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import make_connection

from tagml.core.storage import sql_literal, staged_path, staged_period_dir
from tagml.features.aggregates import aggregate_path, incremental_snapshot_plan, read_manifest, update_monthly_aggregates, window_plan
from tagml.features.customer_features import features_sql, snapshot_spine_sql
from tagml.features.snapshot import build_feature_snapshot, build_feature_snapshots

# table -> (time column, period of a row); customers and loans stay whole
PERIODS = {"transactions": "txn_ts::DATE", "digital_events": "event_ts::DATE", "balances": "month_end"}
SHIFTS = {  # columns moved back by `shift` days for the leap-year bank (balances: to the month end `months` before)
    "customers": ("onboarding_date", "birth_date"),
    "loans": ("open_date", "close_date"),
    "transactions": ("txn_ts",),
    "digital_events": ("event_ts",),
}


def write_period_bank(con, whole: Path, out: Path, shift_days: int = 0) -> Path:
    """The staged tables of `whole` (one file per table) laid out by period under `out`, optionally moved
    `shift_days` back in time (balances by the same number of whole months, to stay on month ends)."""
    out.mkdir(parents=True)
    for table in ("customers", "loans", "transactions", "digital_events", "balances"):
        src = f"read_parquet({sql_literal(staged_path(whole, table))})"
        cols = [r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()]
        exprs = []
        for c in cols:
            if shift_days and c in SHIFTS.get(table, ()):
                exprs.append(f"CAST({c} - INTERVAL {shift_days} DAY AS {con.execute(f'SELECT typeof({c}) FROM {src} LIMIT 1').fetchone()[0]}) AS {c}")
            elif shift_days and table == "balances" and c == "month_end":
                exprs.append(f"last_day(month_end - INTERVAL {round(shift_days / 365.25 * 12)} MONTH) AS month_end")
            else:
                exprs.append(c)
        select = f"SELECT {', '.join(exprs)} FROM {src}"
        if table not in PERIODS:
            con.execute(f"COPY ({select}) TO {sql_literal(staged_path(out, table))} (FORMAT PARQUET)")
            continue
        tmp = out / f".{table}.parts"
        con.execute(
            f"COPY (SELECT *, strftime({PERIODS[table]}, '%Y-%m-%d') AS period FROM ({select})) TO {sql_literal(tmp)} (FORMAT PARQUET, PARTITION_BY (period))"
        )
        target = staged_period_dir(out, table)
        target.mkdir()
        for part in sorted(tmp.iterdir()):
            files = list(part.glob("*.parquet"))
            assert len(files) == 1, files
            files[0].rename(target / f"{part.name.removeprefix('period=')}.parquet")
        shutil.rmtree(tmp)
    return out


def full_and_incremental(con, staged: Path, aggregates: Path, as_of: date, tmp: Path):
    full = build_feature_snapshot(con, staged, as_of, tmp / f"full-{as_of}.parquet")
    inc = build_feature_snapshot(con, staged, as_of, tmp / f"inc-{as_of}.parquet", aggregates_dir=aggregates)
    return full, inc


def assert_identical(a: Path, b: Path) -> None:
    ta, tb = pq.read_table(a), pq.read_table(b)
    assert ta.schema == tb.schema
    assert ta.num_rows == tb.num_rows > 0
    pd.testing.assert_frame_equal(ta.to_pandas(), tb.to_pandas(), check_exact=True)


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("incremental")


@pytest.fixture(scope="module")
def mcon(module_dir):
    connection = make_connection(module_dir)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def period_bank(bank, module_dir, mcon) -> Path:
    return write_period_bank(mcon, bank["staged"], module_dir / "staged")


@pytest.fixture(scope="module")
def period_aggregates(period_bank, module_dir, mcon) -> Path:
    aggregates = module_dir / "aggregates"
    update = update_monthly_aggregates(mcon, period_bank, aggregates)
    # the generated bank's 12 months (2025-11 .. 2026-10) are all complete in the staged data
    assert len(update.built["transactions"]) == 12
    assert len(update.built["digital"]) == 12 and not update.incomplete["transactions"]
    return aggregates


AS_OFS = {
    "month_end": date(2026, 6, 30),
    "mid_month": date(2026, 6, 15),
    "short_month_end": date(2026, 2, 28),
    "march_29": date(2026, 3, 29),  # the 1-month window starts on Mar 1 (Feb 28 + 1 day): March's head only
    "march_31": date(2026, 3, 31),
    "first_of_month": date(2026, 7, 1),
    "truncated_history": date(2026, 2, 14),  # < 12 months staged before it
    "last_day": date(2026, 10, 31),
}


SLOW_AS_OFS = {"march_29", "march_31", "last_day"}  # the inner loop keeps one of each kind


@pytest.mark.parametrize("as_of", [pytest.param(d, id=k, marks=[pytest.mark.slow] if k in SLOW_AS_OFS else []) for k, d in AS_OFS.items()])
def test_incremental_equals_full_by_period(as_of, period_bank, period_aggregates, mcon, tmp_path):
    full, inc = full_and_incremental(mcon, period_bank, period_aggregates, as_of, tmp_path)
    assert (full.method, inc.method) == ("full", "incremental")
    assert_identical(full.path, inc.path)
    # the aggregates were used: every month the 12-month window covers whole came from them
    plan = window_plan(as_of, set(read_manifest_months(period_aggregates, "transactions")))
    assert inc.months_from_aggregates["transactions"] == list(plan.months) != []
    assert all(f.passed for f in inc.checks if f.blocking)


def read_manifest_months(aggregates: Path, source: str) -> list[date]:
    return [date.fromisoformat(k + "-01") for k in read_manifest(aggregates)["sources"][source]["months"]]


def test_incremental_equals_full_staged_whole(bank, module_dir, mcon, tmp_path):
    """Staged whole (one file per table, as before H1): months are filtered by date in SQL."""
    aggregates = tmp_path / "aggregates"
    for as_of in (date(2026, 5, 17), date(2026, 9, 30)):
        full, inc = full_and_incremental(mcon, bank["staged"], aggregates, as_of, tmp_path)
        assert_identical(full.path, inc.path)
        # history starts 2025-11: every whole month from then to the month before as_of
        assert len(inc.months_from_aggregates["digital"]) == (as_of.year - 2025) * 12 + as_of.month - 11 + (as_of.day == 30)


@pytest.mark.slow
def test_leap_day_and_windows_through_february(bank, module_dir, mcon, tmp_path):
    """The bank moved 730 days back (2026-02-28 becomes 2024-02-29): a leap-day as_of, and the 1-month window
    of Mar 29-31 2024 starting on Mar 1 (Feb 29 + 1 day)."""
    staged = write_period_bank(mcon, bank["staged"], tmp_path / "leap", shift_days=730)
    assert (staged_period_dir(staged, "transactions") / "2024-02-29.parquet").is_file()
    aggregates = tmp_path / "aggregates"
    update_monthly_aggregates(mcon, staged, aggregates)
    for as_of in (date(2024, 2, 29), date(2024, 3, 30), date(2024, 2, 28)):
        # compared as queries: the shifted bank is only for the calendar (its balances are moved by months)
        full = mcon.sql(features_sql(staged, snapshot_spine_sql(staged, as_of), as_of, as_of)).df()
        inc = mcon.sql(incremental_snapshot_plan(mcon, staged, as_of, aggregates).sql).df()
        assert len(full) > 1000
        pd.testing.assert_frame_equal(full, inc, check_exact=True)


RESTATED_DAY = date(2026, 3, 10)


@pytest.mark.slow
def test_restated_day_rebuilds_its_month_and_changes_exactly_the_as_of_it_reaches(period_bank, mcon, tmp_path):
    staged = tmp_path / "staged"
    shutil.copytree(period_bank, staged)
    aggregates = tmp_path / "aggregates"
    update_monthly_aggregates(mcon, staged, aggregates)
    before_files = {p: p.stat().st_mtime_ns for p in (aggregates / "transactions").glob("*.parquet")}
    before = [date(2026, 2, 28), date(2026, 3, 9)]
    after = [RESTATED_DAY, date(2026, 3, 31), date(2026, 6, 15), date(2026, 10, 31)]
    old = {d: tmp_path / f"old-{d}.parquet" for d in before + after}
    update, _ = build_feature_snapshots(mcon, staged, list(old), list(old.values()), aggregates)
    assert not any(update.built.values())  # already up to date
    merged_before = {p.relative_to(aggregates): p.stat().st_mtime_ns for p in (aggregates / "merged").rglob("*.parquet")}

    # the restatement: that day's spending doubled (a corrected file replacing the staged day)
    day_file = staged_period_dir(staged, "transactions") / f"{RESTATED_DAY}.parquet"
    tmp = day_file.with_name(".restated.parquet")
    mcon.execute(
        f"COPY (SELECT * REPLACE (CASE WHEN direction = 'debit' THEN amount * 2 ELSE amount END AS amount) FROM read_parquet({sql_literal(day_file)})) "
        f"TO {sql_literal(tmp)} (FORMAT PARQUET)"
    )
    os.replace(tmp, day_file)

    # a snapshot before the aggregates are updated reads March day by day, and is still exact
    stale = build_feature_snapshot(mcon, staged, date(2026, 6, 15), tmp_path / "stale.parquet", aggregates_dir=aggregates, update_aggregates=False)
    assert date(2026, 3, 1) not in stale.months_from_aggregates["transactions"]
    full = build_feature_snapshot(mcon, staged, date(2026, 6, 15), tmp_path / "full.parquet")
    assert_identical(full.path, stale.path)

    new = {d: tmp_path / f"new-{d}.parquet" for d in old}
    update, _ = build_feature_snapshots(mcon, staged, list(new), list(new.values()), aggregates)
    assert update.built == {"transactions": [date(2026, 3, 1)], "digital": []}
    rebuilt = [p for p, t in before_files.items() if p.stat().st_mtime_ns != t]
    assert rebuilt == [aggregate_path(aggregates, "transactions", date(2026, 3, 1))]
    # a merged group of transactions months covering March has a new identity (the old file removed); every other
    # group, and digital's covering March, is the same file (the stale snapshot above added a group without March)
    merged_after = {p.relative_to(aggregates): p.stat().st_mtime_ns for p in (aggregates / "merged").rglob("*.parquet")}
    replaced = {p for p in merged_before if p.parts[1] == "transactions" and p.name[:7] <= "2026-03" <= p.name[8:15]}
    assert len(replaced) == 2 and not replaced & merged_after.keys()
    assert {p.name[:18] for p in replaced} <= {p.name[:18] for p in merged_after}
    assert {p: t for p, t in merged_before.items() if p not in replaced} == {p: t for p, t in merged_after.items() if p in merged_before}
    for d in before:
        assert_identical(old[d], new[d])
    for d in after:
        assert not pq.read_table(old[d]).equals(pq.read_table(new[d])), d
        full = build_feature_snapshot(mcon, staged, d, tmp_path / f"full-{d}.parquet")
        assert_identical(full.path, new[d])


def _stored_pieces(aggregates: Path) -> dict[Path, int]:
    """The stored merged month groups and balances features, with their mtimes."""
    return {p: p.stat().st_mtime_ns for sub in ("merged", "balances") for p in (aggregates / sub).rglob("*.parquet")}


def test_stored_pieces_are_reused_within_the_month_and_follow_their_inputs_only(period_bank, mcon, tmp_path):
    """A month's merged groups and month-end balances features are computed on its first night and reused by the
    next, though the customers file is restaged (a customer onboarded); a restated balances month end replaces
    exactly the balances features that read it. Every snapshot equals the full recompute."""
    staged = tmp_path / "staged"
    shutil.copytree(period_bank, staged)
    aggregates = tmp_path / "aggregates"
    update_monthly_aggregates(mcon, staged, aggregates)
    full, inc = full_and_incremental(mcon, staged, aggregates, date(2026, 6, 15), tmp_path)
    assert_identical(full.path, inc.path)
    stored = _stored_pieces(aggregates)
    # Nov..Mar (12-month window only) and Apr..May (3 and 12) per source; the balances of 2026-05-31
    assert sorted(p.name.split("_")[0] + "_" + p.name.split("_")[1] for p in stored if "merged" in p.parts) == [
        "2025-11_2026-03",
        "2025-11_2026-03",
        "2026-04_2026-05",
        "2026-04_2026-05",
    ]
    assert [p.name for p in stored if "balances" in p.parts] == ["2026-05-31.parquet"]

    customers = staged_path(staged, "customers")
    tmp = customers.with_name(".customers.parquet")
    mcon.execute(
        f"COPY (SELECT * FROM read_parquet({sql_literal(customers)}) UNION ALL "
        f"SELECT * REPLACE ('C999999999' AS customer_id, DATE '2026-06-16' AS onboarding_date) FROM (SELECT * FROM read_parquet({sql_literal(customers)}) LIMIT 1)) "
        f"TO {sql_literal(tmp)} (FORMAT PARQUET)"
    )
    os.replace(tmp, customers)
    full, inc = full_and_incremental(mcon, staged, aggregates, date(2026, 6, 16), tmp_path)
    assert_identical(full.path, inc.path)
    assert "C999999999" in pq.read_table(inc.path, columns=["customer_id"]).column("customer_id").to_pylist()
    assert _stored_pieces(aggregates) == stored  # nothing recomputed, nothing added

    month_end = staged_period_dir(staged, "balances") / "2026-05-31.parquet"
    tmp = month_end.with_name(".restated.parquet")
    mcon.execute(f"COPY (SELECT * REPLACE (balance * 2 AS balance) FROM read_parquet({sql_literal(month_end)})) TO {sql_literal(tmp)} (FORMAT PARQUET)")
    os.replace(tmp, month_end)
    full, inc = full_and_incremental(mcon, staged, aggregates, date(2026, 6, 17), tmp_path)
    assert_identical(full.path, inc.path)
    now = _stored_pieces(aggregates)
    assert now.keys() == stored.keys()
    assert [p.name for p in stored if now[p] != stored[p]] == ["2026-05-31.parquet"]


def test_dagster_materializes_monthly_aggregates_then_incremental_features(bank, tmp_path):
    """Real materializations: monthly_aggregates, then a customer_features partition computed from them,
    equal to the full recompute; the metadata holds months and counts, no customer id."""
    import dagster as dg

    from tagml.core.settings import Settings
    from tagml.orchestration.feature_assets import build_customer_features_asset, monthly_aggregates
    from tagml.orchestration.partitions import as_of_partitions
    from tagml.orchestration.resources import WarehouseResource

    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    settings.ensure_dirs()
    warehouse = WarehouseResource.from_settings(settings)
    shutil.copytree(bank["staged"], warehouse.staged_dir)
    resources = {"warehouse": warehouse}

    aggregated = dg.materialize([monthly_aggregates], resources=resources, instance=dg.DagsterInstance.ephemeral())
    assert aggregated.success
    [event] = aggregated.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert len(metadata["built_transactions"].value) == 12 and metadata["months_kept"].value == 0
    again = dg.materialize([monthly_aggregates], resources=resources, instance=dg.DagsterInstance.ephemeral())
    [event] = again.get_asset_materialization_events()
    assert event.materialization.metadata["built_transactions"].value == [] and event.materialization.metadata["months_kept"].value == 24

    as_of = date(2026, 8, 20)
    features = build_customer_features_asset(as_of_partitions(settings))
    result = dg.materialize([features], resources=resources, partition_key=as_of.isoformat(), instance=dg.DagsterInstance.ephemeral())
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = event.materialization.metadata
    assert metadata["method"].value == "incremental" and metadata["months_from_aggregates"].value == {"transactions": 9, "digital": 9}
    customers = pq.read_table(staged_path(warehouse.staged_dir, "customers")).column("customer_id").to_pylist()
    shown = " ".join(str(v.value) for e in (*aggregated.get_asset_materialization_events(), event) for v in e.materialization.metadata.values())
    assert not [c for c in customers if c in shown]
    con = make_connection(tmp_path)
    try:
        full = build_feature_snapshot(con, warehouse.staged_dir, as_of, tmp_path / "full.parquet")
    finally:
        con.close()
    assert_identical(full.path, Path(warehouse.features_path(as_of)))
