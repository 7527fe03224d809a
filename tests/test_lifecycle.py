"""The tag lifecycle (tagml.compliance.lifecycle) in a real governance store, its commands, and the tag dictionary (`tagml catalog`)."""

import json
import os
import sqlite3

import pytest

from tagml.cli import main
from tagml.cli.errors import ExitCode
from tagml.compliance import lifecycle
from tagml.compliance.lifecycle import FourEyesError, LifecycleError
from tagml.core.governance import GovernanceStore
from tagml.core.settings import Settings
from tagml.training.catalog import load_catalog
from tagml.training.tracking import connect_tracking

HOSTILE = 'x\'); DROP TABLE tag_status_events; --\n\u2603 "quoted" \x1b[31m'


@pytest.fixture
def governance(tmp_path) -> GovernanceStore:
    return GovernanceStore(tmp_path / "governance.db")


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_a_tag_goes_draft_approved_published_retired_and_every_step_is_recorded(governance, catalog):
    spec = catalog.get("value_tier")
    assert lifecycle.statuses(governance, catalog)["value_tier"].label == "draft" and not governance.path.exists()  # reading creates nothing
    assert lifecycle.approve(governance, spec, by="validator", reason="bands match the card tiers").status == "approved"
    assert lifecycle.published_tags(governance, catalog) == frozenset()  # approved is not published
    assert lifecycle.publish(governance, spec, by="owner").status == "published"
    assert lifecycle.published_tags(governance, catalog) == {"value_tier"}
    assert lifecycle.retire(governance, spec, by="owner", reason="replaced").status == "retired"
    assert lifecycle.published_tags(governance, catalog) == frozenset()
    # a retired tag may come back, but only as a draft that needs a new approval
    assert lifecycle.reopen(governance, spec, by="owner", reason="needed again").status == "draft"
    with pytest.raises(LifecycleError, match="tag 'value_tier' is draft: it cannot become published; from draft it can become: approved"):
        lifecycle.publish(governance, spec, by="someone")
    events = lifecycle.history(governance, "value_tier")
    assert [(e.status, e.by) for e in events] == [("approved", "validator"), ("published", "owner"), ("retired", "owner"), ("draft", "owner")]
    assert {e.entry_hash for e in events} == {spec.content_hash()}


def test_illegal_transitions_name_the_tag_its_status_and_the_allowed_ones(governance, catalog):
    spec = catalog.get("life_stage")
    with pytest.raises(LifecycleError, match="tag 'life_stage' is draft: it cannot become retired; from draft it can become: approved"):
        lifecycle.retire(governance, spec, by="owner", reason="x")
    lifecycle.approve(governance, spec, by="validator", reason="ok")
    with pytest.raises(LifecycleError, match="is approved: it cannot become approved; from approved it can become: published, draft"):
        lifecycle.approve(governance, spec, by="validator", reason="again")
    with pytest.raises(FourEyesError, match="approved by 'VALIDATOR': another person must publish it"):
        lifecycle.publish(governance, spec, by="VALIDATOR")  # the same person, whatever the case
    with pytest.raises(LifecycleError, match="a reason .* is required"):
        lifecycle.retire(governance, spec, by="owner", reason="  ")
    with pytest.raises(LifecycleError, match="a name .* is required"):
        lifecycle.publish(governance, spec, by="")
    assert [e.status for e in lifecycle.history(governance, "life_stage")] == ["approved"]  # the refused steps left nothing


def test_a_changed_catalog_entry_needs_a_new_approval(governance, catalog):
    spec = catalog.get("churn_90d")
    lifecycle.approve(governance, spec, by="validator", reason="ok")
    lifecycle.publish(governance, spec, by="owner")
    changed = spec.model_copy(update={"description": spec.description + " Now also counts dormant accounts."})
    edited = catalog.model_copy(update={"tags": tuple(changed if t.name == "churn_90d" else t for t in catalog.tags)})
    status = lifecycle.statuses(governance, edited)["churn_90d"]
    assert (status.label, status.changed_since_approval) == ("draft (changed since approval)", True)
    assert lifecycle.published_tags(governance, edited) == frozenset()  # the new definition was never approved
    with pytest.raises(LifecycleError, match="is draft \\(changed since approval\\): it cannot become published"):
        lifecycle.publish(governance, changed, by="owner")
    assert lifecycle.approve(governance, changed, by="validator", reason="re-validated").status == "approved"
    assert lifecycle.statuses(governance, catalog)["churn_90d"].label == "draft (changed since approval)"  # the old entry lost it


def test_hostile_names_and_reasons_are_stored_as_data(governance, catalog):
    spec = catalog.get("value_tier")
    lifecycle.approve(governance, spec, by=HOSTILE, reason=HOSTILE)
    [event] = lifecycle.history(governance, "value_tier")
    assert (event.by, event.reason) == (HOSTILE, HOSTILE)
    tables = sqlite3.connect(governance.path).execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'tag_status_events'").fetchall()
    assert tables == [("tag_status_events",)]


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("TAGML_") or name in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TAGML_HOME", str(tmp_path / "home"))
    settings = Settings.from_env()
    settings.ensure_dirs()
    return settings


def test_the_lifecycle_commands_record_who_and_print_history(capsys, home):
    code, out, err = _run(capsys, "approve", "value_tier", "--reason", "bands checked", "--by", "validator")
    assert code == 0 and "value_tier: approved (by validator" in out, err
    code, _, err = _run(capsys, "publish", "value_tier", "--by", "validator")
    assert code == ExitCode.USAGE and "another person must publish it (four-eyes)" in err and err.count("\n") == 1
    assert _run(capsys, "publish", "value_tier", "--by", "owner")[0] == 0
    code, _, err = _run(capsys, "retire", "value_tier", "--reason", HOSTILE, "--by", "owner")
    assert code == 0, err
    code, out, _ = _run(capsys, "status", "value_tier")
    assert code == 0 and out.startswith("value_tier: retired (next: draft)") and "approved  by validator: bands checked" in out
    assert "\\n" in out and "\x1b" not in out  # a recorded newline or escape is shown escaped, not sent to the terminal
    code, out, _ = _run(capsys, "status", "--json")
    assert {t["tag"]: t["status"] for t in json.loads(out)["tags"]}["value_tier"] == "retired"
    code, _, err = _run(capsys, "approve", "no_such_tag", "--reason", "x")
    assert code == ExitCode.NOT_FOUND and "no tag 'no_such_tag'" in err


def test_the_dictionary_as_markdown_shows_status_and_current_producers(capsys, home):
    catalog = load_catalog(home.catalog_path)
    governance = GovernanceStore(home.governance_db)
    lifecycle.approve(governance, catalog.get("value_tier"), by="validator", reason="ok")
    lifecycle.publish(governance, catalog.get("value_tier"), by="owner")
    lifecycle.approve(governance, catalog.get("risk_appetite"), by="validator", reason="ok")
    client = connect_tracking(home.mlflow_tracking_uri)  # a real registry with a champion alias, no training needed
    client.create_registered_model("tagml-risk_appetite")
    client.create_model_version("tagml-risk_appetite", source=str(home.home / "model"))
    client.set_registered_model_alias("tagml-risk_appetite", "champion", "1")

    code, out, err = _run(capsys, "catalog", "--markdown")
    assert code == 0, err
    assert out.startswith("# Tag dictionary\n") and "| tag | owner | kind | classes | source | refresh | sensitivity | status | producer |" in out
    rows = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| tag ")}
    assert set(rows) == {t.name for t in catalog.tags}
    assert "| confidential | approved | tagml-risk_appetite/1 |" in rows["risk_appetite"]
    assert "| published | rule:2026.1:" in rows["value_tier"] and "| rule over aum_total |" in rows["value_tier"]
    assert "| draft | no champion |" in rows["life_stage"] and "labels: kyc, relationship_manager; features: customer_features" in rows["life_stage"]
    assert "## value_tier\n\nCustomer value tier by assets under management" in out
    assert "- status: published (last decision by owner at " in out and "- owner: wealth-analytics; sensitivity: confidential; refresh: weekly" in out

    code, out, _ = _run(capsys, "catalog", "--json")
    by_tag = {t["tag"]: t for t in json.loads(out)["tags"]}
    assert by_tag["risk_appetite"]["producer"] == "tagml-risk_appetite/1" and by_tag["value_tier"]["status"] == "published"


def test_an_unreachable_registry_still_prints_the_dictionary_and_says_so_once(capsys, home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # loopback, nothing listens
    code, out, err = _run(capsys, "catalog")
    assert code == 0 and "risk_appetite" in out and "unknown (registry" in out and "rule:2026.1:" in out
    assert err.count("is unavailable") == 1 and "http://127.0.0.1:9" in err
