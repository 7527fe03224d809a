"""Exports with a purpose: only published tags, confidential ones only when asked, only customers who
consented to the purpose; each decision recorded in the governance store and in a manifest beside the file.

The record holds counts, never customer ids. The file is written atomically; the record and the
manifest exist only when the file does (a failure after the file was placed removes it again).
"""

import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

import duckdb

from tagml.compliance import lifecycle
from tagml.compliance.consent import check_purpose, exclusions_sql, needs_consent
from tagml.core.files import file_sha256
from tagml.core.governance import GovernanceStore, Table, utc_now
from tagml.core.settings import Settings
from tagml.core.storage import WarehouseLayout, atomic_replace, sql_literal
from tagml.scoring.store import ParquetTagStore, TagStore
from tagml.training.catalog import Catalog, load_catalog

# sensitivities that stay out of an export unless it is asked for explicitly (--include-confidential)
CONFIDENTIAL = ("confidential", "restricted")
AUDIENCE_TABLE = "tagml_export_audience"  # a temporary table of the export's connection

EXPORTS = Table(
    "exports",
    ddl=(
        (
            "CREATE TABLE IF NOT EXISTS exports (export_id TEXT PRIMARY KEY, at TEXT NOT NULL, by TEXT NOT NULL, as_of TEXT NOT NULL, "
            "purpose TEXT NOT NULL, tags TEXT NOT NULL, rows INTEGER NOT NULL, customers INTEGER NOT NULL, excluded TEXT NOT NULL, "
            "confidential_included INTEGER NOT NULL, left_out TEXT NOT NULL, format TEXT NOT NULL, out TEXT NOT NULL, sha256 TEXT NOT NULL)"
        ),
    ),
)


class ExportError(ValueError):
    """An export that cannot be made as asked (an unknown tag, nothing left to export)."""


@dataclass(frozen=True)
class ExportSources:
    """What an export reads: the tag store, the staged consents, the catalog and the governance store."""

    store: TagStore
    staged_dir: Path
    catalog: Catalog
    governance: GovernanceStore

    @classmethod
    def from_settings(cls, settings: Settings) -> "ExportSources":
        return cls(
            ParquetTagStore.in_warehouse(settings.warehouse_dir),
            WarehouseLayout(settings.warehouse_dir).staged_dir,
            load_catalog(settings.catalog_path),
            GovernanceStore(settings.governance_db),
        )


@dataclass(frozen=True)
class ExportRecord:
    """What one export wrote and left out, as recorded (counts only)."""

    export_id: str
    at: str
    by: str
    as_of: str
    purpose: str
    tags: list[str]
    rows: int
    customers: int
    excluded: dict[str, int]  # customers left out per reason (no_consent, withdrawn)
    confidential_included: bool
    left_out: dict[str, str]  # tag -> why it is not in the file (its status, confidential, not scored)
    format: str
    out: str
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".manifest.json")


def choose_tags(sources: ExportSources, present: Sequence[str], asked: Sequence[str] | None, include_confidential: bool) -> tuple[list[str], dict[str, str]]:
    """The tags to export and, for every other asked (or present) tag, why it is left out."""
    known = {t.name: t for t in sources.catalog.tags}
    unknown = [t for t in asked or () if t not in known]
    if unknown:
        raise ExportError(f"unknown tags {unknown} for the export; the catalog has: {', '.join(known)}")
    status = lifecycle.statuses(sources.governance, sources.catalog)
    chosen, left_out = [], {}
    for name in dict.fromkeys(asked) if asked else sorted(set(present)):  # a tag asked twice is exported once
        if name not in known:
            left_out[name] = "not in the catalog"
        elif name not in present:
            left_out[name] = "not in the partition"
        elif status[name].status != lifecycle.PUBLISHED:
            left_out[name] = status[name].label
        elif known[name].sensitivity in CONFIDENTIAL and not include_confidential:
            left_out[name] = f"{known[name].sensitivity} (needs --include-confidential)"
        else:
            chosen.append(name)
    return chosen, left_out


def _audience(con: duckdb.DuckDBPyConnection, sources: ExportSources, partition_sql: str, tags: list[str], purpose: str, as_of: date) -> dict[str, int]:
    """Fill the audience table (customer_id, excluded_because) of the export's customers; the counts per exclusion reason."""
    customers = f"SELECT customer_id FROM {partition_sql} WHERE list_contains({_literal_list(tags)}, tag)"
    con.execute(f"CREATE OR REPLACE TEMP TABLE {AUDIENCE_TABLE} AS {exclusions_sql(customers, sources.staged_dir, purpose, as_of)}")
    rows = con.execute(f"SELECT excluded_because, count(*) FROM {AUDIENCE_TABLE} WHERE excluded_because IS NOT NULL GROUP BY 1 ORDER BY 1").fetchall()
    return {reason: int(n) for reason, n in rows}


def _literal_list(names: list[str]) -> str:
    return "[" + ", ".join(sql_literal(n) for n in names) + "]"


def export_tags(
    con: duckdb.DuckDBPyConnection,
    sources: ExportSources,
    *,
    purpose: str,
    out: Path,
    by: str,
    as_of: date | None = None,
    fmt: str = "parquet",
    tags: Sequence[str] | None = None,
    include_confidential: bool = False,
) -> ExportRecord:
    """Export the published tags of the partition on or before `as_of` for `purpose`, and record the decision."""
    check_purpose(purpose)
    if not by or not by.strip():
        raise ExportError("an export records who made it: a name (--by) is required")
    partition = sources.store.latest_on_or_before(as_of)
    partition_sql = sources.store.read_sql(partition)
    present = [row[0] for row in con.execute(f"SELECT DISTINCT tag FROM {partition_sql} ORDER BY 1").fetchall()]
    chosen, left_out = choose_tags(sources, present, tags, include_confidential)
    if not chosen:
        raise ExportError(f"nothing to export for {purpose} from the partition of {partition}: " + "; ".join(f"{t}: {why}" for t, why in left_out.items()))
    excluded = _audience(con, sources, partition_sql, chosen, purpose, partition) if needs_consent(purpose) else {}
    allowed = f"SELECT customer_id FROM {AUDIENCE_TABLE} WHERE excluded_because IS NULL" if needs_consent(purpose) else None
    out = Path(out)
    digest: list[str] = []
    written = False
    try:
        with sources.governance.transaction(EXPORTS) as db:
            rows = sources.store.export(con, partition, fmt, out, tags=chosen, customers=allowed, before_publish=lambda tmp: digest.append(file_sha256(tmp)))
            written = True
            customers = con.execute(
                f"SELECT count(DISTINCT customer_id) FROM {partition_sql} WHERE list_contains({_literal_list(chosen)}, tag)"
                + (f" AND customer_id IN ({allowed})" if allowed else "")
            ).fetchall()[0][0]
            record = ExportRecord(
                export_id=uuid.uuid4().hex,
                at=utc_now(),
                by=by,
                as_of=partition.isoformat(),
                purpose=purpose,
                tags=chosen,
                rows=int(rows),
                customers=int(customers),
                excluded=excluded,
                confidential_included=include_confidential,
                left_out=left_out,
                format=fmt,
                out=str(out.resolve()),
                sha256=digest[-1],
            )
            with atomic_replace(manifest_path(out)) as tmp:
                tmp.write_text(json.dumps(record.as_dict(), indent=2, ensure_ascii=False))
            values = {**record.as_dict(), "tags": json.dumps(chosen), "excluded": json.dumps(excluded), "left_out": json.dumps(left_out)}
            db.execute(f"INSERT INTO exports ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})", list(values.values()))
    except BaseException:
        if written:  # the file must not outlive a decision that was not recorded
            out.unlink(missing_ok=True)
            manifest_path(out).unlink(missing_ok=True)
        raise
    return record


def recorded_exports(governance: GovernanceStore, limit: int = 20) -> list[dict[str, Any]]:
    """The newest export records, newest first."""
    if not governance.path.exists():
        return []
    with governance.read(EXPORTS) as db:
        cursor = db.execute("SELECT * FROM exports ORDER BY at DESC, rowid DESC LIMIT ?", [limit])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
