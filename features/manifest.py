"""What a delivery's raw files are, and the manifest of what each generation staged from them.

The raw directory is inventoried file by file (`raw_inputs`): an event table (transactions, digital_events,
balances) may be delivered as dated files, `<raw>/<table>/YYYY-MM-DD.parquet|csv`, one per period of its event
time (a day; for balances a month end); any other form (`<t>.parquet`, `<t>.csv`, a directory of non-dated
parts) is a *whole* delivery of the table. Each generation's `manifest.json` records every raw input (relative
path, size, mtime_ns, sha256, period, rows, staged files) and every staged table's files (rows and an
order-independent hash of their rows), so the next delivery validates only what is new or changed.

An input whose (size, mtime_ns) equal the manifest's is trusted to be unchanged and is not re-hashed (a file
rewritten in place within the same nanosecond with the same size would be missed: `full=True` re-hashes and
re-validates everything). The manifest holds counts and hashes only, never a row.
"""

import hashlib
import json
import os
import re
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from tagml.core.storage import file_identity
from tagml.features.contract import BALANCES, DIGITAL_EVENTS, HOLDINGS, TRANSACTIONS, TableSpec
from tagml.features.raw import contract_error

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
DATED_FILE = re.compile(r"^(\d{4}-\d{2}-\d{2})\.(parquet|csv)$")
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class PeriodSpec:
    """How an event table is cut into periods: the event-time column and whether a period is a day or a month end."""

    column: str
    month_end: bool = False

    def staged_sql(self) -> str:
        """The period of a staged (typed) row, in SQL."""
        return self.column if self.month_end else f"CAST({self.column} AS DATE)"

    def raw_sql(self) -> str:
        """The period of a raw (not yet typed) row; NULL when its value cannot be read (the type rule reports it)."""
        return f"TRY_CAST({self.column} AS DATE)" if self.month_end else f"CAST(TRY_CAST({self.column} AS TIMESTAMP) AS DATE)"

    def describe(self) -> str:
        return f"the month end of its {self.column}" if self.month_end else f"the day of its {self.column}"


# event tables staged by period (tagml.core.storage.staged_period_dir); every other table is staged whole
PERIOD_TABLES: dict[str, PeriodSpec] = {
    TRANSACTIONS.name: PeriodSpec("txn_ts"),
    DIGITAL_EVENTS.name: PeriodSpec("event_ts"),
    BALANCES.name: PeriodSpec("month_end", month_end=True),
    # month-end values like balances: delivered whole, a night would re-validate every month of history
    HOLDINGS.name: PeriodSpec("month_end", month_end=True),
}


def is_month_end(day: date) -> bool:
    return (day + timedelta(days=1)).day == 1


@dataclass(frozen=True)
class RawInput:
    """One raw file of a delivery."""

    table: str
    path: Path
    relpath: str  # relative to the raw directory: the manifest's key
    kind: str  # parquet | csv
    period: date | None  # a dated file's period; None for a part of a whole delivery
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class TableInputs:
    """A table's raw files: `dated` (one file per period) or `whole` (the files together are the table)."""

    spec: TableSpec
    form: str
    inputs: tuple[RawInput, ...]


def _input(raw_dir: Path, table: str, path: Path, kind: str, period: date | None) -> RawInput:
    return RawInput(table, path, path.relative_to(raw_dir).as_posix(), kind, period, *file_identity(path))


def table_inputs(raw_dir: Path, spec: TableSpec) -> TableInputs | None:
    """The raw files of `spec` in `raw_dir`, or None if the table was not delivered (the caller decides whether that is allowed)."""
    raw_dir = Path(raw_dir)
    single, csv_file, folder = raw_dir / f"{spec.name}.parquet", raw_dir / f"{spec.name}.csv", raw_dir / spec.name
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix in (".parquet", ".csv")) if folder.is_dir() else []
    dated = [p for p in files if DATED_FILE.match(p.name)]
    whole = single if single.is_file() else csv_file if csv_file.is_file() else None
    if dated:
        if spec.name not in PERIOD_TABLES:
            raise contract_error(
                spec,
                None,
                "delivered_whole",
                f"{folder} holds dated files, but {spec.name} is a snapshot table delivered whole ({spec.name}.parquet, .csv or parts)",
            )
        if whole is not None or len(dated) != len(files):
            raise contract_error(
                spec,
                None,
                "one_form",
                f"{spec.name} is delivered both as dated files in {folder} and as a whole table (a {whole or 'non-dated part'}): deliver one form",
            )
        inputs = []
        for path in dated:
            match = DATED_FILE.match(path.name)
            assert match is not None
            try:
                period = date.fromisoformat(match.group(1))
            except ValueError:
                raise contract_error(spec, None, "dated_file_name", f"{path.name}: {match.group(1)} is not a date") from None
            if PERIOD_TABLES[spec.name].month_end and not is_month_end(period):
                raise contract_error(spec, None, "dated_file_name", f"{path.name}: a {spec.name} file is named after a month end, and {period} is not one")
            if any(other.period == period for other in inputs):
                raise contract_error(
                    spec, None, "one_file_per_period", f"{folder} holds two files for {period} ({period}.parquet and {period}.csv): deliver one"
                )
            inputs.append(_input(raw_dir, spec.name, path, match.group(2), period))
        return TableInputs(spec, "dated", tuple(inputs))
    if whole is not None:
        return TableInputs(spec, "whole", (_input(raw_dir, spec.name, whole, whole.suffix[1:], None),))
    parts = [p for p in files if p.suffix == ".parquet"]
    if parts:
        return TableInputs(spec, "whole", tuple(_input(raw_dir, spec.name, p, "parquet", None) for p in parts))
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def input_sha256(item: RawInput, previous: dict[str, Any] | None, full: bool) -> tuple[str, bool]:
    """(sha256, whether it was computed now): the manifest's hash is reused when size and mtime_ns match, unless `full`."""
    if not full and previous and previous.get("size") == item.size and previous.get("mtime_ns") == item.mtime_ns and previous.get("sha256"):
        return previous["sha256"], False
    return file_sha256(item.path), True


def read_manifest(generation: Path | None) -> dict[str, Any] | None:
    """The generation's manifest, or None (no generation yet, or one staged before manifests or by Spark: then everything is new)."""
    if generation is None:
        return None
    path = Path(generation) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == MANIFEST_VERSION else None


def write_manifest(generation: Path, manifest: dict[str, Any]) -> None:
    """Written into the generation being built: it is published with the generation, by the same swap."""
    path = Path(generation) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps({"version": MANIFEST_VERSION, **manifest}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
