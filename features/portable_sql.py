"""DuckDB SQL as the one source of truth, run on Spark through sqlglot.

The feature and validation queries are written once, in DuckDB's dialect, inside a portable subset
(`check_portable`), and transpiled to Spark SQL (`to_spark_sql`). sqlglot transpiles constructs
outside the subset without an error: Spark then rejects them (`* REPLACE`, unsigned types, ASOF
joins, maps, histogram) or, worse, answers differently (a division becomes DECIMAL, a month
difference counts whole months instead of boundaries). A clean transpile still proves nothing: the
Spark equality tests (tests/test_spark_*.py) hold the two engines to the same answers.
"""

import sqlglot
from sqlglot import exp

T = exp.DataType.Type
# integer types Spark has no equivalent of
_NO_SPARK_TYPE = {T.UBIGINT, T.UINT, T.UMEDIUMINT, T.USMALLINT, T.UTINYINT, T.UINT128, T.UINT256, T.UDECIMAL, T.UDOUBLE, T.INT128, T.INT256}
# date_diff units whose count differs: DuckDB counts boundaries crossed, Spark whole units elapsed
_BOUNDARY_UNITS = {"MONTH", "QUARTER", "YEAR"}


class NonPortableSqlError(ValueError):
    """A query uses a construct outside the portable subset (it would fail or silently differ on Spark)."""


def _is_double(node: exp.Expression) -> bool:
    """Whether `node` is DOUBLE in both engines by construction: a CAST to DOUBLE, or a portable division."""
    node = node.unnest()
    if isinstance(node, exp.Cast):
        return node.to.this == T.DOUBLE
    return isinstance(node, exp.Div) and _portable_division(node)


def _portable_division(node: exp.Div) -> bool:
    return _is_double(node.this) or _is_double(node.expression)


def _construct(node: exp.Expression) -> str | None:
    """The name of the non-portable construct `node` is, or None."""
    if isinstance(node, exp.Star) and any(node.args.get(k) for k in ("replace", "except_", "rename")):
        return "SELECT * REPLACE/EXCLUDE/RENAME (list the columns)"
    if isinstance(node, exp.DataType) and node.this in _NO_SPARK_TYPE:
        return f"type {node.sql('duckdb')} (Spark has none: use BIGINT)"
    if isinstance(node, exp.Join) and str(node.args.get("method") or "").upper() == "ASOF":
        return "ASOF JOIN (Spark has none: join on a range and keep the latest row)"
    if isinstance(node, exp.ToMap | exp.Map | exp.VarMap | exp.MapFromEntries | exp.StarMap):
        return "MAP (does not transpile to Spark)"
    if isinstance(node, exp.Anonymous) and node.name.lower() == "histogram":
        return "histogram() (does not transpile to Spark)"
    if isinstance(node, exp.DateDiff) and node.unit is not None and node.unit.name.upper() in _BOUNDARY_UNITS:
        return f"date_diff('{node.unit.name.lower()}') (DuckDB counts boundaries, Spark whole units: use year * 12 + month arithmetic)"
    if isinstance(node, exp.Div) and not _portable_division(node):
        return "division without CAST(... AS DOUBLE) (Spark makes / 3.0 or / 365.25 DECIMAL)"
    return None


def _problems(tree: exp.Expression) -> list[str]:
    found = []
    for node in tree.walk():
        construct = _construct(node)
        if construct:
            snippet = " ".join(node.sql("duckdb").split())
            found.append(f"{construct} in `{snippet[:80]}{'...' if len(snippet) > 80 else ''}`")
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
