"""Exact reuse of the previous night's model output (scoring/reuse.py): a night scored reusing the one before is
the partition a full scoring writes, value for value, and reuse turns itself off whenever what it relied on moved."""

import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tagml.features.customer_features import build_customer_features
from tagml.scoring.reasons import unwrap_pipeline
from tagml.scoring.reuse import SplitIntervals, read_scored_from
from tagml.scoring.score import resolve_champion, score_partition
from tagml.training.catalog import load_catalog
from tagml.training.dataset import build_training_set
from tagml.training.inference import model_input
from tagml.training.registry import apply_gate, champion_version, evaluate_gate
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag
from tests.conftest import WINDOW_END, make_connection, shipped_slices, write_test_catalog

TONIGHT = WINDOW_END
LAST_NIGHT = WINDOW_END - timedelta(days=1)
A_MONTH_AGO = date(2026, 9, 30)


@pytest.fixture(scope="module")
def nights(bank, tmp_path_factory):
    """An xgboost life_stage champion (multi-class, with reasons), a rule tag, and feature snapshots of three nights."""
    tmp = tmp_path_factory.mktemp("reuse")
    catalog = load_catalog(write_test_catalog(tmp / "catalog.yaml", ("life_stage", "value_tier"), model={"family": "xgboost"}))
    client = connect_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
    con = make_connection(tmp)
    features = {}
    for night in (A_MONTH_AGO, LAST_NIGHT, TONIGHT):
        features[night] = tmp / "features" / f"as_of={night}" / "data.parquet"
        build_customer_features(con, bank["staged"], night, features[night])
    tag = catalog.get("life_stage")
    data = build_training_set(con, bank["staged"], tag, A_MONTH_AGO, tmp / "sets")
    trained = train_tag(tag, data, client, shipped_slices(data), artifact_location=str(tmp / "artifacts"), seed=0, threads=1)
    apply_gate(client, evaluate_gate(client, tag, trained.version, data, shipped_slices(data)))
    assert champion_version(client, "life_stage") == trained.version
    return {"tmp": tmp, "catalog": catalog, "client": client, "con": con, "features": features, "staged": bank["staged"]}


def _score(nights, night: date, target: Path, **kwargs):
    return score_partition(nights["con"], nights["client"], nights["catalog"], nights["features"][night], nights["staged"], night, target, **kwargs)


def _rows(path: Path) -> pd.DataFrame:
    frame = pq.read_table(path).to_pandas().drop(columns=["scored_at"])
    frame["probabilities"] = frame["probabilities"].map(lambda pairs: None if pairs is None else tuple(pairs))
    frame["reasons"] = frame["reasons"].map(tuple)
    return frame.sort_values(["tag", "customer_id"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def scored(nights):
    """Last night and a month ago scored in full, tonight scored in full (the reference)."""
    out = {}
    for night in (A_MONTH_AGO, LAST_NIGHT, TONIGHT):
        out[night] = nights["tmp"] / "full" / f"{night}.parquet"
        _score(nights, night, out[night])
    return out


@pytest.mark.parametrize("previous", [LAST_NIGHT, A_MONTH_AGO])
def test_a_night_reusing_an_earlier_one_is_the_full_scoring(nights, scored, tmp_path, previous):
    target = tmp_path / "reused.parquet"
    summary = _score(nights, TONIGHT, target, previous_partition=scored[previous])
    reuse = summary.per_tag["life_stage"]["reuse"]
    # both sides exercised: some customers kept their output, some crossed a split and were scored again
    assert reuse["reused_rows"] > 0 and reuse["rescored_rows"] > 0, reuse
    assert reuse["reused_rows"] + reuse["rescored_rows"] == summary.customers
    pd.testing.assert_frame_equal(_rows(target), _rows(scored[TONIGHT]), check_exact=True)


def test_equal_split_codes_mean_equal_model_output(nights):
    """The property reuse stands on, checked directly: rows of two nights with the same codes get the same probabilities."""
    champion = resolve_champion(nights["client"], nights["catalog"].get("life_stage"))
    pipeline = unwrap_pipeline(champion.model)
    prepare, booster = pipeline.named_steps["prepare"], pipeline.named_steps["model"].get_booster()
    frames = [pd.read_parquet(nights["features"][n]).set_index("customer_id") for n in (A_MONTH_AGO, TONIGHT)]
    common = frames[0].index.intersection(frames[1].index)
    inputs = [model_input(f.loc[common].reset_index(), champion.info) for f in frames]
    values = [np.asarray(prepare.transform(x), dtype=np.float32) for x in inputs]
    intervals = SplitIntervals.from_booster(booster, values[0].shape[1])
    same = (intervals.codes(values[0]) == intervals.codes(values[1])).all(axis=1)
    assert 0 < same.sum() < len(common)
    proba = [champion.model.predict_proba(x) for x in inputs]
    np.testing.assert_array_equal(proba[0][same], proba[1][same])
    # and the codes are not trivially coarse: rows whose codes differ mostly differ in output
    assert (np.abs(proba[0][~same] - proba[1][~same]).max(axis=1) > 0).mean() > 0.5


def test_the_partition_records_what_each_model_tag_was_scored_from(nights, scored):
    recorded = read_scored_from(scored[TONIGHT])
    assert set(recorded) == {"life_stage"}
    entry = recorded["life_stage"]
    assert entry["source"] == str(nights["features"][TONIGHT])
    assert entry["top_reasons"] == 3 and entry["model_version"]


def test_reuse_turns_off_when_last_nights_features_were_rewritten(nights, scored, tmp_path):
    # a copy of last night whose features file is re-materialized after it was scored (a restated day)
    features = tmp_path / "features.parquet"
    shutil.copy(nights["features"][LAST_NIGHT], features)
    previous = tmp_path / "previous.parquet"
    score_partition(nights["con"], nights["client"], nights["catalog"], features, nights["staged"], LAST_NIGHT, previous)
    table = pq.read_table(features)
    pq.write_table(table.slice(0, table.num_rows - 1), features)  # rewritten: another file at the same path
    target = tmp_path / "tonight.parquet"
    summary = _score(nights, TONIGHT, target, previous_partition=previous)
    assert "rewritten" in summary.per_tag["life_stage"]["reuse"]["off"]
    pd.testing.assert_frame_equal(_rows(target), _rows(scored[TONIGHT]), check_exact=True)


def test_reuse_turns_off_for_a_corrupt_or_unrecorded_previous_partition(nights, scored, tmp_path):
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(scored[LAST_NIGHT].read_bytes()[:-100])
    target = tmp_path / "tonight.parquet"
    summary = _score(nights, TONIGHT, target, previous_partition=corrupt)
    assert "unreadable" in summary.per_tag["life_stage"]["reuse"]["off"]
    pd.testing.assert_frame_equal(_rows(target), _rows(scored[TONIGHT]), check_exact=True)
    # a partition written before the record existed: same rows, no key-value metadata
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(scored[LAST_NIGHT]).replace_schema_metadata(None), bare)
    summary = _score(nights, TONIGHT, tmp_path / "again.parquet", previous_partition=bare)
    assert "does not record" in summary.per_tag["life_stage"]["reuse"]["off"]


def test_reuse_turns_off_when_the_reason_settings_change(nights, scored, tmp_path):
    summary = _score(nights, TONIGHT, tmp_path / "t.parquet", previous_partition=scored[LAST_NIGHT], top_reasons=2)
    assert "reason settings" in summary.per_tag["life_stage"]["reuse"]["off"]
