"""The raw data contract: every violation is named (table, column, rule, example keys), leaks no PII,
and leaves what is already staged untouched; good input in any accepted shape stages correctly.

Each case writes one corrupted table into the test's raw directory (derived from the session's
synthetic bank) and validates it against a private copy of the bank's staged tables.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import raw_glob

from tagml.core.storage import sql_literal
from tagml.features.contract import (
    CUSTOMERS,
    DIGITAL_EVENTS,
    LOANS,
    RAW_TABLES,
    TABLES_BY_NAME,
    TRANSACTIONS,
)
from tagml.features.raw import ContractError
from tagml.features.validation import validate_and_stage

# Every PII value planted in a bad row contains this marker; it must never reach an error message.
SECRET = "SECRET"
BAD_CUSTOMER = "CBAD00001"
PII_VALUES = {
    "full_name": "SECRET NAME",
    "phone": "SECRET PHONE 13899990000",
    "national_id": "SECRET ID 110101199001011234",
    "address": "SECRET ADDRESS 1 Renmin Road",
}


# ---- building corrupted sources ---------------------------------------------------------------


def good(raw: Path, table: str) -> str:
    return f"read_parquet({sql_literal(raw_glob(raw, table))})"


def to_parquet(con, sql: str, path: Path) -> None:
    con.execute(f"COPY ({sql}) TO {sql_literal(path)} (FORMAT PARQUET)")


def to_csv(con, sql: str, path: Path) -> None:
    con.execute(f"COPY ({sql}) TO {sql_literal(path)} (FORMAT CSV, HEADER)")


def customers_with_bad_row(raw: Path, replace: str = "", base_replace: str = "", copies: int = 1) -> str:
    """300 good customers plus `copies` of a row for BAD_CUSTOMER carrying PII and `replace`d values."""
    pii = ", ".join(f"{sql_literal(v)} AS {k}" for k, v in PII_VALUES.items())
    bad_replace = f"{pii}, {sql_literal(BAD_CUSTOMER)} AS customer_id" + (f", {replace}" if replace else "")
    base = f"SELECT * {'REPLACE (' + base_replace + ')' if base_replace else ''} FROM {good(raw, 'customers')} ORDER BY customer_id LIMIT 300"
    bad = f"SELECT * REPLACE ({bad_replace}) FROM {good(raw, 'customers')} ORDER BY customer_id LIMIT 1"
    if base_replace:
        bad = f"SELECT * REPLACE ({base_replace}) FROM ({bad})"
        bad = f"SELECT * REPLACE ({bad_replace}) FROM ({bad})"
    return " UNION ALL BY NAME ".join([f"({base})"] + [f"({bad})"] * copies)


def table_with_bad_row(raw: Path, table: str, replace: str, order: str) -> str:
    """Rows 2..301 of a good table plus its first row with `replace`d values."""
    src = good(raw, table)
    return f"(SELECT * FROM {src} ORDER BY {order} LIMIT 300 OFFSET 1) UNION ALL BY NAME (SELECT * REPLACE ({replace}) FROM {src} ORDER BY {order} LIMIT 1)"


def first_row(con, raw: Path, table: str, order: str) -> dict:
    df = con.execute(f"SELECT * FROM {good(raw, table)} ORDER BY {order} LIMIT 1").df()
    return df.iloc[0].to_dict()


@dataclass(frozen=True)
class Case:
    id: str
    table: str
    column: str | None
    rule: str
    # writes the corrupted source into raw_dir; returns key/value pairs one example must contain
    build: Callable[..., dict | None]


def _missing_table(con, raw, out):
    return None


def _missing_column(table: str, column: str):
    def build(con, raw, out):
        to_parquet(con, f"SELECT * EXCLUDE ({column}) FROM {good(raw, table)} LIMIT 300", out / f"{table}.parquet")

    return build


def _csv_bad_birth_date(con, raw, out):
    sql = customers_with_bad_row(raw, "'not-a-date' AS birth_date", base_replace="birth_date::VARCHAR AS birth_date")
    to_csv(con, sql, out / "customers.csv")
    return {"customer_id": BAD_CUSTOMER}


def _csv_fractional_children(con, raw, out):
    """1.5 children must be rejected, not rounded to 2."""
    sql = customers_with_bad_row(raw, "'1.5' AS num_children", base_replace="num_children::VARCHAR AS num_children")
    to_csv(con, sql, out / "customers.csv")
    return {"customer_id": BAD_CUSTOMER, "num_children": "1.5"}


def _whole_column(table: str, replace: str, order: str):
    """The column has an impossible type for every row (struct, list, date for a double...)."""

    def build(con, raw, out):
        to_parquet(con, f"SELECT * REPLACE ({replace}) FROM {good(raw, table)} ORDER BY {order} LIMIT 300", out / f"{table}.parquet")
        return {}  # every row offends; examples must still carry the key (checked for all cases)

    return build


def _bad_customer(replace: str, expect: dict | None = None, copies: int = 1):
    def build(con, raw, out):
        to_parquet(con, customers_with_bad_row(raw, replace, copies=copies), out / "customers.parquet")
        return {"customer_id": BAD_CUSTOMER, **(expect or {})}

    return build


def _bad_txn(replace: str, expect: dict | None = None):
    def build(con, raw, out):
        to_parquet(con, table_with_bad_row(raw, "transactions", f"'TBAD00001' AS txn_id, {replace}", "txn_id"), out / "transactions.parquet")
        return {"txn_id": "TBAD00001", **(expect or {})}

    return build


def _bad_txn_timestamp(con, raw, out):
    src = good(raw, "transactions")
    sql = (
        f"(SELECT * REPLACE (strftime(txn_ts, '%Y-%m-%d %H:%M:%S') AS txn_ts) FROM {src} ORDER BY txn_id LIMIT 300 OFFSET 1) "
        f"UNION ALL BY NAME (SELECT * REPLACE ('TBAD00001' AS txn_id, 'yesterday' AS txn_ts) FROM {src} ORDER BY txn_id LIMIT 1)"
    )
    to_csv(con, sql, out / "transactions.csv")
    return {"txn_id": "TBAD00001"}


def _bad_first_row(table: str, replace: str, order: str, key: tuple[str, ...], expect: dict | None = None):
    def build(con, raw, out):
        to_parquet(con, table_with_bad_row(raw, table, replace, order), out / f"{table}.parquet")
        row = first_row(con, raw, table, order)
        return {**{k: row[k] for k in key}, **(expect or {})}

    return build


def _duplicate_txn(con, raw, out):
    src = good(raw, "transactions")
    to_parquet(con, f"(SELECT * FROM {src} ORDER BY txn_id LIMIT 300) UNION ALL (SELECT * FROM {src} ORDER BY txn_id LIMIT 1)", out / "transactions.parquet")
    return {"txn_id": first_row(con, raw, "transactions", "txn_id")["txn_id"], "copies": 2}


def _empty(table: str):
    def build(con, raw, out):
        to_parquet(con, f"SELECT * FROM {good(raw, table)} LIMIT 0", out / f"{table}.parquet")

    return build


def _truncated_parquet(table: str):
    def build(con, raw, out):
        to_parquet(con, customers_with_bad_row(raw) if table == "customers" else f"SELECT * FROM {good(raw, table)} LIMIT 300", out / "whole.parquet")
        data = (out / "whole.parquet").read_bytes()
        (out / "whole.parquet").unlink()
        (out / f"{table}.parquet").write_bytes(data[: len(data) // 2])

    return build


def _garbage_parquet(table: str):
    def build(con, raw, out):
        (out / f"{table}.parquet").write_bytes(b"SECRET NAME is not a parquet file\x00\x01" * 200)

    return build


CASES = [
    Case("missing_required_table_customers", "customers", None, "table_present", _missing_table),
    Case("missing_required_table_transactions", "transactions", None, "table_present", _missing_table),
    Case("missing_column_birth_date", "customers", "birth_date", "missing_column", _missing_column("customers", "birth_date")),
    Case("missing_column_amount", "transactions", "amount", "missing_column", _missing_column("transactions", "amount")),
    Case("type_csv_birth_date_not_a_date", "customers", "birth_date", "type", _csv_bad_birth_date),
    Case("type_csv_txn_ts_not_a_timestamp", "transactions", "txn_ts", "type", _bad_txn_timestamp),
    Case("type_fractional_int_in_csv", "customers", "num_children", "type", _csv_fractional_children),
    Case(
        "type_date_given_as_struct",
        "balances",
        "month_end",
        "type",
        _whole_column("balances", "{'d': month_end} AS month_end", "customer_id, month_end, product"),
    ),
    Case("type_date_given_as_list", "loans", "open_date", "type", _whole_column("loans", "[open_date] AS open_date", "loan_id")),
    Case(
        "type_double_given_as_date", "balances", "balance", "type", _whole_column("balances", "DATE '2026-01-31' AS balance", "customer_id, month_end, product")
    ),
    Case("not_null_region", "customers", "region", "not_null", _bad_customer("NULL::VARCHAR AS region")),
    Case("not_null_amount", "transactions", "amount", "not_null", _bad_txn("NULL::DOUBLE AS amount")),
    Case("allowed_values_region", "customers", "region", "allowed_values", _bad_customer("'atlantis' AS region", {"region": "atlantis"})),
    Case("allowed_values_category", "transactions", "category", "allowed_values", _bad_txn("'gambling' AS category", {"category": "gambling"})),
    Case(
        "min_negative_balance",
        "balances",
        "balance",
        "min",
        _bad_first_row("balances", "-5.0 AS balance", "customer_id, month_end, product", ("customer_id", "product"), {"balance": -5.0}),
    ),
    Case("max_city_tier", "customers", "city_tier", "max", _bad_customer("9 AS city_tier", {"city_tier": 9})),
    Case("duplicate_key_customers", "customers", "customer_id", "unique_key", _bad_customer("", {"copies": 2}, copies=2)),
    Case("duplicate_key_transactions", "transactions", "txn_id", "unique_key", _duplicate_txn),
    Case(
        "orphan_customer_in_transactions",
        "transactions",
        "customer_id",
        "known_customer",
        _bad_txn("'C999999999' AS customer_id", {"customer_id": "C999999999"}),
    ),
    Case(
        "rule_loan_closed_before_open",
        "loans",
        "close_date",
        "closed_after_open",
        _bad_first_row("loans", "open_date - 1 AS close_date", "loan_id", ("loan_id",)),
    ),
    Case(
        "rule_known_before_label_date",
        "tag_labels",
        "known_date",
        "known_after_label_date",
        _bad_first_row("tag_labels", "label_date - 1 AS known_date", "customer_id, tag, label_date", ("customer_id", "tag")),
    ),
    Case(
        "rule_month_end_not_month_end",
        "balances",
        "month_end",
        "is_month_end",
        _bad_first_row("balances", "DATE '2026-06-15' AS month_end", "customer_id, month_end, product", ("customer_id",), {"month_end": "2026-06-15"}),
    ),
    Case(
        "rule_onboarded_before_birth",
        "customers",
        "onboarding_date",
        "born_before_onboarding",
        _bad_customer("DATE '1990-01-01' AS birth_date, DATE '1985-01-01' AS onboarding_date"),
    ),
    Case("empty_table", "transactions", None, "non_empty", _empty("transactions")),
    Case("corrupt_truncated_parquet", "customers", None, "readable", _truncated_parquet("customers")),
    Case("corrupt_garbage_parquet", "loans", None, "readable", _garbage_parquet("loans")),
]


def snapshot(staged: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(staged.iterdir())}


def assert_nothing_written(staged: Path, before: dict[str, bytes]) -> None:
    after = snapshot(staged)
    assert sorted(after) == sorted(before), f"staged dir changed: {sorted(set(after) ^ set(before))}"
    for name, data in before.items():
        assert after[name] == data, f"{name} was rewritten"
    assert not [p for p in staged.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def assert_no_pii(text: str) -> None:
    assert SECRET not in text
    for value in PII_VALUES.values():
        assert value not in text


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_violation_is_named_and_writes_nothing(case: Case, con, bank, staged_copy, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    expect_example = case.build(con, bank["raw"], raw_dir)
    spec = TABLES_BY_NAME[case.table]
    before = snapshot(staged_copy)
    assert f"{case.table}.parquet" in before  # a previous good staged file exists for the table

    with pytest.raises(ContractError) as info:
        validate_and_stage(con, spec, raw_dir, staged_copy)

    err = info.value
    matching = [v for v in err.violations if (v.table, v.column, v.rule) == (case.table, case.column, case.rule)]
    found = [(v.table, v.column, v.rule) for v in err.violations]
    assert matching, f"expected ({case.table}, {case.column}, {case.rule}) among {found}"
    violation = matching[0]

    message = str(err)
    where = f"{case.table}.{case.column}" if case.column else f"[{case.table}]"
    assert where in message
    assert case.rule in message
    assert_no_pii(message)
    assert_no_pii(repr(err.violations))

    if expect_example is not None:
        assert violation.examples, f"no example rows for {violation}"
        assert any(all(ex.get(k) == v for k, v in expect_example.items()) for ex in violation.examples), (
            f"no example containing {expect_example}: {violation.examples}"
        )
        for ex in violation.examples:  # examples identify the row by its key
            assert set(spec.key) <= set(ex), f"example {ex} lacks the key {spec.key}"
        if violation.rule != "unique_key":
            assert violation.n_rows >= 1
    for v in err.violations:
        for ex in v.examples:
            assert not set(ex) & set(CUSTOMERS.pii_columns)

    assert_nothing_written(staged_copy, before)


@pytest.mark.parametrize(
    "n_before, n_after",
    [(100, 0), (50, 50), (30_000, 50)],
    ids=["last_line", "near_the_top", "beyond_the_sniffer_sample"],
)
def test_malformed_csv_row_is_a_contract_error_without_pii(n_before, n_after, con, bank, staged_copy, tmp_path):
    """A CSV row with too many fields is rejected with a ContractError; the offending line (which may
    hold names or phone numbers) is never echoed -- not as a message, not as 'column names' -- and
    nothing is staged."""
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    header = ",".join(c.name for c in CUSTOMERS.columns)
    lines = [header]
    row = "C{i:09d},Name {i},13800000000,ID{i},1 Road,1980-01-01,F,single,0,bachelor,employee,east,1,2020-01-01,branch"
    lines += [row.format(i=i) for i in range(n_before)]
    lines.append(
        f"{BAD_CUSTOMER},{PII_VALUES['full_name']},{PII_VALUES['phone']},x,y,1980-01-01,F,single,0,bachelor,employee,east,1,2020-01-01,branch,EXTRA,FIELDS"
    )
    lines += [row.format(i=n_before + 1 + i) for i in range(n_after)]
    (raw_dir / "customers.csv").write_text("\n".join(lines) + "\n")
    before = snapshot(staged_copy)

    with pytest.raises(ContractError) as info:
        validate_and_stage(con, CUSTOMERS, raw_dir, staged_copy)

    assert all(v.table == "customers" for v in info.value.violations)
    assert_no_pii(str(info.value))
    assert_no_pii(repr(info.value.violations))
    assert_nothing_written(staged_copy, before)


def test_good_table_overwrites_previous_stage_atomically(con, bank, staged_copy, tmp_path):
    """The counterpart of 'writes nothing': valid input replaces the staged file and leaves no temp files."""
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    to_parquet(con, f"SELECT * FROM {good(bank['raw'], 'loans')} ORDER BY loan_id LIMIT 100", raw_dir / "loans.parquet")
    result = validate_and_stage(con, LOANS, raw_dir, staged_copy)
    assert result.rows == 100
    assert con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(staged_copy / 'loans.parquet')})").fetchone()[0] == 100
    assert not [p for p in staged_copy.iterdir() if p.name.startswith(".")]


# ---- accepted shapes of good input ------------------------------------------------------------


def staged_frame(con, path: Path, order: str) -> pd.DataFrame:
    return con.execute(f"SELECT * FROM read_parquet({sql_literal(path)}) ORDER BY {order}").df()


def staged_types(con, path: Path) -> dict[str, str]:
    return {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({sql_literal(path)})").fetchall()}


@pytest.mark.parametrize("table", ["customers", "loans", "transactions"])
def test_csv_input_stages_with_contract_types(table, con, bank, tmp_path):
    """A table given as CSV stages to the same typed data as the same rows given as Parquet."""
    spec = TABLES_BY_NAME[table]
    order = ", ".join(spec.key)
    subset = f"SELECT * FROM {good(bank['raw'], table)} ORDER BY {order} LIMIT 2000"
    csv_raw, pq_raw = tmp_path / "csv_raw", tmp_path / "pq_raw"
    csv_raw.mkdir(), pq_raw.mkdir()
    to_csv(con, subset, csv_raw / f"{table}.csv")
    to_parquet(con, subset, pq_raw / f"{table}.parquet")
    staged_csv, staged_pq = tmp_path / "staged_csv", tmp_path / "staged_pq"
    for staged, raw in ((staged_csv, csv_raw), (staged_pq, pq_raw)):
        staged.mkdir()
        if spec.references_customers:  # the loader checks customer_id against staged customers
            (staged / "customers.parquet").write_bytes((bank["staged"] / "customers.parquet").read_bytes())
        result = validate_and_stage(con, spec, raw, staged)
        assert result.rows == 2000
    assert result.source.endswith(".parquet")

    path_csv = staged_csv / f"{table}.parquet"
    expected_types = {c.name: c.sql_type for c in spec.staged_columns}
    assert staged_types(con, path_csv) == expected_types
    pd.testing.assert_frame_equal(staged_frame(con, path_csv, order), staged_frame(con, staged_pq / f"{table}.parquet", order))


def test_pii_columns_are_dropped_from_staged_customers(con, bank):
    result = bank["staged_tables"]["customers"]
    assert set(result.dropped_pii) == set(CUSTOMERS.pii_columns) == {"full_name", "phone", "national_id", "address"}
    types = staged_types(con, result.path)
    assert list(types) == [c.name for c in CUSTOMERS.staged_columns]
    assert not set(types) & set(CUSTOMERS.pii_columns)
    # and no PII value survives anywhere in the staged file
    names = con.execute(f"SELECT DISTINCT full_name FROM {good(bank['raw'], 'customers')} LIMIT 20").fetchall()
    blob = result.path.read_bytes()
    assert not any(n.encode() in blob for (n,) in names)


def test_unknown_extra_columns_are_ignored_and_reported(con, bank, staged_copy, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    to_parquet(
        con,
        f"SELECT *, 'gold' AS crm_segment, 42 AS legacy_score FROM {good(bank['raw'], 'transactions')} ORDER BY txn_id LIMIT 500",
        raw_dir / "transactions.parquet",
    )
    result = validate_and_stage(con, TRANSACTIONS, raw_dir, staged_copy)
    assert result.ignored_columns == ("crm_segment", "legacy_score")
    assert result.rows == 500
    assert list(staged_types(con, result.path)) == [c.name for c in TRANSACTIONS.staged_columns]


def test_optional_columns_may_be_absent(con, bank, tmp_path):
    """PII columns are optional: customers without them stage fine (and nothing is reported dropped)."""
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    pii = ", ".join(CUSTOMERS.pii_columns)
    to_parquet(con, f"SELECT * EXCLUDE ({pii}) FROM {good(bank['raw'], 'customers')}", raw_dir / "customers.parquet")
    result = validate_and_stage(con, CUSTOMERS, raw_dir, tmp_path / "staged")
    assert result.dropped_pii == ()
    assert result.rows == bank["config"].customers


def test_optional_digital_events_absent_stages_empty_table(con, bank, staged_copy, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    result = validate_and_stage(con, DIGITAL_EVENTS, raw_dir, staged_copy)
    assert result.rows == 0
    assert "absent" in result.source
    assert staged_types(con, result.path) == {c.name: c.sql_type for c in DIGITAL_EVENTS.staged_columns}
    assert con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(result.path)})").fetchone()[0] == 0


def test_directory_of_parts_and_single_file_are_both_accepted(con, bank, tmp_path):
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    to_parquet(con, f"SELECT * FROM {good(bank['raw'], 'customers')}", raw_dir / "customers.parquet")
    single = validate_and_stage(con, CUSTOMERS, raw_dir, tmp_path / "staged_single")
    parts = bank["staged_tables"]["customers"]
    assert single.rows == parts.rows == bank["config"].customers
    order = "customer_id"
    pd.testing.assert_frame_equal(staged_frame(con, single.path, order), staged_frame(con, parts.path, order))


def test_contract_declarations_are_consistent():
    for spec in RAW_TABLES:
        names = [c.name for c in spec.columns]
        assert len(names) == len(set(names)), spec.name
        assert set(spec.key) <= set(names), spec.name
        assert spec.event_time is None or spec.event_time in names
        for rule in spec.rules:
            assert rule.column in names
        for c in spec.columns:
            assert not (c.pii and c.required), f"{spec.name}.{c.name}: PII must be optional"
            assert not (c.pii and c.name in spec.key)
            assert re.fullmatch(r"[a-z_]+", c.name)
        if spec.references_customers:
            assert "customer_id" in names
