"""The embedded warehouse: DuckDB connections over Parquet files, atomic writes, and where each table lives."""

import fcntl
import glob
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import NamedTuple, Protocol

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

PARQUET_OPTIONS = "FORMAT PARQUET, COMPRESSION ZSTD, ROW_GROUP_SIZE 122880"
# DuckDB's own units (1000^i and 1024^i), in any case as DuckDB reads them ('4gib' is 4 GiB); anything
# else is refused before a connection is opened. Settings validate TAGML_DUCKDB_MEMORY_LIMIT with it too.
MEMORY_LIMIT = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*$", re.IGNORECASE)
PARTITION_FILE = "data.parquet"
STAGED_PERIOD_FILE = re.compile(r"^\d{4}-\d{2}-\d{2}\.parquet$")  # a staged period file's name: its period, ISO


class WarehouseConfigError(ValueError):
    """A connection setting (threads, memory limit) is not of the accepted form."""


def connect(threads: int = 2, memory_limit: str = "4GB", database: str | Path = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with deliberate thread and memory limits (the machine is shared).

    The limits usually come from the environment (TAGML_DUCKDB_MEMORY_LIMIT): they are checked
    here, for every caller, and reach DuckDB as bound parameters, never as SQL text.
    """
    if not isinstance(memory_limit, str) or not MEMORY_LIMIT.match(memory_limit.strip()):
        raise WarehouseConfigError(
            f"DuckDB memory limit {memory_limit!r} (TAGML_DUCKDB_MEMORY_LIMIT) is not a size such as '4GB' or '512MiB'"
            " (a number and one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )
    try:
        threads = int(threads)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1:
        raise WarehouseConfigError("DuckDB threads (TAGML_THREADS) must be a positive integer")
    con = duckdb.connect(str(database))
    try:
        con.execute("SET threads = ?", [threads])
        con.execute("SET memory_limit = ?", [memory_limit.strip()])
        con.execute("SET preserve_insertion_order = false")
    except BaseException:
        con.close()
        raise
    return con


class FileIdentity(NamedTuple):
    """What changes when a file is rewritten: size and mtime in nanoseconds (every write here swaps in a new file)."""

    size: int
    mtime_ns: int


def file_identity(path: Path | str) -> FileIdentity:
    """One definition of "the same file as before" for every cache and manifest keyed on an input file
    (drift's reference counts, the monthly aggregates, the raw delivery manifest): a content hash would
    read every byte of a 1M-customer partition each night to learn what the stat already says."""
    st = os.stat(path)
    return FileIdentity(st.st_size, st.st_mtime_ns)


def quote(identifier: str) -> str:
    """A DuckDB identifier: doubled double quotes inside double quotes."""
    return '"' + identifier.replace('"', '""') + '"'


def sql_literal(value: object) -> str:
    """A DuckDB string literal for our own text (paths, constants): quotes doubled.

    DuckDB string literals have no backslash escapes, so doubling `'` is the whole escaping; a NUL
    cannot appear in a path or constant we write. Values from data or users go in as parameters.
    """
    text = str(value)
    if "\x00" in text:
        raise ValueError("a NUL character cannot appear in an SQL literal")
    return "'" + text.replace("'", "''") + "'"


def glob_literal(directory: Path | str, pattern: str) -> str:
    """A DuckDB string literal for files matching `pattern` under `directory`.

    DuckDB expands `*`, `?` and `[...]` anywhere in a path, so the directory (a user's TAGML_HOME or
    raw directory, say `/data/tags [prod]`) is escaped and only `pattern` is a pattern. Its glob
    cannot match under a directory whose path has a backslash: refused with the directory named.
    """
    directory = str(directory)
    if "\\" in directory:
        raise WarehouseConfigError(f"DuckDB cannot read files by pattern under a directory with a backslash in its path: {directory}")
    return sql_literal(glob.escape(directory.rstrip("/")) + "/" + pattern)


def staged_path(staged_dir: Path, table: str) -> Path:
    """The validated (PII removed) raw table `table` in the staged directory, staged whole as one file.

    A table staged by period (`staged_files`: one file per day or month end) is a directory instead;
    read any staged table through `staged_files` / `staged_relation`, which know both forms.
    """
    return staged_dir / f"{table}.parquet"


def staged_period_dir(staged_dir: Path, table: str) -> Path:
    """The directory of a table staged by period: one `<YYYY-MM-DD>.parquet` per day (or month end) of its event time."""
    return staged_dir / table


def staged_period(path: Path) -> date:
    """The period (day or month end) a staged period file holds, from its name."""
    return date.fromisoformat(Path(path).stem)


def staged_files(staged_dir: Path, table: str, first: date | None = None, last: date | None = None) -> list[Path]:
    """The Parquet files of staged `table`, in period order: `[<table>.parquet]` for a table staged
    whole, else its period files whose period is within [`first`, `last`] (either bound optional).

    Selecting by file name is what lets a nightly read only the days it needs, whatever the history.
    """
    whole = staged_path(staged_dir, table)
    if whole.is_file():
        return [whole]
    periods = staged_period_dir(staged_dir, table)
    if not periods.is_dir():
        return []
    # names compared as text (ISO dates sort as dates): a nightly lists a few hundred files per table many times
    low, high = first.isoformat() if first else "", last.isoformat() if last else "9999-12-31"
    with os.scandir(periods) as entries:
        names = sorted(e.name for e in entries if STAGED_PERIOD_FILE.match(e.name))
    return [periods / name for name in names if low <= name[:10] <= high]


def latest_staged_files(staged_dir: Path, table: str, last: date) -> list[Path]:
    """What holds the rows of `table`'s latest period on or before `last`: its one period file when staged by period
    (a file holds exactly its period's rows, and a period with no row has no file), else the whole table's file."""
    files = staged_files(staged_dir, table)
    return files if files == [staged_path(staged_dir, table)] else staged_files(staged_dir, table, last=last)[-1:]


def staged_relation(staged_dir: Path, table: str, first: date | None = None, last: date | None = None) -> str:
    """`read_parquet([...])` over `staged_files(...)`: the files listed one by one (no DuckDB glob, so no
    pattern characters of the home's path are ever read as a pattern). A table with no file in the range
    is the table's first file filtered to no rows, so the relation keeps its columns."""
    files = staged_files(staged_dir, table, first, last)
    if files:
        return f"read_parquet([{', '.join(sql_literal(f) for f in files)}])"
    every = staged_files(staged_dir, table)
    if not every:
        raise FileNotFoundError(f"staged table {table} is missing from {staged_dir}: re-run the raw ingest (raw_ingest_job)")
    return f"(SELECT * FROM read_parquet({sql_literal(every[0])}) LIMIT 0)"


@dataclass(frozen=True)
class PartitionedTable:
    """A table stored as one Parquet file per as_of: `<root>/as_of=YYYY-MM-DD/data.parquet` (hive-style directories).

    Readers never use hive partitioning: every file carries its own `as_of` column.
    """

    root: Path

    def directory(self, as_of: date) -> Path:
        return Path(self.root) / f"as_of={as_of.isoformat()}"

    def path(self, as_of: date) -> Path:
        return self.directory(as_of) / PARTITION_FILE

    def files(self) -> list[Path]:
        return sorted(Path(self.root).glob(f"as_of=*/{PARTITION_FILE}"))

    def partitions(self) -> list[date]:
        """The as_of dates that have a partition file, oldest first."""
        return sorted(date.fromisoformat(p.parent.name.removeprefix("as_of=")) for p in self.files())

    def read_all_sql(self, union_by_name: bool = False) -> str:
        """A `read_parquet(...)` over every partition (union_by_name: partitions written with fewer columns)."""
        options = ", union_by_name = true" if union_by_name else ""
        return f"read_parquet({glob_literal(self.root, 'as_of=*/' + PARTITION_FILE)}{options}, hive_partitioning = false)"

    def read_sql(self, as_of: date) -> str:
        """A `read_parquet(...)` of one partition's file."""
        return f"read_parquet({sql_literal(self.path(as_of))})"


@dataclass(frozen=True)
class WarehouseLayout:
    """Where each table of the embedded warehouse lives under its directory (TAGML_WAREHOUSE_DIR)."""

    root: Path

    @property
    def staged_dir(self) -> Path:
        """Validated raw tables (PII removed), one Parquet file per contract table."""
        return Path(self.root) / "raw"

    @property
    def customer_features(self) -> PartitionedTable:
        return PartitionedTable(Path(self.root) / "customer_features")

    @property
    def customer_tags(self) -> PartitionedTable:
        return PartitionedTable(Path(self.root) / "customer_tags")

    @property
    def training_sets_dir(self) -> Path:
        return Path(self.root) / "training_sets"

    @property
    def aggregates_dir(self) -> Path:
        """Monthly aggregates of the staged event tables (per customer and month; `tagml.features.aggregates`).
        They hold customer ids: erasure rewrites them like every other Parquet store (store "monthly_aggregates")."""
        return Path(self.root) / "aggregates"


def _temporaries(target: Path) -> list[Path]:
    """Temporary files of `target`, also those named only by a lock file (the writer died before creating it).

    Names are matched exactly (`.<name>.<uuid hex>.tmp`): an engine's own scratch file beside ours is never touched.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{32}}\.(tmp|lock)")
    names = {m.group(0).removesuffix(".lock").removesuffix(".tmp") for p in target.parent.glob(f".{target.name}.*") if (m := pattern.fullmatch(p.name))}
    return sorted(target.parent / f"{name}.tmp" for name in names)


def _lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name.removesuffix(".tmp") + ".lock")


def _try_lock(path: Path, create: bool) -> int | None:
    """An fd holding an exclusive flock on `path` (the file the path names *now*), or None if held elsewhere or gone."""
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # a cleaner may have unlinked the lock file between our open and our flock: then we hold a
        # lock nobody else can see, so it protects nothing
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Delete the temporary files of `target` whose writer is dead, whatever their age.

    Every writer holds an flock on a `.lock` file beside its temporary file until it has swapped
    or removed it (`locked_temporary`); a lock we can take belongs to a writer that died (the kernel
    releases flocks with the process), so its temporary file is garbage. A live concurrent writer of
    the same partition keeps its lock and its file. Returns the removed temporary files.
    """
    removed = []
    for tmp in _temporaries(target):
        lock = _lock_path(tmp)
        fd = _try_lock(lock, create=False)
        if fd is None and lock.exists():
            continue  # a live writer
        # no lock file: its writer removes the temporary before the lock, so it is gone (or predates locks)
        try:
            if tmp.exists():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
            if fd is not None:
                lock.unlink(missing_ok=True)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


@contextmanager
def locked_temporary(target: Path) -> Iterator[Path]:
    """A temporary path beside `target`, locked as in use while the block runs, and removed after.

    Cleans up the temporaries of dead writers of the same target first. Whatever is left at the
    path when the block ends is deleted. Writers use `atomic_replace`, which also swaps it in.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    while True:
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        lock = _lock_path(tmp)
        fd = _try_lock(lock, create=True)
        if fd is not None:
            break
    try:
        yield tmp
    finally:
        try:
            tmp.unlink(missing_ok=True)  # before the lock: a temporary without its lock file is always garbage
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextmanager
def atomic_replace(target: Path) -> Iterator[Path]:
    """A unique, locked temporary path beside `target` (`locked_temporary`) that replaces `target` when the block succeeds.

    Readers see the old file or the new one, never half (`os.replace` is atomic on POSIX within one
    filesystem). If the block raises, the target is untouched and the temporary is removed; a writer
    killed mid-block leaves a temporary that the next writer of the same target removes.
    """
    with locked_temporary(target) as tmp:
        yield tmp
        os.replace(tmp, target)


def write_parquet_atomically(
    con: duckdb.DuckDBPyConnection,
    select_sql: str,
    target: Path,
    validate: Callable[[Path], None] | None = None,
    params: list | None = None,
) -> int:
    """Write the query's rows to `target` so that readers see the old file or the new one, never half.

    DuckDB writes to the temporary file of `atomic_replace`; `validate(tmp)` may inspect it and raise
    to abort; `params` bind the query's `?` placeholders. On any error the target is untouched.
    """
    with atomic_replace(target) as tmp:
        con.execute(f"COPY ({select_sql}) TO {sql_literal(tmp)} ({PARQUET_OPTIONS})", params or [])
        rows = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(tmp)})").fetchall()[0][0]
        if validate is not None:
            validate(tmp)
    return int(rows)


def write_parquet_by_period(con: duckdb.DuckDBPyConnection, select_sql: str, period_sql: str, target_dir: Path) -> dict[date, Path]:
    """Write the query's rows as one `<YYYY-MM-DD>.parquet` per value of `period_sql` (a DATE expression over the
    query's columns) into `target_dir`; returns period -> file written, in period order.

    One partitioned COPY into a scratch directory beside `target_dir`, then each period's file moved in by
    `os.replace` (a period DuckDB wrote in several pieces is merged first), so a reader of `target_dir` sees a
    period's old file or its new one, never half; the scratch directory is removed whatever happens. A period with
    no row gets no file. The period column exists only during the write, never in a written file.
    """
    target_dir = Path(target_dir)
    scratch = target_dir.parent / f".{target_dir.name}.{uuid.uuid4().hex}.periods"
    column = "__tagml_write_period"
    written: dict[date, Path] = {}
    try:
        con.execute(
            f"COPY (SELECT *, {period_sql} AS {column} FROM ({select_sql}) AS period_rows) TO {sql_literal(scratch)} "
            f"({PARQUET_OPTIONS}, PARTITION_BY ({column}))"
        )
        target_dir.mkdir(parents=True, exist_ok=True)
        for part in sorted(scratch.glob(f"{column}=*")) if scratch.is_dir() else []:
            period = date.fromisoformat(part.name.split("=", 1)[1])
            pieces = sorted(part.glob("*.parquet"))
            tmp = part / f".{period.isoformat()}.{uuid.uuid4().hex}.tmp"
            if len(pieces) == 1:
                os.rename(pieces[0], tmp)
            else:
                con.execute(f"COPY (SELECT * FROM read_parquet([{', '.join(sql_literal(p) for p in pieces)}])) TO {sql_literal(tmp)} ({PARQUET_OPTIONS})")
            target = target_dir / f"{period.isoformat()}.parquet"
            os.replace(tmp, target)
            written[period] = target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return written


def commit_parquet_parts(parts_dir: Path, target: Path, schema: pa.Schema | None = None) -> int:
    """Concatenate the part files an engine wrote under `parts_dir` (a Spark job's output directory) into
    `target`, atomically (`atomic_replace`), in part order; returns rows.

    Parts are streamed batch by batch, so memory stays at one row group. `schema` (e.g. the tag store's)
    is what the file must have: parts are cast to it and a part that cannot be cast fails the commit,
    leaving the target untouched. No part files (an engine that wrote nothing) is an error, not an empty file.
    """
    parts = sorted(Path(parts_dir).glob("part-*.parquet"))
    if not parts:
        raise WarehouseConfigError(f"no Parquet part files under {parts_dir}: the engine's write did not finish")
    rows = 0
    with atomic_replace(target) as tmp:
        first = pq.read_schema(parts[0])
        out_schema = schema if schema is not None else first
        with pq.ParquetWriter(tmp, out_schema, compression="zstd") as writer:
            for part in parts:
                for batch in pq.ParquetFile(part).iter_batches(batch_size=122_880):
                    table = pa.Table.from_batches([batch])
                    if table.schema != out_schema:
                        table = table.select(out_schema.names).cast(out_schema)
                    writer.write_table(table)
                    rows += table.num_rows
    return rows


def tag_store_views(tags: PartitionedTable) -> dict[str, str]:
    """The tag store's views, name -> query: the one definition for the warehouse's DuckDB file and a session.

    `customer_tags_current` selects the newest as_of when it is read, so a view published before the
    nightly partition was written still shows that partition.
    """
    return {
        "customer_tags_history": f"SELECT * FROM {tags.read_all_sql()}",
        "customer_tags_current": "SELECT * FROM customer_tags_history WHERE as_of = (SELECT max(as_of) FROM customer_tags_history)",
    }


def create_views(con: duckdb.DuckDBPyConnection, views: dict[str, str]) -> None:
    for name, query in views.items():
        con.execute(f"CREATE OR REPLACE VIEW {quote(name)} AS {query}")


def publish_views(duckdb_path: Path, warehouse_dir: Path) -> list[str]:
    """(Re)create views in the warehouse's DuckDB file over everything stored as Parquet, so that
    `duckdb <file>` answers SQL over raw tables, features and tags without copying them.

    Views are a convenience: if another process holds the file, they are left as they were.
    """
    layout = WarehouseLayout(Path(warehouse_dir))
    staged = layout.staged_dir
    tables = sorted({p.stem for p in staged.glob("*.parquet")} | {d.name for d in staged.glob("*") if d.is_dir() and staged_files(staged, d.name)})
    views = {f"raw_{t}": f"SELECT * FROM {staged_relation(staged, t)}" for t in tables}
    if layout.customer_features.files():
        views["customer_features"] = f"SELECT * FROM {layout.customer_features.read_all_sql()}"
    if layout.customer_tags.files():
        views.update(tag_store_views(layout.customer_tags))
    duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(duckdb_path))
    except duckdb.IOException:
        return []
    try:
        create_views(con, views)
    finally:
        con.close()
    return list(views)


class Warehouse(Protocol):
    """The seam where a warehouse plugs in: where its tables live, a connection to query them, and views for analysts.

    Domain code and Dagster assets take this interface; `EmbeddedWarehouse` (DuckDB over local Parquet)
    is the zero-setup implementation, and a bank's engine is another class with the same methods.
    """

    @property
    def layout(self) -> WarehouseLayout: ...

    def connect(self) -> duckdb.DuckDBPyConnection: ...

    def publish_views(self) -> list[str]: ...


@dataclass(frozen=True)
class EmbeddedWarehouse:
    """DuckDB over the Parquet files under `root`, with views in the DuckDB file at `duckdb_path`."""

    root: Path
    duckdb_path: Path
    threads: int = 2
    memory_limit: str = "4GB"

    @property
    def layout(self) -> WarehouseLayout:
        return WarehouseLayout(Path(self.root))

    def connect(self) -> duckdb.DuckDBPyConnection:
        return connect(self.threads, self.memory_limit)

    def publish_views(self) -> list[str]:
        return publish_views(Path(self.duckdb_path), Path(self.root))
