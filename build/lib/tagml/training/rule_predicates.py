"""Rule predicates: a rule band's `when:` SQL, parsed and checked against an allow-list.

A band's predicate is written by a catalog author and run over every customer, so it is parsed once at
catalog load, checked construct by construct and bound against the feature columns, and the SQL that
runs is generated from the parse tree, never from the text.
"""

import difflib
import threading
from collections.abc import Collection

import duckdb
import sqlglot
from sqlglot import exp

from tagml.features.dictionary import FEATURE_NAMES, FEATURES


class RuleSyntaxError(ValueError):
    """A rule band is not an allowed predicate over the feature columns; the message names the construct."""


# ---- rule predicates -----------------------------------------------------------------------------
# A band's `when:` is SQL written by a catalog author and run over every customer. It is parsed and
# checked against an allow-list here, once at catalog load, and the SQL that runs is generated from
# the parsed tree (never the raw text): column references, literals, comparisons, arithmetic,
# boolean logic, IN (literal list), BETWEEN, IS NULL, CASE, casts to numbers or text and a few scalar
# functions. No subqueries, table functions, file access, parameters or unknown functions.
_RULE_NODES: tuple[type[exp.Expression], ...] = (
    exp.Column,
    exp.Identifier,
    exp.Literal,
    exp.Boolean,
    exp.Null,
    exp.Paren,
    exp.And,
    exp.Or,
    exp.Not,
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
    exp.Is,
    exp.In,
    exp.Between,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.Mod,
    exp.Neg,
    exp.Cast,
    exp.TryCast,
    exp.DataType,
    exp.DataTypeParam,
    exp.Case,
    exp.If,
)
RULE_FUNCTIONS: dict[type[exp.Expression], str] = {
    exp.Abs: "abs",
    exp.Coalesce: "coalesce",
    exp.Nullif: "nullif",
    exp.Least: "least",
    exp.Greatest: "greatest",
    exp.Round: "round",
    exp.Floor: "floor",
    exp.Ceil: "ceil",
    exp.Ln: "ln",
    exp.Sqrt: "sqrt",
    exp.Length: "length",
    exp.Lower: "lower",
    exp.Upper: "upper",
}
_CAST_TYPES = exp.DataType.NUMERIC_TYPES | exp.DataType.TEXT_TYPES | {exp.DataType.Type.BOOLEAN}
# the column types the binder check gives each feature (the snapshot stores numbers as DOUBLE or BIGINT)
_FEATURE_TYPES = {f.name: "VARCHAR" if f.kind == "categorical" else "DOUBLE" for f in FEATURES}


def _construct(node: exp.Expression) -> str:
    """A short, readable name for a rejected piece of a predicate."""
    if isinstance(node, (exp.Subquery, exp.Select, exp.Query)):
        return "a subquery"
    if isinstance(node, exp.Table):
        return f"a table reference ({node.sql(dialect='duckdb')[:60]})"
    if isinstance(node, exp.Placeholder):
        return "a parameter placeholder"
    if isinstance(node, exp.Anonymous):
        return f"the function {node.name.lower()}()"
    if isinstance(node, exp.Func):
        return f"the function {node.sql_name().lower()}()"
    return f"{type(node).__name__} ({node.sql(dialect='duckdb')[:60]})"


def parse_rule_predicate(text: str, columns: Collection[str] = FEATURE_NAMES) -> exp.Expression:
    """Parse one band's predicate and check it against the allow-list and the known `columns`.

    Raises RuleSyntaxError naming the offending construct or column.
    """
    if not text or not text.strip():
        raise RuleSyntaxError("the predicate is empty")
    try:
        statements = [s for s in sqlglot.parse(text, read="duckdb") if s is not None]
    except sqlglot.errors.SqlglotError as exc:
        raise RuleSyntaxError(f"not a valid SQL expression: {str(exc).splitlines()[0][:200]}") from exc
    if len(statements) != 1:
        raise RuleSyntaxError(f"expected one predicate, found {len(statements)} statements")
    tree = statements[0]
    known = set(columns)
    for node in tree.walk():
        if isinstance(node, exp.Column):
            if node.table or node.args.get("db") or node.args.get("catalog"):
                raise RuleSyntaxError(f"qualified column {node.sql(dialect='duckdb')}: refer to a feature by its name alone")
            if not isinstance(node.this, exp.Identifier):
                raise RuleSyntaxError(f"{_construct(node.this)} is not allowed")
            if node.name not in known:
                close = difflib.get_close_matches(node.name, sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RuleSyntaxError(f"unknown column {node.name!r}{hint}; a rule sees the customer_features columns")
        elif isinstance(node, exp.In):
            if any(node.args.get(k) for k in ("query", "unnest", "field")):
                raise RuleSyntaxError("IN takes a list of literal values only (no subquery)")
            for item in node.expressions:
                value = item.this if isinstance(item, exp.Neg) else item
                if not isinstance(value, (exp.Literal, exp.Boolean, exp.Null)):
                    raise RuleSyntaxError(f"IN takes a list of literal values only, not {item.sql(dialect='duckdb')[:60]}")
        elif isinstance(node, exp.DataType):
            if node.this not in _CAST_TYPES:
                raise RuleSyntaxError(f"a cast to {node.sql(dialect='duckdb')} is not allowed (numbers, text or boolean only)")
        elif type(node) not in RULE_FUNCTIONS and type(node) not in _RULE_NODES:
            allowed = ", ".join(sorted(RULE_FUNCTIONS.values()))
            raise RuleSyntaxError(
                f"{_construct(node)} is not allowed; a band may use feature columns, literals, "
                f"comparisons, arithmetic, AND/OR/NOT, IN, BETWEEN, IS NULL, CASE and {allowed}"
            )
    return tree


def rule_predicate_sql(text: str, columns: Collection[str] = FEATURE_NAMES) -> str:
    """The SQL that runs for a band: generated from the checked parse tree, every identifier quoted."""
    # comments are dropped: nothing of the text but its checked tree reaches DuckDB
    return "(" + parse_rule_predicate(text, columns).sql(dialect="duckdb", identify=True, comments=False) + ")"


_binder: duckdb.DuckDBPyConnection | None = None
_binder_lock = threading.Lock()


def bind_check(predicate_sql: str) -> None:
    """Bind the predicate over an empty table of the feature columns: type errors show at load, not at scoring.

    One in-memory database per process (opening one costs ~50 ms), external access off; each check
    runs on its own cursor, so catalogs load safely from several threads.
    """
    global _binder
    with _binder_lock:
        if _binder is None:
            con = duckdb.connect(":memory:")
            con.execute("CREATE TABLE features (" + ", ".join(f'"{n}" {t}' for n, t in _FEATURE_TYPES.items()) + ")")
            con.execute("SET enable_external_access = false")
            _binder = con
        cursor = _binder.cursor()
    try:
        cursor.execute(f"SELECT CASE WHEN {predicate_sql} THEN 1 END FROM features").fetchall()
    except duckdb.Error as exc:
        raise RuleSyntaxError(f"does not evaluate over the feature columns: {str(exc).splitlines()[0][:200]}") from exc
    finally:
        cursor.close()
