"""Erasure with real stores: the suppression list at staging (DuckDB and Spark hash alike), erase() on a small
store with hostile ids, and the whole loop: a home that ran ingest -> train -> nightly (features, tags, drift with
its Evidently report) in a persistent Dagster instance, two customers erased, every store scanned decoded
(0 hits), then the next nightly from the raw directory that still holds them (still 0 hits), and the Dagster
erasure job from a request file."""

import json
import sqlite3
import time
from datetime import date
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tagml.compliance.erasure import REQUESTS_DIR, REWRITTEN_STORES, ErasureRequestError, erase
from tagml.compliance.scan import id_pattern, scan_for_customers
from tagml.core.governance import GovernanceStore, GovernanceUnavailableError
from tagml.core.settings import Settings
from tagml.core.storage import sql_literal, staged_relation
from tagml.core.suppression import SUPPRESSED, customer_hash, home_salt, load_suppression, suppress
from tagml.features.contract import RAW_TABLES
from tagml.features.delivery import stage_delivery
from tagml.training.versions import registered_model_name

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
    salt = (governance.parent / "erasure.salt").read_text()
    (governance.parent / "erasure.salt").unlink()
    with pytest.raises(GovernanceUnavailableError, match="2 erased customers but the erasure salt"):
        stage_delivery(con, bank["raw"], tmp_path / "raw", DELIVERY, governance_db=governance)
    (governance.parent / "erasure.salt").write_text(salt)
    expected = {
        t: con.execute(
            f"SELECT count(*) FROM read_parquet({sql_literal(str(bank['raw'] / t / '*.parquet'))}) WHERE customer_id IN (SELECT unnest(?))", [erased]
        ).fetchall()[0][0]
        for t in _contract_tables_with_customers()
    }
    assert delivery.suppressed_rows == expected and expected["customers"] == 2 and expected["transactions"] > 0
    for name, staged in delivery.tables.items():
        if name in expected:
            relation = staged_relation(delivery.generation, name)  # an event table is staged as a directory of period files
            left = con.execute(f"SELECT count(*) FROM {relation} WHERE customer_id IN (SELECT unnest(?))", [erased]).fetchall()[0][0]
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


def test_tagml_erase_prints_the_receipt_and_refuses_an_empty_request(small_store, monkeypatch, capsys):
    from tagml.cli import main

    monkeypatch.setenv("TAGML_HOME", str(small_store.home))
    assert main(["erase", "--reason", "DSR-1"]) == 2
    ids = small_store.home / "ids.txt"
    ids.write_text("C000000002\n\nC404\n")
    capsys.readouterr()
    assert main(["erase", "C000000001", "--from-file", str(ids), "--reason", "DSR-1", "--by", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "3 requested, 2 found" in out and "2 rows removed" in out and "1 of the ids had no row" in out and "verified: 0 hits in" in out
    assert "C00000000" not in out and "C404" not in out


def test_the_scan_counts_ids_as_whole_tokens_only():
    pattern = id_pattern(["C0001"])
    assert len(pattern.findall(b'{"id": "C0001", "x": "C00012", "y": "AC0001"} C0001')) == 2


# --- the whole loop, real stores ------------------------------------------------------------------------

TRAINED, NIGHT, NEXT_NIGHT = date(2026, 8, 31), date(2026, 9, 30), date(2026, 10, 31)


def _rows_of(con, path: Path, ids: list[str]) -> int:
    return con.execute(f"SELECT count(*) FROM read_parquet({sql_literal(path)}) WHERE customer_id IN (SELECT unnest(?))", [ids]).fetchall()[0][0]


@pytest.fixture(scope="module")
def pipeline_home(tmp_path_factory):
    """ingest -> train (risk_appetite, value_tier) -> nightly for one as_of, in a Dagster instance stored under the home."""
    import dagster as dg

    from tagml.features.synthetic import BankConfig, generate_bank
    from tagml.orchestration.definitions import build_definitions
    from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB, RAW_INGEST_JOB, TRAIN_ALL_JOB, reevaluation_run_config
    from tests.conftest import write_test_catalog

    root = tmp_path_factory.mktemp("erasure_home")
    write_test_catalog(root / "catalog.yaml", ("risk_appetite", "value_tier"))
    settings = Settings.from_env(
        {"TAGML_HOME": str(root / "home"), "TAGML_CATALOG": str(root / "catalog.yaml"), "TAGML_DRIFT_SAMPLE_ROWS": "500", "TAGML_THREADS": "1"}
    )
    settings.ensure_dirs()
    generate_bank(BankConfig(customers=1500, months=12, seed=5), settings.raw_dir)
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    assert defs.resolve_job_def(RAW_INGEST_JOB).execute_in_process(instance=instance).success
    train = reevaluation_run_config("risk_appetite", TRAINED.isoformat())
    assert defs.resolve_job_def(TRAIN_ALL_JOB).execute_in_process(instance=instance, run_config=train).success
    assert defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(instance=instance, partition_key=NIGHT.isoformat()).success
    return {"settings": settings, "defs": defs, "instance": instance}


@pytest.mark.slow
def test_erasure_leaves_no_trace_in_any_store_and_survives_the_next_nightly(pipeline_home):
    from tagml.orchestration.compliance_jobs import ERASURE_JOB
    from tagml.orchestration.jobs import NIGHTLY_SCORING_JOB

    settings, defs, instance = pipeline_home["settings"], pipeline_home["defs"], pipeline_home["instance"]
    staged = settings.warehouse_dir / "raw"
    with duckdb.connect() as con:
        # two labelled customers: they are in the training snapshot, so the model version is named
        erased = [
            r[0]
            for r in con.execute(
                f"SELECT DISTINCT customer_id FROM read_parquet({sql_literal(staged / 'tag_labels.parquet')}) WHERE tag = 'risk_appetite' ORDER BY 1 LIMIT 2"
            ).fetchall()
        ]
        tags_partition = settings.warehouse_dir / "customer_tags" / f"as_of={NIGHT}" / "data.parquet"
        expected_tag_rows = _rows_of(con, tags_partition, erased)
    before = scan_for_customers(settings, erased)
    assert before["customer_tags"] == expected_tag_rows > 0 and before["customer_features"] > 0 and before["training_sets"] > 0

    started = time.perf_counter()
    receipt = erase(settings, erased, "dpo@bank", "DSR-2026-0042")
    erase_seconds = time.perf_counter() - started
    started = time.perf_counter()
    after = scan_for_customers(settings, erased)
    scan_seconds = time.perf_counter() - started
    print(
        f"\nERASURE-MEASURE erase {erase_seconds:.1f} s ({receipt.rows_removed} rows), scan {scan_seconds:.1f} s ({receipt.verification['files_scanned']} files)"
    )
    print("ERASURE-MEASURE", json.dumps({"before": before, **{k: v for k, v in receipt.to_dict().items() if k in ("stores", "verification", "seconds")}}))

    assert receipt.verified and receipt.customers == receipt.customers_found == 2
    assert {k: v for k, v in after.items() if k != "raw delivery"} == dict.fromkeys([k for k in after if k != "raw delivery"], 0)
    assert after["raw delivery"] > 0  # the bank's own directory: named in the receipt, not rewritten
    assert receipt.stores["customer_tags"].rows_removed == expected_tag_rows
    assert receipt.rows_removed == sum(before[s] for s in REWRITTEN_STORES)
    assert receipt.model_versions == [f"{registered_model_name('risk_appetite')}/1"]
    assert receipt.stores["evidently reports"].files_removed == 1 and not (settings.reports_dir / "risk_appetite" / f"{NIGHT}.html").exists()
    [snapshot] = receipt.snapshots
    assert snapshot["sha256_before"] != snapshot["sha256_after"]
    assert any("raw delivery directory" in a for a in receipt.bank_actions)

    # the next nightly stages again from the raw directory that still holds them: suppressed, never back
    night = defs.resolve_job_def(NIGHTLY_SCORING_JOB).execute_in_process(instance=instance, partition_key=NEXT_NIGHT.isoformat())
    assert night.success
    staged_meta = {
        e.asset_key.path[-1]: e.step_materialization_data.materialization.metadata
        for e in night.get_asset_materialization_events()
        if e.asset_key.path[-1].startswith("raw_")
    }
    # the raw files did not change, so the staged tables (rewritten by the erasure) are carried over as they are: nothing to
    # suppress, nothing comes back (a changed or restated raw file is validated again, and then suppressed: the staging test above)
    assert staged_meta["raw_customers"]["carried_over"].value is True
    assert staged_meta["raw_customers"]["erased_rows_suppressed"].value == 0
    assert (settings.reports_dir / "risk_appetite" / f"{NEXT_NIGHT}.html").exists()
    again = scan_for_customers(settings, erased)
    assert {k: v for k, v in again.items() if k != "raw delivery"} == dict.fromkeys([k for k in again if k != "raw delivery"], 0), again

    # the Dagster job: the id travels in a request file, never in the run config, and the file is gone after
    with duckdb.connect() as con:
        [(third,)] = con.execute(f"SELECT customer_id FROM read_parquet({sql_literal(staged / 'customers.parquet')}) ORDER BY 1 DESC LIMIT 1").fetchall()
    request = settings.governance_db.parent / REQUESTS_DIR / "dsr-43.txt"
    request.parent.mkdir(parents=True, exist_ok=True)
    request.write_text(third + "\n")
    config = {"ops": {"erase_customers": {"config": {"request_file": "dsr-43.txt", "reason": "DSR-2026-0043", "requested_by": "dpo@bank"}}}}
    result = defs.resolve_job_def(ERASURE_JOB).execute_in_process(instance=instance, run_config=config)
    assert result.success and not request.exists()
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    assert output.event_specific_data.metadata["verified"].value is True
    final = scan_for_customers(settings, [third, *erased])
    assert {k: v for k, v in final.items() if k != "raw delivery"} == dict.fromkeys([k for k in final if k != "raw delivery"], 0), final
    with GovernanceStore(settings.governance_db).read() as governance:
        assert governance.execute("SELECT count(*) FROM erasures").fetchall()[0][0] == 2
    assert pq.read_table(settings.warehouse_dir / "customer_tags" / f"as_of={NEXT_NIGHT}" / "data.parquet").num_rows > 0


@pytest.mark.spark
@pytest.mark.slow
def test_spark_staging_suppresses_the_same_rows_as_duckdb(spark, con, bank, tmp_path):
    from tagml.features.spark_staging import stage_delivery_spark

    governance = tmp_path / "governance" / "governance.db"
    salt = home_salt(governance)
    # Spark's sha2 over the same concatenation: the hash of a hostile id agrees with Python's (and so DuckDB's)
    for customer in HOSTILE:
        assert spark.sql("SELECT sha2(concat(:salt, :id), 256) AS h", args={"salt": salt, "id": customer}).collect()[0]["h"] == customer_hash(salt, customer)
    _suppress(governance, ["C000000003", "C000000011", HOSTILE[0]])
    duck = stage_delivery(con, bank["raw"], tmp_path / "duck" / "raw", DELIVERY, governance_db=governance)
    on_spark = stage_delivery_spark(spark, bank["raw"], tmp_path / "spark" / "raw", DELIVERY, governance_db=governance)
    assert on_spark.suppressed_rows == duck.suppressed_rows and duck.suppressed_rows["customers"] == 2
    for name, staged in duck.tables.items():
        ours = pq.read_table(on_spark.tables[name].path).to_pandas()
        theirs = pq.read_table(staged.path).to_pandas()
        assert len(ours) == len(theirs) == staged.rows, name
        if "customer_id" in theirs:
            assert set(ours["customer_id"]) == set(theirs["customer_id"]) and not {"C000000003", "C000000011"} & set(ours["customer_id"]), name
