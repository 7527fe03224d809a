"""The tag API against a real server: `tagml serve` as a process on 127.0.0.1 (a free port), a real httpx client,
a real online store (SQLite, loaded from a synthetic tag partition), the real tag lifecycle and API keys."""

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import httpx
import pytest

from tagml.core.settings import Settings
from tagml.core.storage import WarehouseLayout, connect
from tagml.scoring.online import SQLiteOnlineStore
from tagml.scoring.store import ParquetTagStore
from tagml.scoring.synthetic import write_synthetic_partition
from tagml.serving.auth import create_key
from tagml.training.catalog import load_catalog
from tests.conftest import publish_tags

DAY1, DAY2 = date(2026, 1, 31), date(2026, 2, 28)
CUSTOMERS = 200
CUSTOMER = "C000000007"
PUBLISHED = ("risk_appetite", "life_stage", "value_tier", "suitability")  # confidential: risk_appetite, suitability; churn_90d unpublished


@dataclass
class Server:
    url: str
    settings: Settings
    keys: dict[str, str]
    process: subprocess.Popen
    log: Path

    def client(self, key: str | None = None, how: str = "bearer") -> httpx.Client:
        headers = {}
        if key is not None:
            headers = {"Authorization": f"Bearer {self.keys[key]}"} if how == "bearer" else {"X-API-Key": self.keys[key]}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_partition(settings: Settings, day: date, seed: int = 0) -> None:
    catalog = load_catalog(settings.catalog_path)
    path = WarehouseLayout(settings.warehouse_dir).customer_tags.path(day)
    with closing(connect()) as con:
        write_synthetic_partition(con, catalog, path, day, CUSTOMERS, seed=seed, changed_share=0.2)


def refresh(settings: Settings, day: date | None = None) -> None:
    with closing(connect()) as con:
        SQLiteOnlineStore(settings.online_store_path).refresh(con, ParquetTagStore.in_warehouse(settings.warehouse_dir), day)


def start_server(settings: Settings, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGML_")} | {"TAGML_HOME": str(settings.home)}
    with open(log, "w") as handle:  # the child keeps its own descriptor
        process = subprocess.Popen([sys.executable, "-m", "tagml.cli", "serve", "--port", str(port)], env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"tagml serve exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(url + "/health", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise AssertionError("tagml serve did not answer within 60 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("api")
    settings = Settings.from_env({"TAGML_HOME": str(base / "home")})
    settings.ensure_dirs()
    write_partition(settings, DAY1)
    refresh(settings)
    publish_tags(settings, PUBLISHED)
    keys = {
        "tags": create_key(settings.api_keys_path, "crm", ["read:tags"])[0],
        "confidential": create_key(settings.api_keys_path, "rm-desk", ["read:tags", "read:confidential"])[0],
        "audiences": create_key(settings.api_keys_path, "campaigns", ["read:audiences"])[0],
        "exporter": create_key(settings.api_keys_path, "campaign-tool", ["read:audiences", "export:audiences"])[0],
    }
    process, url = start_server(settings, base / "server.log")
    try:
        yield Server(url, settings, keys, process, base / "server.log")
    finally:
        process.terminate()
        process.wait(10)


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["message"], body
    return body["error"]


def test_customer_tags_published_and_confidential_by_scope(server):
    with server.client("tags") as plain, server.client("confidential", how="x-api-key") as trusted:
        shown = plain.get(f"/customers/{CUSTOMER}/tags").json()
        full = trusted.get(f"/customers/{CUSTOMER}/tags").json()
    assert shown["customer_id"] == CUSTOMER and shown["as_of"] == DAY1.isoformat() and shown["scored_at"]
    assert {t["tag"] for t in shown["tags"]} == {"life_stage", "value_tier"}
    hidden = {h["tag"]: h["why"] for h in shown["hidden"]}
    assert hidden["churn_90d"] == "not published" and "read:confidential" in hidden["risk_appetite"] and "read:confidential" in hidden["suitability"]
    assert "value" not in str(shown["hidden"])  # only names and why, never values
    assert {t["tag"] for t in full["tags"]} == {"life_stage", "value_tier", "risk_appetite", "suitability"}
    assert [h["tag"] for h in full["hidden"]] == ["churn_90d", "lifecycle_stage"]
    risk = next(t for t in full["tags"] if t["tag"] == "risk_appetite")
    catalog = load_catalog(server.settings.catalog_path)
    assert risk["value"] in catalog.get("risk_appetite").classes and 0 < risk["probability"] <= 1
    assert risk["probabilities"] == {risk["value"]: risk["probability"]} and risk["reasons"]
    for field in ("source", "producer", "model_version", "observed_value", "inferred_value", "observed_mismatch", "assessment", "assessed_on"):
        assert field in risk
    assert risk["source"] == "model" and risk["model_version"] == "1"


def test_tag_filter_and_unknown_customer_or_tag(server):
    with server.client("confidential") as client:
        only = client.get(f"/customers/{CUSTOMER}/tags", params=[("tag", "risk_appetite"), ("tag", "churn_90d")]).json()
        assert [t["tag"] for t in only["tags"]] == ["risk_appetite"] and [h["tag"] for h in only["hidden"]] == ["churn_90d"]
        unknown_customer = client.get("/customers/NOPE123/tags")
        assert unknown_customer.status_code == 404 and error_of(unknown_customer)["code"] == "unknown_customer"
        unknown_tag = client.get(f"/customers/{CUSTOMER}/tags", params={"tag": "credit_score"})
        assert unknown_tag.status_code == 404 and "credit_score" in error_of(unknown_tag)["message"]
        assert client.get("/tags/credit_score").status_code == 404
        hostile = client.get("/customers/x' OR '1'='1/tags")
        assert hostile.status_code == 404 and error_of(hostile)["code"] == "unknown_customer"
        too_long = client.get("/customers/" + "9" * 500 + "/tags")
        assert too_long.status_code == 422 and "128" in error_of(too_long)["message"]
        route = client.get("/no/such/thing")
        assert route.status_code == 404 and error_of(route)["code"] == "not_found"


def test_auth_401_and_403(server):
    with server.client() as anonymous:
        missing = anonymous.get(f"/customers/{CUSTOMER}/tags")
        assert missing.status_code == 401 and "API key" in error_of(missing)["message"] and missing.headers["www-authenticate"] == "Bearer"
        wrong = anonymous.get(f"/customers/{CUSTOMER}/tags", headers={"Authorization": "Bearer tgk_not-a-key"})
        assert wrong.status_code == 401 and "unknown" in error_of(wrong)["message"]
        assert anonymous.get("/health").status_code == 200  # no key needed
    with server.client("audiences") as campaigns:
        forbidden = campaigns.get(f"/customers/{CUSTOMER}/tags")
        assert forbidden.status_code == 403 and "read:tags" in error_of(forbidden)["message"]
    with server.client("tags") as plain:
        no_confidential = plain.get(f"/customers/{CUSTOMER}/tags/risk_appetite/explanation")
        assert no_confidential.status_code == 403 and "read:confidential" in error_of(no_confidential)["message"]
        assert plain.post("/audiences/count", json={"query": {}}).status_code == 403


def test_revoked_and_new_keys_take_effect_without_restart(server):
    from tagml.serving.auth import revoke_key

    secret, _ = create_key(server.settings.api_keys_path, "short-lived", ["read:tags"])
    headers = {"X-API-Key": secret}
    assert httpx.get(f"{server.url}/tags", headers=headers).status_code == 200
    revoke_key(server.settings.api_keys_path, "short-lived")
    assert httpx.get(f"{server.url}/tags", headers=headers).status_code == 401


def test_explanation_in_words(server):
    with server.client("confidential") as client:
        body = client.get(f"/customers/{CUSTOMER}/tags/risk_appetite/explanation").json()
        assert body["tag"] == "risk_appetite" and body["customer_id"] == CUSTOMER
        catalog = load_catalog(server.settings.catalog_path)
        spec = catalog.get("risk_appetite")
        assert body["intended_use"] == spec.intended_use and body["limitations"] == spec.limitations
        assert body["source"]["model_version"] == "1" and "model" in body["source"]["sentence"]
        by_code = {r["code"]: r for r in body["reasons"]}
        assert "share_equity high" in by_code  # every synthetic model row starts with it
        assert by_code["share_equity high"]["sentence"] == (
            "The customer's share of AUM in equity is above the typical customer's (the median of all customers at the tags' date)."
        )
        if "region=east" in by_code:
            assert by_code["region=east"]["sentence"] == "The customer's home-branch region is east."
        rule = client.get(f"/customers/{CUSTOMER}/tags/value_tier/explanation").json()
        assert rule["source"]["rule"]["bands"] and rule["reasons"][0]["kind"] == "text"
        unpublished = client.get(f"/customers/{CUSTOMER}/tags/churn_90d/explanation")
        assert unpublished.status_code == 404 and "not published" in error_of(unpublished)["message"]
        assert client.get("/customers/NOPE/tags/life_stage/explanation").status_code == 404


def test_tag_dictionary_with_quality(server):
    with server.client("tags") as client:
        tags = {t["name"]: t for t in client.get("/tags").json()["tags"]}
        one = client.get("/tags/life_stage").json()
    catalog = load_catalog(server.settings.catalog_path)
    assert list(tags) == [t.name for t in catalog.tags]
    assert tags["churn_90d"]["status"] != "published" and tags["life_stage"]["status"] == "published"
    assert tags["risk_appetite"]["sensitivity"] == "confidential" and tags["risk_appetite"]["classes"] == list(catalog.get("risk_appetite").classes)
    quality = one["quality"]
    assert one["name"] == "life_stage" and quality["as_of"] == DAY1.isoformat() and quality["customers"] == CUSTOMERS
    assert 0.9 <= quality["coverage"] <= 1 and quality["freshness_days"] == (date.today() - DAY1).days


def test_health(server):
    body = httpx.get(f"{server.url}/health").json()
    assert body["status"] == "ok" and body["customers"] == CUSTOMERS and body["loaded_at"]
    assert body["freshness_days"] == (date.today() - DAY1).days
    assert httpx.get(f"{server.url}/docs").status_code == 200 and "/customers/{customer_id}/tags" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_malformed_bodies_get_a_readable_422(server):
    with server.client("audiences") as client:
        not_json = client.post("/audiences/count", content=b"{not json", headers={"content-type": "application/json"})
        assert not_json.status_code == 422 and "json" in error_of(not_json)["message"].lower()
        wrong_type = client.post("/audiences/count", json={"query": "everyone", "as_of": "yesterday"})
        error = error_of(wrong_type)
        assert wrong_type.status_code == 422 and "body.query" in error["message"] and "body.as_of" in error["message"]
        extra = client.post("/audiences/count", json={"query": {}, "sql": "DROP TABLE x"})
        assert extra.status_code == 422 and "body.sql" in error_of(extra)["message"]


def test_refresh_while_serving_and_a_forced_internal_error(server):
    write_partition(server.settings, DAY2, seed=1)
    refresh(server.settings)
    with server.client("tags") as client:
        assert client.get("/health").json()["as_of"] == DAY2.isoformat()
        assert client.get(f"/customers/{CUSTOMER}/tags").json()["as_of"] == DAY2.isoformat()
        assert client.get("/tags/life_stage").json()["quality"]["previous_as_of"] == DAY1.isoformat()
        # a damaged store file (swapped in whole, as a refresh would): 503, the operator must rebuild it
        store = server.settings.online_store_path
        kept = store.with_name("kept.sqlite")
        os.link(store, kept)
        damaged = store.with_name("damaged.sqlite")
        damaged.write_bytes(b"this is not a database" * 100)
        os.replace(damaged, store)
        try:
            unreadable = client.get(f"/customers/{CUSTOMER}/tags")
        finally:
            os.replace(kept, store)
        assert unreadable.status_code == 503 and error_of(unreadable)["code"] == "store_unreadable"
        assert "Traceback" not in unreadable.text and str(store) not in unreadable.text
        # a readable store with one broken record: the reader fails inside; the caller gets no stack trace
        os.link(store, kept)
        broken_copy = store.with_name("broken.sqlite")
        shutil.copyfile(store, broken_copy)
        with closing(sqlite3.connect(broken_copy)) as db:
            db.execute("UPDATE customers SET tags = '[{not json' WHERE customer_id = ?", [CUSTOMER])
            db.commit()
        os.replace(broken_copy, store)
        try:
            broken = client.get(f"/customers/{CUSTOMER}/tags")
        finally:
            os.replace(kept, store)
        assert broken.status_code == 500
        error = error_of(broken)
        assert error["code"] == "internal_error" and error["request_id"] in error["message"]
        assert "Traceback" not in broken.text and "json" not in broken.text.lower()
        assert client.get(f"/customers/{CUSTOMER}/tags").status_code == 200  # back once the store is
    log = server.log.read_text()
    assert error["request_id"] in log  # the operator can find it
    assert CUSTOMER not in log and "C0000" not in log  # no customer id (access log off, errors by type only)


def test_not_loaded_store_is_503(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    settings.ensure_dirs()
    key = create_key(settings.api_keys_path, "crm", ["read:tags"])[0]
    process, url = start_server(settings, tmp_path / "server.log")
    try:
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and error_of(health)["code"] == "store_not_loaded"
        lookup = httpx.get(url + f"/customers/{CUSTOMER}/tags", headers={"X-API-Key": key})
        assert lookup.status_code == 503 and "tagml online refresh" in error_of(lookup)["message"]
        tags = httpx.get(url + "/tags", headers={"X-API-Key": key}).json()["tags"]
        assert tags and all(t["quality"] is None for t in tags)
    finally:
        process.terminate()
        process.wait(10)


def expected_count(settings: Settings, tag: str, values: list[str]) -> int:
    """Customers with `tag` in `values` in the newest partition, counted independently of the API (plain DuckDB over the file)."""
    store = ParquetTagStore.in_warehouse(settings.warehouse_dir)
    with closing(connect()) as con:
        sql = f"SELECT count(DISTINCT customer_id) FROM {store.read_sql(store.latest_on_or_before(None))} WHERE tag = ? AND list_contains(?, value)"
        return con.execute(sql, [tag, values]).fetchone()[0]


def test_audience_count_and_export(server):
    import io

    import pyarrow.parquet as pq

    catalog = load_catalog(server.settings.catalog_path)
    values = list(catalog.get("life_stage").classes[:2])
    query = {"tag": "life_stage", "in": values}
    with server.client("audiences") as counter, server.client("exporter") as exporter, server.client("tags") as reader:
        counted = counter.post("/audiences/count", json={"query": query})
        assert counted.status_code == 200, counted.text
        body = counted.json()
        assert body["matched"] == body["selected"] == expected_count(server.settings, "life_stage", values) and body["excluded"] == {}
        confidential = counter.post("/audiences/count", json={"query": {"tag": "risk_appetite", "in": ["C1"]}})
        assert confidential.status_code == 422 and "risk_appetite" in error_of(confidential)["message"]
        bad_class = counter.post("/audiences/count", json={"query": {"tag": "life_stage", "in": ["astronaut"]}})
        assert bad_class.status_code == 422 and "astronaut" in error_of(bad_class)["message"]
        hostile = counter.post("/audiences/count", json={"query": {"tag": "life_stage'; DROP TABLE x; --", "in": ["single"]}})
        assert hostile.status_code == 422 and error_of(hostile)["code"] == "invalid_query"
        assert counter.post("/audiences", json={"query": query, "purpose": "service", "name": "x"}).status_code == 403
        made = exporter.post("/audiences", json={"query": query, "purpose": "service", "name": "spring campaign", "format": "parquet"})
        assert made.status_code == 201, made.text
        record = made.json()
        assert record["selected"] == body["selected"] and "out" not in record and record["file"] == f"/audiences/{record['audience_id']}/file"
        assert counter.get(f"/audiences/{record['audience_id']}").json()["selected"] == record["selected"]
        assert counter.get(f"/audiences/{record['audience_id']}/file").status_code == 403
        download = exporter.get(record["file"])
        assert download.status_code == 200
        table = pq.read_table(io.BytesIO(download.content))
        assert table.num_rows == record["selected"] and "customer_id" in table.column_names
        assert reader.get("/audiences/0123abcd").status_code == 403
        unknown = counter.get("/audiences/0123abcd")
        assert unknown.status_code == 404 and error_of(unknown)["code"] == "unknown_audience"
        no_purpose = exporter.post("/audiences", json={"query": query, "name": "x"})
        assert no_purpose.status_code == 422 and "purpose" in error_of(no_purpose)["message"]
        bad_format = exporter.post("/audiences", json={"query": query, "purpose": "service", "name": "x", "format": "xlsx"})
        assert bad_format.status_code == 422 and "body.format" in error_of(bad_format)["message"]
    exported = list((server.settings.home / "audiences").glob("*.parquet"))
    assert len(exported) == 1  # under the home, named by the server


def test_reason_codes_in_words():
    from tagml.features.dictionary import FEATURES
    from tagml.serving.explain import explain_reason

    feature = FEATURES[0]
    low = explain_reason(f"{feature.name} low")
    assert low["kind"] == "feature" and low["feature"] == feature.name and "at or below the typical customer" in low["sentence"]
    assert feature.description.rstrip(".").lower() in low["sentence"].lower()
    rule = explain_reason("holds P1 (R4) above the assessed C2 of 2026-01-31")  # the suitability rule's own sentence
    assert rule == {"code": rule["code"], "kind": "text", "sentence": "Holds P1 (R4) above the assessed C2 of 2026-01-31."}
    unknown = explain_reason("no_such_feature high")
    assert unknown["kind"] == "text" and unknown["sentence"] == "No_such_feature high."  # passed through, never dropped
