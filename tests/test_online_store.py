"""The embedded online tag store: the same answers as the Parquet lookup, an atomic swap under concurrent reads,
failures that keep the old store, erasure, and the online_tags asset (including a backfill of an older partition)."""

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import date

import dagster as dg
import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tagml.compliance.erasure import erase
from tagml.compliance.scan import ONLINE_STORE
from tagml.core.settings import Settings
from tagml.core.storage import PARQUET_OPTIONS, sql_literal
from tagml.orchestration.partitions import as_of_partitions
from tagml.orchestration.resources import WarehouseResource
from tagml.orchestration.serving_assets import OnlineStoreResource, build_online_tags_asset
from tagml.scoring.lookup import TAG_FIELDS, customer_tags
from tagml.scoring.online import OnlineStoreError, SQLiteOnlineStore, open_online_store, quality_report
from tagml.scoring.store import ParquetTagStore, TagStoreError
from tagml.scoring.synthetic import synthetic_partition_sql, write_synthetic_partition
from tagml.training.catalog import load_catalog

CATALOG = load_catalog()
OCT, NOV = date(2026, 10, 31), date(2026, 11, 30)
HOSTILE = ["O'Brien\"; DROP TABLE customers; --", "客户 ünïcødé 🙂", "x" * 5000, "%_\\*?"]


def _partition(con, store: ParquetTagStore, as_of: date, customers: int, seed: int = 0, hand_made: bool = False) -> None:
    """A synthetic partition; `hand_made`: with hostile ids, NULL values and probabilities, empty reason lists,
    observed values and an expired suitability assessment."""
    path = store.partition_path(as_of)
    if not hand_made:
        write_synthetic_partition(con, CATALOG, path, as_of, customers, seed=seed)
        return
    hostile = ", ".join(f"({i}, {sql_literal(h)})" for i, h in enumerate(HOSTILE))
    path.parent.mkdir(parents=True, exist_ok=True)
    con.execute(
        f"""COPY (
            WITH s AS ({synthetic_partition_sql(CATALOG, as_of, customers, seed)}), h AS (SELECT * FROM (VALUES {hostile}) v(i, id))
            SELECT coalesce(h.id, s.customer_id) AS customer_id, s.as_of, s.tag,
                   CASE WHEN s.tag = 'life_stage' AND s.customer_id LIKE '%3' THEN NULL ELSE s.value END AS value,
                   CASE WHEN s.customer_id LIKE '%4' THEN NULL ELSE s.probability END AS probability,
                   CASE WHEN s.customer_id LIKE '%4' THEN NULL ELSE s.probabilities END AS probabilities,
                   CASE WHEN s.customer_id LIKE '%5' THEN [] ELSE s.reasons END AS reasons, s.source,
                   s.inferred_value, CASE WHEN s.tag = 'risk_appetite' AND s.customer_id LIKE '%6' THEN 'C2' ELSE s.observed_value END AS observed_value,
                   CASE WHEN s.tag = 'risk_appetite' AND s.customer_id LIKE '%6' THEN s.value <> 'C2' ELSE s.observed_mismatch END AS observed_mismatch,
                   CASE WHEN s.tag = 'suitability' AND s.customer_id LIKE '%7' THEN 'expired' ELSE s.assessment END AS assessment,
                   CASE WHEN s.tag = 'suitability' AND s.customer_id LIKE '%7' THEN DATE '2024-01-15' ELSE s.assessed_on END AS assessed_on,
                   s.producer, s.model_version, s.mlflow_run_id, s.scored_at
            FROM s LEFT JOIN h ON s.customer_id = 'C' || lpad(CAST(h.i AS VARCHAR), 9, '0')
        ) TO {sql_literal(path)} ({PARQUET_OPTIONS})"""
    )


@pytest.fixture
def con():
    connection = duckdb.connect()
    connection.execute("SET preserve_insertion_order = false")  # as the warehouse's connections have it
    yield connection
    connection.close()


@pytest.fixture
def store(tmp_path) -> ParquetTagStore:
    return ParquetTagStore(tmp_path / "customer_tags")


def _rounded(value):
    """Floats to 10 decimals: the Parquet lookup goes through pandas' to_json (10 digits), the online store keeps the double."""
    if isinstance(value, float):
        return round(value, 10)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def _comparable(entry: dict) -> dict:
    return {k: _rounded(entry[k]) for k in (*TAG_FIELDS, "probabilities", "reasons")}


@pytest.mark.parametrize("hand_made", [False, True], ids=["synthetic", "hand-made"])
def test_every_tag_field_equals_the_parquet_lookup(con, store, tmp_path, hand_made):
    _partition(con, store, OCT, 300, seed=1, hand_made=hand_made)
    online = SQLiteOnlineStore(tmp_path / "online" / "tags.sqlite")
    snapshot = online.refresh(con, store)
    assert (snapshot.as_of, snapshot.customers, snapshot.rows) == ("2026-10-31", 300, 300 * len(CATALOG.tags))
    ids = [r[0] for r in con.execute(f"SELECT DISTINCT customer_id FROM {store.read_sql(OCT)}").fetchall()]
    assert len(ids) == 300 and (not hand_made or set(HOSTILE) <= set(ids))
    everything = [t.name for t in CATALOG.tags]
    for customer_id in ids:
        expected = customer_tags(con, store, customer_id, published=everything)
        got = online.customer(customer_id)
        assert got["customer_id"] == customer_id and got["as_of"] == expected["as_of"]
        assert got["scored_at"].startswith(expected["scored_at"])
        assert [_comparable(e) for e in got["tags"]] == [_comparable(e) for e in expected["tags"]], customer_id
    assert online.customer("C999999999") is None and online.customers([ids[0], "nobody", ids[0]]).keys() == {ids[0]}
    if hand_made:
        expired = [e for cid in ids for e in online.customer(cid)["tags"] if e["assessment"] == "expired"]
        assert expired and all(e["assessed_on"] == "2024-01-15" for e in expired)


def test_quality_coverage_stability_and_staleness_by_catalog_cadence(con, store, tmp_path):
    _partition(con, store, OCT, 2_000, seed=1)
    _partition(con, store, NOV, 2_000, seed=1)
    online = SQLiteOnlineStore(tmp_path / "tags.sqlite")
    online.refresh(con, store)
    quality = {q.tag: q for q in online.quality()}
    assert set(quality) == {t.name for t in CATALOG.tags}
    changed = store.changed_share(con, OCT, NOV)
    assert all(quality[t].changed_share == changed[t] and 0.01 < changed[t] < 0.12 for t in quality)  # synthetic: ~5% changed
    assert all(q.previous_as_of == "2026-10-31" and q.coverage == 1.0 for q in quality.values())
    report = {r["tag"]: r for r in quality_report(online.quality(), CATALOG, today=date(2026, 12, 9))}
    cadence = {t.name: t.refresh for t in CATALOG.tags}
    for tag, row in report.items():
        assert row["freshness_days"] == 9 and row["refresh"] == cadence[tag]
        assert row["stale"] == (cadence[tag] in ("daily", "weekly")), tag
    assert not any(r["stale"] for r in quality_report(online.quality(), CATALOG, today=date(2026, 12, 1)))


def test_freshness_is_the_age_of_the_oldest_inference_a_carried_tag_holds(con, store, tmp_path):
    """A monthly tag carried from the start of its month is as old as that inference, not as the partition."""
    _partition(con, store, NOV, 2_000, seed=1)
    path = store.partition_path(NOV)
    table = pq.read_table(path)
    carried = pc.and_(pc.equal(table["tag"], "life_stage"), pc.less(table["customer_id"], "C000001000"))
    days = pc.if_else(carried, pa.scalar(date(2026, 11, 2), pa.date32()), table["inferred_as_of"])
    pq.write_table(table.set_column(table.schema.get_field_index("inferred_as_of"), "inferred_as_of", days), path)
    online = SQLiteOnlineStore(tmp_path / "tags.sqlite")
    online.refresh(con, store)
    report = {r["tag"]: r for r in quality_report(online.quality(), CATALOG, today=date(2026, 12, 3))}
    assert report["life_stage"]["oldest_inferred_as_of"] == "2026-11-02" and report["life_stage"]["freshness_days"] == 31
    assert report["life_stage"]["stale"] is False  # monthly: 32 days allowed
    assert report["value_tier"]["freshness_days"] == 3 and report["value_tier"]["stale"] is True  # daily: 2 days allowed
    entry = next(e for e in online.customer("C000000001")["tags"] if e["tag"] == "life_stage")
    assert entry["inferred_as_of"] == "2026-11-02"


def test_readers_see_a_whole_old_or_new_record_while_refreshes_alternate(con, store, tmp_path):
    _partition(con, store, OCT, 3_000, seed=1)
    _partition(con, store, NOV, 3_000, seed=2)  # another seed: most values differ between the two
    path = tmp_path / "tags.sqlite"
    writer = SQLiteOnlineStore(path)
    sample = [f"C{i:09d}" for i in range(0, 3_000, 7)]
    expected = {}
    for as_of in (OCT, NOV):
        writer.refresh(con, store, as_of)
        expected[as_of.isoformat()] = {cid: SQLiteOnlineStore(path).customer(cid) for cid in sample}
    assert expected["2026-10-31"][sample[1]]["tags"] != expected["2026-11-30"][sample[1]]["tags"]
    problems, seen, reads, done = [], set(), [0], threading.Event()

    def read_loop() -> None:
        reader = SQLiteOnlineStore(path)
        while not done.is_set():
            for cid in sample:
                record = reader.customer(cid)
                reads[0] += 1
                if record is None or record != expected[record["as_of"]][cid]:
                    problems.append((cid, None if record is None else record["as_of"]))
                    return
                seen.add(record["as_of"])

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for i in range(6):
            writer.refresh(con, store, (OCT, NOV)[i % 2])
    finally:
        done.set()
        thread.join()
    assert not problems and seen == {"2026-10-31", "2026-11-30"} and reads[0] > len(sample)


def test_a_failed_refresh_keeps_the_old_store_and_leaves_nothing_readers_could_open(con, store, tmp_path):
    _partition(con, store, OCT, 500, seed=1)
    path = tmp_path / "tags.sqlite"
    online = SQLiteOnlineStore(path)
    online.refresh(con, store)
    before = online.customer("C000000001")
    # a corrupt newer partition
    store.partition_path(NOV).parent.mkdir(parents=True)
    store.partition_path(NOV).write_bytes(b"PAR1 not really parquet")
    with pytest.raises(TagStoreError, match="2026-11-30"):
        online.refresh(con, store)
    # an empty partition
    con.execute(f"COPY (SELECT * FROM {store.read_sql(OCT)} LIMIT 0) TO {sql_literal(store.partition_path(NOV))} ({PARQUET_OPTIONS})")
    with pytest.raises(OnlineStoreError, match="no rows"):
        online.refresh(con, store)
    assert SQLiteOnlineStore(path).customer("C000000001") == before and online.snapshot().as_of == "2026-10-31"
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(("tags", ".tags"))) == ["tags.sqlite"]


@pytest.mark.slow  # a 300k-customer build to kill mid-way: ~15 s
def test_a_killed_refresh_keeps_the_old_store_and_the_next_one_cleans_up(con, store, tmp_path):
    _partition(con, store, OCT, 500, seed=1)
    _partition(con, store, NOV, 300_000, seed=2)  # big enough to be killed mid-build
    path = tmp_path / "tags.sqlite"
    SQLiteOnlineStore(path).refresh(con, store, OCT)
    script = (
        "import duckdb, sys; from pathlib import Path; from tagml.scoring.online import SQLiteOnlineStore; from tagml.scoring.store import ParquetTagStore;"
        f"SQLiteOnlineStore(Path({str(path)!r})).refresh(duckdb.connect(), ParquetTagStore(Path({str(store.root)!r})))"
    )
    writer = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".tmp") and p.stat().st_size > 1_000_000 for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the writer was killed before it started its file"
    online = SQLiteOnlineStore(path)
    assert online.snapshot().as_of == "2026-10-31" and online.customer("C000000001") is not None
    online.refresh(con, store, OCT)  # the next writer removes the dead one's temporary
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_corrupt_or_foreign_file_names_itself_and_the_remedy(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    foreign = tmp_path / "foreign.sqlite"
    db = sqlite3.connect(foreign)
    db.execute("CREATE TABLE something (x)")
    db.commit()
    db.close()
    for path in (garbage, foreign):
        for call in (lambda o: o.customer("C1"), lambda o: o.snapshot(), lambda o: o.quality(), lambda o: o.erase(["C1"])):
            with pytest.raises(OnlineStoreError, match=rf"{path}.*tagml online refresh"):
                call(SQLiteOnlineStore(path))
    with pytest.raises(OnlineStoreError, match="has not been loaded yet"):
        SQLiteOnlineStore(tmp_path / "missing.sqlite").customer("C1")


def test_erase_keeps_meta_counts_and_hostile_ids_round_trip(con, store, tmp_path):
    _partition(con, store, OCT, 200, seed=1, hand_made=True)
    online = open_online_store(str(tmp_path / "tags.sqlite"))
    online.refresh(con, store)
    for hostile in HOSTILE:
        assert online.customer(hostile)["customer_id"] == hostile
    tags = len(CATALOG.tags)
    assert online.erase([HOSTILE[0], HOSTILE[2], "C000000010", "unknown"]) == 3
    snapshot = online.snapshot()
    assert (snapshot.customers, snapshot.rows) == (197, 197 * tags)
    assert online.customer(HOSTILE[0]) is None and online.customer(HOSTILE[1])["customer_id"] == HOSTILE[1]
    assert online.erase([]) == 0 and online.erase(["unknown"]) == 0 and online.snapshot().customers == 197


def test_tagml_erase_removes_customers_from_the_online_store_and_the_scan_covers_it(con, tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    settings.ensure_dirs()
    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    _partition(con, store, OCT, 100, seed=1, hand_made=True)
    online = open_online_store(settings.online_store)
    online.refresh(con, store)
    receipt = erase(settings, [HOSTILE[1], "C000000020"], "dpo", "request 7")
    assert receipt.stores[ONLINE_STORE].rows_removed == 2 and receipt.stores[ONLINE_STORE].files_rewritten == 1
    assert receipt.verified and receipt.verification["hits"][ONLINE_STORE] == 0
    assert online.customer(HOSTILE[1]) is None and online.customer("C000000020") is None and online.snapshot().customers == 98
    assert receipt.rows_removed == receipt.stores["customer_tags"].rows_removed  # the online copies are not counted twice


@pytest.mark.slow  # Dagster materializations in process: ~15 s
def test_online_tags_asset_refreshes_to_the_newest_partition_and_a_backfill_keeps_it(con, tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home"), "TAGML_PARTITIONS_START": "2026-10-01"})
    settings.ensure_dirs()
    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    _partition(con, store, OCT, 400, seed=1)
    _partition(con, store, NOV, 500, seed=2)
    asset = build_online_tags_asset(as_of_partitions(settings), CATALOG)
    resources = {"warehouse": WarehouseResource.from_settings(settings), "online_store": OnlineStoreResource.from_settings(settings)}

    def materialize(as_of: date) -> tuple[dict, dg.ExecuteInProcessResult]:
        result = dg.materialize([asset], partition_key=as_of.isoformat(), resources=resources, instance=dg.DagsterInstance.ephemeral())
        assert result.success
        return result.asset_materializations_for_node("online_tags")[0].metadata, result

    meta, result = materialize(NOV)
    assert (meta["as_of"].value, meta["customers"].value, meta["refreshed"].value) == ("2026-11-30", 500, True)
    quality = meta["quality_json"].value
    assert {q["tag"] for q in quality} == {t.name for t in CATALOG.tags} and all("stale" in q and q["changed_share"] is not None for q in quality)
    assert "| risk_appetite |" in meta["quality"].value
    checks = result.get_asset_check_evaluations()
    assert [c.check_name for c in checks] == ["holds_partition"] and checks[0].passed
    meta, _ = materialize(OCT)  # a backfill of the older partition: the store keeps serving November
    assert (meta["as_of"].value, meta["refreshed"].value) == ("2026-11-30", False)
    assert open_online_store(settings.online_store).snapshot().customers == 500
    os.unlink(settings.online_store)  # nothing loaded yet: even a backfill loads the newest partition
    meta, _ = materialize(OCT)
    assert (meta["as_of"].value, meta["refreshed"].value) == ("2026-11-30", True)


def test_every_job_that_scores_tags_also_refreshes_the_online_store(tmp_path):
    from tagml.orchestration.definitions import build_definitions
    from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, reevaluate_job_name
    from tagml.orchestration.walkthrough import NIGHTLY_ASSETS

    loaded = build_definitions(Settings.from_env({"TAGML_HOME": str(tmp_path / "home")}))
    scoring = [NIGHTLY_SCORING_JOB, *(reevaluate_job_name(t.name) for t in CATALOG.model_tags)]
    for name in scoring:
        keys = loaded.resolve_job_def(name).asset_layer.executable_asset_keys
        assert dg.AssetKey("customer_tags") in keys and dg.AssetKey("online_tags") in keys, name
    assert "online_tags" in NIGHTLY_ASSETS and loaded.resources["online_store"].location == str(tmp_path / "home" / "online" / "tags.sqlite")
