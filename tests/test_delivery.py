"""A delivery is staged all or nothing: every table validated (against the delivered customers) before
any staged table changes; implausible dates and numbers are named; ragged CSV rows are named by line."""

import shutil
from datetime import date
from pathlib import Path

import pytest
from conftest import raw_glob

from tagml.core.storage import sql_literal, staged_files
from tagml.features.contract import CUSTOMERS, RAW_TABLES, TRANSACTIONS
from tagml.features.delivery import current_generation, generations_dir, stage_delivery
from tagml.features.raw import ContractError
from tagml.features.validation import validate_and_stage

DELIVERY = date(2026, 11, 5)  # after the session bank's last month (2026-10)


def good(raw: Path, table: str) -> str:
    return f"read_parquet({sql_literal(raw_glob(raw, table))})"


def tables_bytes(staged: Path) -> dict[str, bytes]:
    """Every staged file's bytes (an event table is a directory of period files)."""
    return {f"{spec.name}/{f.name}": f.read_bytes() for spec in RAW_TABLES for f in staged_files(staged, spec.name)}


def copy_raw(bank, tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(bank["raw"], raw)
    return raw


def replace_table(con, raw: Path, table: str, sql: str) -> None:
    """Replace a raw table (a directory of parts) by the rows of `sql`, as one Parquet file."""
    out = raw / f"{table}.parquet"
    con.execute(f"COPY ({sql}) TO {sql_literal(out)} (FORMAT PARQUET)")
    shutil.rmtree(raw / table)


@pytest.fixture
def delivered(con, bank, tmp_path) -> Path:
    """A warehouse's staged dir after one good delivery of the session bank."""
    staged = tmp_path / "warehouse" / "raw"
    result = stage_delivery(con, bank["raw"], staged, DELIVERY)
    assert set(result.tables) == {s.name for s in RAW_TABLES}
    assert staged.is_symlink() and current_generation(staged) == result.generation.resolve()
    return staged


def test_failing_customers_leaves_every_staged_table_byte_identical(con, bank, delivered, tmp_path):
    """The issue's case: the new customers fail a rule while balances, transactions and labels are
    valid. With per-table staging the others were already replaced and referenced customers that were
    no longer staged; a delivery must change nothing."""
    before = tables_bytes(delivered)
    generation = current_generation(delivered)
    raw = copy_raw(bank, tmp_path)
    # drop 40 customers (their balances and transactions stay) and break one more row
    replace_table(
        con,
        raw,
        "customers",
        f"SELECT * REPLACE (CASE WHEN customer_id = (SELECT max(customer_id) FROM {good(bank['raw'], 'customers')}) "
        f"THEN 'atlantis' ELSE region END AS region) FROM {good(bank['raw'], 'customers')} ORDER BY customer_id OFFSET 40",
    )
    with pytest.raises(ContractError) as info:
        stage_delivery(con, raw, delivered, DELIVERY)
    found = {(v.table, v.column, v.rule) for v in info.value.violations}
    assert ("customers", "region", "allowed_values") in found
    assert tables_bytes(delivered) == before
    assert current_generation(delivered) == generation
    assert [p.name for p in generations_dir(delivered).iterdir() if p.name.startswith(".building")] == []


def test_known_customer_rule_runs_against_the_delivered_customers(con, bank, delivered, tmp_path):
    """Customers dropped from the delivery orphan their rows in the other tables: named per table,
    and nothing is staged. (Checked against the *old* staged customers, this passed.)"""
    before = tables_bytes(delivered)
    raw = copy_raw(bank, tmp_path)
    replace_table(con, raw, "customers", f"SELECT * FROM {good(bank['raw'], 'customers')} ORDER BY customer_id OFFSET 40")
    with pytest.raises(ContractError) as info:
        stage_delivery(con, raw, delivered, DELIVERY)
    orphaned = {v.table for v in info.value.violations if v.rule == "known_customer"}
    assert {"balances", "transactions"} <= orphaned
    assert all(v.n_rows > 0 for v in info.value.violations if v.rule == "known_customer")
    assert tables_bytes(delivered) == before


def test_new_customers_and_their_rows_arrive_in_one_delivery(con, bank, tmp_path):
    """Customers first staged in this delivery are known to its transactions (the old staged
    customers did not have them)."""
    staged = tmp_path / "warehouse" / "raw"
    # a first delivery with half the customers and only their rows
    half = tmp_path / "half"
    half.mkdir()
    first = f"(SELECT customer_id FROM {good(bank['raw'], 'customers')} ORDER BY customer_id LIMIT 1500)"
    for spec in RAW_TABLES:
        src = good(bank["raw"], spec.name)
        keep = f"WHERE customer_id IN {first}" if spec.references_customers or spec.name == "customers" else ""
        con.execute(f"COPY (SELECT * FROM {src} {keep}) TO {sql_literal(half / (spec.name + '.parquet'))} (FORMAT PARQUET)")
    stage_delivery(con, half, staged, DELIVERY)
    full = stage_delivery(con, bank["raw"], staged, DELIVERY)
    assert full.tables["customers"].rows == bank["config"].customers
    assert full.tables["transactions"].rows == bank["staged_tables"]["transactions"].rows
    # the previous generation is kept for readers that resolved it; older ones are pruned
    assert len([p for p in generations_dir(staged).iterdir() if not p.name.startswith(".")]) == 2


def test_a_plain_staged_directory_is_adopted_and_kept_on_failure(con, bank, staged_copy, tmp_path):
    """Tables staged before deliveries existed (a plain directory) survive a failed delivery
    byte-identical and are replaced by a good one."""
    before = tables_bytes(staged_copy)
    raw = copy_raw(bank, tmp_path)
    replace_table(
        con,
        raw,
        "transactions",
        f"SELECT * REPLACE (TIMESTAMP '2099-01-01 10:00:00' AS txn_ts) FROM {good(bank['raw'], 'transactions')} ORDER BY txn_id LIMIT 10",
    )
    with pytest.raises(ContractError):
        stage_delivery(con, raw, staged_copy, DELIVERY)
    assert tables_bytes(staged_copy) == before
    good_delivery = stage_delivery(con, bank["raw"], staged_copy, DELIVERY)
    assert staged_copy.is_symlink()
    assert good_delivery.tables["customers"].rows == bank["config"].customers


# ---- plausibility ---------------------------------------------------------------------------


def _one_bad(con, bank, raw_dir: Path, table: str, order: str, replace: str) -> None:
    src = good(bank["raw"], table)
    con.execute(
        f"COPY ((SELECT * FROM {src} ORDER BY {order} LIMIT 200 OFFSET 1) UNION ALL BY NAME "
        f"(SELECT * REPLACE ({replace}) FROM {src} ORDER BY {order} LIMIT 1)) TO {sql_literal(raw_dir / (table + '.parquet'))} (FORMAT PARQUET)"
    )


PLAUSIBILITY = [
    ("transactions", "txn_id", "TIMESTAMP '2099-03-01 10:00:00' AS txn_ts", "txn_ts", "not_after_delivery"),
    ("tag_labels", "customer_id, tag, label_date", "DATE '2099-01-01' AS known_date", "known_date", "not_after_delivery"),
    ("customers", "customer_id", "DATE '2090-05-01' AS birth_date", "birth_date", "not_after_delivery"),
    ("customers", "customer_id", "DATE '2090-05-01' AS birth_date", "onboarding_date", "born_before_onboarding"),
    ("balances", "customer_id, month_end, product", "'NaN'::DOUBLE AS balance", "balance", "finite"),
    ("balances", "customer_id, month_end, product", "'inf'::DOUBLE AS balance", "balance", "finite"),
    ("loans", "loan_id", "'-inf'::DOUBLE AS monthly_payment", "monthly_payment", "finite"),
]


@pytest.mark.parametrize("table, order, replace, column, rule", PLAUSIBILITY, ids=[f"{p[0]}-{p[3]}-{p[4]}-{p[2][:5]}" for p in PLAUSIBILITY])
def test_implausible_values_are_named_violations(table, order, replace, column, rule, con, bank, staged_copy, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    _one_bad(con, bank, raw_dir, table, order, replace)
    before = {p.name: p.read_bytes() for p in staged_copy.iterdir()}
    spec = next(s for s in RAW_TABLES if s.name == table)
    with pytest.raises(ContractError) as info:
        validate_and_stage(con, spec, raw_dir, staged_copy, delivery_date=DELIVERY)
    matching = [v for v in info.value.violations if (v.table, v.column, v.rule) == (table, column, rule)]
    assert matching and matching[0].n_rows == 1 and matching[0].examples, info.value.violations
    assert f"{table}.{column}" in str(info.value)
    assert {p.name: p.read_bytes() for p in staged_copy.iterdir()} == before


def test_nan_text_in_a_csv_is_not_a_number(con, bank, staged_copy, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    src = good(bank["raw"], "transactions")
    con.execute(
        f"COPY ((SELECT * REPLACE (amount::VARCHAR AS amount) FROM {src} ORDER BY txn_id LIMIT 100 OFFSET 1) UNION ALL BY NAME "
        f"(SELECT * REPLACE ('NaN' AS amount) FROM {src} ORDER BY txn_id LIMIT 1)) TO {sql_literal(raw_dir / 'transactions.csv')} (FORMAT CSV, HEADER)"
    )
    with pytest.raises(ContractError) as info:
        validate_and_stage(con, TRANSACTIONS, raw_dir, staged_copy, delivery_date=DELIVERY)
    assert ("transactions", "amount", "finite") in {(v.table, v.column, v.rule) for v in info.value.violations}


def test_delivery_date_bounds_dates_and_defaults_to_today(con, bank, staged_copy, tmp_path):
    """The session bank's last transactions (October 2026) are after a delivery of 2026-10-15, and
    fine on a delivery of today."""
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    src = good(bank["raw"], "transactions")
    con.execute(f"COPY (SELECT * FROM {src} ORDER BY txn_ts DESC LIMIT 500) TO {sql_literal(raw_dir / 'transactions.parquet')} (FORMAT PARQUET)")
    with pytest.raises(ContractError) as info:
        validate_and_stage(con, TRANSACTIONS, raw_dir, staged_copy, delivery_date=date(2026, 10, 15))
    [late] = [v for v in info.value.violations if v.rule == "not_after_delivery"]
    assert late.column == "txn_ts" and late.n_rows > 0 and "2026-10-15" in late.detail
    assert validate_and_stage(con, TRANSACTIONS, raw_dir, staged_copy).rows == 500


# ---- ragged CSV -----------------------------------------------------------------------------


def test_ragged_csv_names_the_file_and_lines_not_missing_columns(con, staged_copy, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    header = ",".join(c.name for c in CUSTOMERS.columns)
    row = "C{i:09d},Name {i},13800000000,ID{i},1 Road,1980-01-01,F,single,0,bachelor,employee,east,1,2020-01-01,branch"
    lines = [header] + [row.format(i=i) for i in range(40)]
    lines[7] += ",EXTRA"  # file line 8
    lines[21] = lines[21].rsplit(",", 3)[0]  # file line 22: three fields short
    (raw_dir / "customers.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ContractError) as info:
        validate_and_stage(con, CUSTOMERS, raw_dir, staged_copy, delivery_date=DELIVERY)
    rules = {v.rule for v in info.value.violations}
    assert rules == {"field_count"}, info.value.violations
    message = str(info.value)
    assert "customers.csv" in message and "lines 8" in message and "lines 22" in message
    assert "missing_column" not in message and "Name 7" not in message and "Name 20" not in message


def test_states_a_crash_can_leave_are_recovered(con, bank, delivered, tmp_path):
    """A writer killed mid-delivery leaves a `.building-*` directory (never read) or, while adopting
    a plain directory, no link at all: the next delivery starts from the newest complete generation
    and a failing one still changes nothing."""
    before = tables_bytes(delivered)
    generation = current_generation(delivered)
    leftover = generations_dir(delivered) / ".building-00000000000000000001-deadbeef"
    leftover.mkdir()
    (leftover / "customers.parquet").write_bytes(b"half written")
    delivered.unlink()  # the link is gone
    raw = copy_raw(bank, tmp_path)
    replace_table(con, raw, "loans", f"SELECT * REPLACE ('NaN'::DOUBLE AS principal) FROM {good(bank['raw'], 'loans')} LIMIT 5")
    with pytest.raises(ContractError, match="finite"):
        stage_delivery(con, raw, delivered, DELIVERY)
    assert current_generation(delivered) == generation
    assert tables_bytes(delivered) == before
