"""Purpose-marked exports (tagml.compliance.exports) over a real tag partition, staged consents and governance store.

The tiny world: six customers with hand-written consent events around the as_of 2026-09-30, three
tags of the shipped catalog (value_tier internal, risk_appetite confidential, life_stage left a draft).
"""

import hashlib
import json
import sqlite3
from datetime import date

import duckdb
import pandas as pd
import pytest

from tagml.cli.lookup import ExportPurpose
from tagml.compliance import lifecycle
from tagml.compliance.consent import EXPORT_PURPOSES, ConsentUnavailableError, consent_states_sql
from tagml.compliance.exports import ExportError, ExportSources, export_tags, manifest_path, recorded_exports
from tagml.core.governance import GovernanceStore, GovernanceUnavailableError
from tagml.core.storage import sql_literal, staged_path
from tagml.scoring.lookup import customer_tags
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import load_catalog

AS_OF, LATER = date(2026, 9, 30), date(2026, 10, 31)
CUSTOMERS = ("C1", "C2", "C3", "C4", "C5", "C6")
CONSENTS = [
    ("C1", "marketing", "granted", "2026-01-01 10:00:00"),
    ("C1", "personalisation", "withdrawn", "2026-02-01 10:00:00"),  # another purpose: no effect on marketing
    ("C2", "marketing", "granted", "2026-01-01 10:00:00"),
    ("C2", "marketing", "withdrawn", "2026-09-15 08:30:00"),  # withdrew before as_of
    ("C3", "marketing", "granted", "2026-10-05 09:00:00"),  # granted after as_of: does not count then
    # C4: no event at all (opt-in: no consent)
    ("C5", "marketing", "granted", "2026-09-30 23:59:59"),  # the last second of as_of counts
    ("C5", "marketing", "withdrawn", "2026-10-01 00:00:00"),  # the next day's withdrawal does not (yet)
    ("C6", "marketing", "granted", "2026-03-01 12:00:00"),
    ("C6", "marketing", "withdrawn", "2026-03-01 12:00:00"),  # the same instant: the withdrawal wins
]
TAGS = ("value_tier", "risk_appetite", "life_stage")


def _write_consents(staged_dir, rows) -> None:
    staged_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=["customer_id", "purpose", "status", "recorded_at"]).assign(channel="app")
    frame["recorded_at"] = pd.to_datetime(frame["recorded_at"])
    frame.to_parquet(staged_path(staged_dir, "consents"), index=False)


def _write_partition(store: ParquetTagStore, as_of: date) -> None:
    path = store.partition_path(as_of)
    path.parent.mkdir(parents=True)
    values = ", ".join(f"({sql_literal(c)}, {sql_literal(t)})" for c in CUSTOMERS for t in TAGS)
    with duckdb.connect() as con:
        con.execute(
            f"COPY (SELECT customer_id, DATE {sql_literal(as_of.isoformat())} AS as_of, tag, 'v' AS value, 0.5::DOUBLE AS probability, "
            "NULL::MAP(VARCHAR, DOUBLE) AS probabilities, ['r']::VARCHAR[] AS reasons, 'rule' AS source, 'rule:1' AS producer, "
            "NULL::VARCHAR AS model_version, NULL::VARCHAR AS observed_value, NULL::VARCHAR AS inferred_value, NULL::BOOLEAN AS observed_mismatch, "
            f"TIMESTAMP '2026-10-01 02:00:00' AS scored_at FROM (VALUES {values}) t(customer_id, tag)) TO {sql_literal(str(path))} (FORMAT parquet)"
        )


@pytest.fixture
def world(tmp_path):
    store = ParquetTagStore(tmp_path / "warehouse" / "customer_tags", protected=[tmp_path / "warehouse"])
    for day in (AS_OF, LATER):
        _write_partition(store, day)
    staged = tmp_path / "warehouse" / "raw"
    _write_consents(staged, CONSENTS)
    catalog = load_catalog()
    governance = GovernanceStore(tmp_path / "governance" / "governance.db")
    for name in ("value_tier", "risk_appetite"):
        lifecycle.approve(governance, catalog.get(name), by="validator", reason="validated for the test")
        lifecycle.publish(governance, catalog.get(name), by="tag-owner")
    con = duckdb.connect()
    yield {"sources": ExportSources(store, staged, catalog, governance), "con": con, "out": tmp_path / "out" / "tags.parquet", "staged": staged}
    con.close()


def _export(world, **kwargs):
    world["out"].parent.mkdir(exist_ok=True)
    kwargs.setdefault("out", world["out"])
    return export_tags(world["con"], world["sources"], by="crm-batch", **kwargs)


def test_a_marketing_export_leaves_out_customers_without_consent_and_records_why(world):
    record = _export(world, purpose="marketing", as_of=AS_OF)
    exported = pd.read_parquet(world["out"])
    # C1 consented; C5's grant in the last second of as_of counts; C2 and C6 withdrew; C3's grant came later; C4 never answered
    assert sorted(exported["customer_id"].unique()) == ["C1", "C5"] and set(exported["tag"]) == {"value_tier"}
    assert record.excluded == {"no_consent": 2, "withdrawn": 2} and (record.rows, record.customers) == (2, 2)
    assert record.left_out == {"life_stage": "draft", "risk_appetite": "confidential (needs --include-confidential)"}
    assert record.sha256 == hashlib.sha256(world["out"].read_bytes()).hexdigest() and not record.confidential_included

    manifest = json.loads(manifest_path(world["out"]).read_text())
    [row] = recorded_exports(world["sources"].governance)
    assert manifest == record.as_dict() and manifest["excluded"] == {"no_consent": 2, "withdrawn": 2}
    recorded = (row["export_id"], row["by"], row["purpose"], row["as_of"], row["rows"], row["customers"])
    assert recorded == (record.export_id, "crm-batch", "marketing", "2026-09-30", 2, 2)
    assert json.loads(row["excluded"]) == record.excluded and json.loads(row["left_out"]) == record.left_out and row["sha256"] == record.sha256
    assert not any(c in json.dumps(manifest) + json.dumps(row) for c in CUSTOMERS)  # counts only, never customer ids


def test_consent_granted_after_as_of_counts_from_its_day_on(world):
    record = _export(world, purpose="marketing", as_of=LATER)
    # a month later C3's grant counts and C5's withdrawal of 2026-10-01 does
    assert sorted(pd.read_parquet(world["out"])["customer_id"].unique()) == ["C1", "C3"]
    assert record.excluded == {"no_consent": 1, "withdrawn": 3} and record.as_of == "2026-10-31"


def test_confidential_tags_need_the_flag_and_unpublished_ones_never_leave(world):
    record = _export(world, purpose="marketing", as_of=AS_OF, include_confidential=True, fmt="csv", out=world["out"].with_suffix(".csv"))
    exported = pd.read_csv(world["out"].with_suffix(".csv"))
    assert set(exported["tag"]) == {"value_tier", "risk_appetite"} and record.confidential_included and record.left_out == {"life_stage": "draft"}
    assert record.sha256 == hashlib.sha256(world["out"].with_suffix(".csv").read_bytes()).hexdigest()
    with pytest.raises(ExportError, match="nothing to export for marketing .*life_stage: draft"):
        _export(world, purpose="marketing", as_of=AS_OF, tags=["life_stage"])
    with pytest.raises(ExportError, match="unknown tags \\['no_such_tag'\\]"):
        _export(world, purpose="marketing", tags=["no_such_tag"])
    assert len(recorded_exports(world["sources"].governance)) == 1


def test_an_unpublished_tag_is_hidden_from_lookups_by_name(world):
    sources = world["sources"]
    published = lifecycle.published_tags(sources.governance, sources.catalog)
    result = customer_tags(world["con"], sources.store, "C1", AS_OF, published=published)
    assert [t["tag"] for t in result["tags"]] == ["risk_appetite", "value_tier"] and result["hidden"] == ["life_stage"]
    lifecycle.retire(sources.governance, sources.catalog.get("value_tier"), by="tag-owner", reason="superseded")
    published = lifecycle.published_tags(sources.governance, sources.catalog)
    result = customer_tags(world["con"], sources.store, "C1", AS_OF, published=published)
    assert [t["tag"] for t in result["tags"]] == ["risk_appetite"] and result["hidden"] == ["life_stage", "value_tier"]


def test_without_a_consents_table_a_purpose_export_refuses_and_service_needs_none(world):
    staged_path(world["staged"], "consents").unlink()
    with pytest.raises(ConsentUnavailableError, match="no consents table was delivered .*nothing was exported"):
        _export(world, purpose="marketing")
    assert not world["out"].exists() and recorded_exports(world["sources"].governance) == []
    record = _export(world, purpose="service", as_of=AS_OF)
    assert record.excluded == {} and record.customers == len(CUSTOMERS) and recorded_exports(world["sources"].governance)[0]["purpose"] == "service"


def test_no_record_no_file(world, tmp_path):
    broken = ExportSources(world["sources"].store, world["staged"], world["sources"].catalog, GovernanceStore(tmp_path))  # a directory, not a file
    with pytest.raises(GovernanceUnavailableError):
        export_tags(world["con"], broken, purpose="service", out=world["out"], by="x")
    assert not world["out"].exists() and not manifest_path(world["out"]).exists()


def test_consent_states_match_an_independent_count_on_the_synthetic_bank(bank):
    consents = pd.read_parquet(staged_path(bank["staged"], "consents"))
    day = consents["recorded_at"].max().date()
    with duckdb.connect() as con:
        states = con.execute(f"SELECT state, count(*) FROM ({consent_states_sql(bank['staged'], 'marketing', day)}) GROUP BY 1").fetchall()
    marketing = consents[(consents["purpose"] == "marketing") & (consents["recorded_at"] < pd.Timestamp(day) + pd.Timedelta(days=1))]
    last = marketing.sort_values(["recorded_at", "status"]).groupby("customer_id")["status"].last()  # 'withdrawn' sorts after 'granted'
    assert dict(states) == last.value_counts().to_dict() and dict(states)["withdrawn"] > 0


def test_the_cli_offers_exactly_the_export_purposes():
    assert tuple(p.value for p in ExportPurpose) == EXPORT_PURPOSES


def test_hostile_text_in_a_consent_row_stays_data(world):
    _write_consents(world["staged"], [*CONSENTS, ("C4'); DROP TABLE x; --\n☃", "marketing", "granted", "2026-01-01 00:00:00")])
    record = _export(world, purpose="marketing", as_of=AS_OF)
    assert record.excluded == {"no_consent": 2, "withdrawn": 2}  # the stranger is not a customer of the partition
    assert sqlite3.connect(world["sources"].governance.path).execute("SELECT count(*) FROM exports").fetchone() == (1,)
