"""Monthly aggregates of the event tables, and the feature snapshot computed from them.

Every transactions/digital feature is an expression over mergeable measures (`tagml.features.dictionary.MEASURES`:
sums in cents, counts, maxima, bit-ors). Per customer and calendar month, each measure's value over the month is
stored as Parquet (`<aggregates_dir>/<source>/<YYYY-MM>.parquet`), with a manifest of the staged files each month
was built from. A snapshot for `as_of` then merges, per window of 1/3/12 months, the months lying wholly inside the
window from the aggregates and the days at its edges (the start month's tail, the current month up to as_of) from
the staged daily rows: the same measures, merged exactly, so the features equal the full recompute's bit for bit.

The months a snapshot takes whole fall into groups by the windows they count in (for a mid-November as_of:
Dec..Aug in the 12-month window only, Sep..Oct in the 3- and 12-month ones); every as_of of a month has the same
groups, so each group of two or more months is merged once into a stored piece (`merged_months_path`), keyed by the
identity of its months' aggregates, and a night merges 2 such pieces instead of 11 months (the measures merge
associatively: sums, counts, maxima, bit-ors).

A month is built only once the staged data reaches its last day (before that it is read day by day), and rebuilt
only when the staged files it was built from change (a restated day, a rewritten whole-table file, erasure) or the
measures' definitions do. A month whose aggregate is missing or stale is read from the daily rows instead: a
snapshot is never computed from aggregates that do not match the staged data it reads.
"""

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import duckdb

from tagml.core.storage import file_identity, sql_literal, staged_files, staged_path, staged_period, staged_relation, write_parquet_atomically
from tagml.features.customer_features import (
    EVENT_SOURCES,
    balances_select,
    base_ctes,
    history_start,
    joined_select,
    measure_features_cte,
    snapshot_spine_select,
    staged_relations,
)
from tagml.features.delivery import current_generation
from tagml.features.dictionary import MEASURES, WINDOWS, Measure, event_rows, source_measures

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


# ---- calendar arithmetic, as DuckDB does it ----------------------------------------------------------


def month_start(day: date) -> date:
    return day.replace(day=1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def month_end(day: date) -> date:
    return next_month(month_start(day)) - timedelta(days=1)


def minus_months(day: date, months: int) -> date:
    """`day - INTERVAL months MONTH` as DuckDB computes it: the same day number, clamped to the month's end."""
    index = day.year * 12 + day.month - 1 - months
    first = date(index // 12, index % 12 + 1, 1)
    return first.replace(day=min(day.day, month_end(first).day))


def window_start(as_of: date, months: int) -> date:
    """The first day of the window of `months` months ending on `as_of` (inclusive): as_of - months + 1 day.
    Mar 28-31 all start on Mar 1 for one month (Feb 28 + 1 day)."""
    return minus_months(as_of, months) + timedelta(days=1)


@dataclass(frozen=True)
class WindowPlan:
    """How the windows of one as_of are covered: `months` (month -> the windows it lies wholly inside, read from
    the aggregates) and `days` (window -> day ranges (first, last) read from the staged rows)."""

    as_of: date
    months: dict[date, frozenset[int]]
    days: dict[int, list[tuple[date, date]]]

    @property
    def day_ranges(self) -> list[tuple[date, date]]:
        """The day ranges to read, overlaps merged, in order."""
        merged: list[tuple[date, date]] = []
        for lo, hi in sorted(r for ranges in self.days.values() for r in ranges):
            if merged and lo <= merged[-1][1] + timedelta(days=1):
                merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
            else:
                merged.append((lo, hi))
        return merged


def window_plan(as_of: date, aggregated: set[date]) -> WindowPlan:
    """Which months of each window come from the aggregates (`aggregated`: months with a fresh aggregate) and
    which days from the daily rows: a month is taken whole only when the window covers all of it."""
    months: dict[date, set[int]] = {}
    days: dict[int, list[tuple[date, date]]] = {k: [] for k in WINDOWS}
    for k in WINDOWS:
        start = window_start(as_of, k)
        month = month_start(start)
        while month <= as_of:
            lo, hi = max(month, start), min(month_end(month), as_of)
            if month in aggregated and lo == month and hi == month_end(month):
                months.setdefault(month, set()).add(k)
            else:
                days[k].append((lo, hi))
            month = next_month(month)
    return WindowPlan(as_of, {m: frozenset(ks) for m, ks in sorted(months.items())}, days)


# ---- the aggregates on disk ----------------------------------------------------------------------------


def _measures(source: str) -> list[Measure]:
    return [x for x in MEASURES if x.source == source]


def measures_signature(source: str) -> str:
    """What a month's aggregate depends on besides its input files: the measures' definitions."""
    text = "\n".join(f"{x.name}|{_monthly_value(x)}" for x in _measures(source))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def aggregate_path(aggregates_dir: Path, source: str, month: date) -> Path:
    return Path(aggregates_dir) / source / f"{month:%Y-%m}.parquet"


def _month_files(generation: Path, table: str, month: date) -> list[Path]:
    return staged_files(generation, table, month, month_end(month))


def input_identity(generation: Path, files: list[Path]) -> list[list]:
    """The identity of the staged files a month is built from: name within the generation, size and mtime
    (generations share unchanged files by hard link, so an unchanged file keeps all three)."""
    return [[f.relative_to(generation).as_posix(), *file_identity(f)] for f in files]


def read_manifest(aggregates_dir: Path) -> dict:
    path = Path(aggregates_dir) / MANIFEST
    if not path.is_file():
        return {"format": MANIFEST_FORMAT, "sources": {}}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"format": MANIFEST_FORMAT, "sources": {}}  # unreadable: every month is rebuilt, nothing trusted
    if manifest.get("format") != MANIFEST_FORMAT:
        return {"format": MANIFEST_FORMAT, "sources": {}}
    return manifest


def _write_manifest(aggregates_dir: Path, manifest: dict) -> None:
    path = Path(aggregates_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _source_entries(manifest: dict, source: str) -> dict[str, dict]:
    entry = manifest["sources"].get(source)
    if not entry or entry.get("signature") != measures_signature(source):
        entry = {"signature": measures_signature(source), "months": {}}
        manifest["sources"][source] = entry
    return entry["months"]


def _staged_months(con: duckdb.DuckDBPyConnection, generation: Path, table: str, ts: str) -> tuple[list[date], date | None]:
    """The calendar months with staged rows, and the last day the staged data reaches."""
    if staged_path(generation, table).is_file():
        rel = staged_relation(generation, table)
        months = [r[0] for r in con.execute(f"SELECT DISTINCT date_trunc('month', {ts})::DATE FROM {rel} ORDER BY 1").fetchall()]
        through = con.execute(f"SELECT max({ts})::DATE FROM {rel}").fetchall()[0][0]
        return months, through
    periods = [staged_period(f) for f in staged_files(generation, table)]
    return sorted({month_start(p) for p in periods}), max(periods, default=None)


def fresh_months(generation: Path, aggregates_dir: Path, source: str) -> dict[date, Path]:
    """The months whose stored aggregate was built from exactly the staged files `generation` holds for them."""
    table = EVENT_SOURCES[source][0]
    entries = read_manifest(aggregates_dir)["sources"].get(source) or {}
    if entries.get("signature") != measures_signature(source):
        return {}
    fresh = {}
    for key, entry in entries.get("months", {}).items():
        month = date.fromisoformat(key + "-01")
        path = aggregate_path(aggregates_dir, source, month)
        if path.is_file() and entry["inputs"] == input_identity(generation, _month_files(generation, table, month)):
            fresh[month] = path
    return fresh


def monthly_select(source: str, relation: str, month: date) -> str:
    """Every measure of `source` per customer over `month`'s rows of `relation`."""
    ts = EVENT_SOURCES[source][1]
    cols = ",\n  ".join(f"{_monthly_value(x)} AS m_{x.name}" for x in _measures(source))
    first, after = sql_literal(month), sql_literal(next_month(month))
    return (
        f"SELECT customer_id, DATE {first} AS month,\n  {cols}\n"
        f"FROM (SELECT customer_id, {', '.join(event_rows(source))} FROM {relation} WHERE {ts} >= DATE {first} AND {ts} < DATE {after})\n"
        f"GROUP BY customer_id ORDER BY customer_id"
    )


@dataclass
class AggregatesUpdate:
    """What `update_monthly_aggregates` did, per source: months built (new or changed), kept, removed, and
    left to the daily rows because the staged data does not reach their last day yet."""

    built: dict[str, list[date]] = field(default_factory=dict)
    kept: dict[str, list[date]] = field(default_factory=dict)
    removed: dict[str, list[date]] = field(default_factory=dict)
    incomplete: dict[str, list[date]] = field(default_factory=dict)
    rows: int = 0


def update_monthly_aggregates(con: duckdb.DuckDBPyConnection, staged_dir: Path, aggregates_dir: Path) -> AggregatesUpdate:
    """Bring the monthly aggregates up to date with the current staged generation: only months that are
    complete in the staged data and whose input files (or the measures' definitions) changed are rebuilt.

    Each month's file is replaced atomically and the manifest rewritten after it, so an interruption leaves
    at worst a month whose manifest entry no longer matches (rebuilt next time, and never used meanwhile).
    """
    generation = current_generation(staged_dir)
    aggregates_dir = Path(aggregates_dir)
    aggregates_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(aggregates_dir)
    update = AggregatesUpdate()
    for source, (table, ts) in EVENT_SOURCES.items():
        entries = _source_entries(manifest, source)
        months, through = _staged_months(con, generation, table, ts)
        built, kept, incomplete = update.built.setdefault(source, []), update.kept.setdefault(source, []), update.incomplete.setdefault(source, [])
        for month in months:
            if through is None or month_end(month) > through:
                incomplete.append(month)
                continue
            files = _month_files(generation, table, month)
            inputs = input_identity(generation, files)
            key, path = f"{month:%Y-%m}", aggregate_path(aggregates_dir, source, month)
            entry = entries.get(key)
            if entry and entry["inputs"] == inputs and path.is_file():
                kept.append(month)
                continue
            relation = f"read_parquet([{', '.join(sql_literal(f) for f in files)}])"
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = write_parquet_atomically(con, monthly_select(source, relation, month), path)
            entries[key] = {"inputs": inputs, "rows": rows}
            _write_manifest(aggregates_dir, manifest)
            built.append(month)
            update.rows += rows
        gone = sorted(set(entries) - {f"{m:%Y-%m}" for m in months})
        for key in gone:
            aggregate_path(aggregates_dir, source, date.fromisoformat(key + "-01")).unlink(missing_ok=True)
            del entries[key]
        update.removed[source] = [date.fromisoformat(k + "-01") for k in gone]
        _write_manifest(aggregates_dir, manifest)
    return update


# ---- the snapshot from the aggregates --------------------------------------------------------------------


def _in_ranges(ts: str, ranges: list[tuple[date, date]]) -> str:
    if not ranges:
        return "false"
    return "(" + " OR ".join(f"({ts} >= DATE {sql_literal(lo)} AND {ts} < DATE {sql_literal(hi + timedelta(days=1))})" for lo, hi in ranges) + ")"


def _monthly_value(x: Measure) -> str:
    """A measure over a month's (or fewer days') rows, as stored: a sum in cents fits DECIMAL(18,2) (BIGINT-backed,
    cheaper to store and merge than the DECIMAL(38,2) a sum returns; an overflow is an error, never a wrong value)."""
    return f"CAST({x.over_rows()} AS DECIMAL(18,2))" if x.agg == "sum" else x.over_rows()


MERGED_DIR = "merged"


def month_groups(plan: WindowPlan) -> list[tuple[frozenset[int], list[date]]]:
    """The plan's whole months grouped by the windows they count in, in month order of each group's first."""
    groups: dict[frozenset[int], list[date]] = {}
    for month, ks in plan.months.items():
        groups.setdefault(ks, []).append(month)
    return sorted(groups.items(), key=lambda g: g[1][0])


def _group_identity(aggregates_dir: Path, source: str, months: list[date]) -> str:
    """What a merged group depends on: the measures' definitions and each month aggregate's own input identity
    (as the manifest holds it), so a restated day, an erasure or a rebuilt month gives another identity."""
    entries = read_manifest(aggregates_dir)["sources"][source]["months"]
    text = json.dumps([measures_signature(source), [[f"{m:%Y-%m}", entries[f"{m:%Y-%m}"]["inputs"]] for m in months]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def merged_months_path(con: duckdb.DuckDBPyConnection, aggregates_dir: Path, source: str, months: list[date], paths: Mapping[date, Path]) -> Path:
    """The source's measures per customer merged over `months` (fresh aggregates, `paths`), stored once under a
    name holding the identity of its inputs: a stale file is never read, only replaced. The other identities of
    the same months (from before a restatement) are removed once the new one is written."""
    folder = Path(aggregates_dir) / MERGED_DIR / source
    stem = f"{months[0]:%Y-%m}_{months[-1]:%Y-%m}_{len(months)}"
    path = folder / f"{stem}_{_group_identity(aggregates_dir, source, months)}.parquet"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    # stored as the month aggregates are (`_monthly_value` types), so the night's merge reads one type per measure
    cols = ",\n  ".join(
        f"CAST({x.merged(f'm_{x.name}', 'true')} AS DECIMAL(18,2)) AS m_{x.name}" if x.agg == "sum" else f"{x.merged(f'm_{x.name}', 'true')} AS m_{x.name}"
        for x in _measures(source)
    )
    files = ", ".join(sql_literal(paths[m]) for m in months)
    write_parquet_atomically(con, f"SELECT customer_id,\n  {cols}\nFROM read_parquet([{files}])\nGROUP BY customer_id ORDER BY customer_id", path)
    for old in folder.glob(f"{stem}_*.parquet"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _pieces_cte(source: str, generation: Path, plan: WindowPlan, months: Mapping[date, Path], merged: Mapping[frozenset[int], Path] | None = None) -> str:
    """`<source>_pieces`: per customer, the source's monthly measure values of the aggregated months and of the
    daily rows at the windows' edges, each flagged with the windows (in_w1/in_w3/in_w12) it counts in.

    Not joined to the spine: the snapshot has one as_of, and the final LEFT JOIN from the spine's customers
    drops anyone else (customers onboarded after as_of). `merged`: window set -> a stored merge of all the plan's
    months counting in exactly those windows (`merged_months_path`), read instead of those months one by one."""
    merged = merged or {}
    table, ts = EVENT_SOURCES[source]
    used = [x for x in _measures(source) if any(x is y for y, _ in source_measures(source))]
    flags = [f"in_w{k}" for k in WINDOWS]
    as_of = f"DATE {sql_literal(plan.as_of)} AS as_of"
    parts = []
    cols = ", ".join(f"m_{x.name}" for x in used)
    for ks, path in merged.items():
        group_flags = ", ".join(f"{'true' if k in ks else 'false'} AS in_w{k}" for k in WINDOWS)
        parts.append(f"  SELECT customer_id, {as_of}, {group_flags}, {cols}\n  FROM read_parquet({sql_literal(path)})")
    single = {m: ks for m, ks in plan.months.items() if ks not in merged}
    if single:
        files = ", ".join(sql_literal(months[m]) for m in single)
        month_flags = ", ".join(
            f"month IN ({', '.join(f'DATE {sql_literal(m)}' for m, ks in single.items() if k in ks) or 'NULL'}) AS in_w{k}" for k in WINDOWS
        )
        parts.append(f"  SELECT customer_id, {as_of}, {month_flags}, {cols}\n  FROM read_parquet([{files}])")
    ranges = plan.day_ranges
    if ranges:
        files = list(dict.fromkeys(f for lo, hi in ranges for f in staged_files(generation, table, lo, hi)))
        relation = f"read_parquet([{', '.join(sql_literal(f) for f in files)}])" if files else staged_relation(generation, table, *ranges[0])
        row_flags = ", ".join(f"{_in_ranges(ts, plan.days[k])} AS in_w{k}" for k in WINDOWS)
        cols = ", ".join(f"{_monthly_value(x)} AS m_{x.name}" for x in used)
        parts.append(
            f"  SELECT customer_id, {as_of}, {', '.join(flags)}, {cols}\n"
            f"  FROM (SELECT customer_id, {', '.join(event_rows(source))}, {row_flags}\n"
            f"        FROM {relation} WHERE {_in_ranges(ts, ranges)})\n"
            f"  GROUP BY customer_id, {', '.join(flags)}"
        )
    if not parts:  # no window day at all cannot happen (as_of is in every window); kept total for safety
        raise ValueError(f"no month or day covers the windows of {plan.as_of}")
    return f"{source}_pieces AS (\n" + "\n  UNION ALL BY NAME\n".join(parts) + "\n)"


def _merged_measures_cte(source: str) -> str:
    cols = [f"    {x.merged(f'm_{x.name}', f'in_w{k}')} AS m_{x.name}_w{k}" for x, k in source_measures(source)]
    return (
        f"{source}_measures AS (\n  SELECT customer_id, as_of,\n" + ",\n".join(cols) + f"\n  FROM {source}_pieces\n"
        f"  WHERE {' OR '.join(f'in_w{k}' for k in WINDOWS)}\n  GROUP BY customer_id, as_of\n)"
    )


@dataclass(frozen=True)
class IncrementalPlan:
    """The SQL of an incremental snapshot, and what it reads: months from the aggregates and day ranges, per source."""

    sql: str
    months: dict[str, list[date]]
    day_ranges: dict[str, list[tuple[date, date]]]


def snap_of(as_of: date) -> date:
    """The latest month end on or before `as_of` (`balance_month_end_sql`)."""
    return as_of if as_of == month_end(as_of) else month_start(as_of) - timedelta(days=1)


def balances_features_path(con: duckdb.DuckDBPyConnection, generation: Path, aggregates_dir: Path, snap: date) -> Path:
    """The balances features at month end `snap` (`balances_select`), stored once per snap with the identity of
    the staged files they were computed from: reused by every as_of of the month while those files are unchanged.
    The customers file is not among them (`balances_select` does not read it): it is restaged every night."""
    first = minus_months(snap, 12) + timedelta(days=1)
    files = staged_files(generation, "balances", first, snap)
    inputs = input_identity(generation, files)
    path = Path(aggregates_dir) / "balances" / f"{snap}.parquet"
    stamp = path.with_suffix(".json")
    try:
        if path.is_file() and json.loads(stamp.read_text()) == {"inputs": inputs, "signature": _balances_signature()}:
            return path
    except (OSError, ValueError):
        pass  # missing or unreadable: computed again
    path.parent.mkdir(parents=True, exist_ok=True)
    relations = staged_relations(generation, history_start(snap), snap)
    write_parquet_atomically(con, balances_select(relations, snap), path)
    tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"inputs": inputs, "signature": _balances_signature()}))
    os.replace(tmp, stamp)
    return path


def _balances_signature() -> str:
    from tagml.features.dictionary import FEATURES

    text = "\n".join(f"{f.name}|{f.sql}" for f in FEATURES if f.source == "balances") + balances_select(
        {"customers": "c", "balances": "b", "loans": "l"}, date(2000, 1, 31)
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def incremental_snapshot_plan(con: duckdb.DuckDBPyConnection, staged_dir: Path, as_of: date, aggregates_dir: Path) -> IncrementalPlan:
    """The snapshot for `as_of` from the fresh monthly aggregates plus the staged daily rows at the windows'
    edges (and of any month without a fresh aggregate), and the balances features stored for its month end
    (computed and stored first if missing or stale). Customers and loans as in the full query."""
    generation = current_generation(staged_dir)
    relations = staged_relations(generation, history_start(as_of), as_of)
    balances = f"read_parquet({sql_literal(balances_features_path(con, generation, aggregates_dir, snap_of(as_of)))})"
    ctes = base_ctes(relations, snapshot_spine_select(relations["customers"], as_of), as_of, as_of, balances=balances)
    months, ranges = {}, {}
    for source in EVENT_SOURCES:
        fresh = fresh_months(generation, aggregates_dir, source)
        plan = window_plan(as_of, set(fresh))
        merged = {ks: merged_months_path(con, aggregates_dir, source, group, fresh) for ks, group in month_groups(plan) if len(group) > 1}
        ctes += [_pieces_cte(source, generation, plan, fresh, merged), _merged_measures_cte(source), measure_features_cte(source)]
        months[source], ranges[source] = list(plan.months), plan.day_ranges
    return IncrementalPlan("WITH " + ",\n".join(ctes) + joined_select(), months, ranges)
