"""The online tag store on a real PostgreSQL (one server for the module, a fresh database per test): every record,
snapshot and quality row equal to the SQLite store's on the same partitions; lookups during refreshes see the old
generation or the new one, never half; a failed refresh leaves the old one serving and no table behind; erasure;
a server restart; an unreachable server named without its password."""

import itertools
import threading
from datetime import date
from pathlib import Path

import pytest

from tagml.core.storage import PARQUET_OPTIONS, atomic_replace, connect, sql_literal
from tagml.scoring.online import OnlineStoreError, OnlineStoreUnavailableError, SQLiteOnlineStore, open_online_store
from tagml.scoring.online_postgres import PostgresOnlineStore
from tagml.scoring.store import ParquetTagStore, TagStoreError
from tagml.scoring.synthetic import synthetic_partition_sql, write_synthetic_partition
from tagml.training.catalog import load_catalog
from tests.postgres import _run, free_port, postgres_bin, running_postgres

pytestmark = pytest.mark.postgres

FIRST, SECOND, HANDMADE = date(2026, 10, 31), date(2026, 11, 30), date(2026, 12, 31)
CUSTOMERS = 1500
# strings a COPY line, a JSON document or a SQL string could trip over
DATABASES = itertools.count()
HOSTILE = 'O\'Brien\t"x"\\n\\\n\r; DROP TABLE tagml_online_pointer;-- 风险偏好 🙂 %s {}'


@pytest.fixture(scope="module")
def server():
    with running_postgres() as running:
        yield running


@pytest.fixture
def url(server, monkeypatch) -> str:
    """A fresh database's URL without a password: libpq reads it from PGPASSWORD, as the deployment guide says."""
    database = server.create_database(f"online_{next(DATABASES)}")
    monkeypatch.setenv("PGPASSWORD", server.password)
    return f"postgresql://{server.user}@{server.host}:{server.port}/{database}"


def _handmade_sql(catalog) -> str:
    """A partition with the shapes synthetic data lacks: NULLs everywhere they may be, several-class maps, long and
    hostile reason lists, observed/inferred values, assessments, and hostile customer ids."""
    base = synthetic_partition_sql(catalog, HANDMADE, 300, seed=7, changed_share=0.1)
    hostile = sql_literal(HOSTILE)
    return f"""
        SELECT * REPLACE (
            CASE WHEN customer_id = 'C000000001' THEN {hostile} WHEN customer_id = 'C000000002' THEN 'C-中文-\\' ELSE customer_id END AS customer_id,
            CASE WHEN hash(customer_id, tag) % 7 = 0 THEN NULL ELSE value END AS value,
            CASE WHEN hash(customer_id, tag) % 5 = 0 THEN NULL ELSE probability END AS probability,
            CASE WHEN probabilities IS NOT NULL AND hash(customer_id) % 2 = 0 THEN MAP {{'a': 0.25, {hostile}: 0.5, 'c': NULL}} ELSE probabilities END
                AS probabilities,
            CASE WHEN hash(customer_id, tag) % 3 = 0 THEN [{hostile}, 'second reason', NULL] WHEN hash(customer_id, tag) % 3 = 1 THEN [] ELSE reasons END
                AS reasons,
            CASE WHEN hash(customer_id) % 4 = 0 THEN 'observed ' || {hostile} END AS observed_value,
            CASE WHEN hash(customer_id) % 4 = 1 THEN value END AS inferred_value,
            CASE WHEN hash(customer_id) % 4 = 0 THEN true WHEN hash(customer_id) % 4 = 1 THEN false END AS observed_mismatch,
            CASE WHEN hash(customer_id) % 6 = 0 THEN 'C3' END AS assessment,
            CASE WHEN hash(customer_id) % 6 = 0 THEN DATE '2026-06-30' END AS assessed_on
        ) FROM ({base})
    """


def _write(con, path: Path, query: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(path) as tmp:
        con.execute(f"COPY ({query}) TO {sql_literal(tmp)} ({PARQUET_OPTIONS})")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tag store with two synthetic partitions (the second ~20% changed) and a hand-made one, and the SQLite store's answers."""
    root = tmp_path_factory.mktemp("online_pg")
    con = connect(threads=1, memory_limit="1GB")
    catalog = load_catalog()
    store = ParquetTagStore(root / "tags")
    write_synthetic_partition(con, catalog, store.partition_path(FIRST), FIRST, CUSTOMERS, seed=3, changed_share=0.2)
    write_synthetic_partition(con, catalog, store.partition_path(SECOND), SECOND, CUSTOMERS, seed=3, changed_share=0.2)
    _write(con, store.partition_path(HANDMADE), _handmade_sql(catalog))
    expected = {}
    for as_of in (FIRST, SECOND, HANDMADE):
        sqlite = SQLiteOnlineStore(root / f"sqlite-{as_of}.sqlite")
        snapshot = sqlite.refresh(con, store, as_of)
        ids = [r[0] for r in con.execute(f"SELECT DISTINCT customer_id FROM {store.read_sql(as_of)} ORDER BY 1").fetchall()]
        expected[as_of] = {"snapshot": snapshot, "records": sqlite.customers(ids), "quality": sqlite.quality(), "ids": ids}
        sqlite.close()
    yield {"con": con, "store": store, "catalog": catalog, "root": root, "expected": expected}
    con.close()


def _generation_tables(server, url: str) -> list[str]:
    with server.connect(url.rsplit("/", 1)[1]) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE tablename LIKE 'tagml\\_online\\_customers\\_g%' ORDER BY 1")
        tables = [t for (t,) in cursor.fetchall()]
        cursor.execute("SELECT state, count(*) FROM tagml_online_generations GROUP BY 1")
        states = dict(cursor.fetchall())
    connection.close()
    assert states == {"current": 1}, states  # no loading or retired generation left behind
    return tables


def _same_snapshot(got, want) -> None:
    assert got is not None
    assert {**got.as_dict(), "loaded_at": None} == {**want.as_dict(), "loaded_at": None}


@pytest.mark.parametrize("as_of", [SECOND, HANDMADE], ids=["synthetic", "handmade"])
def test_every_record_snapshot_and_quality_equal_the_sqlite_stores(world, url, as_of):
    expected = world["expected"][as_of]
    online = PostgresOnlineStore(url)
    try:
        _same_snapshot(online.refresh(world["con"], world["store"], as_of), expected["snapshot"])
        _same_snapshot(online.snapshot(), expected["snapshot"])
        assert online.quality() == expected["quality"] and len(expected["quality"]) == len(world["catalog"].tags)
        if as_of == SECOND:
            assert all(q.changed_share and 0.1 < q.changed_share < 0.3 for q in expected["quality"])
        got = online.customers(expected["ids"] + ["C999999999", HOSTILE + "x"])
        assert list(got) == expected["ids"] and got == expected["records"]
        assert all(online.customer(cid) == expected["records"][cid] for cid in expected["ids"][:200])
        assert online.customer("C999999999") is None and online.customers([]) == {}
        if as_of == HANDMADE:  # the hostile shapes are really there
            assert online.customer(HOSTILE)["customer_id"] == HOSTILE
            entries = [e for r in got.values() for e in r["tags"]]
            assert any(e["value"] is None for e in entries) and any(HOSTILE in (e["reasons"] or []) for e in entries)
            assert any(e["probabilities"] and HOSTILE in e["probabilities"] for e in entries)
    finally:
        online.close()


def test_lookups_during_refreshes_see_the_old_or_the_new_generation_never_half(world, url, server):
    con, store, expected = world["con"], world["store"], world["expected"]
    online = PostgresOnlineStore(url)
    online.refresh(con, store, FIRST)
    sample = expected[FIRST]["ids"][::37]
    assert sum(expected[FIRST]["records"][c] != expected[SECOND]["records"][c] for c in sample) > len(sample) // 2  # the two differ
    seen, wrong, stop, failures = {FIRST.isoformat(): 0, SECOND.isoformat(): 0}, [], threading.Event(), []

    def read_loop():
        try:
            while not stop.is_set():
                for cid in sample:
                    record = online.customer(cid)
                    as_of = date.fromisoformat(record["as_of"])
                    if record != expected[as_of]["records"][cid]:
                        wrong.append((cid, record["as_of"]))
                    seen[record["as_of"]] += 1
                batch = online.customers(sample)
                if len({r["as_of"] for r in batch.values()}) != 1 or any(
                    batch[c] != expected[date.fromisoformat(batch[c]["as_of"])]["records"][c] for c in batch
                ):
                    wrong.append(("batch", None))
        except Exception as exc:  # noqa: BLE001 (reported by the main thread)
            failures.append(exc)

    reader = threading.Thread(target=read_loop)
    reader.start()
    try:
        for as_of in (SECOND, FIRST, SECOND, FIRST, SECOND):
            online.refresh(con, store, as_of)
    finally:
        stop.set()
        reader.join(30)
    assert not failures and not wrong
    assert seen[FIRST.isoformat()] > 0 and seen[SECOND.isoformat()] > 0
    assert online.snapshot().as_of == SECOND.isoformat()
    assert len(_generation_tables(server, url)) == 1  # every old generation dropped
    online.close()


def test_a_refresh_failing_mid_copy_leaves_the_old_generation_serving_and_no_table_behind(world, url, server):
    con, expected = world["con"], world["expected"]
    online = PostgresOnlineStore(url)
    online.refresh(con, world["store"], FIRST)
    before = _generation_tables(server, url)
    bad = ParquetTagStore(world["root"] / "bad_tags")
    # PostgreSQL's text cannot hold a NUL: the last customer's line fails the COPY after thousands went in
    base = synthetic_partition_sql(world["catalog"], SECOND, CUSTOMERS, seed=3)
    _write(
        con,
        bad.partition_path(SECOND),
        f"SELECT * REPLACE (CASE WHEN customer_id = 'C000001499' THEN 'Z' || chr(0) ELSE customer_id END AS customer_id) FROM ({base})",
    )
    with pytest.raises(OnlineStoreError, match="loading the partition 2026-11-30.*0x00") as failed:
        online.refresh(con, bad, SECOND)
    assert "Z" not in str(failed.value).replace("SQLSTATE", "")  # no row's value echoed
    corrupt = ParquetTagStore(world["root"] / "corrupt_tags")
    corrupt.partition_path(SECOND).parent.mkdir(parents=True)
    corrupt.partition_path(SECOND).write_bytes(bad.partition_path(SECOND).read_bytes()[:5000])
    with pytest.raises(TagStoreError):
        online.refresh(con, corrupt, SECOND)
    _same_snapshot(online.snapshot(), expected[FIRST]["snapshot"])
    assert online.customers(expected[FIRST]["ids"]) == expected[FIRST]["records"]
    assert _generation_tables(server, url) == before
    online.close()


def test_erase_deletes_the_customers_from_the_current_generation(world, url):
    expected = world["expected"][SECOND]
    online = PostgresOnlineStore(url)
    assert online.erase(["C000000001"]) == 0  # never loaded: nothing there
    online.refresh(world["con"], world["store"], SECOND)
    gone = expected["ids"][:3]
    assert online.erase([*gone, gone[0], "C999999999"]) == 3
    assert online.erase(gone) == 0 and online.erase([]) == 0
    assert all(online.customer(cid) is None for cid in gone)
    assert online.customer(expected["ids"][3]) == expected["records"][expected["ids"][3]]
    assert online.snapshot().customers == expected["snapshot"].customers - 3
    online.close()


def test_lookups_continue_after_the_server_restarts(world, url, server):
    expected = world["expected"][FIRST]
    online = PostgresOnlineStore(url)
    online.refresh(world["con"], world["store"], FIRST)
    cid = expected["ids"][5]
    assert online.customer(cid) == expected["records"][cid]
    with server.connect() as connection, connection.cursor() as cursor:
        cursor.execute("SHOW data_directory")
        data = Path(cursor.fetchone()[0])
    connection.close()
    _run([str(postgres_bin() / "pg_ctl"), "restart", "-D", str(data), "-l", str(data.parent / "server.log"), "-m", "fast", "-w", "-t", "60"], data.parent)
    assert online.customer(cid) == expected["records"][cid]  # the lost connection is replaced, the statement prepared again
    online.close()


def test_an_unloaded_store_says_so(url):
    online = PostgresOnlineStore(url)
    assert online.snapshot() is None
    with pytest.raises(OnlineStoreError, match="has not been loaded yet"):
        online.customer("C000000001")
    with pytest.raises(OnlineStoreError, match="has not been loaded yet"):
        online.quality()
    online.close()


def test_an_unreachable_server_is_named_without_its_password(monkeypatch):
    port = free_port()
    monkeypatch.setenv("PGPASSWORD", "env-secret-1234")
    online = PostgresOnlineStore(f"postgresql://tagml:url-secret-5678@127.0.0.1:{port}/tags_db")
    for call in (lambda: online.customer("C000000001"), online.snapshot, lambda: online.erase(["C1"])):
        with pytest.raises(OnlineStoreUnavailableError) as unreachable:
            call()
        message = str(unreachable.value)
        assert f"host 127.0.0.1 port {port} database tags_db" in message
        assert "secret" not in message
    assert "secret" not in online.describe()
    with pytest.raises(OnlineStoreUnavailableError, match="not a valid PostgreSQL URL") as bad:
        PostgresOnlineStore("postgresql://tagml:url-secret-5678@[127.0.0.1/db")
    assert "secret" not in str(bad.value)


def test_open_online_store_takes_a_postgresql_url(world, url):
    online = open_online_store(url)
    assert isinstance(online, PostgresOnlineStore)
    online.refresh(world["con"], world["store"])  # the newest partition
    _same_snapshot(online.snapshot(), world["expected"][HANDMADE]["snapshot"])
    online.close()


def test_a_read_only_role_with_the_documented_grants_reads_every_generation(world, url, server):
    """docs/DEPLOYMENT.md: the API may read with SELECT on the three views only; the grants survive refreshes."""
    expected, database = world["expected"], url.rsplit("/", 1)[1]
    online = PostgresOnlineStore(url)
    online.refresh(world["con"], world["store"], FIRST)
    role = f"reader_{database}"
    with server.connect(database) as connection, connection.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", [server.password])
        cursor.execute(f"GRANT CONNECT ON DATABASE {database} TO {role}; GRANT USAGE ON SCHEMA public TO {role}")
        cursor.execute(f"GRANT SELECT ON tagml_online_customers, tagml_online_snapshot, tagml_online_tag_quality TO {role}")
    connection.close()
    reader = PostgresOnlineStore(f"postgresql://{role}@{server.host}:{server.port}/{database}")
    cid = expected[FIRST]["ids"][9]
    assert reader.customer(cid) == expected[FIRST]["records"][cid]
    online.refresh(world["con"], world["store"], SECOND)  # a new table the role was never granted
    assert reader.customer(cid) == expected[SECOND]["records"][cid]
    assert reader.quality() == expected[SECOND]["quality"] and reader.snapshot().as_of == SECOND.isoformat()
    with pytest.raises(OnlineStoreError, match="permission denied"):
        reader.erase([cid])
    reader.close()
    online.close()
