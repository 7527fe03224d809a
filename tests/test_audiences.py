"""Audiences (tagml.serving.audiences) over a hand-checked tiny world: two real tag partitions, staged consents,
a real governance store and contact history under a real home.

The world (risk_appetite is a model tag, value_tier a rule tag; both published, life_stage left a draft):

    customer  risk Jun  risk Sep  p(Sep)  p(C3) Sep  value_tier Sep   marketing consent at Sep 30
    C1        C2        C4        0.80    0.15       affluent         granted
    C2        C2        C2        0.60    0.40       mass             granted
    C3        C3        C4        0.65    0.35       high_net_worth   granted
    C4        C2        C5        0.90    0.05       private_banking  none
    C5        C4        C4        0.75    0.25       mass             granted, then withdrawn
    C6        (new)     C4        0.55    0.45       affluent         granted
    H1        C1        C1        0.95    0.05       mass             granted     (id: quotes and '; DROP)
    H2        C5        C5        0.70    0.30       affluent         granted     (id: a spreadsheet formula)
    H3        C3        C3        0.50    0.50       mass             none        (id: unicode)
"""

import json
import os
import re
import sqlite3
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from tagml.compliance import lifecycle
from tagml.compliance.erasure import erase
from tagml.compliance.exports import manifest_path
from tagml.core.governance import GovernanceUnavailableError
from tagml.core.settings import Settings
from tagml.core.storage import WarehouseLayout, sql_literal, staged_path
from tagml.scoring.store import ParquetTagStore
from tagml.serving.audiences import (
    AudienceError,
    AudienceQueryError,
    AudienceSources,
    ContactCap,
    audience_customers,
    count_audience,
    export_audience,
    parse_query,
    recorded_audiences,
)

JUNE, SEPT = date(2026, 6, 30), date(2026, 9, 30)
H1, H2, H3 = "O'Brien\"; DROP TABLE customer_tags;--", '=HYPERLINK("http://x")', "客户-七"
# customer: (risk June, risk Sept, probability Sept, probability of C3 Sept, value_tier Sept)
WORLD = {
    "C1": ("C2", "C4", 0.80, 0.15, "affluent"),
    "C2": ("C2", "C2", 0.60, 0.40, "mass"),
    "C3": ("C3", "C4", 0.65, 0.35, "high_net_worth"),
    "C4": ("C2", "C5", 0.90, 0.05, "private_banking"),
    "C5": ("C4", "C4", 0.75, 0.25, "mass"),
    "C6": (None, "C4", 0.55, 0.45, "affluent"),
    H1: ("C1", "C1", 0.95, 0.05, "mass"),
    H2: ("C5", "C5", 0.70, 0.30, "affluent"),
    H3: ("C3", "C3", 0.50, 0.50, "mass"),
}
CONSENTS = [
    *[(c, "marketing", "granted", "2026-01-01 10:00:00") for c in ("C1", "C2", "C3", "C5", "C6", H1, H2)],
    ("C5", "marketing", "withdrawn", "2026-09-01 10:00:00"),
    ("C4", "personalisation", "granted", "2026-01-01 10:00:00"),  # another purpose: not marketing consent
]
RISK_HIGH = {"tag": "risk_appetite", "in": ["C4", "C5"]}
NOW = datetime(2026, 10, 15, 12, 0, tzinfo=UTC)


def _rows(as_of: date) -> list[dict]:
    rows = []
    for customer, (june, sept, p, p_c3, tier) in WORLD.items():
        risk = june if as_of == JUNE else sept
        if risk is None:
            continue
        if as_of == JUNE:
            p, p_c3, tier = 0.5, 0.2, tier if customer != "C3" else "affluent"
        other = "C3" if risk != "C3" else "C2"
        probabilities = {risk: p} | ({other: p_c3} if risk != "C3" else {})
        common = {"customer_id": customer, "as_of": as_of, "reasons": ["r"], "producer": "x", "scored_at": pd.Timestamp("2026-10-01 02:00")}
        rows.append(
            {
                **common,
                "tag": "risk_appetite",
                "value": risk,
                "probability": p,
                "keys": list(probabilities),
                "vals": list(probabilities.values()),
                "source": "model",
            }
        )
        rows.append({**common, "tag": "value_tier", "value": tier, "probability": None, "keys": None, "vals": None, "source": "rule"})
        rows.append({**common, "tag": "life_stage", "value": "single", "probability": 0.9, "keys": ["single"], "vals": [0.9], "source": "model"})
    return rows


def _write_partition(store: ParquetTagStore, as_of: date) -> None:
    path = store.partition_path(as_of)
    path.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect() as con:
        con.register("rows", pd.DataFrame(_rows(as_of)))
        con.execute(
            "COPY (SELECT customer_id, as_of::DATE AS as_of, tag, value, probability::DOUBLE AS probability, "
            "CASE WHEN keys IS NOT NULL THEN map(keys::VARCHAR[], vals::DOUBLE[]) END AS probabilities, reasons, source, producer, scored_at FROM rows) "
            f"TO {sql_literal(path)} (FORMAT parquet)"
        )


@pytest.fixture
def world(tmp_path):
    settings = Settings.from_env({"TAGML_HOME": str(tmp_path / "home")})
    settings.ensure_dirs()
    sources = AudienceSources.from_settings(settings)
    for day in (JUNE, SEPT):
        _write_partition(sources.store, day)
    staged = WarehouseLayout(settings.warehouse_dir).staged_dir
    staged.mkdir(parents=True, exist_ok=True)
    consents = pd.DataFrame(CONSENTS, columns=["customer_id", "purpose", "status", "recorded_at"]).assign(channel="app")
    consents["recorded_at"] = pd.to_datetime(consents["recorded_at"])
    consents.to_parquet(staged_path(staged, "consents"), index=False)
    for name in ("value_tier", "risk_appetite"):
        lifecycle.approve(sources.governance, sources.catalog.get(name), by="validator", reason="validated for the test")
        lifecycle.publish(sources.governance, sources.catalog.get(name), by="tag-owner")
    con = duckdb.connect()
    yield {"settings": settings, "sources": sources, "con": con, "visible": {"value_tier", "risk_appetite"}}
    con.close()


def _select(world, query, **kwargs) -> list[str]:
    kwargs.setdefault("visible_tags", world["visible"])
    return audience_customers(world["con"], world["sources"], query, **kwargs)


def _count(world, query, **kwargs):
    kwargs.setdefault("visible_tags", world["visible"])
    return count_audience(world["con"], world["sources"], query, **kwargs)


def _export(world, query, **kwargs):
    kwargs.setdefault("visible_tags", world["visible"])
    kwargs.setdefault("by", "crm-batch")
    kwargs.setdefault("purpose", "marketing")
    kwargs.setdefault("name", "spring campaign")
    return export_audience(world["con"], world["sources"], query, **kwargs)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (RISK_HIGH, ["C1", "C3", "C4", "C5", "C6", H2]),
        ({"all": [RISK_HIGH, {"tag": "value_tier", "in": ["affluent", "high_net_worth", "private_banking"]}]}, ["C1", "C3", "C4", "C6", H2]),
        ({"any": [{"tag": "value_tier", "in": ["private_banking"]}, {"tag": "risk_appetite", "in": ["C1"]}]}, ["C4", H1]),
        ({"not": RISK_HIGH}, ["C2", H1, H3]),
        ({"not": {"not": RISK_HIGH}}, ["C1", "C3", "C4", "C5", "C6", H2]),
        ({"tag": "risk_appetite", "probability": {"gte": 0.7}}, ["C1", "C4", "C5", H1, H2]),
        ({"tag": "risk_appetite", "probability": {"gt": 0.6, "lt": 0.8}}, ["C3", "C5", H2]),
        ({"tag": "risk_appetite", "probability": {"gte": 0.35, "class": "C3"}}, ["C2", "C3", "C6", H3]),
        ({"tag": "risk_appetite", "changed": {"from": ["C2"], "to": ["C4"], "since": "2026-06-30"}}, ["C1"]),
        ({"tag": "risk_appetite", "changed": {"to": ["C4", "C5"], "since": "2026-07-15"}}, ["C1", "C3", "C4"]),  # C6 is new, C5 was C4 already
        ({"tag": "value_tier", "changed": {"since": "2026-06-30"}}, ["C3"]),
        ({"consent": "marketing"}, ["C1", "C2", "C3", "C6", H1, H2]),
        # changed up (C2 -> C4/C5) or high net worth, and never asked for marketing
        (
            {
                "all": [
                    {
                        "any": [
                            {"tag": "risk_appetite", "changed": {"from": ["C2"], "to": ["C4", "C5"], "since": "2026-06-30"}},
                            {"tag": "value_tier", "in": ["high_net_worth"]},
                        ]
                    },
                    {"not": {"consent": "marketing"}},
                ]
            },
            ["C4"],
        ),
    ],
)
def test_each_operator_selects_the_hand_checked_customers(world, query, expected):
    assert _select(world, query) == sorted(expected)
    count = _count(world, query)
    assert (count.as_of, count.matched, count.selected, count.excluded) == ("2026-09-30", len(expected), len(expected), {})


def test_the_june_partition_is_counted_when_asked_for(world):
    assert _select(world, {"tag": "risk_appetite", "in": ["C2"]}, as_of=date(2026, 8, 1)) == ["C1", "C2", "C4"]
    with pytest.raises(AudienceError, match="no tag partition on or before 2026-01-01"):
        _count(world, RISK_HIGH, as_of=date(2026, 1, 1))
    with pytest.raises(AudienceQueryError, match="needs a date before the partition counted"):
        _count(world, {"tag": "risk_appetite", "changed": {"since": "2026-09-30"}})
    with pytest.raises(AudienceQueryError, match="no tag partition on or before 2026-05-01"):
        _count(world, {"tag": "risk_appetite", "changed": {"since": "2026-05-01"}})


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (
            {"all": [RISK_HIGH, RISK_HIGH, {"tag": "risk_appetite", "in": ["C9"]}]},
            "query.all[2].in[0]: 'C9' is not a class of risk_appetite (C1, C2, C3, C4, C5)",
        ),
        ({"tag": "no_such_tag", "in": ["x"]}, "query.tag: unknown tag 'no_such_tag'"),
        ({"tag": "life_stage", "in": ["single"]}, "query.tag: tag 'life_stage' is not available to this caller"),
        ({"tag": 7, "in": ["C1"]}, "query.tag: a tag name is text, got 7"),
        ({"tag": "risk_appetite", "in": []}, "query.in: expected a non-empty list of classes of risk_appetite"),
        ({"tag": "risk_appetite", "in": "C4"}, "query.in: expected a non-empty list"),
        ({"all": []}, "query.all: expected a non-empty list of conditions"),
        ({"any": [RISK_HIGH, "C4"]}, "query.any[1]: expected an object"),
        ({"not": RISK_HIGH, "tag": "x"}, "query: 'not' must be the only key"),
        ({"tag": "risk_appetite", "in": ["C4"], "probability": {"gte": 0.5}}, "query: a tag condition needs exactly one of in, probability, changed"),
        ({"tag": "risk_appetite", "in": ["C4"], "extra": 1}, "query: unknown keys ['extra']"),
        ({"tag": "risk_appetite", "probability": {"gte": 1.5}}, "query.probability.gte: a probability is a number from 0 to 1, got 1.5"),
        ({"tag": "risk_appetite", "probability": {"gte": True}}, "query.probability.gte: a probability is a number"),
        ({"tag": "risk_appetite", "probability": {"gte": "0.7"}}, "query.probability.gte: a probability is a number"),
        ({"tag": "risk_appetite", "probability": {"class": "C4"}}, "query.probability: give at least one bound"),
        ({"tag": "risk_appetite", "probability": {"gte": 0.5, "class": "C7"}}, "query.probability.class: 'C7' is not a class of risk_appetite"),
        ({"tag": "value_tier", "probability": {"gte": 0.5}}, "query.tag: value_tier is a rule tag"),
        ({"tag": "risk_appetite", "changed": {"from": ["C2"]}}, "query.changed.since: expected a date YYYY-MM-DD, got None"),
        ({"tag": "risk_appetite", "changed": {"since": "2026-02-30"}}, "query.changed.since: expected a date"),
        ({"tag": "risk_appetite", "changed": {"since": "2026-06-30", "to": ["X"]}}, "query.changed.to[0]: 'X' is not a class"),
        ({"consent": "spam"}, "query.consent: 'spam' is not a consent purpose"),
        ({"consent": "service"}, "query.consent: 'service' is not a consent purpose"),
        ([RISK_HIGH], "query: expected an object"),
        ({}, "query: expected one of all, any, not, tag or consent"),
    ],
)
def test_each_validation_error_names_its_path(world, query, message):
    with pytest.raises(AudienceQueryError, match=re.escape(message)):
        _count(world, query)


def test_depth_size_and_visibility_limits(world):
    deep = RISK_HIGH
    for _ in range(9):
        deep = {"not": deep}
    with pytest.raises(AudienceQueryError, match="nested deeper than 8"):
        parse_query(deep, world["sources"].catalog)
    with pytest.raises(AudienceQueryError, match="query.any: more than 100 conditions"):
        parse_query({"any": [RISK_HIGH] * 101}, world["sources"].catalog)
    with pytest.raises(AudienceQueryError, match="more than 200 conditions"):
        parse_query({"all": [{"any": [RISK_HIGH] * 60}] * 4}, world["sources"].catalog)
    # by default (no visible set given) a confidential tag such as risk_appetite is refused, a published internal one allowed
    with pytest.raises(AudienceQueryError, match="query.tag: tag 'risk_appetite' is not available"):
        count_audience(world["con"], world["sources"], RISK_HIGH)
    assert count_audience(world["con"], world["sources"], {"tag": "value_tier", "in": ["mass"]}).matched == 4


@pytest.mark.parametrize("hostile", ["C4'; DROP TABLE customer_tags;--", 'C4" OR 1=1', "高风险", "C4\x00", "' OR ''='"])
def test_hostile_strings_are_data(world, hostile):
    """A hostile value is refused by the catalog check, echoed back as data; nothing is run or changed."""
    before = _select(world, RISK_HIGH)
    with pytest.raises(AudienceQueryError, match=r"query.in\[1\]: .* is not a class of risk_appetite"):
        _count(world, {"tag": "risk_appetite", "in": ["C4", hostile]})
    with pytest.raises(AudienceQueryError, match="query.tag: unknown tag"):
        _count(world, {"tag": hostile, "in": ["C4"]})
    assert _select(world, RISK_HIGH) == before and len(world["sources"].store.partitions()) == 2


def test_consent_exclusions_are_counted_per_reason(world):
    count = _count(world, RISK_HIGH, purpose="marketing")
    # matched C1 C3 C4 C5 C6 H2: C4 never consented, C5 withdrew
    assert (count.matched, count.excluded, count.selected) == (6, {"no_consent": 1, "withdrawn": 1}, 4)
    assert _select(world, RISK_HIGH, purpose="marketing") == sorted(["C1", "C3", "C6", H2])
    service = _count(world, RISK_HIGH, purpose="service")
    assert (service.matched, service.excluded, service.selected) == (6, {}, 6)
    personalised = _count(world, RISK_HIGH, purpose="personalisation")  # only C4 consented to it
    assert personalised.excluded == {"no_consent": 5} and personalised.selected == 1
    with pytest.raises(AudienceQueryError, match="purpose: unknown export purpose 'spam'"):
        _count(world, RISK_HIGH, purpose="spam")


def test_contact_cap_excludes_customers_in_enough_recent_audiences(world):
    affluent = {"tag": "value_tier", "in": ["affluent"]}
    cap = ContactCap(2, 30)
    old = _export(world, RISK_HIGH, cap=cap, now=NOW - timedelta(days=60))  # outside every window below but the 70-day one
    first = _export(world, RISK_HIGH, cap=cap, now=NOW - timedelta(days=20))
    second = _export(world, affluent, cap=cap, now=NOW - timedelta(days=10))
    assert (old.selected, first.selected, first.excluded.get("contact_cap"), second.selected) == (4, 4, None, 3)
    # now: C1, C6 and H2 were in `first` and `second` (2 in 30 days); C3 only in `first`: the old one does not count
    count = _count(world, RISK_HIGH, purpose="marketing", cap=cap, now=NOW)
    assert (count.matched, count.excluded, count.selected) == (6, {"contact_cap": 3, "no_consent": 1, "withdrawn": 1}, 1)
    assert _select(world, RISK_HIGH, purpose="marketing", cap=cap, now=NOW) == ["C3"]
    assert _count(world, RISK_HIGH, purpose="marketing", cap=ContactCap(2, 70), now=NOW).excluded["contact_cap"] == 4
    assert "contact_cap" not in _count(world, RISK_HIGH, purpose="marketing", cap=ContactCap(0, 30), now=NOW).excluded  # 0: off
    assert "contact_cap" not in _count(world, RISK_HIGH, purpose="marketing", cap=ContactCap(3, 30), now=NOW).excluded
    assert "contact_cap" not in _count(world, RISK_HIGH, purpose="service", cap=cap, now=NOW).excluded  # another purpose's history
    with pytest.raises(AudienceQueryError, match="cap.days: a whole number >= 0"):
        ContactCap(2, -1)


def test_export_writes_file_manifest_history_and_a_counts_only_record(world):
    query = {"all": [RISK_HIGH, {"tag": "value_tier", "in": ["affluent", "high_net_worth"]}]}
    record = _export(world, query, cap=ContactCap(3, 30), now=NOW)
    out = world["settings"].home / "audiences"
    assert record.out.startswith(str(out.resolve())) and record.out.endswith(".parquet")
    frame = pd.read_parquet(record.out)
    assert list(frame.columns) == ["customer_id", "risk_appetite", "value_tier"] == record.columns
    expected = [["C1", "C4", "affluent"], ["C3", "C4", "high_net_worth"], ["C6", "C4", "affluent"], [H2, "C5", "affluent"]]
    assert frame.values.tolist() == sorted(expected)
    manifest = json.loads(manifest_path(record.out).read_text())
    assert manifest == json.loads(json.dumps(record.as_dict()))
    assert (manifest["matched"], manifest["selected"], manifest["excluded"], manifest["cap"]) == (4, 4, {}, {"max_audiences": 3, "days": 30})
    assert manifest["query"] == query and manifest["query_normalised"]["all"][1] == {"tag": "value_tier", "in": ["affluent", "high_net_worth"]}
    history = world["settings"].warehouse_dir / "contact_history" / "purpose=marketing"
    [history_file] = history.glob("*.parquet")
    assert sorted(pd.read_parquet(history_file)["customer_id"]) == sorted(frame["customer_id"])
    [row] = recorded_audiences(world["sources"].governance)
    assert (row["audience_id"], row["name"], row["by"], row["selected"], row["sha256"]) == (
        record.audience_id,
        "spring campaign",
        "crm-batch",
        4,
        record.sha256,
    )
    assert row["query"] == record.query_normalised and row["query_sha256"] == parse_query(query, world["sources"].catalog).sha256
    with sqlite3.connect(world["sources"].governance.path) as db:
        dump = "\n".join(db.iterdump())
    # counts only, never ids (C6 and H2 were selected; C1..C5 are also risk classes, so they are not telling)
    assert not any(c in text for c in ("C6", H2) for text in (dump, manifest_path(record.out).read_text()))


def test_csv_export_guards_formulas_and_keeps_hostile_ids_as_data(world, tmp_path):
    out = tmp_path / "crm" / "audience.csv"
    record = _export(world, {"tag": "value_tier", "in": ["affluent", "mass"]}, purpose="service", fmt="csv", out=out)
    frame = pd.read_csv(out, keep_default_na=False)
    assert sorted(frame["customer_id"]) == sorted(["C1", "C2", "C5", "C6", H1, "'" + H2, H3])
    assert record.selected == 7 and record.excluded == {} and manifest_path(out).exists()
    with pytest.raises(AudienceError, match="inside"):
        _export(world, RISK_HIGH, out=world["settings"].warehouse_dir / "a.parquet")
    with pytest.raises(AudienceQueryError, match="format: 'xlsx'"):
        _export(world, RISK_HIGH, fmt="xlsx")
    with pytest.raises(AudienceQueryError, match="by: a non-empty text"):
        _export(world, RISK_HIGH, by=" ")
    with pytest.raises(AudienceError, match="selects nobody"):
        _export(world, {"all": [RISK_HIGH, {"not": RISK_HIGH}]})
    assert len(recorded_audiences(world["sources"].governance)) == 1


def test_a_campaign_is_reproduced_from_its_manifest(world):
    cap = ContactCap(1, 30)
    _export(world, RISK_HIGH, cap=cap, now=NOW - timedelta(days=5))
    record = _export(world, {"tag": "value_tier", "in": ["affluent", "mass"]}, cap=cap, now=NOW)  # C1, C6, H2 capped by the first
    later = _export(world, {"tag": "value_tier", "in": ["mass"]}, cap=ContactCap(0, 0), now=NOW + timedelta(days=1))  # C2 and H1 again
    manifest = json.loads(manifest_path(record.out).read_text())
    assert manifest["excluded"] == {"contact_cap": 3, "no_consent": 1, "withdrawn": 1}  # C1 C6 H2 capped, H3 never asked, C5 withdrew
    replay = _select(
        world,
        manifest["query"],
        purpose=manifest["purpose"],
        as_of=date.fromisoformat(manifest["as_of"]),
        cap=ContactCap(**manifest["cap"]),
        now=datetime.fromisoformat(manifest["at"]),
    )
    assert later.selected == 2 and replay == sorted(pd.read_parquet(record.out)["customer_id"]) == sorted(["C2", H1])  # later history not counted
    assert parse_query(manifest["query_normalised"], world["sources"].catalog).sha256 == manifest["query_sha256"]


def test_a_failed_export_leaves_no_file_no_record_no_history(world, tmp_path):
    out = tmp_path / "crm" / "a.parquet"
    manifest_path(out).mkdir(parents=True)  # the manifest cannot be placed: fails after the file and the history were written
    with pytest.raises(OSError):
        _export(world, RISK_HIGH, out=out)
    history = world["settings"].warehouse_dir / "contact_history"
    assert not out.exists() and not list(history.rglob("*.parquet")) and recorded_audiences(world["sources"].governance) == []
    manifest_path(out).rmdir()
    with sqlite3.connect(world["sources"].governance.path) as db:  # a governance table the insert does not fit
        db.executescript("DROP TABLE audiences; CREATE TABLE audiences (audience_id TEXT PRIMARY KEY);")
    with pytest.raises(GovernanceUnavailableError):
        _export(world, RISK_HIGH, out=out)
    assert not out.exists() and not manifest_path(out).exists() and not list(history.rglob("*.parquet"))


def test_a_refreshed_partition_invalidates_the_cached_wide_table(world):
    assert _select(world, {"tag": "value_tier", "in": ["private_banking"]}) == ["C4"]
    store = world["sources"].store
    path = store.partition_path(SEPT)
    with store.write_partition(SEPT) as tmp, duckdb.connect() as con:  # a re-run of scoring: C2 is private banking now
        con.execute(
            "COPY (SELECT * REPLACE (CASE WHEN customer_id = 'C2' AND tag = 'value_tier' THEN 'private_banking' ELSE value END AS value) "
            f"FROM read_parquet({sql_literal(path)})) TO {sql_literal(tmp)} (FORMAT parquet)"
        )
    assert _select(world, {"tag": "value_tier", "in": ["private_banking"]}) == ["C2", "C4"]
    cached = world["con"].execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = 'tagml_audience_cache' AND table_name LIKE 'wide_20260930%'")
    assert cached.fetchone()[0] == 1  # the stale table was dropped


def test_erasure_rewrites_the_contact_history_and_the_audience_files(world):
    record = _export(world, RISK_HIGH, purpose="service", now=NOW)
    assert record.selected == 6
    as_csv = _export(world, RISK_HIGH, purpose="service", fmt="csv", name="as csv")
    files = [Path(r.out) for r in (record, as_csv)]
    assert all(f.is_relative_to(world["settings"].audiences_dir) for f in files)
    receipt = erase(world["settings"], ["C1", H2], "dpo", "DSR-1")
    [history, _] = sorted((world["settings"].warehouse_dir / "contact_history").rglob("*.parquet"))
    assert sorted(pd.read_parquet(history)["customer_id"]) == ["C3", "C4", "C5", "C6"]
    # tagml's own copies of the audience files are rewritten too (what a CRM downloaded is the bank's to erase)
    assert sorted(pd.read_parquet(files[0])["customer_id"]) == ["C3", "C4", "C5", "C6"]
    assert sorted(pd.read_csv(files[1])["customer_id"]) == ["C3", "C4", "C5", "C6"]
    assert receipt.stores["audience exports"].files_rewritten == 2 and receipt.verification["verified"]
    assert receipt.rows_removed >= 2 + 2 * 3 * 2  # history rows, and both partitions' rows of the two customers
    # erased customers are gone from the counts too (the partitions were rewritten: a new cache table)
    assert _select(world, RISK_HIGH) == ["C3", "C4", "C5", "C6"]


def test_the_cli_counts_exports_and_lists(world, tmp_path, monkeypatch, capsys):
    from tagml.cli import main

    for name in list(os.environ):
        if name.startswith("TAGML_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TAGML_HOME", str(world["settings"].home))
    world["settings"].embedded_tracking_db.parent.mkdir(parents=True, exist_ok=True)
    sqlite3.connect(world["settings"].embedded_tracking_db).close()  # a home where something was trained (read commands require it)
    query = tmp_path / "q.json"
    query.write_text(json.dumps(RISK_HIGH))
    assert main(["audience", "count", "--query", str(query), "--purpose", "marketing", "--json"]) == 4  # confidential without the flag
    assert "not available to this caller" in capsys.readouterr().err
    assert main(["audience", "count", "--query", str(query), "--purpose", "marketing", "--include-confidential", "--json"]) == 0
    counted = json.loads(capsys.readouterr().out)
    assert (counted["matched"], counted["selected"], counted["excluded"]) == (6, 4, {"no_consent": 1, "withdrawn": 1})
    out = tmp_path / "crm" / "a.csv"
    args = ["audience", "export", "--query", str(query), "--name", "n", "--purpose", "marketing", "--include-confidential", "--format", "csv"]
    assert main([*args, "--out", str(out), "--by", "me", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["selected"] == 4 and out.exists() and record["by"] == "me"
    assert main(["audience", "list"]) == 0
    assert "'n' for marketing as of 2026-09-30: 4 of 6 (left out: no_consent 1, withdrawn 1) by me" in capsys.readouterr().out
    query.write_text("{not json")
    assert main(["audience", "count", "--query", str(query)]) == 4
    assert "--query: " in capsys.readouterr().err
