"""Audience selection (圈人): a small, validated JSON query language over tags, compiled to set-based
DuckDB SQL over a per-customer wide table of the tag store's partition (values only as parameters),
with counts, exports and contact-frequency caps.

The query language (docs/AUDIENCES.md, tagml.serving.audience_query): AND/OR/NOT of conditions on
one tag each: `in` a list of its classes, `probability` bounds, `changed` from/to classes since a
date; and `consent` to a purpose. Unknown tags, classes or purposes, and tags the caller may not
see, are refused naming the place in the query (AudienceQueryError), before any SQL runs.

Speed: the long partition (a row per customer and tag) is pivoted once into a wide table (a row per
customer; per tag its value, probability and probabilities) held in an in-memory database attached
to the caller's DuckDB connection (`tagml_audience_cache`), keyed by the partition file's identity
(inode, size, mtime): a refresh or an erasure rewrites the file (a new inode), so the next count
builds a new table and drops the old one. Nothing of it is written to disk, so no copy of the
customers outlives an erasure. Consent states per (purpose, day) are cached the same way.

Contact history: an export records which customers it selected, one Parquet file per audience
under `<warehouse>/contact_history/purpose=<purpose>/`, so `tagml erase` rewrites it like every
warehouse file; the governance store holds counts only.
"""

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from tagml.compliance import lifecycle
from tagml.compliance.consent import (
    CONSENT_PURPOSES,
    NO_CONSENT,
    WITHDRAWN,
    ConsentUnavailableError,
    UnknownPurposeError,
    check_purpose,
    consent_states_sql,
    needs_consent,
)
from tagml.compliance.exports import CONFIDENTIAL, manifest_path
from tagml.core.files import file_sha256
from tagml.core.governance import GovernanceStore, Table
from tagml.core.settings import Settings
from tagml.core.storage import PARQUET_OPTIONS, WarehouseLayout, atomic_replace, quote, sql_literal, staged_path
from tagml.scoring.store import FORMULA_PREFIXES, ParquetTagStore, TagStoreError
from tagml.serving.audience_query import Query, compile_predicate, parse_query

__all__ = [
    "AudienceCount",
    "AudienceError",
    "AudienceQueryError",
    "AudienceRecord",
    "AudienceSources",
    "ContactCap",
    "audience_customers",
    "count_audience",
    "export_audience",
    "parse_query",
    "recorded_audiences",
    "visible_tags",
]

CACHE_DB = "tagml_audience_cache"  # an in-memory database attached to the caller's connection
CONTACT_HISTORY = "contact_history"  # under the warehouse: erasure rewrites it
CONTACT_CAP = "contact_cap"  # the exclusion reason of the contact-frequency cap
SELECTION_TABLE = "tagml_audience_selection"  # a temporary table of an export's connection
MAX_NAME = 200
FORMATS = ("parquet", "csv")

AUDIENCES = Table(
    "audiences",
    ddl=(
        (
            "CREATE TABLE IF NOT EXISTS audiences (audience_id TEXT PRIMARY KEY, at TEXT NOT NULL, by TEXT NOT NULL, name TEXT NOT NULL, "
            "purpose TEXT NOT NULL, as_of TEXT NOT NULL, query TEXT NOT NULL, query_sha256 TEXT NOT NULL, matched INTEGER NOT NULL, "
            "selected INTEGER NOT NULL, excluded TEXT NOT NULL, cap TEXT NOT NULL, format TEXT NOT NULL, out TEXT NOT NULL, "
            "sha256 TEXT NOT NULL, contact_history TEXT NOT NULL)"
        ),
    ),
)


class AudienceQueryError(ValueError):
    """A query that does not parse, or names an unknown tag, class or purpose (says where, as a path into the query)."""


class AudienceError(LookupError):
    """An audience that cannot be made as asked (no partition, an unknown audience id, nothing selected)."""


@dataclass(frozen=True)
class ContactCap:
    """A customer already in `max_audiences` audiences of the same purpose in the last `days` days is left out (0: no cap)."""

    max_audiences: int
    days: int

    def __post_init__(self) -> None:
        for name in ("max_audiences", "days"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AudienceQueryError(f"cap.{name}: a whole number >= 0, got {value!r}")

    @property
    def active(self) -> bool:
        return self.max_audiences > 0 and self.days > 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "ContactCap":
        return cls(settings.contact_cap_audiences, settings.contact_cap_days)


@dataclass(frozen=True)
class AudienceCount:
    """How many customers a query selects on one partition, and how many are left out and why."""

    as_of: str
    matched: int  # customers matching the query
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> customers left out (no_consent, withdrawn, contact_cap)
    selected: int = 0  # matched minus every exclusion
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AudienceRecord:
    """What one audience export wrote, selected and left out, as recorded (counts only)."""

    audience_id: str
    at: str  # UTC, microseconds: the cap of a reproduction counts only history strictly before it
    by: str
    name: str
    purpose: str
    as_of: str
    query: Any  # as given
    query_normalised: dict[str, Any]
    query_sha256: str
    matched: int
    selected: int
    excluded: dict[str, int]
    cap: dict[str, int]
    format: str
    columns: list[str]
    out: str
    sha256: str
    contact_history: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AudienceSources:
    """What audiences read and write: the tag store, the staged consents, the catalog, the governance store,
    and tagml's own record of which customers were selected for which audience (the contact history)."""

    store: Any  # TagStore
    staged_dir: Path
    catalog: Any  # Catalog
    governance: Any  # GovernanceStore
    audiences_dir: Path
    contact_history_dir: Path | None = None  # None: no history (counts only; exports refuse)
    protected: tuple[Path, ...] = ()  # directories an export may not write into (the warehouse)

    @classmethod
    def from_settings(cls, settings: Settings) -> "AudienceSources":
        from tagml.training.catalog import load_catalog

        warehouse = Path(settings.warehouse_dir)
        return cls(
            ParquetTagStore.in_warehouse(warehouse),
            WarehouseLayout(warehouse).staged_dir,
            load_catalog(settings.catalog_path),
            GovernanceStore(settings.governance_db),
            settings.audiences_dir,
            warehouse / CONTACT_HISTORY,
            (warehouse,),
        )


def visible_tags(sources: AudienceSources, confidential: bool = False) -> frozenset[str]:
    """The tags a caller may select by: published ones, confidential (or restricted) ones only when allowed."""
    published = lifecycle.published_tags(sources.governance, sources.catalog)
    return frozenset(t.name for t in sources.catalog.tags if t.name in published and (confidential or t.sensitivity not in CONFIDENTIAL))


def _file_key(path: Path) -> str | None:
    """The identity of a file's current content: a rewrite through os.replace changes the inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{st.st_ino:x}_{st.st_size:x}_{st.st_mtime_ns:x}"


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class _Cached:
    table: str  # qualified name
    key: str | None  # None: not cacheable (a temp table rebuilt on each use)
    built: bool = True  # built by this call (False: found in the cache)


def _cached(con: duckdb.DuckDBPyConnection, prefix: str, key: str | None, build_sql: str, params: list[Any] | None = None) -> _Cached:
    """The cache table `<prefix>_<key>` of `build_sql`, built when missing (other tables of the prefix dropped); without a key, a fresh temp table."""
    if key is None:
        name = f"tagml_uncached_{prefix}"
        con.execute(f"CREATE OR REPLACE TEMP TABLE {quote(name)} AS {build_sql}", params or [])
        return _Cached(quote(name), None)
    name = f"{prefix}_{key}"
    con.execute(f"ATTACH IF NOT EXISTS ':memory:' AS {CACHE_DB}")
    tables = [
        t
        for (t,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND starts_with(table_name, ?)", [CACHE_DB, prefix + "_"]
        ).fetchall()
    ]
    if name in tables:
        return _Cached(f"{CACHE_DB}.{quote(name)}", key, built=False)
    for old in tables:  # a partition, consents file or history that was replaced: its table goes
        con.execute(f"DROP TABLE IF EXISTS {CACHE_DB}.{quote(old)}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {CACHE_DB}.{quote(name)} AS {build_sql}", params or [])
    return _Cached(f"{CACHE_DB}.{quote(name)}", key)


def wide_sql(sources: AudienceSources, partition: date) -> str:
    """The partition as one row per customer in customer_id order: `rid` (the row number), `v:<tag>` value,
    `p:<tag>` probability, `m:<tag>` probabilities (a pivot of the long rows)."""
    try:
        relation = sources.store.read_sql(partition)
    except TagStoreError as err:
        raise AudienceError(str(err)) from err
    columns = []
    for spec in sources.catalog.tags:  # names validated by the catalog
        on = f"tag = {sql_literal(spec.name)}"
        columns.append(f"any_value(value) FILTER (WHERE {on}) AS {quote('v:' + spec.name)}")
        columns.append(f"any_value(probability) FILTER (WHERE {on}) AS {quote('p:' + spec.name)}")
        columns.append(f"any_value(probabilities) FILTER (WHERE {on}) AS {quote('m:' + spec.name)}")
    pivot = f"SELECT customer_id, {', '.join(columns)} FROM {relation} GROUP BY customer_id"
    return f"SELECT row_number() OVER (ORDER BY customer_id) AS rid, * FROM ({pivot}) ORDER BY rid"


def wide_table(con: duckdb.DuckDBPyConnection, sources: AudienceSources, partition: date) -> _Cached:
    """`wide_sql` materialised in the connection's cache database, keyed by the partition file's identity and the catalog's tags."""
    build = wide_sql(sources, partition)
    key = _file_key(Path(sources.store.location(partition)))
    return _cached(con, f"wide_{partition:%Y%m%d}", None if key is None else f"{key}_{_short(build)}", build)


def _aligned(
    con: duckdb.DuckDBPyConnection, wide: _Cached, prefix: str, key: str | None, columns_sql: str, joined: str, params: list[Any] | None = None
) -> str:
    """A table with one row per row of `wide`, in its order (`rid`), of `columns_sql` over `w LEFT JOIN joined j USING (customer_id)`.

    Counts read it by POSITIONAL JOIN (no hash join of a million customer ids per count); it is checked
    aligned once, when built.
    """
    build = f"SELECT w.rid, {columns_sql} FROM {wide.table} w LEFT JOIN ({joined}) j USING (customer_id) ORDER BY w.rid"
    full_key = None if key is None or wide.key is None else f"{_short(wide.key + key)}"
    cached = _cached(con, prefix, full_key, build, params)
    if cached.built:
        check = (
            f"SELECT count(*) FROM {wide.table} w POSITIONAL JOIN (SELECT rid AS aligned_rid FROM {cached.table}) a WHERE w.rid IS DISTINCT FROM a.aligned_rid"
        )
        if con.execute(check).fetchone()[0]:
            con.execute(f"DROP TABLE IF EXISTS {cached.table}")
            raise AudienceError(f"internal: the cached table {cached.table} was not aligned with {wide.table} and was dropped; retry")
    return cached.table


def consent_relation(con: duckdb.DuckDBPyConnection, sources: AudienceSources, wide: _Cached, purpose: str, day: date) -> str:
    """(state) of each customer of `wide`: the deciding consent event for `purpose` at the end of `day` (NULL: none)."""
    try:
        states = consent_states_sql(sources.staged_dir, purpose, day)
    except (ConsentUnavailableError, UnknownPurposeError) as err:
        raise AudienceError(str(err)) from err
    key = _file_key(staged_path(Path(sources.staged_dir), "consents"))
    table = _aligned(con, wide, f"consent_{purpose}_{day:%Y%m%d}", key, "j.state", states)
    return f"(SELECT state FROM {table})"  # only the column read: a positional join does not prune columns of a subquery's *


def previous_relation(con: duckdb.DuckDBPyConnection, sources: AudienceSources, wide: _Cached, current: date, before: date, tags: Collection[str]) -> str:
    """(`v:<tag>` of `tags`) of each customer of `wide` in the partition of `before` (NULL: not in it)."""
    earlier = wide_table(con, sources, before)
    columns = ", ".join(f"j.{quote('v:' + t.name)}" for t in sources.catalog.tags)
    table = _aligned(con, wide, f"previous_{current:%Y%m%d}_{before:%Y%m%d}", earlier.key, columns, f"SELECT * FROM {earlier.table}")
    return f"(SELECT {', '.join(quote('v:' + t) for t in sorted(tags))} FROM {table})"


def _history_files(sources: AudienceSources, purpose: str) -> list[Path]:
    if sources.contact_history_dir is None:
        return []
    folder = Path(sources.contact_history_dir) / f"purpose={purpose}"
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith(".")) if folder.is_dir() else []


def _capped_sql(
    con: duckdb.DuckDBPyConnection, sources: AudienceSources, wide: _Cached, purpose: str, cap: ContactCap, now: datetime
) -> tuple[str, list[Any]] | None:
    """The `rid`s of customers already selected for `cap.max_audiences` audiences of `purpose` in the `cap.days` days before `now` (strictly).

    The history is read once per set of history files (its selections mapped to `rid`, audiences to small numbers), not per count.
    """
    files = _history_files(sources, purpose) if cap.active else []
    if not files:
        return None
    listed = "[" + ", ".join(sql_literal(p) for p in files) + "]"
    keys = [_file_key(p) for p in files]
    key = None if None in keys or wide.key is None else _short(wide.key + "|".join(f"{p.name}:{k}" for p, k in zip(files, keys)))
    build = (
        f"SELECT w.rid, dense_rank() OVER (ORDER BY h.audience_id) AS audience, h.selected_at FROM read_parquet({listed}) h "
        f"JOIN {wide.table} w USING (customer_id) ORDER BY audience"
    )
    try:
        history = _cached(con, f"history_{purpose}", key, build).table
    except duckdb.Error as err:
        raise AudienceError(f"the contact history of {purpose} under {sources.contact_history_dir} cannot be read: {err}") from err
    since = now - timedelta(days=cap.days)
    return (
        # a customer is in an audience's history once, so counting rows counts audiences (count DISTINCT was 3-5x slower)
        f"SELECT rid FROM {history} WHERE selected_at >= ? AND selected_at < ? GROUP BY rid HAVING count(*) >= ?",
        [_naive_utc(since), _naive_utc(now), cap.max_audiences],
    )


def _naive_utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class _Plan:
    partition: date
    query: Query
    purpose: str | None
    cap: ContactCap
    wide: str  # the current partition's wide table
    sql: str  # (rid, customer_id, excluded_because) of every matched customer
    params: list[Any]


def _plan(
    con: duckdb.DuckDBPyConnection,
    sources: AudienceSources,
    query: Any,
    purpose: str | None,
    as_of: date | None,
    cap: ContactCap | None,
    visible: Collection[str] | None,
    now: datetime,
) -> _Plan:
    parsed = parse_query(query, sources.catalog, visible_tags(sources) if visible is None else visible)
    if purpose is not None:
        try:
            check_purpose(purpose)
        except UnknownPurposeError as err:
            raise AudienceQueryError(f"purpose: {err}") from err
    cap = cap if cap is not None else ContactCap(0, 0)
    try:
        partition = sources.store.latest_on_or_before(as_of)
    except TagStoreError as err:
        raise AudienceError(str(err)) from err
    wide = wide_table(con, sources, partition)
    joins, since_alias = [], {}
    for i, since in enumerate(parsed.since_dates()):
        if since >= partition:
            raise AudienceQueryError(f"query: 'changed since {since}' needs a date before the partition counted ({partition})")
        try:
            before = sources.store.latest_on_or_before(since)
        except TagStoreError as err:
            raise AudienceQueryError(f"query: no tag partition on or before {since} to compare with ({err})") from err
        since_alias[since] = f"s{i}"
        tags = {n.tag for n in parsed.changed_conditions() if n.since == since}
        joins.append(f"POSITIONAL JOIN {previous_relation(con, sources, wide, partition, before, tags)} s{i}")
    consents = {name: consent_relation(con, sources, wide, name, partition) for name in parsed.consent_purposes()}
    if purpose is not None and needs_consent(purpose) and purpose not in consents:
        consents[purpose] = consent_relation(con, sources, wide, purpose, partition)
    consent_alias = {}
    for i, (name, relation) in enumerate(sorted(consents.items())):
        consent_alias[name] = f"k{i}"
        joins.append(f"POSITIONAL JOIN {relation} k{i}")
    compiled = compile_predicate(parsed.root, since_alias, consent_alias)
    params = list(compiled.params)
    reasons = []
    if purpose is not None and needs_consent(purpose):
        state = f"{consent_alias[purpose]}.state"
        reasons += [f"WHEN {state} = 'withdrawn' THEN {sql_literal(WITHDRAWN)}", f"WHEN {state} IS DISTINCT FROM 'granted' THEN {sql_literal(NO_CONSENT)}"]
    capped = _capped_sql(con, sources, wide, purpose, cap, now) if purpose is not None else None
    if capped is not None:
        reasons.append(f"WHEN w.rid IN ({capped[0]}) THEN {sql_literal(CONTACT_CAP)}")
    because = f"CASE {' '.join(reasons)} END" if reasons else "CAST(NULL AS VARCHAR)"
    # the CASE comes before the WHERE in the text, so the cap's parameters go first
    sql = f"SELECT w.rid, w.customer_id, {because} AS excluded_because FROM {wide.table} w {' '.join(joins)} WHERE {compiled.predicate}"
    return _Plan(partition, parsed, purpose, cap, wide.table, sql, (capped[1] if capped else []) + params)


def _counts(con: duckdb.DuckDBPyConnection, relation: str, params: list[Any]) -> tuple[int, dict[str, int]]:
    rows = con.execute(f"SELECT excluded_because, count(*) FROM ({relation}) GROUP BY ALL ORDER BY 1 NULLS FIRST", params).fetchall()
    excluded = {reason: int(n) for reason, n in rows if reason is not None}
    return sum(int(n) for _, n in rows), excluded


def count_audience(
    con: duckdb.DuckDBPyConnection,
    sources: AudienceSources,
    query: Any,
    *,
    purpose: str | None = None,
    as_of: date | None = None,
    cap: ContactCap | None = None,
    visible_tags: Collection[str] | None = None,
    now: datetime | None = None,
) -> AudienceCount:
    """Count the customers `query` selects on the partition on or before `as_of`, with the exclusions of `purpose` and `cap`.

    `purpose` None: no exclusions; `service`: no consent needed, the cap still applies. `cap` None: no cap
    (callers pass `ContactCap.from_settings`); `visible_tags` None: the published tags that are not confidential.
    """
    started = time.perf_counter()
    plan = _plan(con, sources, query, purpose, as_of, cap, visible_tags, now or datetime.now(UTC))
    try:
        matched, excluded = _counts(con, plan.sql, plan.params)
    except duckdb.Error as err:
        raise AudienceError(f"the audience could not be counted on the partition of {plan.partition}: {err}") from err
    return AudienceCount(plan.partition.isoformat(), matched, excluded, matched - sum(excluded.values()), round(time.perf_counter() - started, 4))


def audience_customers(
    con: duckdb.DuckDBPyConnection,
    sources: AudienceSources,
    query: Any,
    *,
    purpose: str | None = None,
    as_of: date | None = None,
    cap: ContactCap | None = None,
    visible_tags: Collection[str] | None = None,
    now: datetime | None = None,
) -> list[str]:
    """The selected customers' ids, sorted (what an export writes; with a manifest's query, as_of, purpose, cap and `now=at`, a reproduction)."""
    plan = _plan(con, sources, query, purpose, as_of, cap, visible_tags, now or datetime.now(UTC))
    return [row[0] for row in con.execute(f"SELECT customer_id FROM ({plan.sql}) WHERE excluded_because IS NULL ORDER BY 1", plan.params).fetchall()]


def _checked_text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value or len(value) > MAX_NAME:
        raise AudienceQueryError(f"{what}: a non-empty text of at most {MAX_NAME} characters without NUL is required, got {value!r:.80}")
    return value


def _default_out(sources: AudienceSources, name: str, partition: date, audience_id: str, fmt: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:60] or "audience"
    return Path(sources.audiences_dir) / f"{slug}-{partition.isoformat()}-{audience_id[:8]}.{fmt}"


def _write_file(con: duckdb.DuckDBPyConnection, select_sql: str, columns: list[str], fmt: str, out: Path) -> str:
    """The audience file, atomically; returns its sha256 (of the finished temporary, before it replaces `out`)."""
    digest: list[str] = []
    with atomic_replace(out) as tmp:
        if fmt == "parquet":
            con.execute(f"COPY ({select_sql}) TO {sql_literal(tmp)} ({PARQUET_OPTIONS})")
        else:
            # text cells a spreadsheet would run as a formula get a leading ' (scoring/store.py's FORMULA_PREFIXES, OWASP CSV injection)
            prefixes = ", ".join(sql_literal(p) for p in FORMULA_PREFIXES)
            cells = ", ".join(
                f"CASE WHEN left({quote(c)}, 1) IN ({prefixes}) THEN {sql_literal(chr(39))} || {quote(c)} ELSE {quote(c)} END AS {quote(c)}" for c in columns
            )
            con.execute(f"COPY (SELECT {cells} FROM ({select_sql})) TO {sql_literal(tmp)} (FORMAT CSV, HEADER)")
        digest.append(file_sha256(tmp))
    return digest[0]


def export_audience(
    con: duckdb.DuckDBPyConnection,
    sources: AudienceSources,
    query: Any,
    *,
    name: str,
    purpose: str,
    by: str,
    fmt: str = "parquet",
    out: Path | None = None,
    as_of: date | None = None,
    cap: ContactCap | None = None,
    visible_tags: Collection[str] | None = None,
    now: datetime | None = None,
) -> AudienceRecord:
    """Select the audience, write it (customer_id and the current value of each tag the query uses), its manifest,
    its contact history and its governance record; a failure anywhere leaves none of them."""
    _checked_text(name, "name")
    _checked_text(by, "by")
    if purpose is None:
        raise AudienceQueryError(f"purpose: an export needs a purpose (one of {', '.join((*CONSENT_PURPOSES, 'service'))})")
    if fmt not in FORMATS:
        raise AudienceQueryError(f"format: {fmt!r} is not an export format (use {' or '.join(FORMATS)})")
    if sources.contact_history_dir is None:
        raise AudienceError("these sources have no contact history directory: an export must record whom it selected")
    moment = now or datetime.now(UTC)
    plan = _plan(con, sources, query, purpose, as_of, cap, visible_tags, moment)
    audience_id = uuid.uuid4().hex
    out = Path(out) if out is not None else _default_out(sources, name, plan.partition, audience_id, fmt)
    for directory in sources.protected:
        if out.resolve().is_relative_to(Path(directory).resolve()):
            raise AudienceError(f"audience output {out} is inside {directory}; audiences go outside the warehouse")
    con.execute(f"CREATE OR REPLACE TEMP TABLE {SELECTION_TABLE} AS {plan.sql}", plan.params)
    matched, excluded = _counts(con, f"SELECT * FROM {SELECTION_TABLE}", [])
    selected = matched - sum(excluded.values())
    if selected == 0:
        raise AudienceError(f"the query selects nobody on the partition of {plan.partition} (matched {matched}, excluded {excluded}); nothing was exported")
    tags = plan.query.tags()
    columns = ["customer_id", *tags]
    values = ", ".join(f"w.{quote('v:' + t)} AS {quote(t)}" for t in tags)
    file_sql = (
        f"SELECT s.customer_id{', ' + values if values else ''} FROM {SELECTION_TABLE} s JOIN {plan.wide} w "
        "USING (rid) WHERE s.excluded_because IS NULL ORDER BY s.customer_id"
    )
    history = Path(sources.contact_history_dir) / f"purpose={purpose}" / f"{moment:%Y%m%dT%H%M%S}-{audience_id}.parquet"
    at = moment.astimezone(UTC).isoformat()
    placed: list[Path] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with sources.governance.transaction(AUDIENCES) as db:
            digest = _write_file(con, file_sql, columns, fmt, out)
            placed.append(out)
            history.parent.mkdir(parents=True, exist_ok=True)
            with atomic_replace(history) as tmp:
                con.execute(
                    f"COPY (SELECT customer_id, ? AS audience_id, ? AS purpose, ?::TIMESTAMP AS selected_at FROM {SELECTION_TABLE} "
                    f"WHERE excluded_because IS NULL ORDER BY 1) TO {sql_literal(tmp)} ({PARQUET_OPTIONS})",
                    [audience_id, purpose, _naive_utc(moment)],
                )
            placed.append(history)
            record = AudienceRecord(
                audience_id=audience_id,
                at=at,
                by=by,
                name=name,
                purpose=purpose,
                as_of=plan.partition.isoformat(),
                query=plan.query.given,
                query_normalised=plan.query.normalised,
                query_sha256=plan.query.sha256,
                matched=matched,
                selected=selected,
                excluded=excluded,
                cap={"max_audiences": plan.cap.max_audiences, "days": plan.cap.days},
                format=fmt,
                columns=columns,
                out=str(out.resolve()),
                sha256=digest,
                contact_history=str(history.relative_to(Path(sources.contact_history_dir))),
            )
            with atomic_replace(manifest_path(out)) as tmp:
                tmp.write_text(json.dumps(record.as_dict(), indent=2, ensure_ascii=False))
            placed.append(manifest_path(out))
            row = {k: v for k, v in record.as_dict().items() if k not in ("query_normalised", "columns")}
            row.update(query=json.dumps(record.query_normalised, sort_keys=True, ensure_ascii=False), excluded=json.dumps(excluded), cap=json.dumps(record.cap))
            db.execute(f"INSERT INTO audiences ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    except BaseException:
        for path in placed:  # no file, manifest or history row may outlive a decision that was not recorded
            path.unlink(missing_ok=True)
        raise
    finally:
        con.execute(f"DROP TABLE IF EXISTS {SELECTION_TABLE}")
    return record


def recorded_audiences(governance: GovernanceStore, limit: int = 20, audience_id: str | None = None) -> list[dict[str, Any]]:
    """The newest audience records, newest first (counts only); `audience_id`: only that one (its primary key)."""
    if not governance.path.exists():
        return []
    where, params = ("WHERE audience_id = ?", [audience_id]) if audience_id is not None else ("", [])
    with governance.read(AUDIENCES) as db:
        cursor = db.execute(f"SELECT * FROM audiences {where} ORDER BY at DESC, rowid DESC LIMIT ?", [*params, int(limit)])
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    for row in rows:
        for key in ("query", "excluded", "cap"):
            row[key] = json.loads(row[key])
    return rows
