"""Erasure (PIPL Art. 47, GDPR Art. 17): remove customers from every store tagml writes, keep them out, and leave a receipt.

`erase` runs in this order, so that a failure before the rewrite changes nothing and a failure after it
leaves the customers suppressed (a re-run finishes the job):

1. find every Parquet file of the warehouse and drift directory holding the customers, and the
   registered model versions trained on a training snapshot that held them (before it is rewritten);
2. add the customers' salted hashes to the suppression list (tagml.core.suppression): from the
   commit on, no staging brings them back from the bank's raw directory;
3. holding the staging lock (no delivery is staged meanwhile), rewrite each file that holds them
   without their rows, atomically (readers see the old file or the new one); remove the Evidently
   reports of the partitions that held them and the drift reference profiles computed on populations
   that held them (both recomputed by the next `tag_drift`);
4. scan every store decoded (tagml.compliance.scan) and record the receipt in the governance store
   and as a JSON file: who, when, why, how many customers, per store files rewritten and rows removed,
   old and new hashes of rewritten training snapshots, the model versions trained on them, what the
   bank must erase itself, and the verification. No customer id is ever part of it.
"""

import json
import time
import uuid
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import duckdb
from filelock import FileLock

from tagml.compliance.scan import (
    AUDIENCE_EXPORTS,
    ONLINE_STORE,
    REQUESTS_DIR,
    UNVERIFIED_STORES,
    ScanResult,
    home_stores,
    parquet_hits,
    parquet_ids_found,
    parquet_match_sql,
    register_ids,
    scan_home,
    store_files,
    table_sql,
)
from tagml.core.files import file_sha256
from tagml.core.governance import GovernanceStore, Table, utc_now
from tagml.core.settings import Settings
from tagml.core.storage import PARTITION_FILE, WarehouseLayout, atomic_replace, connect, sql_literal, write_parquet_atomically
from tagml.core.suppression import SUPPRESSED, home_salt, suppress
from tagml.features.delivery import generations_dir

RECEIPTS_DIR = "erasures"
REWRITTEN_STORES = (
    "staged raw tables",
    "customer_features",
    "customer_tags",
    "training_sets",
    "own_features",
    "monthly_aggregates",
    "drift",
    "warehouse (other files)",
    AUDIENCE_EXPORTS,
)
ERASURES_DDL = (
    "CREATE TABLE IF NOT EXISTS erasures (erasure_id TEXT PRIMARY KEY, erased_at TEXT NOT NULL, requested_by TEXT NOT NULL, reason TEXT NOT NULL,"
    " customers INTEGER NOT NULL, customers_found INTEGER NOT NULL, rows_removed INTEGER NOT NULL, verified INTEGER NOT NULL, receipt_json TEXT NOT NULL)"
)
ERASURES = Table("erasures", (ERASURES_DDL,))


class ErasureRequestError(ValueError):
    """The erasure request itself is unusable (no ids, an empty id, no reason); nothing was changed."""


@dataclass
class StoreErasure:
    files_rewritten: int = 0
    rows_removed: int = 0
    files_removed: int = 0


@dataclass(frozen=True)
class ErasureReceipt:
    """What an erasure did, in counts: never a customer id."""

    erasure_id: str
    erased_at: str
    requested_by: str
    reason: str
    customers: int
    customers_found: int  # of the requested ids, how many had any row in tagml's stores
    stores: dict[str, StoreErasure]
    snapshots: list[dict[str, str]]  # training snapshots rewritten: path (home-relative), old and new sha256
    model_versions: list[str]  # registered versions trained on a snapshot that held the customers
    bank_actions: list[str]  # what tagml cannot erase: the bank's stores
    verification: dict[str, Any]
    seconds: float = 0.0
    receipt_path: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def rows_removed(self) -> int:
        # the online store's records are copies of customer_tags rows, counted there (its own count is in `stores`)
        return sum(s.rows_removed for name, s in self.stores.items() if name != ONLINE_STORE)

    @property
    def verified(self) -> bool:
        return bool(self.verification.get("verified"))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rows_removed"] = self.rows_removed
        return out


def requested_ids(customer_ids: Sequence[str]) -> list[str]:
    """The ids exactly as given (an id is data: quotes, newlines and unicode are kept), deduplicated; refuses none or an empty one."""
    ids = list(dict.fromkeys(customer_ids))
    if not ids:
        raise ErasureRequestError("no customer ids to erase: give at least one id (or a file of ids, one a line)")
    if any(not c or "\x00" in c for c in ids):
        raise ErasureRequestError(f"{sum(1 for c in ids if not c or chr(0) in c)} of the ids are empty or contain a NUL character; nothing was erased")
    return ids


def read_id_file(path: Path) -> list[str]:
    """A file of customer ids, one a line; blank lines skipped, nothing else changed (an id is data)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ErasureRequestError(f"no file of customer ids at {path}") from None
    return [line for line in text.splitlines() if line.strip()]


def request_file(settings: Settings, name: str) -> Path:
    """A request file of the erasure job: under `<governance dir>/erasure_requests/` (a relative name is taken from there)."""
    folder = (Path(settings.governance_db).parent / REQUESTS_DIR).resolve()
    path = (folder / name).resolve()
    if not path.is_relative_to(folder):
        raise ErasureRequestError(f"an erasure request file must be under {folder}; {path} is not")
    return path


def _rewritable_files(settings: Settings) -> list[tuple[str, Path]]:
    """The warehouse's and drift directory's Parquet files and the audience exports (Parquet or CSV), by store
    (temporaries and Spark parts left out)."""
    stores = [s for s in home_stores(settings) if s.name in REWRITTEN_STORES]
    out = []
    for store, path in store_files(stores):
        kinds = (".parquet", ".csv") if store.name == AUDIENCE_EXPORTS else (".parquet",)
        if path.suffix in kinds and not path.name.startswith(".") and ".parts" not in path.parent.name:
            out.append((store.name, path))
    return out


def _held(con: duckdb.DuckDBPyConnection, files: list[tuple[str, Path]]) -> dict[Path, tuple[str, int]]:
    """Each file that holds erased customers -> (store, rows)."""
    held = {}
    for store, path in files:
        rows = parquet_hits(con, path)
        if rows:
            held[path] = (store, rows)
    return held


def _customers_found(con: duckdb.DuckDBPyConnection, held: dict[Path, tuple[str, int]]) -> int:
    """How many of the requested ids have a row in any of the files (the ids stay in this function)."""
    found: set[str] = set()
    for path in held:
        found |= parquet_ids_found(con, path)
    return len(found)


def _trained_versions(client: Any, settings: Settings, snapshots: set[Path]) -> list[str]:
    """Registered versions whose training snapshot (`data_snapshot`) is one of `snapshots`."""
    if not snapshots:
        return []
    resolved = {p.resolve() for p in snapshots}
    found = []
    for mv in client.search_model_versions(max_results=10_000):
        stored = (mv.tags or {}).get("data_snapshot")
        if stored and settings.resolve_stored(stored).resolve() in resolved:
            found.append(f"{mv.name}/{mv.version}")
    return sorted(found)


def _rewrite(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """Rewrite one Parquet (or CSV audience) file without the erased customers' rows, atomically; returns rows removed."""
    match = parquet_match_sql(path)
    if match is None:
        return 0
    before = int(con.execute(f"SELECT count(*) FROM {table_sql(path)}").fetchall()[0][0])
    if path.suffix == ".csv":
        with atomic_replace(path) as tmp:
            con.execute(f"COPY (SELECT * FROM {table_sql(path)} WHERE NOT ({match})) TO {sql_literal(tmp)} (FORMAT CSV, HEADER)")
        after = int(con.execute(f"SELECT count(*) FROM {table_sql(path)}").fetchall()[0][0])
    else:
        after = write_parquet_atomically(con, f"SELECT * FROM {table_sql(path)} WHERE NOT ({match})", path)
    return before - after


def _remove_derived(settings: Settings, held: dict[Path, tuple[str, int]], stores: dict[str, StoreErasure]) -> None:
    """Evidently reports of partitions that held the customers, and drift profiles of populations that held them
    (their samples are rows without ids, so they are removed whole; the next tag_drift recomputes them)."""
    as_ofs = {p.parent.name.removeprefix("as_of=") for p, (store, _) in held.items() if store == "customer_tags" and p.name == PARTITION_FILE}
    reports = stores.setdefault("evidently reports", StoreErasure())
    for as_of in sorted(as_ofs):
        for report in sorted(Path(settings.reports_dir).glob(f"*/{as_of}.html")):
            report.unlink(missing_ok=True)
            reports.files_removed += 1
    populations = {str(p.resolve()) for p in held}
    drift = stores.setdefault("drift", StoreErasure())
    for profile in sorted(Path(settings.drift_dir).rglob("profile.json")):
        try:
            population = json.loads(profile.read_text()).get("key", {}).get("population")
        except (OSError, ValueError):
            population = None
        if population and str(Path(population).resolve()) in populations:
            for cached in (profile.with_name("sample.parquet"), profile):
                if cached.exists():
                    cached.unlink()
                    drift.files_removed += 1


def _erase_online(settings: Settings, ids: Sequence[str]) -> StoreErasure:
    """The online tag store without the customers (its rows are one per customer: rows_removed counts customers)."""
    from tagml.scoring.online import open_online_store

    online = open_online_store(settings.online_store)
    try:
        removed = online.erase(ids)
    finally:
        online.close()
    return StoreErasure(files_rewritten=1 if removed and settings.online_store_path is not None else 0, rows_removed=removed)


def _bank_actions(settings: Settings, scan: ScanResult) -> list[str]:
    actions = []
    raw_hits = scan.hits.get("raw delivery", 0)
    if raw_hits:
        actions.append(
            f"the raw delivery directory ({settings.raw_dir}) still holds the customers ({raw_hits} rows/occurrences in "
            f"{len(scan.files_with_hits.get('raw delivery', []))} files): delete them at the source; staging drops them meanwhile"
        )
    actions += _own_table_actions(settings)
    exports = _export_count(settings)
    actions.append(
        f"{exports} export(s) recorded in the governance store went to systems outside tagml: erase the customers there"
        if exports
        else "no export is recorded in the governance store; files exported earlier by hand (tagml export) are outside tagml: erase the customers there"
    )
    return actions


def _own_table_actions(settings: Settings) -> list[str]:
    """The bank's own tables (and labels files) of bring-your-own tags: tagml reads them at every snapshot, so only the bank can erase there."""
    from tagml.scoring.sources import own_tags
    from tagml.training.catalog import load_catalog

    actions = []
    for tag in own_tags(load_catalog(settings.catalog_path)):
        source = tag.label.feature_source
        files = ", ".join(p for p in (source.path, source.labels_path) if p)
        actions.append(f"tag {tag.name} reads the bank's own table(s) {files}: erase the customers there before the next own_features snapshot re-reads them")
    return actions


def _export_count(settings: Settings) -> int:
    """Exports and audience exports recorded in the governance store (`exports`, `audiences`): files handed to other systems
    (tagml rewrites its own copies of audience files; what a CRM downloaded is out of its reach)."""
    import sqlite3

    if not Path(settings.governance_db).exists():
        return 0
    con = sqlite3.connect(f"{Path(settings.governance_db).resolve().as_uri()}?mode=ro", uri=True)
    try:
        present = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name IN ('exports', 'audiences')").fetchall()}
        # table names are our two constants above, never data
        return sum(int(con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]) for table in sorted(present))
    finally:
        con.close()


def _verification(scan: ScanResult) -> dict[str, Any]:
    tagml_stores = {s: n for s, n in scan.hits.items() if s not in UNVERIFIED_STORES}
    return {
        "verified": scan.tagml_hits() == 0,
        "stores_scanned": len(tagml_stores),
        "files_scanned": sum(n for s, n in scan.files.items() if s not in UNVERIFIED_STORES),
        "hits": tagml_stores,
        "stores_with_hits": sorted(s for s, n in tagml_stores.items() if n),
    }


def _record(settings: Settings, receipt: ErasureReceipt) -> ErasureReceipt:
    """The receipt as a JSON file under the governance directory and a row of the `erasures` table."""
    path = Path(settings.governance_db).parent / RECEIPTS_DIR / f"{receipt.erasure_id}.json"
    receipt = replace(receipt, receipt_path=str(path))
    payload = json.dumps(receipt.to_dict(), indent=2, sort_keys=True)
    with atomic_replace(path) as tmp:
        tmp.write_text(payload + "\n")
        tmp.chmod(0o600)
    with GovernanceStore(settings.governance_db).transaction(ERASURES) as con:
        con.execute(
            "INSERT INTO erasures VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                receipt.erasure_id,
                receipt.erased_at,
                receipt.requested_by,
                receipt.reason,
                receipt.customers,
                receipt.customers_found,
                receipt.rows_removed,
                int(receipt.verified),
                payload,
            ),
        )
    return receipt


def erase(settings: Settings, customer_ids: Sequence[str], requested_by: str, reason: str, client: Any | None = None) -> ErasureReceipt:
    """Remove the customers from every store tagml writes, suppress them at staging, verify and record a receipt.

    `client` is the MLflow client asked which versions were trained on the customers (default: the home's store).
    Unknown ids are not an error: the receipt says how many were found (0 rows for the others).
    """
    ids = requested_ids(customer_ids)
    if not reason.strip() or not requested_by.strip():
        raise ErasureRequestError("an erasure needs who asked for it and a reason (--by, --reason): both are part of the receipt")
    started = time.perf_counter()
    erasure_id = f"erasure-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    when = utc_now()
    stores: dict[str, StoreErasure] = {s: StoreErasure() for s in (*REWRITTEN_STORES, "evidently reports")}
    staged_lock = generations_dir(WarehouseLayout(settings.warehouse_dir).staged_dir) / ".lock"
    staged_lock.parent.mkdir(parents=True, exist_ok=True)
    with closing(connect(settings.threads, settings.duckdb_memory_limit)) as con:
        register_ids(con, ids)
        held = _held(con, _rewritable_files(settings))
        found = _customers_found(con, held)
        snapshots = {p for p, (store, _) in held.items() if store == "training_sets"}
        if client is None and snapshots:
            from tagml.training.tracking import connect_tracking

            client = connect_tracking(settings.mlflow_tracking_uri)
        versions = _trained_versions(client, settings, snapshots)
        old_hashes = {p: file_sha256(p) for p in snapshots}
        salt = home_salt(settings.governance_db)
        with GovernanceStore(settings.governance_db).transaction(SUPPRESSED) as gcon:
            suppress(gcon, salt, ids, erasure_id, when)
        with FileLock(str(staged_lock)):
            # looked for again under the lock (a delivery staged meanwhile); a scoring run that read a file before it
            # was rewritten may write the customers back: one more pass catches it
            for _ in range(2):
                again = _held(con, _rewritable_files(settings))
                for path, (store, _rows) in again.items():
                    stores[store].files_rewritten += 1
                    stores[store].rows_removed += _rewrite(con, path)
            _remove_derived(settings, held, stores)
            stores[ONLINE_STORE] = _erase_online(settings, ids)
        scan = scan_home(settings, ids, con)
    receipt = ErasureReceipt(
        erasure_id=erasure_id,
        erased_at=when,
        requested_by=requested_by.strip(),
        reason=reason.strip(),
        customers=len(ids),
        customers_found=found,
        stores=stores,
        snapshots=[{"path": settings.stored_path(p), "sha256_before": old_hashes[p], "sha256_after": file_sha256(p)} for p in sorted(snapshots)],
        model_versions=versions,
        bank_actions=_bank_actions(settings, scan),
        verification=_verification(scan),
        seconds=round(time.perf_counter() - started, 2),
        notes=[] if versions else ["no registered model version was trained on these customers"],
    )
    return _record(settings, receipt)
