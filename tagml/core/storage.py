"""The embedded warehouse: DuckDB connections over Parquet files, and atomic Parquet writes."""

import fcntl
import glob
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path

import duckdb

PARQUET_OPTIONS = "FORMAT PARQUET, COMPRESSION ZSTD, ROW_GROUP_SIZE 122880"
# DuckDB's own units (1000^i and 1024^i); anything else is refused before a connection is opened
MEMORY_LIMIT = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


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


def staged_dir_of(warehouse_dir: Path) -> Path:
    """Where validated raw tables (PII removed) live inside the warehouse."""
    return Path(warehouse_dir) / "raw"


def staged_path(staged_dir: Path, table: str) -> Path:
    return staged_dir / f"{table}.parquet"


def features_path(warehouse_dir: Path, as_of: date) -> Path:
    """The customer_features snapshot for one as_of (hive-style partition directory)."""
    return Path(warehouse_dir) / "customer_features" / f"as_of={as_of.isoformat()}" / "data.parquet"


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

    Cleans up the temporaries of dead writers of the same target first. The caller writes the path
    and `os.replace`s it onto the target; whatever is left at the path when the block ends is deleted.
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


def write_parquet_atomically(
    con: duckdb.DuckDBPyConnection,
    select_sql: str,
    target: Path,
    validate: Callable[[Path], None] | None = None,
    params: list | None = None,
) -> int:
    """Write the query's rows to `target` so that readers see the old file or the new one, never half.

    DuckDB writes to a locked temporary file beside the target (`locked_temporary`); `validate(tmp)`
    may inspect it and raise to abort; `params` bind the query's `?` placeholders; `os.replace` then
    swaps it in (atomic on POSIX within one filesystem). On any error the temporary file is removed
    and the target is untouched.
    """
    with locked_temporary(target) as tmp:
        con.execute(f"COPY ({select_sql}) TO {sql_literal(tmp)} ({PARQUET_OPTIONS})", params or [])
        rows = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(tmp)})").fetchall()[0][0]
        if validate is not None:
            validate(tmp)
        os.replace(tmp, target)
    return int(rows)


def publish_views(duckdb_path: Path, warehouse_dir: Path) -> list[str]:
    """(Re)create views in the warehouse's DuckDB file over everything stored as Parquet, so that
    `duckdb <file>` answers SQL over raw tables, features and tags without copying them.

    Views are a convenience: if another process holds the file, they are left as they were.
    """
    warehouse_dir = Path(warehouse_dir)
    views: list[tuple[str, str]] = [(f"raw_{p.stem}", sql_literal(p)) for p in sorted(staged_dir_of(warehouse_dir).glob("*.parquet"))]
    for name in ("customer_features", "customer_tags"):
        if any((warehouse_dir / name).glob("as_of=*/data.parquet")):
            views.append((name if name == "customer_features" else "customer_tags_history", glob_literal(warehouse_dir / name, "as_of=*/data.parquet")))
    duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(duckdb_path))
    except duckdb.IOException:
        return []
    try:
        for name, path in views:
            con.execute(f"CREATE OR REPLACE VIEW {quote(name)} AS SELECT * FROM read_parquet({path}, hive_partitioning = false)")
        if any(n == "customer_tags_history" for n, _ in views):
            con.execute(
                "CREATE OR REPLACE VIEW customer_tags_current AS SELECT * FROM customer_tags_history "
                "WHERE as_of = (SELECT max(as_of) FROM customer_tags_history)"
            )
    finally:
        con.close()
    return [n for n, _ in views]
