"""DuckDB SQL as the one source of truth, run on Spark through sqlglot.

The feature and validation queries are written once, in DuckDB's dialect, inside a portable subset
(`check_portable`), and transpiled to Spark SQL (`to_spark_sql`). A clean transpile proves nothing:
the Spark equality tests (tests/test_spark_*.py) hold the two engines to the same answers.
"""

import sqlglot
from sqlglot import exp


class NonPortableSqlError(ValueError):
    """A query uses a construct outside the portable subset (it would fail or silently differ on Spark)."""


def _problems(tree: exp.Expression) -> list[str]:
    found: list[str] = []
    for node in tree.walk():
        if isinstance(node, exp.Star) and node.args.get("replace"):
            found.append("SELECT * REPLACE (list the columns)")
        elif isinstance(node, exp.DataType) and node.this in {
            exp.DataType.Type.UBIGINT,
            exp.DataType.Type.UINT,
            exp.DataType.Type.USMALLINT,
            exp.DataType.Type.UTINYINT,
        }:
            found.append(f"unsigned type {node.sql('duckdb')} (Spark has none)")
    return found


def check_portable(sql: str) -> exp.Expression:
    """Parse DuckDB `sql` and return its tree; raise `NonPortableSqlError` naming each construct outside the subset."""
    try:
        tree = sqlglot.parse_one(sql, read="duckdb")
    except sqlglot.errors.ParseError as exc:
        raise NonPortableSqlError(f"not valid DuckDB SQL: {str(exc).splitlines()[0]}") from exc
    problems = _problems(tree)
    if problems:
        raise NonPortableSqlError("not portable to Spark: " + "; ".join(dict.fromkeys(problems)))
    return tree


def to_spark_sql(sql: str) -> str:
    """The Spark SQL of a portable DuckDB query (`check_portable` first)."""
    return check_portable(sql).sql(dialect="spark")
