"""Drift monitoring's pure parts on small hand-made data: PSI, the history, realised performance,
the re-evaluation planner and the Evidently report summary."""

from datetime import UTC, date, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tagml.monitoring.history import SUMMARY, DriftHistory, DriftHistoryError
from tagml.monitoring.performance import realised_performance
from tagml.monitoring.psi import ALL, MISSING, distribution_psi, feature_psi
from tagml.monitoring.reevaluation import Cursor, DriftEvent, drift_verdict, events_from_result, plan_reevaluations, run_key
from tagml.scoring.score import TAG_ROW_SCHEMA
from tagml.scoring.store import ParquetTagStore
from tagml.training.catalog import CatalogError, load_catalog


def _parquet(tmp_path, name: str, frame: pd.DataFrame):
    path = tmp_path / f"{name}.parquet"
    frame.to_parquet(path, index=False)
    return path


@pytest.fixture
def population():
    rng = np.random.default_rng(0)
    n = 20_000
    return pd.DataFrame(
        {
            "customer_id": [f"C{i:06d}" for i in range(n)],
            "income": rng.lognormal(9, 0.5, n),
            # zero for 70% of customers, like trade counts
            "trades": np.where(rng.random(n) < 0.7, 0, rng.poisson(4, n) + 1).astype(float),
            "region": rng.choice(["east", "west", "north"], n, p=[0.5, 0.3, 0.2]),
        }
    )


KINDS = {"income": "numeric", "trades": "numeric", "region": "categorical"}


def _overall(frame: pd.DataFrame) -> pd.Series:
    return frame[frame["slice_column"] == ALL].set_index("feature")["psi"]


def test_psi_is_zero_against_itself_and_matches_a_hand_computation(population, tmp_path, con):
    ref = _parquet(tmp_path, "ref", population)
    assert _overall(feature_psi(con, ref, ref, KINDS)).abs().max() < 1e-12
    shifted = population.assign(income=population["income"] * 1.3)
    cur = _parquet(tmp_path, "cur", shifted)
    psi = _overall(feature_psi(con, ref, cur, KINDS))
    # by hand: bins on the reference deciles, PSI = sum (c - r) ln(c / r)
    edges = np.quantile(population["income"], np.linspace(0.1, 0.9, 9))
    r = np.bincount(np.searchsorted(edges, population["income"], side="left"), minlength=10) / len(population)
    c = np.bincount(np.searchsorted(edges, shifted["income"], side="left"), minlength=10) / len(shifted)
    assert psi["income"] == pytest.approx(float(((c - r) * np.log(c / r)).sum()), rel=1e-6)
    assert psi["income"] > 0.2 and psi["trades"] < 1e-12 and psi["region"] < 1e-12


def test_a_point_mass_gets_its_own_bin_so_a_shift_among_the_active_few_shows(population, tmp_path, con):
    ref = _parquet(tmp_path, "ref", population)
    busier = population.assign(trades=population["trades"] * 2)  # the 30% who trade, trade twice as much
    psi = _overall(feature_psi(con, ref, _parquet(tmp_path, "cur", busier), KINDS))
    assert psi["trades"] > 0.2
    # plain deciles would put everything above the 90th percentile (trades > ~4) in one bin
    edges = np.unique(np.quantile(population["trades"], np.linspace(0.1, 0.9, 9)))
    r = np.bincount(np.searchsorted(edges, population["trades"], side="left"), minlength=len(edges) + 1) / len(population)
    c = np.bincount(np.searchsorted(edges, busier["trades"], side="left"), minlength=len(edges) + 1) / len(busier)
    plain = float(((np.maximum(c, 1e-4) - np.maximum(r, 1e-4)) * np.log(np.maximum(c, 1e-4) / np.maximum(r, 1e-4))).sum())
    assert plain < psi["trades"] / 2


def test_missing_values_and_new_categories_count_as_drift(population, tmp_path, con):
    ref = _parquet(tmp_path, "ref", population)
    changed = population.copy()
    changed.loc[changed.index[:6000], "income"] = np.nan
    changed.loc[changed.index[-2000:], "region"] = "south"
    result = feature_psi(con, ref, _parquet(tmp_path, "cur", changed), KINDS)
    row = result[(result["slice_column"] == ALL)].set_index("feature")
    assert row.loc["income", "psi"] > 0.2 and row.loc["income", "current_missing_share"] == pytest.approx(0.3)
    assert row.loc["income", "reference_missing_share"] == 0
    assert row.loc["region", "psi"] > 0.2


def test_a_shift_in_one_slice_shows_in_that_slice(population, tmp_path, con):
    ref = _parquet(tmp_path, "ref", population)
    changed = population.copy()
    north = changed["region"] == "north"
    changed.loc[north, "income"] *= 2
    result = feature_psi(con, ref, _parquet(tmp_path, "cur", changed), KINDS, {"region": '"region"'})
    income = result[result["feature"] == "income"].set_index(["slice_column", "slice"])
    assert income.loc[("region", "north"), "psi"] > 1
    assert income.loc[("region", "east"), "psi"] < 1e-12 and income.loc[("region", "west"), "psi"] < 1e-12
    # diluted in the whole population: a fifth of the customers moved
    assert 0.02 < income.loc[(ALL, ALL), "psi"] < income.loc[("region", "north"), "psi"] / 10
    rows = income.loc["region"]["reference_rows"].sum()
    assert rows == income.loc[(ALL, ALL), "reference_rows"] == len(population)


def test_distribution_psi():
    assert distribution_psi({"a": 50, "b": 50}, {"a": 50, "b": 50}) == 0
    expected = (0.6 - 0.5) * np.log(0.6 / 0.5) + (0.4 - 0.5) * np.log(0.4 / 0.5)
    assert distribution_psi({"a": 0.5, "b": 0.5}, {"a": 0.6, "b": 0.4}) == pytest.approx(expected)
    assert distribution_psi({"a": 1}, {"a": 90, MISSING: 10}) > 0.4  # a class absent from the reference


# ---- the re-evaluation planner -------------------------------------------------------------


def _event(tag: str, day: str, drifted: bool = True, minute: int = 0) -> DriftEvent:
    return DriftEvent(tag, date.fromisoformat(day), drifted, ("why",), 100 + minute)


def test_a_stored_verdict_reads_back_as_the_event_the_planner_decides_on():
    import json

    stored = json.loads(json.dumps({"risk": drift_verdict(True, ["class PSI 0.3 > 0.2"]), "life": drift_verdict(False, [])}))  # as Dagster's metadata
    events = events_from_result(7, date(2026, 10, 31), stored)
    assert events == [DriftEvent("life", date(2026, 10, 31), False, (), 7), DriftEvent("risk", date(2026, 10, 31), True, ("class PSI 0.3 > 0.2",), 7)]


def test_one_drift_event_one_request_and_a_second_evaluation_requests_nothing():
    events = [_event("risk", "2026-10-31"), _event("life", "2026-10-31", drifted=False, minute=1)]
    first = plan_reevaluations(events, Cursor(), 7, ["risk", "life"])
    assert [(r.tag, r.as_of.isoformat(), r.run_key) for r in first.requests] == [("risk", "2026-10-31", "reevaluate-risk-2026-10-31")]
    cursor = Cursor.parse(first.cursor.dumps())  # as Dagster stores it
    assert plan_reevaluations(events, cursor, 7, ["risk", "life"]).requests == []
    # a lost cursor re-plans the same run key, which Dagster launches only once
    assert [r.run_key for r in plan_reevaluations(events, Cursor(), 7, ["risk", "life"]).requests] == [run_key("risk", date(2026, 10, 31))]


@pytest.mark.parametrize(
    "later, requested, why",
    [
        ("2026-11-03", False, "cooldown"),
        ("2026-11-07", True, ""),
        ("2026-10-20", False, "older than"),
    ],
)
def test_cooldown_in_data_days_and_no_backfill_triggers(later, requested, why):
    first = plan_reevaluations([_event("risk", "2026-10-31")], Cursor(), 7, ["risk"])
    second = plan_reevaluations([_event("risk", later, minute=5)], first.cursor, 7, ["risk"])
    assert bool(second.requests) == requested
    if not requested:
        assert why in second.describe_skips()
        assert second.cursor.last_requested["risk"] == date(2026, 10, 31)


def test_the_cursor_is_a_storage_position_and_an_old_wall_clock_cursor_restarts_safely():
    first = plan_reevaluations([_event("risk", "2026-10-31", minute=7)], Cursor(), 7, ["risk"])
    assert first.cursor.seen_through == 107 and Cursor.parse(first.cursor.dumps()).seen_through == 107
    # stored after the cursor, whatever its as_of or when it was computed: read
    later = plan_reevaluations([_event("life", "2026-10-30", minute=8)], first.cursor, 7, ["risk", "life"])
    assert [r.tag for r in later.requests] == ["life"]
    legacy = Cursor.parse('{"seen_through": "2026-11-01T00:07:00+00:00", "last_requested": {"risk": "2026-10-31"}}')
    assert legacy.seen_through is None and legacy.last_requested == {"risk": date(2026, 10, 31)}


def test_drift_of_a_tag_no_longer_in_the_catalog_is_skipped_by_name():
    plan = plan_reevaluations([_event("retired_tag", "2026-10-31")], Cursor(), 7, ["risk"])
    assert plan.requests == [] and "retired_tag@2026-10-31: not a model tag" in plan.describe_skips()


# ---- the history -----------------------------------------------------------------------------


def _summary(tag: str, as_of: date, drifted: bool) -> dict:
    return {
        "as_of": as_of,
        "tag": tag,
        "drifted": drifted,
        "reasons": ["r"] if drifted else [],
        "computed_at": datetime.now(UTC),
        "drifted_features": [],
        "prediction_psi": 0.01,
    }


def test_history_rewrites_only_the_recomputed_tags_and_names_missing_partitions(tmp_path, con):
    history = DriftHistory(tmp_path / "drift")
    day = date(2026, 10, 31)
    frames = {
        SUMMARY: pd.DataFrame([_summary("a", day, True), _summary("b", day, False)]),
        "drift_features": pd.DataFrame({"tag": ["a", "b"], "slice_column": ALL, "feature": ["x", "x"], "psi": [0.5, 0.0]}),
        "drift_predictions": pd.DataFrame({"tag": ["a", "b"], "class": ["k", "k"]}),
    }
    history.write(con, day, frames)
    again = {
        SUMMARY: pd.DataFrame([_summary("b", day, True)]),
        "drift_features": pd.DataFrame({"tag": ["b"], "slice_column": ALL, "feature": ["x"], "psi": [0.9]}),
        "drift_predictions": pd.DataFrame({"tag": ["b"], "class": ["k"]}),
    }
    history.write(con, day, again)
    summary = history.summary(con, day)
    assert summary.set_index("tag")["drifted"].to_dict() == {"a": True, "b": True}
    assert history.features(con, day, "b")["psi"].tolist() == [0.9]
    assert list(summary["reasons"].iloc[0]) == ["r"]
    assert history.partitions() == [day]
    with pytest.raises(DriftHistoryError, match="no drift results for as_of 2026-10-30"):
        history.summary(con, date(2026, 10, 30))
    with pytest.raises(DriftHistoryError, match="no drift results for tag 'c'"):
        history.summary(con, day, "c")


# ---- realised performance of a tag with delayed labels ---------------------------------------


@pytest.fixture
def churn_world(tmp_path):
    """A tag store partition of 2026-07-31 for churn_90d and the labels that matured 90 days later."""
    tag = load_catalog().get("churn_90d")
    rng = np.random.default_rng(1)
    n = 400
    ids = [f"C{i:05d}" for i in range(n)]
    churned = rng.random(n) < 0.2
    staged = tmp_path / "staged"
    staged.mkdir()
    pd.DataFrame(
        {
            "customer_id": ids,
            "tag": "churn_90d",
            "label": np.where(churned, "churned", "retained"),
            "label_date": date(2026, 7, 31),
            "known_date": date(2026, 10, 29),
            "source": "observed_outcome",
        }
    ).to_parquet(staged / "tag_labels.parquet", index=False)
    return {"tag": tag, "ids": ids, "churned": churned, "staged": staged, "store": ParquetTagStore(tmp_path / "tags")}


def _write_partition(store: ParquetTagStore, as_of: date, ids, p_churn, version: str) -> None:
    n = len(ids)
    table = pa.table(
        {
            "customer_id": ids,
            "as_of": [as_of] * n,
            "tag": ["churn_90d"] * n,
            "value": ["churned" if p > 0.5 else "retained" for p in p_churn],
            "probability": [max(p, 1 - p) for p in p_churn],
            "probabilities": pa.array([[("retained", 1 - p), ("churned", p)] for p in p_churn], pa.map_(pa.string(), pa.float64())),
            "reasons": [[]] * n,
            "source": ["model"] * n,
            "inferred_value": ["churned" if p > 0.5 else "retained" for p in p_churn],
            "observed_value": [None] * n,
            "observed_mismatch": [None] * n,
            "assessment": [None] * n,
            "assessed_on": [None] * n,
            "producer": [f"tagml-churn_90d/{version}"] * n,
            "model_version": [version] * n,
            "mlflow_run_id": ["run"] * n,
            "scored_at": [datetime(2026, 8, 1, tzinfo=UTC)] * n,
            "inferred_as_of": [as_of] * n,
        },
        schema=TAG_ROW_SCHEMA,
    )
    path = store.partition_path(as_of)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_realised_performance_on_matured_labels(churn_world, con):
    w = churn_world
    rng = np.random.default_rng(2)
    good = np.clip(np.where(w["churned"], 0.7, 0.1) + rng.normal(0, 0.05, len(w["ids"])), 0.01, 0.99)
    _write_partition(w["store"], date(2026, 7, 31), w["ids"], good, "3")
    expected = {"3": 0.95}.get
    measured = realised_performance(con, w["tag"], date(2026, 10, 31), w["store"], w["staged"], "3", expected)
    assert measured.status == "measured" and measured.partition == date(2026, 7, 31) and measured.labels == len(w["ids"])
    assert measured.realised > 0.99 and not measured.drifted
    # 90 days before 2026-10-15 there was no partition yet
    early = realised_performance(con, w["tag"], date(2026, 10, 15), w["store"], w["staged"], "3", expected)
    assert early.status == "no partition"
    # a partition on a date without observed outcomes
    _write_partition(w["store"], date(2026, 8, 1), w["ids"], good, "3")
    none = realised_performance(con, w["tag"], date(2026, 11, 1), w["store"], w["staged"], "3", expected)
    assert none.status == "no matured labels" and none.partition == date(2026, 8, 1)


def test_a_realised_drop_flags_the_current_champion_only(churn_world, con):
    w = churn_world
    rng = np.random.default_rng(3)
    poor = np.clip(np.where(w["churned"], 0.35, 0.3) + rng.normal(0, 0.1, len(w["ids"])), 0.01, 0.99)
    _write_partition(w["store"], date(2026, 7, 31), w["ids"], poor, "3")
    result = realised_performance(con, w["tag"], date(2026, 10, 31), w["store"], w["staged"], "3", {"3": 0.9}.get)
    assert result.status == "measured" and result.drifted and result.drop > 0.05
    assert result.expected == 0.9 and result.realised == pytest.approx(result.expected - result.drop)
    replaced = realised_performance(con, w["tag"], date(2026, 10, 31), w["store"], w["staged"], "4", {"3": 0.9}.get)
    assert not replaced.drifted and "since replaced by v4" in replaced.note


def test_realised_performance_without_an_old_enough_partition(churn_world, con):
    w = churn_world
    _write_partition(w["store"], date(2026, 9, 30), w["ids"], np.full(len(w["ids"]), 0.2), "3")
    result = realised_performance(con, w["tag"], date(2026, 10, 31), w["store"], w["staged"], "3", {"3": 0.9}.get)
    assert result.status == "no partition" and "2026-08-02" in result.note
    not_monitored = realised_performance(con, load_catalog().get("risk_appetite"), date(2026, 10, 31), w["store"], w["staged"], "3", {}.get)
    assert not_monitored.status == "not monitored"


# ---- the catalog's drift section -------------------------------------------------------------


def test_critical_features_must_be_known_features(tmp_path):
    entry = load_catalog().get("life_stage").model_dump(mode="json")
    entry["drift"]["critical_features"] = ["risky_shares"]
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"tags": [entry]}))
    with pytest.raises(CatalogError, match=r"tag 'life_stage': .*drift.critical_features: unknown feature names \['risky_shares'\]"):
        load_catalog(path)


# ---- the Evidently report ---------------------------------------------------------------------


def test_evidently_report_on_samples_is_saved_and_summarised(tmp_path):
    from tagml.monitoring.report import drift_report

    rng = np.random.default_rng(4)
    ref = pd.DataFrame({"income": rng.normal(0, 1, 2000), "region": rng.choice(["e", "w"], 2000), "prediction": rng.choice(["C1", "C2"], 2000)})
    cur = pd.DataFrame({"income": rng.normal(1, 1, 2000), "region": rng.choice(["e", "w"], 2000), "prediction": rng.choice(["C1", "C2"], 2000)})
    target = tmp_path / "risk" / "2026-10-31.html"
    summary = drift_report(ref, cur, ["income"], ["region", "prediction"], 0.3, target, {"tag": "risk"})
    assert target.exists() and target.stat().st_size > 10_000
    assert not list(target.parent.glob("*.tmp*"))
    assert summary.columns["income"]["drifted"] is True and summary.columns["region"]["drifted"] is False
    assert summary.drifted_columns == 1 and summary.drifted_share == pytest.approx(1 / 3)
    assert summary.sample_rows == (2000, 2000)


def _frames(day: date, tag: str, drifted: bool, psi: float) -> dict:
    return {
        SUMMARY: pd.DataFrame([_summary(tag, day, drifted)]),
        "drift_features": pd.DataFrame({"tag": [tag], "slice_column": ALL, "feature": ["x"], "psi": [psi]}),
        "drift_predictions": pd.DataFrame({"tag": [tag], "class": ["k"], "slice_psi": [psi]}),
    }


def test_a_writer_killed_between_the_history_tables_leaves_the_previous_generation_whole(tmp_path, con):
    import os
    import signal
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    root = tmp_path / "drift"
    day = date(2026, 10, 31)
    history = DriftHistory(root)
    history.write(con, day, _frames(day, "a", False, 0.01))
    first = history.generation(day)
    # the second run gets as far as the details, and dies before the summary commits them
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import tagml.monitoring.history as history
        from tagml.core.storage import connect
        from tests.test_drift import _frames
        from datetime import date
        original = history.write_parquet_atomically
        def write(con, sql, target, **kwargs):
            if target.parent.parent.name == history.SUMMARY:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(con, sql, target, **kwargs)
        history.write_parquet_atomically = write
        history.DriftHistory(history.Path({str(root)!r})).write(connect(1, "512MB"), date(2026, 10, 31), _frames(date(2026, 10, 31), "a", True, 0.9))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == -signal.SIGKILL
    assert len(list((root / "drift_features" / f"as_of={day}").glob("data-*.parquet"))) == 2  # the dead run's details exist...
    # ...but readers see one generation: the summary's, with its own details
    assert history.generation(day) == first
    assert history.summary(con, day)["drifted"].tolist() == [False]
    assert history.features(con, day, "a")["psi"].tolist() == [0.01]
    assert history.predictions(con, day, "a")["slice_psi"].tolist() == [0.01]
    assert set(history.features(con, day, "a")["generation"]) == {first}
    # the next write commits a new generation and removes the dead one's files
    history.write(con, day, _frames(day, "a", True, 0.5))
    assert history.features(con, day, "a")["psi"].tolist() == [0.5] and history.summary(con, day)["drifted"].tolist() == [True]
    names = {p.name for p in (root / "drift_features" / f"as_of={day}").iterdir()}
    assert names == {f"data-{history.generation(day)}.parquet", f"data-{first}.parquet"}  # the previous one is kept for readers on it


VERDICT = {
    "drifted": True,
    "reasons": ["class PSI 0.412 > 0.2: C1 50.0% -> C1 80.0%"],
    "current_rows": 4000,
    "reference_rows": 3900,
    "drifted_feature_share": 0.25,
    "feature_psi_threshold": 0.2,
    "drifted_feature_share_threshold": 0.3,
    "prediction_psi": 0.412,
    "prediction_psi_threshold": 0.2,
    "performance_status": "not monitored",
}
IDENTITY = {"tag": "risk_appetite", "as_of": "2026-10-31", "model": "tagml-risk_appetite/3", "reference_as_of": "2026-08-31"}


def test_a_column_gone_all_missing_is_named_not_a_crash_and_the_report_says_whose_verdict_counts(tmp_path):
    from tagml.monitoring.report import drift_report

    rng = np.random.default_rng(5)
    n = 1500
    ref = pd.DataFrame({"aum_total": rng.lognormal(10, 1, n), "income": rng.normal(0, 1, n), "prediction": rng.choice(["C1", "C2"], n)})
    # the same population (Evidently: no drift) with a column that went all NULL
    cur = ref.sample(frac=1, random_state=1).reset_index(drop=True).assign(aum_total=np.nan)
    target = tmp_path / "risk_appetite" / "2026-10-31.html"
    summary = drift_report(ref, cur, ["aum_total", "income"], ["prediction"], 0.3, target, IDENTITY, VERDICT)
    assert summary.excluded == {"aum_total": "no values in the current sample"}
    assert "aum_total" not in summary.columns and summary.columns["income"]["drifted"] is False
    page = target.read_text()
    header = page[page.index("<header id='tagml-verdict'") : page.index("</header>")]
    assert page.index("<header id='tagml-verdict'") < page.index('<div id="root_')  # first thing in the body
    for fact in ("risk_appetite", "2026-10-31", "tagml-risk_appetite/3", "2026-08-31"):
        assert fact in header
    assert "<title>tagml drift: risk_appetite 2026-10-31</title>" in page
    # Evidently's sample says "no drift"; the header leads with tagml's decision and its numbers
    assert "tagml's verdict: DRIFTED" in header and "class PSI 0.4120 (threshold 0.2)" in header
    assert "PSI over the whole population (4,000 customers" in header and "not tagml's decision" in header
    assert "aum_total (no values in the current sample)" in header and "C1 50.0% -&gt; C1 80.0%" in header


def test_a_report_with_no_comparable_column_still_has_its_header(tmp_path):
    from tagml.monitoring.report import drift_report

    ref = pd.DataFrame({"aum_total": [1.0, 2.0, 3.0]})
    summary = drift_report(
        ref, ref.assign(aum_total=np.nan), ["aum_total"], [], 0.3, tmp_path / "r.html", IDENTITY, {**VERDICT, "drifted": False, "reasons": []}
    )
    assert summary.columns == {} and summary.drifted_columns == 0
    assert "tagml's verdict: no drift" in (tmp_path / "r.html").read_text()
