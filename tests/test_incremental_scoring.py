"""Incremental scoring of a night from the partition before it.

Exact reuse of the previous night's model output (scoring/reuse.py): a night scored reusing the one before is
the partition a full scoring writes, value for value, and reuse turns itself off whenever what it relied on moved.

The catalog's refresh cadence (scoring/refresh.py): within a tag's period a night keeps the period's inference
(= the model on the features of the night that made it), everything else is tonight's; a new period, a new
champion or an unusable partition infers everyone again."""

import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
TWO_NIGHTS_AGO = WINDOW_END - timedelta(days=2)
A_MONTH_AGO = date(2026, 9, 30)


@pytest.fixture(scope="module")
def nights(bank, tmp_path_factory):
    """An xgboost life_stage champion (multi-class, with reasons), a rule tag, and feature snapshots of three nights."""
    tmp = tmp_path_factory.mktemp("reuse")
    catalog = load_catalog(write_test_catalog(tmp / "catalog.yaml", ("life_stage", "value_tier"), model={"family": "xgboost"}))
    client = connect_tracking(f"sqlite:///{tmp / 'mlflow.db'}")
    con = make_connection(tmp)
    features = {}
    for night in (A_MONTH_AGO, TWO_NIGHTS_AGO, LAST_NIGHT, TONIGHT):
        features[night] = tmp / "features" / f"as_of={night}" / "data.parquet"
        build_customer_features(con, bank["staged"], night, features[night])
    tag = catalog.get("life_stage")
    data = build_training_set(con, bank["staged"], tag, A_MONTH_AGO, tmp / "sets")
    trained = train_tag(tag, data, client, shipped_slices(data), artifact_location=str(tmp / "artifacts"), seed=0, threads=1)
    apply_gate(client, evaluate_gate(client, tag, trained.version, data, shipped_slices(data)))
    assert champion_version(client, "life_stage") == trained.version
    return {"tmp": tmp, "catalog": catalog, "client": client, "con": con, "features": features, "staged": bank["staged"]}


def _score(nights, night: date, target: Path, **kwargs):
    if kwargs.get("previous_partition") is not None:  # these tests are about exact reuse: the refresh cadence is tested below
        kwargs = {"reuse_unchanged": True, "honour_refresh": False, **kwargs}
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
    for night in (A_MONTH_AGO, TWO_NIGHTS_AGO, LAST_NIGHT, TONIGHT):
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


# --- the catalog's refresh cadence -------------------------------------------------------------------------

INFERENCE = ["inferred_value", "probabilities", "reasons", "producer", "model_version", "mlflow_run_id"]


def _with_refresh(catalog, refresh: str):
    return catalog.model_copy(update={"tags": tuple(t.model_copy(update={"refresh": refresh}) if t.kind == "model" else t for t in catalog.tags)})


def _carrying(nights, night: date, target: Path, previous: Path, refresh: str = "monthly", **kwargs):
    catalog = _with_refresh(nights["catalog"], refresh)
    return score_partition(
        nights["con"], nights["client"], catalog, nights["features"][night], nights["staged"], night, target, previous_partition=previous, **kwargs
    )


def _inferred_from(nights, features_night: date, night: date, target: Path) -> pd.DataFrame:
    """What a carried night must hold: the model on `features_night`'s snapshot, everything else on `night`."""
    score_partition(nights["con"], nights["client"], nights["catalog"], nights["features"][features_night], nights["staged"], night, target)
    return _rows(target)


def test_refresh_periods_are_calendar_periods():
    from tagml.scoring.refresh import refresh_period_start

    thursday = date(2026, 10, 29)
    assert refresh_period_start("daily", thursday) == thursday
    assert refresh_period_start("weekly", thursday) == date(2026, 10, 26)  # ISO weeks start on Monday
    assert refresh_period_start("weekly", date(2026, 10, 26)) == date(2026, 10, 26)
    assert refresh_period_start("monthly", thursday) == date(2026, 10, 1)
    assert refresh_period_start("quarterly", thursday) == date(2026, 10, 1)
    assert refresh_period_start("quarterly", date(2026, 9, 30)) == date(2026, 7, 1)
    assert refresh_period_start("quarterly", date(2026, 3, 1)) == date(2026, 1, 1)


def test_a_night_within_the_period_keeps_the_periods_inference_and_tonights_labels(nights, scored, tmp_path):
    # last night made October's inference (the previous partition); a tenth of its customers have none in it, and
    # customers who joined today have none either
    previous = tmp_path / "previous.parquet"
    table = pq.read_table(scored[LAST_NIGHT]).to_pandas()
    life = table["tag"] == "life_stage"
    dropped = set(table.loc[life, "customer_id"].sample(frac=0.1, random_state=0))
    kept = table[~(life & table["customer_id"].isin(dropped))]
    pq.write_table(pa.Table.from_pandas(kept, schema=pq.read_schema(scored[LAST_NIGHT]), preserve_index=False), previous)
    target = tmp_path / "tonight.parquet"
    summary = _carrying(nights, TONIGHT, target, previous)
    full = _rows(scored[TONIGHT])
    with_carry = set(kept.loc[kept["tag"] == "life_stage", "customer_id"])
    tonight_only = set(full.loc[full["tag"] == "life_stage", "customer_id"]) - with_carry
    assert dropped <= tonight_only and len(tonight_only) > len(dropped)  # the bank onboards customers every day
    refresh = summary.per_tag["life_stage"]["refresh"]
    assert refresh["cadence"] == "monthly" and refresh["period_start"] == "2026-10-01"
    assert refresh["inferred_rows"] == len(tonight_only) and refresh["carried_rows"] == summary.customers - len(tonight_only), refresh
    got = _rows(target)
    # carried customers: the model on last night's features, tonight's labels and assessments; the others: tonight's model
    carried = _inferred_from(nights, LAST_NIGHT, TONIGHT, tmp_path / "carried.parquet")
    expected = pd.concat(
        [
            carried[(carried["tag"] == "life_stage") & carried["customer_id"].isin(with_carry)],
            full[(full["tag"] != "life_stage") | full["customer_id"].isin(tonight_only)],
        ]
    )
    expected = expected.sort_values(["tag", "customer_id"]).reset_index(drop=True)
    days = got.pop("inferred_as_of")
    expected = expected.drop(columns=["inferred_as_of"])
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    was_carried = got["customer_id"].isin(with_carry)
    life_rows = got["tag"] == "life_stage"
    assert (days[life_rows & was_carried] == LAST_NIGHT).all() and (days[life_rows & ~was_carried] == TONIGHT).all()
    assert (days[~life_rows] == TONIGHT).all()  # rule tags are evaluated every night
    # the carried rows keep when they were scored
    scored_at = pq.read_table(target, columns=["customer_id", "tag", "scored_at"]).to_pandas()
    before = pq.read_table(previous, columns=["customer_id", "tag", "scored_at"]).to_pandas()
    merged = scored_at.merge(before, on=["customer_id", "tag"], suffixes=("", "_before"))
    merged = merged[(merged["tag"] == "life_stage")]
    assert len(merged) == len(with_carry) and (merged["scored_at"] == merged["scored_at_before"]).all()


def test_a_carried_inference_travels_across_the_period(nights, scored, tmp_path):
    # two nights ago inferred October; last night carried it (and inferred its new customers); tonight carries both
    last = tmp_path / "last.parquet"
    _carrying(nights, LAST_NIGHT, last, scored[TWO_NIGHTS_AGO])
    tonight = tmp_path / "tonight.parquet"
    summary = _carrying(nights, TONIGHT, tonight, last)
    got = _rows(tonight)
    life = got["tag"] == "life_stage"
    # each customer's inference is the model on the features of the first night of October it was a customer
    first_night = {}
    for night in (TONIGHT, LAST_NIGHT, TWO_NIGHTS_AGO):
        for customer in pd.read_parquet(nights["features"][night], columns=["customer_id"])["customer_id"]:
            first_night[customer] = night
    expected_day = got.loc[life, "customer_id"].map(first_night)
    assert {TWO_NIGHTS_AGO, TONIGHT} <= set(expected_day)  # (this bank onboarded no one on the 30th)
    assert (got.loc[life, "inferred_as_of"] == expected_day).all()
    assert summary.per_tag["life_stage"]["refresh"]["inferred_rows"] == (expected_day == TONIGHT).sum()
    parts = []
    for night in (TWO_NIGHTS_AGO, LAST_NIGHT, TONIGHT):
        frame = _inferred_from(nights, night, TONIGHT, tmp_path / f"expected-{night}.parquet")
        ours = frame["customer_id"].map(first_night) == night
        parts.append(frame[(frame["tag"] == "life_stage") & ours] if night != TONIGHT else frame[(frame["tag"] != "life_stage") | ours])
    expected = pd.concat(parts).sort_values(["tag", "customer_id"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got.drop(columns=["inferred_as_of"]), expected.drop(columns=["inferred_as_of"]), check_exact=True)


@pytest.mark.parametrize("refresh", ["daily", "weekly"])
def test_a_new_period_infers_everyone(nights, scored, tmp_path, refresh):
    # a month ago is another period for monthly; for daily every night is; LAST_NIGHT (Fri 30th) and TONIGHT (Sat 31st)
    # share an ISO week, so weekly needs the partition of a month ago
    previous = scored[A_MONTH_AGO] if refresh == "weekly" else scored[LAST_NIGHT]
    target = tmp_path / "t.parquet"
    summary = _carrying(nights, TONIGHT, target, previous, refresh=refresh)
    refresh_summary = summary.per_tag["life_stage"]["refresh"]
    assert refresh_summary["inferred_rows"] == "all", refresh_summary
    assert ("daily" in refresh_summary["why"]) if refresh == "daily" else ("no inference yet" in refresh_summary["why"])
    pd.testing.assert_frame_equal(_rows(target), _rows(scored[TONIGHT]), check_exact=True)


def test_nothing_is_carried_from_an_unusable_partition_or_another_champion(nights, scored, tmp_path):
    from dataclasses import replace

    from tagml.scoring.refresh import plan_carry

    tag = _with_refresh(nights["catalog"], "monthly").get("life_stage")
    info = resolve_champion(nights["client"], tag).info
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(scored[LAST_NIGHT].read_bytes()[:-100])
    bare = tmp_path / "bare.parquet"
    pq.write_table(pq.read_table(scored[LAST_NIGHT]).replace_schema_metadata(None), bare)
    assert plan_carry(scored[LAST_NIGHT], tag, info, 3, TONIGHT)[0] is not None
    cases = {
        "unreadable": (corrupt, info, 3),
        "does not record": (bare, info, 3),
        "champion changed": (scored[LAST_NIGHT], replace(info, version="999"), 3),
        "reason settings": (scored[LAST_NIGHT], info, 2),
        "no earlier": (None, info, 3),
    }
    for why, (partition, version, top) in cases.items():
        carry, problem = plan_carry(partition, tag, version, top, TONIGHT)
        assert carry is None and why in problem, (why, problem)
    # and the night is then the full scoring, not a failure
    target = tmp_path / "t.parquet"
    summary = _carrying(nights, TONIGHT, target, corrupt)
    assert "unreadable" in summary.per_tag["life_stage"]["refresh"]["why"]
    pd.testing.assert_frame_equal(_rows(target), _rows(scored[TONIGHT]), check_exact=True)


def test_refresh_all_infers_everyone_within_the_period(nights, scored, tmp_path):
    target = tmp_path / "t.parquet"
    summary = _carrying(nights, TONIGHT, target, scored[LAST_NIGHT], honour_refresh=False)
    assert summary.per_tag["life_stage"]["refresh"]["inferred_rows"] == "all"
    pd.testing.assert_frame_equal(_rows(target), _rows(scored[TONIGHT]), check_exact=True)


def test_a_partition_written_before_inferred_as_of_carries_and_reads_as_its_own_as_of(nights, scored, tmp_path):
    from tagml.scoring.store import ParquetTagStore

    old = pq.read_table(scored[LAST_NIGHT])
    old = old.drop(["inferred_as_of"]).replace_schema_metadata(old.schema.metadata)
    store = ParquetTagStore(tmp_path / "store")
    with store.write_partition(LAST_NIGHT) as staged:
        pq.write_table(old, staged)
    summary = _carrying(nights, TONIGHT, tmp_path / "t.parquet", store.partition_path(LAST_NIGHT))
    refresh = summary.per_tag["life_stage"]["refresh"]
    assert refresh["carried_rows"] == len(old.filter(pc.equal(old["tag"], "life_stage"))), refresh
    days = _rows(tmp_path / "t.parquet").query("tag == 'life_stage'")["inferred_as_of"]
    assert (days == LAST_NIGHT).sum() == refresh["carried_rows"] and (days == TONIGHT).sum() == refresh["inferred_rows"]
    con = nights["con"]
    days = con.execute(f"SELECT DISTINCT inferred_as_of FROM {store.read_sql(LAST_NIGHT)}").fetchall()
    assert days == [(LAST_NIGHT,)]


def test_reuse_never_takes_a_row_the_previous_partition_carried(nights, scored, tmp_path):
    """A carried row's output came from an earlier night's features, not from the file its partition records: reusing
    it tonight (a new period, so nothing is carried) would copy a stale inference for customers whose codes held."""
    # last night's partition, its life_stage rows carried from two nights ago
    from_two_nights = tmp_path / "from-two-nights.parquet"
    _carrying(nights, LAST_NIGHT, from_two_nights, scored[TWO_NIGHTS_AGO])
    days = _rows(from_two_nights).query("tag == 'life_stage'")["inferred_as_of"]
    assert (days == TWO_NIGHTS_AGO).sum() > 0
    target = tmp_path / "tonight.parquet"
    summary = _score(nights, TONIGHT, target, previous_partition=from_two_nights)
    reuse = summary.per_tag["life_stage"]["reuse"]
    assert reuse["reused_rows"] <= (days != TWO_NIGHTS_AGO).sum()
    pd.testing.assert_frame_equal(_rows(target), _rows(scored[TONIGHT]), check_exact=True)
