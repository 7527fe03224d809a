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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import duckdb
import pyarrow as pa
from filelock import FileLock

from tagml.core.settings import DEFAULT_TIMEZONE
from tagml.core.storage import sql_literal, staged_path
from tagml.core.suppression import load_suppression
from tagml.features.contract import CUSTOMERS, PRODUCTS_TABLE, RAW_TABLES, TableSpec
from tagml.features.raw import ContractError, RawSource, Violation, bank_today, open_source
from tagml.features.validation import DuckDBRunner, SqlRunner, StagedTable, ValidatedTable, validate_source, write_staged

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


def stage_delivery(
    con: duckdb.DuckDBPyConnection,
    raw_dir: Path,
    staged_dir: Path,
    delivery_date: date | None = None,
    timezone: str = DEFAULT_TIMEZONE,
    governance_db: Path | None = None,
) -> StagedDelivery:
    """Validate every contract table of `raw_dir` and stage them all together, or none of them.

    Each table is validated and written into a new generation directory; the known-customer rule
    runs against the *delivered* customers; violations of every table are reported together. Only
    when all tables are valid does one atomic rename make the new generation current, so what was
    staged before stays byte-identical on any failure. `delivery_date` (default: today in
    `timezone`) bounds every date: nothing may happen after the data was delivered. The rows of customers
    erased in the home of `governance_db` are dropped before validation (`Suppressor`).
    """
    delivery_date = delivery_date or bank_today(timezone)
    runner = DuckDBRunner(con)
    suppressor = Suppressor(governance_db, runner, lambda hashes: con.register(SUPPRESSED_VIEW, pa.table({"customer_hash": pa.array(hashes, pa.string())})))

    def validate(spec: TableSpec, staged: Mapping[str, Path]) -> ValidatedTable:
        known = {name: f"read_parquet({sql_literal(path)})" for name, path in staged.items()}
        source = suppressor.apply(spec, open_source(con, spec, raw_dir))
        return validate_source(runner, spec, source, delivery_date, known.get(CUSTOMERS.name), known.get(PRODUCTS_TABLE.name))

    delivery = stage_generation(staged_dir, delivery_date, validate, lambda valid, target: write_staged(con, valid, target))
    return replace(delivery, suppressed_rows=suppressor.counts)


def stage_generation(
    staged_dir: Path,
    delivery_date: date,
    validate: Callable[[TableSpec, Mapping[str, Path]], ValidatedTable],
    write: Callable[[ValidatedTable, Path], StagedTable],
) -> StagedDelivery:
    """Stage every contract table into a new generation of `staged_dir` and make it current, or raise and change nothing.

    The engine comes in as two functions: `validate(spec, the tables staged so far: name -> file)` and
    `write(validated table, target file)`; everything else (the lock, the generation, the swap, which
    violations are reported together) is the same for every engine.
    """
    staged_dir = Path(staged_dir)
    gens = generations_dir(staged_dir)
    gens.mkdir(parents=True, exist_ok=True)
    with FileLock(str(gens / ".lock")):
        _recover(staged_dir)
        gen_id = _new_generation_id()
        building = gens / f".building-{gen_id}"
        building.mkdir()
        try:
            tables = _stage_into(building, validate, write)
            generation = gens / gen_id
            os.rename(building, generation)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        # The one step that publishes the delivery: before it the old generation is current,
        # after it the new one; no reader ever sees part of each.
        _point(staged_dir, generation)
        _prune(staged_dir)
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
