"""Opening stored Parquet files with an error that names the file and how to repair it.

A truncated or overwritten partition otherwise surfaces as a bare ArrowInvalid or DuckDB
"No magic bytes found" traceback far from the file that caused it.
"""

import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class CorruptFileError(RuntimeError):
    """A stored Parquet file is missing or unreadable. `remedy` says what rebuilds it."""

    def __init__(self, path: Path, remedy: str, reason: str):
        self.path = Path(path)
        self.remedy = remedy
        self.reason = reason
        super().__init__(f"{self.path} is not a readable Parquet file ({reason}); to repair it: {remedy}")


def check_parquet(path: Path, remedy: str) -> pq.FileMetaData:
    """Open `path`'s Parquet footer (cheap: no data pages are read) or raise `CorruptFileError`.

    A truncated file loses its footer, which is what this catches; damage inside a data page is
    found when the pages are read (callers re-check their inputs with this when a read fails).
    """
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(path, remedy, "the file does not exist")
    try:
        return pq.ParquetFile(path).metadata
    except (pa.ArrowException, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CorruptFileError(path, remedy, reason) from exc


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (a training snapshot's identity, an export's checksum)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
