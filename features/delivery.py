"""Stage a delivery -- every contract table of one raw directory -- as one unit.

All tables are validated into a new *generation* directory, the cross-table rules run against the
delivered customers, and only then one atomic rename of a symlink (`<staged_dir>` ->
`.<staged_dir>.generations/<id>`) makes the new generation current. A crash at any point leaves the
previous generation current and complete; readers that resolve the link once (`current_generation`)
never mix two deliveries.
"""

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from tagml.core.settings import DEFAULT_TIMEZONE
from tagml.core.storage import quote, sql_literal, staged_files, staged_path, staged_period, staged_period_dir, staged_relation, write_parquet_by_period
from tagml.core.suppression import load_suppression
from tagml.features.contract import CUSTOMERS, PRODUCTS_TABLE, RAW_TABLES, TableSpec
from tagml.features.manifest import PERIOD_TABLES, PeriodSpec, RawInput, TableInputs, input_sha256, read_manifest, table_inputs, write_manifest
from tagml.features.raw import ContractError, RawSource, Violation, bank_today, locate_source, open_dated_source, open_source
from tagml.features.validation import (
    RATED_BY_PRODUCTS,
    DuckDBRunner,
    SqlRunner,
    StagedTable,
    ValidatedTable,
    known_key_violations,
    validate_source,
    write_staged,
)

T = TypeVar("T")
FILE_COLUMN = "__tagml_file"
REMOVED_CUSTOMERS = "removed_customers"

# The current generation and the one before it: a reader that resolved the old link just before a
# swap can finish reading it.
KEEP_GENERATIONS = 2
STALE_BUILD_SECONDS = 6 * 3600
SUPPRESSED_VIEW = "suppressed_customer_hashes"


@dataclass(frozen=True)
class StagedDelivery:
    """Every table of one delivery, staged together into `generation`."""

    delivery_date: date
    generation: Path
    tables: dict[str, StagedTable]
    suppressed_rows: dict[str, int] = field(default_factory=dict)  # table -> rows of erased customers dropped (counts only)
    # event table -> periods whose staged rows this delivery added or replaced (a whole-table delivery: the periods whose rows changed)
    changed_periods: dict[str, list[date]] = field(default_factory=dict)
    ingest: dict[str, "TableIngest"] = field(default_factory=dict)  # table -> what was validated, skipped, restated


@dataclass
class Suppressor:
    """Drops the rows of erased customers (tagml.core.suppression) from each delivered table before it is validated.

    The list is read on first use, which is inside the staging lock (`stage_generation`): an erasure that
    committed before the lock was taken is always seen. `register(hashes)` makes the hashes the engine's
    view `SUPPRESSED_VIEW`; the hash itself is computed in the engine's SQL, the same on DuckDB and Spark.
    """

    governance_db: Path | None
    runner: SqlRunner
    register: Callable[[list[str]], None]
    counts: dict[str, int] = field(default_factory=dict)
    _salt: str | None = None
    _loaded: bool = False

    def load(self) -> str | None:
        """The suppression salt (None: nobody erased), reading the list on first use."""
        return self._load()

    def _load(self) -> str | None:
        if not self._loaded:
            self._loaded = True
            suppression = load_suppression(self.governance_db) if self.governance_db is not None else None
            if suppression is not None:
                self.register(sorted(suppression.hashes))
                self._salt = suppression.salt
        return self._salt

    def apply(self, spec: TableSpec, source: RawSource | None) -> RawSource | None:
        if source is None or "customer_id" not in source.column_types or self._load() is None:
            return source
        # the salt is 64 hex characters (checked when read); a NULL id is kept for the not_null rule to report
        hashed = f"sha256({sql_literal(self._salt)} || TRY_CAST(customer_id AS VARCHAR))"
        keep = f"customer_id IS NULL OR {hashed} NOT IN (SELECT customer_hash FROM {SUPPRESSED_VIEW})"
        dropped = int(self.runner.rows(f"SELECT count(*) FROM {source.relation} WHERE NOT ({keep})")[0][0])
        self.counts[spec.name] = dropped
        if not dropped:
            return source
        view = f"unsuppressed_{spec.name}"
        self.runner.create_view(view, f"SELECT * FROM {source.relation} WHERE {keep}")
        return replace(source, relation=view)


def generations_dir(staged_dir: Path) -> Path:
    return staged_dir.parent / f".{staged_dir.name}.generations"


def current_generation(staged_dir: Path) -> Path:
    """The directory the staged tables are read from now.

    A reader that opens several staged tables should resolve this once and read every table from
    it: paths through `staged_dir` follow the link at each open, so a delivery swapped in between
    two opens would otherwise mix two deliveries.
    """
    return Path(staged_dir).resolve()


def _point(staged_dir: Path, generation: Path) -> None:
    """Make `staged_dir` a symlink to `generation` in one atomic rename."""
    link = staged_dir.parent / f".{staged_dir.name}.{uuid.uuid4().hex}.link"
    os.symlink(os.path.relpath(generation, staged_dir.parent), link, target_is_directory=True)
    try:
        os.replace(link, staged_dir)
    finally:
        if os.path.lexists(link):
            os.unlink(link)


def _complete_generations(gens: Path) -> list[Path]:
    return sorted(p for p in gens.iterdir() if p.is_dir() and not p.name.startswith(".")) if gens.exists() else []


def _new_generation_id() -> str:
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"


def _recover(staged_dir: Path) -> None:
    """Bring `staged_dir` to the generation layout (a symlink), whatever a crash left behind."""
    gens = generations_dir(staged_dir)
    if staged_dir.is_symlink():
        if staged_dir.exists():
            return
        staged_dir.unlink()  # a link to a generation someone deleted: fall back to the newest
    if staged_dir.is_dir():
        # tables staged before generations existed (or by `validate_and_stage` into a plain
        # directory): adopt them as the first generation
        gens.mkdir(parents=True, exist_ok=True)
        adopted = gens / _new_generation_id()
        os.rename(staged_dir, adopted)
        _point(staged_dir, adopted)
        return
    complete = _complete_generations(gens)
    if complete:  # a crash between adopting a plain directory and linking it
        _point(staged_dir, complete[-1])


def _prune(staged_dir: Path) -> None:
    gens = generations_dir(staged_dir)
    current = current_generation(staged_dir)
    complete = _complete_generations(gens)
    keep = {current, *complete[-KEEP_GENERATIONS:]}
    for old in complete:
        if old.resolve() not in {k.resolve() for k in keep}:
            shutil.rmtree(old, ignore_errors=True)
    now = time.time()
    for building in gens.glob(".building-*"):
        try:
            if now - building.stat().st_mtime > STALE_BUILD_SECONDS:
                shutil.rmtree(building, ignore_errors=True)
        except FileNotFoundError:
            pass


@dataclass(frozen=True)
class TableIngest:
    """What one delivery did to one table (counts and dates only: never a row)."""

    validated: tuple[str, ...] = ()  # raw files (relative to the raw directory) validated by this delivery
    skipped: int = 0  # raw files unchanged since the staged generation's manifest: neither validated nor staged again
    hashed: int = 0  # raw files whose sha256 was computed (the others matched the manifest's size and mtime_ns)
    restated: tuple[date, ...] = ()  # staged periods replaced on request (`restate=`)
    rows_new: int = 0  # rows written into new or replaced staged files
    carried: bool = False  # the whole staged table was carried over (hard links) unchanged


def stage_delivery(
    con: duckdb.DuckDBPyConnection,
    raw_dir: Path,
    staged_dir: Path,
    delivery_date: date | None = None,
    timezone: str = DEFAULT_TIMEZONE,
    governance_db: Path | None = None,
    *,
    restate: Iterable[date | str] = (),
    full: bool = False,
) -> StagedDelivery:
    """Validate what is new or changed in `raw_dir` and stage it with everything staged before, as one new generation, or change nothing.

    Only the raw files that are new or changed since the current generation's manifest are validated
    (`tagml.features.manifest`); unchanged staged files are hard-linked into the new generation. Event tables
    are staged by period; a dated file whose period is already staged with other content, or a new file for a
    staged period, is refused unless that period is listed in `restate` (then exactly that period is replaced).
    The known-customer rule runs for the new rows against the staged (or newly delivered) customers;
    violations of every table are reported together, and only when all is valid does one atomic rename make the
    new generation current, so what was staged before stays byte-identical on any failure. `delivery_date`
    (default: today in `timezone`) bounds every date. The rows of customers erased in the home of
    `governance_db` are dropped before validation (`Suppressor`). `full=True` re-hashes and re-validates every
    raw file (the staged periods no raw file delivers any more are kept).
    """
    delivery_date = delivery_date or bank_today(timezone)
    restate_periods = frozenset(_as_date(d) for d in restate)
    runner = DuckDBRunner(con)
    suppressor = Suppressor(governance_db, runner, lambda hashes: con.register(SUPPRESSED_VIEW, pa.table({"customer_hash": pa.array(hashes, pa.string())})))

    def build(building: Path, previous: Path | None) -> _Build:
        # read under the lock even if nothing new is validated: a suppression list without its salt is refused every night
        suppressor.load()
        job = _Incremental(con, runner, suppressor, Path(raw_dir), building, previous, read_manifest(previous), delivery_date, restate_periods, full)
        return job.run()

    generation, built = _build_and_publish(Path(staged_dir), build)
    staged = {name: replace(t, path=_published_path(Path(staged_dir), name, t.path)) for name, t in built.tables.items()}
    return StagedDelivery(delivery_date, generation, staged, suppressor.counts, built.changed_periods, built.ingest)


def _as_date(value: date | str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        raise ContractError([Violation("delivery", None, "restate", f"restate period {str(value)[:40]!r} is not a date (YYYY-MM-DD)")]) from None


def _published_path(staged_dir: Path, table: str, built: Path) -> Path:
    return staged_period_dir(staged_dir, table) if built.suffix != ".parquet" else staged_path(staged_dir, table)


@dataclass
class _Build:
    tables: dict[str, StagedTable]
    changed_periods: dict[str, list[date]]
    ingest: dict[str, TableIngest]


def _link(source: Path, target: Path) -> None:
    """`target` becomes another name of `source` (same inode): an unchanged staged file costs nothing per generation."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # a filesystem without hard links: a copy is slower but equally correct
        shutil.copy2(source, target)


def write_period_files(
    con: duckdb.DuckDBPyConnection, select_sql: str, period: PeriodSpec, target_dir: Path, columns: list[str]
) -> dict[date, tuple[int, str]]:
    """Write the query's rows as one `<period>.parquet` per period into `target_dir` (a generation being built);
    returns period -> (rows, order-independent hash of the rows)."""
    written = write_parquet_by_period(con, select_sql, period.staged_sql(), target_dir)
    return period_file_stats(con, list(written.values()), columns)


def period_file_stats(con: duckdb.DuckDBPyConnection, files: list[Path], columns: list[str]) -> dict[date, tuple[int, str]]:
    """period -> (rows, hash) of staged period files: the hash (a sum of row hashes) does not depend on row order."""
    if not files:
        return {}
    row = "struct_pack(" + ", ".join(quote(c) for c in columns) + ")"
    stats = con.execute(
        f"SELECT {FILE_COLUMN}, count(*), coalesce(sum(hash({row})), 0)::VARCHAR FROM read_parquet([{', '.join(sql_literal(f) for f in files)}], "
        f"filename = {sql_literal(FILE_COLUMN)}) GROUP BY 1"
    ).fetchall()
    found = {staged_period(Path(name)): (int(rows), digest) for name, rows, digest in stats}
    return {staged_period(f): found.get(staged_period(f), (0, "0")) for f in files}


@dataclass
class _Incremental:
    """One delivery's staging into the generation being built, table by table (customers and products first)."""

    con: duckdb.DuckDBPyConnection
    runner: DuckDBRunner
    suppressor: "Suppressor"
    raw_dir: Path
    building: Path
    previous: Path | None
    manifest: dict[str, Any] | None
    delivery_date: date
    restate: frozenset[date]
    full: bool
    tables: dict[str, StagedTable] = field(default_factory=dict)
    changed_periods: dict[str, list[date]] = field(default_factory=dict)
    ingest: dict[str, TableIngest] = field(default_factory=dict)
    inputs_out: dict[str, dict[str, Any]] = field(default_factory=dict)
    tables_out: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed_tables: set[str] = field(default_factory=set)
    restated_used: set[date] = field(default_factory=set)
    _removed: int | None = None

    def _previous_table(self, name: str) -> dict[str, Any] | None:
        return (self.manifest or {}).get("tables", {}).get(name)

    def _previous_input(self, relpath: str) -> dict[str, Any] | None:
        return (self.manifest or {}).get("inputs", {}).get(relpath)

    def _previous_files(self, name: str) -> dict[str, Path]:
        """Staged files of the table in the previous generation, generation-relative path -> file."""
        if self.previous is None:
            return {}
        return {f.relative_to(self.previous).as_posix(): f for f in staged_files(self.previous, name)}

    def run(self) -> _Build:
        violations: list[Violation] = []
        for spec in RAW_TABLES:  # customers (and products) first: the others are checked against them
            try:
                self._stage_table(spec)
            except ContractError as err:
                violations.extend(err.violations)
        if CUSTOMERS.name not in self.tables and violations:
            checked = ", ".join(s.name for s in RAW_TABLES if s.references_customers)
            violations.append(
                Violation(CUSTOMERS.name, None, "known_customer_not_checked", f"customers are invalid, so {checked} were not checked against them")
            )
        unused = sorted(self.restate - self.restated_used)
        if unused:
            days = ", ".join(d.isoformat() for d in unused)
            violations.append(Violation("delivery", None, "restate", f"restate lists {days}, but no delivered dated file of an event table is for that period"))
        if violations:
            raise ContractError(violations)
        write_manifest(self.building, {"delivery_date": self.delivery_date.isoformat(), "inputs": self.inputs_out, "tables": self.tables_out})
        return _Build(self.tables, self.changed_periods, self.ingest)

    # -- the three ways a table arrives -------------------------------------------------------------

    def _stage_table(self, spec: TableSpec) -> None:
        delivered = table_inputs(self.raw_dir, spec)
        if delivered is None:
            locate_source(spec, self.raw_dir)  # raises for a required table
            previous = self._previous_table(spec.name)
            if spec.name in PERIOD_TABLES and previous and previous.get("inputs_form") == "dated":
                return self._carry(spec, previous, TableIngest(carried=True))  # dated history stays staged when no new file came
            return self._stage_whole(spec, None, ())
        if delivered.form == "dated":
            return self._stage_dated(spec, delivered)
        hashes = self._hash_inputs(delivered)
        signature = sorted([item.relpath, digest] for item, (digest, _) in zip(delivered.inputs, hashes))
        previous = self._previous_table(spec.name)
        hashed = sum(1 for _, computed in hashes if computed)
        if not self.full and previous and previous.get("inputs_form") == "whole" and previous.get("signature") == signature and self._previous_files(spec.name):
            self._check_carried_keys(spec, previous)
            for item, (digest, _) in zip(delivered.inputs, hashes):
                self.inputs_out[item.relpath] = {**self._previous_input(item.relpath), "size": item.size, "mtime_ns": item.mtime_ns}
            return self._carry(spec, previous, TableIngest(skipped=len(delivered.inputs), hashed=hashed, carried=True))
        self._stage_whole(spec, delivered, hashes)

    def _hash_inputs(self, delivered: TableInputs) -> list[tuple[str, bool]]:
        return [input_sha256(item, self._previous_input(item.relpath), self.full) for item in delivered.inputs]

    def _carry(self, spec: TableSpec, previous: dict[str, Any], ingest: TableIngest) -> None:
        linked = []
        for relpath, source in self._previous_files(spec.name).items():
            _link(source, self.building / relpath)
            linked.append(self.building / relpath)
        if spec.name in PERIOD_TABLES:
            self._check_history(spec, linked)
            for relpath, entry in self.inputs_of(previous).items():
                self.inputs_out.setdefault(relpath, entry)
        self.tables_out[spec.name] = previous
        self.ingest[spec.name] = ingest
        self.tables[spec.name] = self._staged_table(spec, previous)
        if spec.name in PERIOD_TABLES:
            self.changed_periods[spec.name] = []

    def inputs_of(self, previous_table: dict[str, Any]) -> dict[str, Any]:
        """The previous manifest's raw inputs that staged this table (a dated table's history keeps its inputs' hashes)."""
        inputs = (self.manifest or {}).get("inputs", {})
        return {rel: inputs[rel] for rel in previous_table.get("inputs", []) if rel in inputs}

    def _staged_table(self, spec: TableSpec, entry: dict[str, Any]) -> StagedTable:
        path = staged_period_dir(self.building, spec.name) if entry["form"] == "period" else staged_path(self.building, spec.name)
        rows = sum(int(f["rows"]) for f in entry["files"].values())
        return StagedTable(spec.name, path, rows, entry["source"], tuple(entry["dropped_pii"]), tuple(entry["ignored_columns"]))

    def _known(self, name: str) -> str | None:
        staged = self.tables.get(name)
        return staged_relation(self.building, name) if staged is not None else None

    def _check_carried_keys(self, spec: TableSpec, previous: dict[str, Any]) -> None:
        """A snapshot table carried over is checked again against customers (products) that changed: its keys only.
        (Event tables' staged history is not re-checked: see docs/DATA_CONTRACT.md.)"""
        if spec.name in PERIOD_TABLES:
            return
        rechecked = (spec.references_customers and CUSTOMERS.name in self.changed_tables) or (
            spec.name in RATED_BY_PRODUCTS and PRODUCTS_TABLE.name in self.changed_tables
        )
        if rechecked and self._previous_files(spec.name):
            relation = staged_relation(self.previous, spec.name)
            customers = self._known(CUSTOMERS.name) if spec.references_customers else None
            products = self._known(PRODUCTS_TABLE.name) if spec.name in RATED_BY_PRODUCTS else None
            violations = known_key_violations(self.runner, spec, relation, customers, products)
            if violations:
                raise ContractError(violations)

    def _check_history(self, spec: TableSpec, linked: list[Path]) -> None:
        """Staged history kept by link is not validated again, but customers dropped from a new customers delivery must not
        orphan it: only then (rare: customers normally only grow) are the linked files scanned, for those customers only."""
        if not linked or not spec.references_customers or not self._removed_customers():
            return
        files = ", ".join(sql_literal(f) for f in linked)
        orphan = int(
            self.con.execute(f"SELECT count(*) FROM read_parquet([{files}]) WHERE customer_id IN (SELECT customer_id FROM {REMOVED_CUSTOMERS})").fetchone()[0]
        )
        if orphan:
            raise ContractError(
                [
                    Violation(
                        spec.name,
                        "customer_id",
                        "known_customer",
                        f"customer_id not in customers: the delivered customers drop customers whose staged {spec.name} history ({len(linked)} staged files) stays",
                        orphan,
                    )
                ]
            )

    def _removed_customers(self) -> int:
        """How many previously staged customers the newly delivered customers no longer have (temporary table `REMOVED_CUSTOMERS`)."""
        if self._removed is None:
            self._removed = 0
            old = staged_files(self.previous, CUSTOMERS.name) if self.previous is not None else []
            if CUSTOMERS.name in self.changed_tables and old and CUSTOMERS.name in self.tables:
                self.con.execute(
                    f"CREATE OR REPLACE TEMP TABLE {REMOVED_CUSTOMERS} AS SELECT customer_id FROM {staged_relation(self.previous, CUSTOMERS.name)} "
                    f"EXCEPT SELECT customer_id FROM {staged_relation(self.building, CUSTOMERS.name)}"
                )
                self._removed = int(self.con.execute(f"SELECT count(*) FROM {REMOVED_CUSTOMERS}").fetchone()[0])
        return self._removed

    def _stage_whole(self, spec: TableSpec, delivered: TableInputs | None, hashes: Any) -> None:
        """A table delivered whole (or an optional one not delivered): validated in full, and it replaces the staged table."""
        source = self.suppressor.apply(spec, open_source(self.con, spec, self.raw_dir) if delivered is not None else None)
        valid = validate_source(self.runner, spec, source, self.delivery_date, self._known(CUSTOMERS.name), self._known(PRODUCTS_TABLE.name))
        self.changed_tables.add(spec.name)
        inputs = [item.relpath for item in delivered.inputs] if delivered else []
        by_period = spec.name in PERIOD_TABLES and delivered is not None  # an absent optional table: one empty file keeps its columns
        if by_period:
            files, changed, rows_new = self._replace_periods(spec, valid)
        else:
            staged = write_staged(self.con, valid, staged_path(self.building, spec.name))
            # an event table no longer delivered at all is empty now: every period it had is a changed one
            gone = sorted(staged_period(f) for rel, f in self._previous_files(spec.name).items() if "/" in rel) if spec.name in PERIOD_TABLES else []
            files, changed, rows_new = {f"{spec.name}.parquet": {"rows": staged.rows, "hash": None}}, gone, staged.rows
        rows = sum(f["rows"] for f in files.values())
        for item, (digest, _) in zip(delivered.inputs if delivered else (), hashes):
            staged_names = sorted(files)
            self.inputs_out[item.relpath] = {
                "table": spec.name,
                "size": item.size,
                "mtime_ns": item.mtime_ns,
                "sha256": digest,
                "period": None,
                "rows": rows if len(inputs) == 1 else _parquet_rows(item.path),
                "staged": staged_names,
            }
        entry = {
            "form": "period" if by_period else "whole",
            "inputs_form": "whole" if delivered else "absent",
            "inputs": inputs,
            "signature": sorted([item.relpath, digest] for item, (digest, _) in zip(delivered.inputs, hashes)) if delivered else [],
            "source": valid.source,
            "dropped_pii": list(valid.dropped_pii),
            "ignored_columns": list(valid.ignored_columns),
            "files": files,
        }
        self.tables_out[spec.name] = entry
        self.ingest[spec.name] = TableIngest(validated=tuple(inputs), hashed=sum(1 for _, c in hashes if c), rows_new=rows_new)
        self.tables[spec.name] = self._staged_table(spec, entry)
        if spec.name in PERIOD_TABLES:
            self.changed_periods[spec.name] = changed

    def _replace_periods(self, spec: TableSpec, valid: ValidatedTable) -> tuple[dict[str, Any], list[date], int]:
        """A whole delivery of an event table, written by period: periods whose rows hash as before keep the previous
        generation's file (same inode); the changed ones are listed (compared by row hash, not just all)."""
        target = staged_period_dir(self.building, spec.name)
        stats = write_period_files(self.con, valid.select_sql, PERIOD_TABLES[spec.name], target, [c.name for c in spec.staged_columns])
        previous = self._previous_files(spec.name)
        # staged before manifests (or whole): no hashes to compare, so every period counts as changed
        changed, rows_new = self._keep_unchanged(spec, stats)
        files = {f"{spec.name}/{day.isoformat()}.parquet": {"rows": rows, "hash": digest} for day, (rows, digest) in stats.items()}
        removed = {staged_period(Path(rel)) for rel in previous if previous[rel].parent.name == spec.name} - set(stats)
        return files, sorted(set(changed) | removed), rows_new

    def _keep_unchanged(self, spec: TableSpec, stats: dict[date, tuple[int, str]]) -> tuple[list[date], int]:
        """Newly written period files whose rows hash as the previous generation's file of the period are replaced by
        a link to that file (same inode: readers and aggregates see it unchanged); returns the periods that did change
        (compared by row hash and count) and their rows."""
        previous = self._previous_files(spec.name)
        entries = (self._previous_table(spec.name) or {}).get("files", {})
        target = staged_period_dir(self.building, spec.name)
        changed, rows_new = [], 0
        for day, (rows, digest) in stats.items():
            relpath = f"{spec.name}/{day.isoformat()}.parquet"
            old = entries.get(relpath)
            if old is not None and relpath in previous and old.get("hash") == digest and old.get("rows") == rows:
                os.unlink(target / f"{day.isoformat()}.parquet")
                _link(previous[relpath], target / f"{day.isoformat()}.parquet")
            else:
                changed.append(day)
                rows_new += rows
        return changed, rows_new

    def _stage_dated(self, spec: TableSpec, delivered: TableInputs) -> None:
        """Dated files: the new and restated periods are validated together and written; every other staged period is linked."""
        period = PERIOD_TABLES[spec.name]
        previous = self._previous_files(spec.name)
        staged_periods = {staged_period(previous[rel]): rel for rel in previous if previous[rel].parent.name == spec.name}
        violations: list[Violation] = []
        fresh: list[RawInput] = []
        restated: list[date] = []
        skipped = hashed = 0
        previous_table = self._previous_table(spec.name) or {}
        carried_inputs = self.inputs_of(previous_table) if previous_table.get("inputs_form") == "dated" else {}
        for item in delivered.inputs:
            before = self._previous_input(item.relpath)
            digest, computed = input_sha256(item, before, self.full)
            hashed += computed
            assert item.period is not None
            is_staged = item.period in staged_periods
            same = before is not None and before.get("sha256") == digest and item.relpath in carried_inputs
            if item.period in self.restate:
                self.restated_used.add(item.period)
            if is_staged and same and not self.full and item.period not in self.restate:
                skipped += 1
                self.inputs_out[item.relpath] = {**before, "size": item.size, "mtime_ns": item.mtime_ns}
                continue
            if is_staged and not same and item.period not in self.restate:
                what = "was staged from a file with other content" if before is not None else "is already staged"
                violations.append(
                    Violation(
                        spec.name,
                        period.column,
                        "changed_delivery" if before is not None else "overlap",
                        f"{item.relpath}: period {item.period.isoformat()} {what}; to replace that period, stage again with "
                        f"restate=[{item.period.isoformat()}] (raw_delivery config `restate`)",
                    )
                )
                continue
            if is_staged and item.period in self.restate:
                restated.append(item.period)
            fresh.append(item)
            self.inputs_out[item.relpath] = {
                "table": spec.name,
                "size": item.size,
                "mtime_ns": item.mtime_ns,
                "sha256": digest,
                "period": item.period.isoformat(),
            }
        if violations:
            raise ContractError(violations)
        files = dict(previous_table.get("files", {})) if previous_table else {}
        replaced = {item.period for item in fresh}
        linked = []
        for day, rel in staged_periods.items():
            if day not in replaced:
                _link(previous[rel], self.building / rel)
                linked.append(self.building / rel)
                files.setdefault(rel, {"rows": _parquet_rows(previous[rel]), "hash": None})
            else:
                files.pop(rel, None)
        for rel, entry in carried_inputs.items():
            if entry.get("period") and date.fromisoformat(entry["period"]) not in replaced:
                self.inputs_out.setdefault(rel, entry)
        self._check_history(spec, linked)
        source_note = previous_table.get("source", f"{spec.name}/ (dated files)")
        dropped, ignored = previous_table.get("dropped_pii", []), previous_table.get("ignored_columns", [])
        rows_new = 0
        changed: list[date] = []
        stats: dict[date, tuple[int, str]] = {}
        if fresh:
            source = self.suppressor.apply(spec, open_dated_source(self.con, spec, fresh, period.raw_sql()))
            valid = validate_source(self.runner, spec, source, self.delivery_date, self._known(CUSTOMERS.name), self._known(PRODUCTS_TABLE.name))
            stats = write_period_files(self.con, valid.select_sql, period, staged_period_dir(self.building, spec.name), [c.name for c in spec.staged_columns])
            changed, rows_new = self._keep_unchanged(spec, stats)
            source_note = f"{self.raw_dir / spec.name} (dated files)"
            dropped = sorted(set(dropped) | set(valid.dropped_pii))
            ignored = sorted(set(ignored) | set(valid.ignored_columns))
            for day, (rows, digest) in stats.items():
                files[f"{spec.name}/{day.isoformat()}.parquet"] = {"rows": rows, "hash": digest}
        for item in fresh:
            rows = stats.get(item.period, (0, "0"))[0]
            self.inputs_out[item.relpath].update(rows=rows, staged=[f"{spec.name}/{item.period.isoformat()}.parquet"] if rows else [])
        entry = {
            "form": "period",
            "inputs_form": "dated",
            "inputs": sorted(rel for rel, e in self.inputs_out.items() if e.get("table") == spec.name),
            "signature": [],
            "source": source_note,
            "dropped_pii": list(dropped),
            "ignored_columns": list(ignored),
            "files": dict(sorted(files.items())),
        }
        self.tables_out[spec.name] = entry
        self.ingest[spec.name] = TableIngest(
            validated=tuple(item.relpath for item in fresh), skipped=skipped, hashed=hashed, restated=tuple(sorted(restated)), rows_new=rows_new
        )
        self.tables[spec.name] = self._staged_table(spec, entry)
        # a period restated (or re-validated by `full`) with the same rows is not a change; one whose file now has no row is
        changed_days = set(changed) | {d for d in replaced if d not in stats and d in staged_periods}
        self.changed_periods[spec.name] = sorted(changed_days)
        if changed_days:
            self.changed_tables.add(spec.name)


def _parquet_rows(path: Path) -> int | None:
    try:
        return int(pq.ParquetFile(path).metadata.num_rows)
    except (OSError, pa.ArrowException):  # a CSV part, or a file that is not Parquet: the count is informative only
        return None


def _build_and_publish(staged_dir: Path, build: Callable[[Path, Path | None], T]) -> tuple[Path, T]:
    """Under the staging lock: build a new generation (`build(building dir, previous generation or None)`), then make it
    current by the one symlink swap and prune old ones; on any error the building directory is removed and nothing changes."""
    gens = generations_dir(staged_dir)
    gens.mkdir(parents=True, exist_ok=True)
    with FileLock(str(gens / ".lock")):
        _recover(staged_dir)
        previous = current_generation(staged_dir) if staged_dir.exists() else None
        gen_id = _new_generation_id()
        building = gens / f".building-{gen_id}"
        building.mkdir()
        try:
            result = build(building, previous)
            generation = gens / gen_id
            os.rename(building, generation)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        # The one step that publishes the delivery: before it the old generation is current,
        # after it the new one; no reader ever sees part of each.
        _point(staged_dir, generation)
        _prune(staged_dir)
    return generation, result


def stage_generation(
    staged_dir: Path,
    delivery_date: date,
    validate: Callable[[TableSpec, Mapping[str, Path]], ValidatedTable],
    write: Callable[[ValidatedTable, Path], StagedTable],
) -> StagedDelivery:
    """Stage every contract table into a new generation of `staged_dir` and make it current, or raise and change nothing.

    This is the engine-neutral, non-incremental staging (Spark's): every table whole, validated in full.
    The engine comes in as two functions: `validate(spec, the tables staged so far: name -> file)` and
    `write(validated table, target file)`; everything else (the lock, the generation, the swap, which
    violations are reported together) is the same for every engine.
    """
    staged_dir = Path(staged_dir)
    # Spark stages every table whole, without a manifest: the next DuckDB delivery then validates everything once
    generation, tables = _build_and_publish(staged_dir, lambda building, _previous: _stage_into(building, validate, write))
    staged = {name: StagedTable(t.table, staged_path(staged_dir, name), t.rows, t.source, t.dropped_pii, t.ignored_columns) for name, t in tables.items()}
    return StagedDelivery(delivery_date, generation, staged)


def _stage_into(
    building: Path,
    validate: Callable[[TableSpec, Mapping[str, Path]], ValidatedTable],
    write: Callable[[ValidatedTable, Path], StagedTable],
) -> dict[str, StagedTable]:
    """Validate every table and write the valid ones into the generation being built; raise the
    violations of every table together if any."""
    violations: list[Violation] = []
    tables: dict[str, StagedTable] = {}
    for spec in RAW_TABLES:  # customers (and products) first: the others are checked against them
        try:
            valid = validate(spec, {name: t.path for name, t in tables.items()})
        except ContractError as err:
            violations.extend(err.violations)
            continue
        tables[spec.name] = write(valid, staged_path(building, spec.name))
    if CUSTOMERS.name not in tables and violations:
        checked = ", ".join(s.name for s in RAW_TABLES if s.references_customers)
        violations.append(Violation(CUSTOMERS.name, None, "known_customer_not_checked", f"customers are invalid, so {checked} were not checked against them"))
    if violations:
        raise ContractError(violations)
    return tables
