"""Hostile strings in configuration and data: they reach DuckDB as values, never as SQL text.

Quotes, backslashes, SQL fragments and non-ASCII text in every free-text column of the raw contract
go through staging, features and drift (PSI per slice) unchanged; a memory limit carrying stacked
SQL is refused before any connection runs it; paths with quotes reach SQL safely.
"""

import duckdb
import pytest

from features.warehouse import (
    WarehouseConfigError,
    connect,
    sql_literal,
    write_parquet_atomically,
)

STACKED = "1GB'; COPY (SELECT 42 AS x) TO '{target}' (FORMAT CSV); SET memory_limit = '2GB"


@pytest.mark.parametrize("value", [STACKED, "4 GB; SELECT 1", "lots", "", "4GB'", "-1GB", "1e9"])
def test_memory_limit_of_the_wrong_form_is_refused_before_any_sql(tmp_path, value):
    target = tmp_path / "written_by_memory_limit.csv"
    with pytest.raises(WarehouseConfigError, match="TAGML_DUCKDB_MEMORY_LIMIT"):
        connect(1, value.format(target=target))
    assert not target.exists()


@pytest.mark.parametrize("value, expected", [("512MiB", "512.0 MiB"), ("1.5 GiB", "1.5 GiB"), ("2000MB", "1.8 GiB")])
def test_memory_limit_in_duckdb_units_is_set(value, expected):
    with connect(1, value) as con:
        assert con.execute("SELECT current_setting('memory_limit'), current_setting('threads')").fetchall() == [(expected, 1)]


def test_threads_must_be_a_positive_integer():
    with pytest.raises(WarehouseConfigError, match="TAGML_THREADS"):
        connect(0, "1GB")
    with pytest.raises(WarehouseConfigError, match="TAGML_THREADS"):
        connect("2; DROP TABLE x", "1GB")


def test_paths_with_quotes_backslashes_and_non_ascii_reach_sql_as_literals(tmp_path):
    odd = tmp_path / "Xi'an \\ 西安 \"q\"" / "data.parquet"
    with connect(1, "512MB") as con:
        rows = write_parquet_atomically(con, "SELECT 'Xi''an' AS region", odd)
        assert rows == 1
        assert con.execute(f"SELECT region FROM read_parquet({sql_literal(odd)})").fetchall() == [("Xi'an",)]
    with pytest.raises(ValueError, match="NUL"):
        sql_literal("a\x00b")
    with duckdb.connect() as con:  # the literal is the value itself, whatever it holds
        for text in ("Xi'an", "a\\b", "'||read_text('/etc/passwd')||'", "Ω≈ç√ 西安"):
            assert con.execute(f"SELECT {sql_literal(text)}").fetchall() == [(text,)]
