"""Staging on Spark equals staging on DuckDB: the same files (schema and rows) for a good delivery, the
same named violations for a bad one, and the current generation untouched when it fails."""

import shutil
from datetime import date
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from tagml.core.storage import sql_literal, staged_path
from tagml.features.contract import RAW_TABLES
from tagml.features.delivery import current_generation, generations_dir, stage_delivery
from tagml.features.raw import ContractError, Violation
from tagml.features.spark_staging import stage_delivery_spark
from tagml.features.validation import MAX_EXAMPLES

pytestmark = [pytest.mark.spark, pytest.mark.slow]  # each test stages the 3000-customer bank on both engines

DELIVERY = date(2026, 11, 5)  # after the session bank's last month (2026-10)


def _source(raw: Path, table: str) -> str:
    return f"read_parquet({sql_literal(str(raw / table / '*.parquet'))})"


def _files(path: Path) -> list[Path]:
    # DuckDB stages an event table by period (a directory of files), Spark whole (one file)
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


def _types(path: Path) -> list[tuple[str, str]]:
    # names and types; DuckDB also carries a raw file's NOT NULL over, which no reader relies on
    return [(f.name, str(f.type)) for f in pq.read_schema(_files(path)[0])]


def _frame(path: Path) -> pd.DataFrame:
    frame = pd.concat([pq.read_table(f).to_pandas() for f in _files(path)], ignore_index=True)
    return frame.sort_values(list(frame.columns)).reset_index(drop=True)


def test_a_good_delivery_stages_the_same_files_on_both_engines(spark, con, bank, tmp_path):
    duck = stage_delivery(con, bank["raw"], tmp_path / "duck" / "raw", DELIVERY)
    on_spark = stage_delivery_spark(spark, bank["raw"], tmp_path / "spark" / "raw", DELIVERY)
    assert set(on_spark.tables) == {s.name for s in RAW_TABLES}
    for spec in RAW_TABLES:
        ours, theirs = on_spark.tables[spec.name], duck.tables[spec.name]
        assert (ours.rows, ours.dropped_pii, ours.ignored_columns) == (theirs.rows, theirs.dropped_pii, theirs.ignored_columns), spec.name
        assert _types(ours.path) == _types(theirs.path), spec.name
        pd.testing.assert_frame_equal(_frame(ours.path), _frame(theirs.path), check_exact=True, obj=spec.name)
    generation = current_generation(tmp_path / "spark" / "raw")
    assert sorted(p.name for p in generation.iterdir()) == sorted(f"{s.name}.parquet" for s in RAW_TABLES)
    assert [p.name for p in generations_dir(tmp_path / "spark" / "raw").iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def _replace(con, raw: Path, table: str, select: str) -> None:
    """Replace one raw table (a directory of parts) by the rows of `select` over it (`{src}`), as one Parquet file."""
    con.execute(f"COPY ({select.format(src=_source(raw, table))}) TO {sql_literal(raw / (table + '.parquet'))} (FORMAT PARQUET)")
    shutil.rmtree(raw / table)


BAD_DELIVERIES = {
    "unknown_customer_in_transactions": (
        "transactions",
        "SELECT * REPLACE (CASE WHEN txn_id = (SELECT min(txn_id) FROM {src}) THEN 'C999999999' ELSE customer_id END AS customer_id) FROM {src}",
        ("transactions", "customer_id", "known_customer"),
    ),
    "unrated_product_in_holdings": (
        "holdings",
        "SELECT * REPLACE (CASE WHEN row_number() OVER (ORDER BY customer_id, month_end, product_id) = 1 THEN 'XX-UNRATED' ELSE product_id END AS product_id) FROM {src}",
        ("holdings", "product_id", "known_product"),
    ),
    "values_of_the_wrong_type": (
        "customers",
        "SELECT * REPLACE (CASE WHEN customer_id = (SELECT min(customer_id) FROM {src}) THEN '1.5' ELSE num_children::VARCHAR END AS num_children) FROM {src}",
        ("customers", "num_children", "type"),
    ),
    "a_missing_column": ("transactions", "SELECT * EXCLUDE (amount) FROM {src}", ("transactions", "amount", "missing_column")),
    "a_duplicate_key": (
        "transactions",
        "SELECT * FROM {src} UNION ALL (SELECT * FROM {src} ORDER BY txn_id LIMIT 1)",
        ("transactions", "txn_id", "unique_key"),
    ),
    "nan_and_a_month_end_that_is_not_one": (
        "balances",
        (
            "SELECT * REPLACE (CASE WHEN row_number() OVER (ORDER BY customer_id, month_end, product) = 1 THEN 'NaN'::DOUBLE ELSE balance END AS balance, "
            "CASE WHEN row_number() OVER (ORDER BY customer_id, month_end, product) = 2 THEN DATE '2026-06-15' ELSE month_end END AS month_end) FROM {src}"
        ),
        ("balances", "balance", "finite"),
    ),
    "a_transaction_after_the_delivery": (
        "transactions",
        "SELECT * REPLACE (CASE WHEN txn_id = (SELECT min(txn_id) FROM {src}) THEN TIMESTAMP '2026-11-06 10:00:00' ELSE txn_ts END AS txn_ts) FROM {src}",
        ("transactions", "txn_ts", "not_after_delivery"),
    ),
}


def _comparable(v: Violation) -> tuple:
    # the source's type name is the engine's own (DuckDB `VARCHAR`, Spark `STRING`); the rest is the same text
    detail = v.detail.split(" cannot be read as ")[-1]
    examples = str(v.examples) if v.n_rows <= MAX_EXAMPLES else len(v.examples)  # which examples of many is the engine's choice (str: NaN == NaN)
    return (v.table, v.column, v.rule, v.n_rows, detail, examples)


@pytest.mark.parametrize("case", list(BAD_DELIVERIES))
def test_a_bad_delivery_fails_the_same_way_and_leaves_the_current_generation(case, spark, con, bank, tmp_path):
    table, select, expected = BAD_DELIVERIES[case]
    raw = tmp_path / "raw"
    shutil.copytree(bank["raw"], raw)
    _replace(con, raw, table, select)
    staged = tmp_path / "warehouse" / "raw"
    stage_delivery(con, bank["raw"], staged, DELIVERY)
    generation = current_generation(staged)
    before = {str(p.relative_to(generation)): p.read_bytes() for p in generation.rglob("*.parquet")}

    with pytest.raises(ContractError) as on_duckdb:
        stage_delivery(con, raw, tmp_path / "duck" / "raw", DELIVERY)
    with pytest.raises(ContractError) as on_spark:
        stage_delivery_spark(spark, raw, staged, DELIVERY)

    assert expected in {(v.table, v.column, v.rule) for v in on_spark.value.violations}
    assert sorted(map(_comparable, on_spark.value.violations), key=str) == sorted(map(_comparable, on_duckdb.value.violations), key=str)
    assert current_generation(staged) == generation
    assert {str(p.relative_to(generation)): p.read_bytes() for p in generation.rglob("*.parquet")} == before
    assert [p.name for p in generations_dir(staged).iterdir() if p.name.startswith(".") and p.name != ".lock"] == []


def test_a_column_of_a_type_that_cannot_be_cast_is_a_type_violation(spark, con, bank, tmp_path):
    """DuckDB binds TRY_CAST(struct AS DATE) and finds every value invalid; Spark refuses the cast itself:
    the same table, column and rule, counted per row on DuckDB and per column on Spark."""
    raw = tmp_path / "raw"
    shutil.copytree(bank["raw"], raw)
    _replace(con, raw, "balances", "SELECT * REPLACE ({{'d': month_end}} AS month_end) FROM {src}")
    with pytest.raises(ContractError) as on_duckdb:
        stage_delivery(con, raw, tmp_path / "duck" / "raw", DELIVERY)
    with pytest.raises(ContractError) as on_spark:
        stage_delivery_spark(spark, raw, tmp_path / "spark" / "raw", DELIVERY)
    [duck] = on_duckdb.value.violations
    [ours] = on_spark.value.violations
    assert (ours.table, ours.column, ours.rule) == (duck.table, duck.column, duck.rule) == ("balances", "month_end", "type")
    assert ours.detail == "source type STRUCT<D:DATE> cannot be read as date"


def test_a_csv_table_and_an_absent_optional_one_stage_the_same_and_a_ragged_csv_is_named(spark, con, bank, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(bank["raw"], raw)
    con.execute(f"COPY (SELECT * FROM {_source(raw, 'loans')}) TO {sql_literal(raw / 'loans.csv')} (FORMAT CSV, HEADER)")
    shutil.rmtree(raw / "loans")
    shutil.rmtree(raw / "digital_events")
    duck = stage_delivery(con, raw, tmp_path / "duck" / "raw", DELIVERY)
    on_spark = stage_delivery_spark(spark, raw, tmp_path / "spark" / "raw", DELIVERY)
    for table in ("loans", "digital_events"):
        assert _types(on_spark.tables[table].path) == _types(duck.tables[table].path), table
        pd.testing.assert_frame_equal(_frame(on_spark.tables[table].path), _frame(duck.tables[table].path), check_exact=True, obj=table)
    assert (on_spark.tables["digital_events"].rows, on_spark.tables["digital_events"].source) == (0, "absent (optional table)")

    lines = (raw / "loans.csv").read_text().splitlines()
    lines[5] += ",EXTRA"
    (raw / "loans.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ContractError) as info:
        stage_delivery_spark(spark, raw, tmp_path / "spark" / "raw", DELIVERY)
    assert [(v.table, v.rule) for v in info.value.violations] == [("loans", "field_count")]
    assert "loans.csv" in str(info.value) and "EXTRA" not in str(info.value)
    assert staged_path(tmp_path / "spark" / "raw", "loans").read_bytes() == on_spark.tables["loans"].path.read_bytes()
