"""The model card of every registered version, against a real MLflow SQLite store and registry: its numbers are the
run's logged metrics, it says why gender is not a feature of risk_appetite, it carries the gate's decision and the
overrides, and a validator reproduces the version's metrics from it."""

import json
import shutil
import time
from pathlib import Path

import pytest

from tagml.core.storage import PartitionedTable
from tagml.monitoring.stability import score_stability
from tagml.training.catalog import load_catalog
from tagml.training.dataset import build_training_set
from tagml.training.fairness import load_demographics
from tagml.training.model_card import CARD_DIR, build_model_card, card_version, log_model_card, read_card_record
from tagml.training.model_card_template import Section, Table, render_html, render_markdown
from tagml.training.registry import apply_gate, evaluate_gate, promote
from tagml.training.reproduce import ReproductionError, reproduce_from_card
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag
from tagml.training.versions import registered_model_name
from tests.conftest import MID_MONTH_END, WINDOW_END, make_connection, shipped_slices

pytestmark = pytest.mark.slow


def _risk_tag():
    entry = load_catalog().get("risk_appetite").model_dump(mode="json")
    entry["model"].update(trials=2, timeout_seconds=120)
    entry["model"]["search_space"]["n_estimators"] = {"low": 20, "high": 60, "integer": True}
    entry["promotion"].update(max_calibration_error=0.5, slice_floor=0.0, margin=0.0)
    return type(load_catalog().get("risk_appetite")).model_validate(entry)


@pytest.fixture(scope="module")
def trained(bank, bank_features, tmp_path_factory):
    """Two versions of risk_appetite trained as the training asset does: train (card r1), gate, stability, card r2."""
    root = tmp_path_factory.mktemp("card")
    client = connect_tracking(f"sqlite:///{root / 'mlflow.db'}")
    tag = _risk_tag()
    con = make_connection(root)
    try:
        data = build_training_set(con, bank["staged"], tag, WINDOW_END, root / "training_sets", seed=0)
    finally:
        con.close()
    features = PartitionedTable(root / "customer_features")
    features.directory(MID_MONTH_END).mkdir(parents=True)
    shutil.copy(bank_features[MID_MONTH_END], features.path(MID_MONTH_END))
    slices, demographics = shipped_slices(data), load_demographics(bank["staged"])
    versions, seconds = [], []
    for seed in (0, 1):
        result = train_tag(tag, data, client, slices, artifact_location=str(root / "artifacts"), seed=seed, threads=1, demographics=demographics)
        apply_gate(client, evaluate_gate(client, tag, result.version, data, slices))
        started = time.perf_counter()
        log_model_card(client, tag.name, result.version, score_stability(client, tag, result.version, features))
        seconds.append(result.seconds["model_card"] + time.perf_counter() - started)
        versions.append(result)
    print(f"model card seconds per version (at registration + after the gate): {[round(s, 2) for s in seconds]}")
    return {"client": client, "tag": tag, "data": data, "results": versions, "root": root, "uri": f"sqlite:///{root / 'mlflow.db'}"}


def test_every_registered_version_has_a_card_whose_numbers_are_the_runs_metrics(trained):
    client = trained["client"]
    registered = client.search_model_versions(f"name = '{registered_model_name('risk_appetite')}'")
    assert sorted(str(v.version) for v in registered) == sorted(r.version for r in trained["results"])
    for version in registered:
        card = read_card_record(client, "risk_appetite", version.version)
        run = client.get_run(version.run_id).data.metrics
        logged = {k.removeprefix("test_"): v for k, v in run.items() if k.startswith("test_") and not k.endswith("_over_baseline")}
        assert card["metrics"]["test"] == logged and "macro_f1" in logged and "recall_C5" in logged
        assert card["comparison"]["baseline"]["macro_f1"] == run["baseline_test_macro_f1"]
        assert card["calibration"]["ece"] == run["test_calibration_error"] and card["calibration"]["bins"]
        intervals = card["metrics"]["intervals"]["macro_f1"]
        assert intervals["low"] <= logged["macro_f1"] <= intervals["high"] and intervals["draws"] > 100
        assert card["metrics"]["slices"] and all(s["rows"] >= 30 for s in card["metrics"]["slices"].values())
        # re-logged after the gate: the decision and its reasons, the measured stability, revision 2
        assert card["revision"] == 2 and card["gate"]["decision"] == version.tags["gate.decision"] and card["gate"]["reasons"]
        assert card["stability"]["status"] == "measured" and "2026-06-30" in card["stability"]["current"]
        assert card["data"]["sha256"] and card["data"]["labels"]["sources"] == ["risk_questionnaire"]
        files = {a.path for a in client.list_artifacts(version.run_id, CARD_DIR)}
        assert {f"{CARD_DIR}/model_card.md", f"{CARD_DIR}/model_card.html", f"{CARD_DIR}/model_card.json"} <= files
        assert {a.path for a in client.list_artifacts(version.run_id, f"{CARD_DIR}/revisions")} == {
            f"{CARD_DIR}/revisions/r1.md",
            f"{CARD_DIR}/revisions/r2.md",
        }
    second = read_card_record(client, "risk_appetite", trained["results"][1].version)
    assert second["comparison"]["champion"]["version"] == trained["results"][0].version


def test_the_card_lists_gender_as_excluded_with_its_reason_and_the_pii_never_used(trained):
    card = build_model_card(trained["client"], "risk_appetite", trained["results"][0].version)
    excluded = {e["column"]: e["reason"] for e in card.record["features"]["excluded"]}
    assert excluded["gender"] == "excluded by the catalog (features.exclude)"
    assert "gender" not in {f["name"] for f in card.record["features"]["used"]}
    assert card.record["features"]["pii_dropped_at_staging"]["customers"] == 4  # counted, never named on MLflow
    assert "| gender | excluded by the catalog (features.exclude) |" in card.markdown
    assert "Prioritising which customers" in card.markdown and "<td>gender</td>" in card.html


def test_the_card_holds_no_customer_id(trained):
    client, data = trained["client"], trained["data"]
    run_id = trained["results"][0].run_id
    local = client.download_artifacts(run_id, CARD_DIR, str(trained["root"] / "download"))
    text = " ".join(p.read_text() for p in Path(local).rglob("*") if p.is_file())
    ids = set(data.frame["customer_id"].astype(str))
    assert text and not [i for i in ids if i in text]


def test_overrides_appear_on_the_card_with_who_and_why(trained):
    client, first = trained["client"], trained["results"][0]
    promote(client, "risk_appetite", first.version, by="validator-ana", reason="back to v1 while v2 is reviewed", force=True)
    card = build_model_card(client, "risk_appetite", first.version)
    assert any(h["by"] == "validator-ana" and h["version"] == first.version for h in card.record["overrides"])
    assert "validator-ana" in card.markdown and "back to v1 while v2 is reviewed" in card.html
    assert card_version(client, "risk_appetite", None) == first.version  # the champion's card by default


def test_a_validator_reproduces_the_metrics_from_the_card(trained, tmp_path):
    card = read_card_record(trained["client"], "risk_appetite", trained["results"][0].version)
    reproduction = reproduce_from_card(card, tmp_path / "scratch")
    assert reproduction.matches, reproduction.differences
    assert reproduction.reproduced["macro_f1"] == pytest.approx(card["metrics"]["test"]["macro_f1"], abs=1e-12)

    # a snapshot rewritten since (as an erasure does) is refused by name, nothing retrained
    copy = tmp_path / "rewritten.parquet"
    shutil.copy(trained["data"].snapshot_path, copy)
    with copy.open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ReproductionError, match="no longer matches the card"):
        reproduce_from_card({**card, "data": {**card["data"], "snapshot": str(copy)}}, tmp_path / "scratch2")
    assert not (tmp_path / "scratch2").exists()


def test_hostile_text_stays_text_in_both_renderings():
    hostile = "<script>alert('x')</script> | col\n# heading `code` '; DROP TABLE x; --"
    sections = [Section("use", (("meaning", hostile),), (Table(("a", "b"), ((hostile, 1.5),)),))]
    html, markdown = render_html(hostile, sections), render_markdown(hostile, sections)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<script>" not in markdown and "\n# heading" not in markdown and "\\| col" in markdown
    assert json.dumps(hostile)  # the record keeps the text itself


def test_the_card_command_prints_or_writes_a_versions_card(trained, tmp_path, monkeypatch, capsys):
    from tagml.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TAGML_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["uri"])
    version = trained["results"][1].version
    assert main(["card", "risk_appetite", "--version", version]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Model card: tagml-risk_appetite version {version}") and "## Fairness slices" in out
    assert main(["card", "risk_appetite", "--version", version, "--html", "--out", str(tmp_path / "card.html")]) == 0
    assert (tmp_path / "card.html").read_text().startswith("<!doctype html>")
    assert main(["card", "risk_appetite", "--version", "99"]) == 3  # not found: one line, its own code
    assert "has no version 99" in capsys.readouterr().err
