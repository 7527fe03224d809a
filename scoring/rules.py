"""Rule tags: ordered SQL bands from the catalog, evaluated set-based over a feature snapshot.

A band's `when:` was parsed and checked against an allow-list when the catalog loaded
(training/catalog.py); the SQL here is generated again from that checked tree, never pasted from the
catalog text. Rules are evaluated on a sandboxed DuckDB connection (`open_sandbox`): the
feature columns arrive as Arrow batches and external access is off, so even a band that slipped
past the check could not read or write a file.
"""

from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from sqlglot import exp

from tagml.core.storage import MEMORY_LIMIT, connect, quote, sql_literal
from tagml.training.catalog import CONTRACT_SLICES, Catalog, TagSpec
from tagml.training.rule_predicates import parse_rule_predicate


class RuleInputError(ValueError):
    """The feature snapshot lacks a column a rule reads."""


class SliceError(ValueError):
    """A slice a tag declares cannot be built over its features (named tag and slice)."""


def rule_case_sql(tag: TagSpec) -> str:
    """`CASE WHEN <band 1> THEN 'label' ... ELSE default END`: the first matching band wins."""
    assert tag.rule is not None, f"{tag.name} is not a rule tag"
    whens = " ".join(f"WHEN {band.sql} THEN {sql_literal(band.label)}" for band in tag.rule.bands)
    return f"CASE {whens} ELSE {sql_literal(tag.rule.default)} END"


def rule_columns(tag: TagSpec) -> tuple[str, ...]:
    """The feature columns a rule tag's bands read, sorted."""
    assert tag.rule is not None, f"{tag.name} is not a rule tag"
    return tuple(sorted({c.name for band in tag.rule.bands for c in parse_rule_predicate(band.when).find_all(exp.Column)}))


def rule_version(tag: TagSpec) -> str:
    """What every rule-tag row records as its producer: rule (or suitability) version plus the catalog entry hash."""
    spec = tag.rule or tag.suitability
    assert spec is not None, f"{tag.name} is not a rule tag"
    return f"rule:{spec.version}:{tag.content_hash()}"


def feature_batches(path: Path, columns: Collection[str], batch_rows: int) -> pa.RecordBatchReader:
    """A stream of only `columns` of a feature snapshot, read by pyarrow (no SQL touches the path)."""
    parquet = pq.ParquetFile(path)
    wanted = list(dict.fromkeys(columns))
    missing = [c for c in wanted if c not in parquet.schema_arrow.names]
    if missing:
        raise RuleInputError(f"{path} lacks the column(s) {missing}")
    schema = pa.schema([parquet.schema_arrow.field(c) for c in wanted])
    return pa.RecordBatchReader.from_batches(schema, parquet.iter_batches(batch_size=batch_rows, columns=wanted))


def sandbox_limits(con: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
    """`con`'s thread count and memory limit (None when it has none: DuckDB prints that in PiB, a unit it does not accept)."""
    threads, memory_limit = con.execute("SELECT current_setting('threads'), current_setting('memory_limit')").fetchall()[0]
    return int(threads), (str(memory_limit) if MEMORY_LIMIT.match(str(memory_limit)) else None)


def open_sandbox(threads: int, memory_limit: str | None, tables: dict[str, pa.RecordBatchReader | pa.Table]) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with `tables` registered and external access disabled.

    External access cannot be switched back on for a running database, which is why this is a
    connection of its own: once it is off, read_text, read_parquet, COPY and ATTACH fail with a
    Permission Error, while the registered Arrow inputs stay readable. It needs no other connection,
    so a Spark worker opens one over its partition's batches.
    """
    if memory_limit is not None:
        sandbox = connect(threads, memory_limit)
    else:  # no limit: DuckDB's default
        sandbox = duckdb.connect(":memory:")
        sandbox.execute("SET threads = ?", [threads])
    try:
        for name, table in tables.items():
            sandbox.register(name, table)
        sandbox.execute("SET enable_external_access = false")
    except BaseException:
        sandbox.close()
        raise
    return sandbox


def sandboxed_connection(con: duckdb.DuckDBPyConnection, tables: dict[str, pa.RecordBatchReader | pa.Table]) -> duckdb.DuckDBPyConnection:
    """`open_sandbox` with the thread and memory limits of the caller's `con`."""
    return open_sandbox(*sandbox_limits(con), tables)


def evaluate_rule(features: pa.RecordBatchReader, select_sql: str, threads: int, memory_limit: str | None, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Evaluate `select_sql` (over a relation named `features`, with `rule_case_sql(tag)` in it) on a
    sandboxed connection over a stream of feature batches, as a stream of Arrow batches."""
    sandbox = open_sandbox(threads, memory_limit, {"features": features})
    try:
        yield from sandbox.sql(select_sql).to_arrow_reader(batch_rows)
    finally:
        sandbox.close()


def rule_batches(con: duckdb.DuckDBPyConnection, path: Path, tag: TagSpec, select_sql: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """`evaluate_rule` over a feature snapshot's customer_id and rule columns, with `con`'s limits."""
    yield from evaluate_rule(feature_batches(path, ["customer_id", *rule_columns(tag)], batch_rows), select_sql, *sandbox_limits(con), batch_rows)


def slice_expressions(catalog: Catalog, columns: set[str], tag: TagSpec | None = None, sources: Sequence[str] | None = None) -> dict[str, str]:
    """SQL per slice over a feature snapshot: a rule tag's bands (value tier) or a feature column (region).

    Which slices: `sources` (the names training resolved and recorded on a version: tagml.training.evaluate.
    slice_sources), else `tag`'s declared `slices`, else the contract's (value_tier, region). A slice the
    snapshot cannot build is left out, as a missing feature column is, unless the tag declares it: then it
    is a SliceError naming the tag and the slice. A rule's SQL is generated from its checked parse tree; a
    column is quoted (a bank's column names are hostile input).
    """
    declared = tag is not None and tag.slices is not None
    names = sources if sources is not None else (tag.slices if tag is not None and tag.slices is not None else CONTRACT_SLICES)
    out = {}
    for name in names:
        rule = next((t for t in catalog.rule_tags if t.name == name and t.rule is not None), None)
        lacking = sorted(set(rule_columns(rule)) - columns) if rule is not None else ([] if name in columns else [name])
        if not lacking:
            out[name] = rule_case_sql(rule) if rule is not None else quote(name)
        elif declared and name in tag.slices:
            what = (
                f"is the rule tag reading {lacking}, which its features lack"
                if rule is not None
                else "is neither a rule tag of the catalog nor a column of its features"
            )
            raise SliceError(f"tag {tag.name!r}: slice {name!r} {what}")
    return out
