"""The portable subset: the feature query is inside it, and every construct outside it is rejected by name."""

from datetime import date

import pytest

from tagml.features.customer_features import STAGED_TABLES, features_select, snapshot_select
from tagml.features.portable_sql import NonPortableSqlError, check_portable, to_spark_sql

VIEWS = {t: f"v_{t}" for t in STAGED_TABLES}


def test_the_feature_queries_are_portable_and_transpile():
    for sql in (
        snapshot_select(VIEWS, date(2026, 6, 30)),
        features_select(VIEWS, "SELECT customer_id, as_of FROM labels", date(2026, 1, 31), date(2026, 10, 31)),
    ):
        spark_sql = to_spark_sql(sql)
        assert "REPLACE" not in spark_sql and "UBIGINT" not in spark_sql
        assert "DATEDIFF(MONTH" not in spark_sql
        for view in VIEWS.values():
            assert f"FROM {view}" in spark_sql or f"JOIN {view}" in spark_sql


@pytest.mark.parametrize(
    ("sql", "construct"),
    [
        ("SELECT * REPLACE (coalesce(x, 0) AS x) FROM t", "SELECT * REPLACE"),
        ("SELECT * EXCLUDE (x) FROM t", "SELECT * REPLACE/EXCLUDE"),
        ("SELECT 1::UBIGINT << 3 AS mask", "type UBIGINT"),
        ("SELECT CAST(x AS UINTEGER) FROM t", "type UINTEGER"),
        ("SELECT CAST(x AS HUGEINT) FROM t", "type INT128"),
        ("SELECT * FROM t ASOF JOIN u ON t.k = u.k AND t.ts >= u.ts", "ASOF JOIN"),
        ("SELECT MAP {'a': 1} AS m", "MAP"),
        ("SELECT map(['a'], [1]) AS m", "MAP"),
        ("SELECT histogram(x) FROM t", "histogram()"),
        ("SELECT date_diff('month', a, b) FROM t", "date_diff('month')"),
        ("SELECT datediff('year', a, b) FROM t", "date_diff('year')"),
        ("SELECT x / 365.25 FROM t", "division without CAST"),
        ("SELECT sum(x) / 3 FROM t", "division without CAST"),
        ("SELECT (CAST(x AS DOUBLE) / 3) / (y / 2) FROM t", "division without CAST"),
        ("SELECT CAST(x AS DECIMAL(10, 2)) / 3 FROM t", "division without CAST"),
    ],
)
def test_a_construct_outside_the_subset_is_rejected_by_name(sql, construct):
    with pytest.raises(NonPortableSqlError, match="not portable to Spark") as raised:
        check_portable(sql)
    message = str(raised.value)
    assert construct in message
    assert "in `" in message, "the error quotes the offending snippet"
    with pytest.raises(NonPortableSqlError):
        to_spark_sql(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT CAST(x AS DOUBLE) / 3 FROM t",
        "SELECT x / CAST(y AS DOUBLE) FROM t",
        "SELECT CAST(x AS DOUBLE) / 3 / nullif(y, 0) FROM t",
        "SELECT date_diff('day', a, b) FROM t",
        "SELECT (year(b) * 12 + month(b)) - (year(a) * 12 + month(a)) FROM t",
        "SELECT bit_count(bit_or(CAST(1 AS BIGINT) << (month(ts) % 60))) FROM t",
        "SELECT customer_id, x FROM t LEFT JOIN u USING (customer_id)",
    ],
)
def test_the_portable_spellings_pass(sql):
    check_portable(sql)


def test_every_problem_is_named_once_and_invalid_sql_is_its_own_error():
    with pytest.raises(NonPortableSqlError) as raised:
        check_portable("SELECT * REPLACE (x / 2 AS x), 1::UBIGINT FROM t")
    message = str(raised.value)
    assert "REPLACE" in message and "UBIGINT" in message and "division" in message
    with pytest.raises(NonPortableSqlError, match="not valid DuckDB SQL"):
        check_portable("SELECT FROM WHERE (")
