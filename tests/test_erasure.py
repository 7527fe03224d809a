"""Erasure with real stores: the suppression list at staging (DuckDB and Spark hash alike), erase() on a small
store with hostile ids, and the whole loop: a home that ran ingest -> train -> nightly (features, tags, drift with
its Evidently report) in a persistent Dagster instance, two customers erased, every store scanned decoded
(0 hits), then the next nightly from the raw directory that still holds them (still 0 hits), and the Dagster
erasure job from a request file."""

import json
import sqlite3
from datetime import date
from pathlib import Path

import pandas as pd
import pytest

from tagml.compliance.erasure import ErasureRequestError, erase
from tagml.compliance.governance import GovernanceStore
from tagml.compliance.scan import id_pattern, scan_for_customers
from tagml.compliance.suppression import SUPPRESSED, customer_hash, home_salt, load_suppression, suppress
from tagml.core.settings import Settings
from tagml.core.storage import sql_literal
from tagml.features.contract import RAW_TABLES
from tagml.features.delivery import stage_delivery

DELIVERY = date(2026, 11, 5)
HOSTILE = ["O'Brien'; DROP TABLE erasures; --", "line\nbreak", "客户-7\u200b"]


def _suppress(governance_db: Path, ids: list[str]) -> None:
    salt = home_salt(governance_db)
    with GovernanceStore(governance_db).transaction(SUPPRESSED) as con:
        suppress(con, salt, ids, "erasure-test", "2026-12-01T00:00:00+00:00")


def _contract_tables_with_customers() -> list[str]:
    return [s.name for s in RAW_TABLES if any(c.name == "customer_id" for c in s.columns)]


def test_the_hash_is_the_same_in_python_and_duckdb_sql_for_hostile_ids(con):
    salt = "ab" * 32
    for customer in [*HOSTILE, "C000000001"]:
        assert con.execute("SELECT sha256(? || ?)", [salt, customer]).fetchall()[0][0] == customer_hash(salt, customer)


def test_staging_drops_erased_customers_from_every_table_and_counts_them(con, bank, tmp_path):
    governance = tmp_path / "governance" / "governance.db"
    assert load_suppression(governance) is None  # nobody erased: nothing filtered, no store created by reading
    erased = ["C000000003", "C000000011"]
    _suppress(governance, erased)
    assert (governance.parent / "erasure.salt").stat().st_mode & 0o777 == 0o600
    delivery = stage_delivery(con, bank["raw"], tmp_path / "raw", DELIVERY, governance_db=governance)
    expected = {
        t: con.execute(
            f"SELECT count(*) FROM read_parquet({sql_literal(str(bank['raw'] / t / '*.parquet'))}) WHERE customer_id IN (SELECT unnest(?))", [erased]
        ).fetchall()[0][0]
        for t in _contract_tables_with_customers()
    }
    assert delivery.suppressed_rows == expected and expected["customers"] == 2 and expected["transactions"] > 0
    for name, staged in delivery.tables.items():
        if name in expected:
            left = con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(staged.path)}) WHERE customer_id IN (SELECT unnest(?))", [erased]).fetchall()[
                0
            ][0]
            assert left == 0, name
            assert staged.rows == bank["staged_tables"][name].rows - expected[name], name


@pytest.fixture
def small_store(tmp_path) -> Settings:
    """A home whose tag store holds hostile ids next to ordinary ones (no pipeline run)."""
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    settings.ensure_dirs()
    partition = settings.warehouse_dir / "customer_tags" / "as_of=2026-10-31" / "data.parquet"
    partition.parent.mkdir(parents=True)
    ids = [*HOSTILE, "C000000001", "C000000002"]
    pd.DataFrame({"customer_id": ids, "tag": "value_tier", "value": "mass"}).to_parquet(partition)
    (settings.reports_dir / "risk_appetite").mkdir(parents=True)
    (settings.reports_dir / "risk_appetite" / "2026-10-31.html").write_text("<html>features only</html>")
    return settings


def test_erase_treats_hostile_ids_as_data_and_reports_unknown_ones(small_store):
    with pytest.raises(ErasureRequestError, match="no customer ids"):
        erase(small_store, [], "dpo", "request 1")
    receipt = erase(small_store, [HOSTILE[0], HOSTILE[1], "C999999999"], "dpo", "request 2")
    assert (receipt.customers, receipt.customers_found, receipt.rows_removed) == (3, 2, 2)
    assert receipt.stores["customer_tags"].files_rewritten == 1 and receipt.stores["evidently reports"].files_removed == 1
    assert receipt.verified and receipt.verification["hits"]["customer_tags"] == 0
    left = pd.read_parquet(small_store.warehouse_dir / "customer_tags" / "as_of=2026-10-31" / "data.parquet")["customer_id"].tolist()
    assert left == [HOSTILE[2], "C000000001", "C000000002"]
    # the receipt (file and governance row) names no id; the suppression list holds hashes only
    text = Path(receipt.receipt_path).read_text()
    governance = sqlite3.connect(small_store.governance_db)
    rows = governance.execute("SELECT receipt_json, customers, rows_removed FROM erasures").fetchall()
    stored = " ".join(r[0] for r in rows) + " ".join(h for (h,) in governance.execute("SELECT customer_hash FROM suppressed_customers"))
    governance.close()
    assert rows[0][1:] == (3, 2) and json.loads(text)["erasure_id"] == receipt.erasure_id
    assert not id_pattern([HOSTILE[0], HOSTILE[1], "C999999999"]).search((text + stored).encode())
    assert scan_for_customers(small_store, ["C000000001"])["customer_tags"] == 1  # the others are untouched


def test_the_scan_counts_ids_as_whole_tokens_only():
    pattern = id_pattern(["C0001"])
    assert len(pattern.findall(b'{"id": "C0001", "x": "C00012", "y": "AC0001"} C0001')) == 2
