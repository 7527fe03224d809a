"""Batch scoring and the tag store with real stores: DuckDB/Parquet features, an MLflow SQLite registry."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tagml.features.customer_features import build_customer_features
from tagml.scoring.coverage import check_coverage
from tagml.scoring.score import (
    TAG_ROW_SCHEMA,
    CoverageError,
    ScoringError,
    score_partition,
)
from tagml.scoring.store import ParquetTagStore, TagStoreError
from tagml.training.catalog import load_catalog
from tagml.training.dataset import build_training_set
from tagml.training.registry import apply_gate, champion_version, evaluate_gate, promote
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag
from tests.conftest import WINDOW_END, make_connection, shipped_slices, write_test_catalog

AS_OF = WINDOW_END


def small_catalog(tmp: Path, include=("risk_appetite", "value_tier", "lifecycle_stage")) -> Path:
    return write_test_catalog(tmp / "catalog.yaml", include)


@pytest.fixture(scope="module")
def world(bank, tmp_path_factory):
    """A trained, promoted risk_appetite champion and a feature snapshot at the window end."""
    tmp = tmp_path_factory.mktemp("scoring")
    catalog = load_catalog(small_catalog(tmp))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = connect_tracking(uri)
    con = make_connection(tmp)
    features = tmp / "features" / f"as_of={AS_OF}" / "data.parquet"
    build_customer_features(con, bank["staged"], AS_OF, features)
    tag = catalog.get("risk_appetite")
    data = build_training_set(con, bank["staged"], tag, AS_OF, tmp / "sets")
    first = train_tag(tag, data, client, shipped_slices(data), artifact_location=str(tmp / "artifacts"), seed=0, threads=1)
    apply_gate(client, evaluate_gate(client, tag, first.version, data, shipped_slices(data)))
    assert champion_version(client, "risk_appetite") == first.version
    return {
        "tmp": tmp,
        "catalog": catalog,
        "uri": uri,
        "client": client,
        "con": con,
        "features": features,
        "data": data,
        "first": first,
        "staged": bank["staged"],
    }


def _score(world, target: Path, **kwargs):
    return score_partition(world["con"], world["client"], world["catalog"], world["features"], world["staged"], AS_OF, target, **kwargs)


def test_every_customer_gets_every_tag_with_what_produced_it(world, tmp_path):
    target = tmp_path / "tags" / f"as_of={AS_OF}" / "data.parquet"
    summary = _score(world, target)
    rows = pd.read_parquet(target)
    customers = pq.read_metadata(world["features"]).num_rows
    assert summary.rows == len(rows) == customers * 3
    assert rows.groupby("tag").customer_id.nunique().to_dict() == {"risk_appetite": customers, "value_tier": customers, "lifecycle_stage": customers}
    model = rows[rows.tag == "risk_appetite"]
    assert set(model.producer) == {f"tagml-risk_appetite/{world['first'].version}"}
    assert set(model.mlflow_run_id) == {world["first"].run_id}
    sums = model.probabilities.map(lambda m: sum(v for _, v in m))
    assert np.allclose(sums, 1, atol=1e-5)
    assert (model.reasons.map(len) > 0).mean() > 0.95
    assert model.reasons.explode().dropna().str.match(r"^[a-z0-9_]+( high| low|=.+)$").all()
    # observed questionnaires win and the disagreement with the model stays visible
    observed = model[model.source == "observed"]
    assert len(observed) > 0 and (observed.value == observed.observed_value).all()
    assert observed.observed_mismatch.isin([True, False]).all()
    assert (observed.observed_mismatch == (observed.inferred_value != observed.observed_value)).all()
    inferred = model[model.source == "model"]
    assert (inferred.value == inferred.inferred_value).all() and inferred.observed_value.isna().all()
    rules = rows[rows.tag == "value_tier"]
    assert rules.producer.str.startswith("rule:2026.1:").all() and rules.probability.isna().all()
    aum = pd.read_parquet(world["features"], columns=["customer_id", "aum_total"]).set_index("customer_id").aum_total
    tiers = rules.set_index("customer_id").value
    assert (tiers[aum[aum >= 1_000_000].index].isin(["high_net_worth", "private_banking"])).all()
    assert (tiers[aum[aum < 50_000].index] == "mass").all()


def test_scoring_follows_the_champion_alias(world, tmp_path):
    tag = world["catalog"].get("risk_appetite")
    second = train_tag(tag, world["data"], world["client"], shipped_slices(world["data"]), artifact_location=str(world["tmp"] / "artifacts"), seed=1, threads=1)
    target = tmp_path / "data.parquet"
    _score(world, target)
    assert set(pd.read_parquet(target, filters=[("tag", "=", "risk_appetite")]).model_version) == {world["first"].version}
    promote(world["client"], "risk_appetite", second.version, by="test")
    try:
        _score(world, target)
        assert set(pd.read_parquet(target, filters=[("tag", "=", "risk_appetite")]).model_version) == {second.version}
    finally:
        promote(world["client"], "risk_appetite", world["first"].version, by="test")


def test_rerunning_a_partition_leaves_exactly_one_copy(world, tmp_path):
    store = ParquetTagStore(tmp_path / "tags")
    for _ in range(2):
        _score(world, store.partition_path(AS_OF))
    assert [p.name for p in store.partition_path(AS_OF).parent.iterdir()] == ["data.parquet"]
    con = world["con"]
    assert (
        con.execute(f"SELECT count(*), count(DISTINCT (customer_id, tag)) FROM read_parquet('{store.partition_path(AS_OF)}')").fetchall()[0]
        == (pq.read_metadata(store.partition_path(AS_OF)).num_rows,) * 2
    )


def test_missing_champion_fails_clearly_and_writes_nothing(world, tmp_path):
    catalog = load_catalog(small_catalog(tmp_path, include=("risk_appetite", "life_stage")))
    target = tmp_path / "data.parquet"
    target.write_bytes(b"previous partition")
    with pytest.raises(ScoringError, match="tag 'life_stage': no 'champion' alias on registered model 'tagml-life_stage'"):
        score_partition(world["con"], world["client"], catalog, world["features"], world["staged"], AS_OF, target)
    assert target.read_bytes() == b"previous partition"
    assert list(tmp_path.glob(".*tmp")) == []


def test_features_not_matching_the_model_fail_clearly_and_write_nothing(world, tmp_path):
    broken = tmp_path / "features.parquet"
    table = pq.read_table(world["features"])
    pq.write_table(table.drop(["share_equity", "age"]), broken)
    target = tmp_path / "data.parquet"
    with pytest.raises(ScoringError, match=r"lacks 2 column\(s\).*'age'.*'share_equity'"):
        score_partition(world["con"], world["client"], world["catalog"], broken, world["staged"], AS_OF, target)
    assert not target.exists()


@pytest.mark.slow
def test_a_scoring_run_killed_mid_write_leaves_the_previous_partition_intact(world, tmp_path):
    target = tmp_path / "tags" / f"as_of={AS_OF}" / "data.parquet"
    _score(world, target)
    before = pd.read_parquet(target)
    script = textwrap.dedent(
        f"""
        import sys, time
        from datetime import date
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import tagml.scoring.score as score
        from tagml.core.storage import connect
        from tagml.training.catalog import load_catalog
        from tagml.training.tracking import connect_tracking
        original = score._model_batches
        def slow(*args, **kwargs):
            for batch in original(*args, **kwargs):
                time.sleep(0.2)
                yield batch
        score._model_batches = slow
        score.score_partition(connect(1, "1GB"), connect_tracking({world["uri"]!r}), load_catalog({str(world["tmp"] / "catalog.yaml")!r}),
            Path({str(world["features"])!r}), Path({str(world["staged"])!r}), date.fromisoformat({AS_OF.isoformat()!r}),
            Path({str(target)!r}), batch_rows=50)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(target.parent.glob(".data.parquet.*.tmp")):
        time.sleep(0.05)
    assert list(target.parent.glob(".data.parquet.*.tmp")), "the scoring run never started writing"
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    pd.testing.assert_frame_equal(pd.read_parquet(target), before)
    # readers of the store never see the half-written file
    assert ParquetTagStore(target.parent.parent).partitions() == [AS_OF]
    assert list(target.parent.glob(".data.parquet.*.tmp")), "the killed writer's temporary file is left"
    # the re-run of the partition removes the dead writer's temporary at once, not hours later
    _score(world, target)
    assert _no_temporaries(target.parent) and sorted(p.name for p in target.parent.iterdir()) == ["data.parquet"]


# ---- the store's queries on a hand-made example ---------------------------------------------------


def _rows(as_of: date, values: dict[str, str], producer: str) -> pa.Table:
    n = len(values)
    return pa.table(
        {
            "customer_id": list(values),
            "as_of": [as_of] * n,
            "tag": ["risk_appetite"] * n,
            "value": list(values.values()),
            "probability": [0.6] * n,
            "probabilities": pa.array([[("C1", 0.4), ("C2", 0.6)]] * n, pa.map_(pa.string(), pa.float64())),
            "reasons": [["age high"]] * n,
            "source": ["model"] * n,
            "inferred_value": list(values.values()),
            "observed_value": [None] * n,
            "observed_mismatch": [None] * n,
            "assessment": [None] * n,
            "assessed_on": [None] * n,
            "producer": [producer] * n,
            "model_version": [producer[-1]] * n,
            "mlflow_run_id": ["run" + producer[-1]] * n,
            "scored_at": [datetime(2026, 1, 1, tzinfo=UTC)] * n,
            "inferred_as_of": [as_of] * n,
        },
        schema=TAG_ROW_SCHEMA,
    )


@pytest.fixture
def hand_store(tmp_path):
    store = ParquetTagStore(tmp_path / "tags")
    for as_of, values, producer in (
        (date(2026, 9, 30), {"A": "C1", "B": "C2", "C": "C2"}, "tagml-risk_appetite/1"),
        (date(2026, 10, 31), {"A": "C2", "B": "C2", "C": "C1", "D": "C1"}, "tagml-risk_appetite/2"),
    ):
        path = store.partition_path(as_of)
        path.parent.mkdir(parents=True)
        pq.write_table(_rows(as_of, values, producer), path)
    return store


def test_history_changes_and_transitions_on_a_hand_made_store(hand_store, tmp_path):
    con = make_connection(tmp_path)
    assert hand_store.partitions() == [date(2026, 9, 30), date(2026, 10, 31)]
    # what tag did A have on 2026-10-15, and from which model version?
    on_date = hand_store.customer_tags(con, "A", date(2026, 10, 15))
    assert on_date[["value", "producer"]].values.tolist() == [["C1", "tagml-risk_appetite/1"]]
    history = hand_store.history(con, "A", "risk_appetite")
    assert history[["value", "producer"]].values.tolist() == [["C1", "tagml-risk_appetite/1"], ["C2", "tagml-risk_appetite/2"]]
    changes = hand_store.changes(con, "risk_appetite", date(2026, 9, 30), date(2026, 10, 31))
    assert changes[["customer_id", "from_value", "to_value"]].where(changes.notna(), None).values.tolist() == [
        ["A", "C1", "C2"],
        ["C", "C2", "C1"],
        ["D", None, "C1"],
    ]
    matrix = hand_store.transition_matrix(con, "risk_appetite", date(2026, 9, 30), date(2026, 10, 31))
    assert matrix.loc["C1", "C2"] == 1 and matrix.loc["C2", "C2"] == 1 and matrix.loc["C2", "C1"] == 1 and matrix.loc["(new)", "C1"] == 1
    assert hand_store.changed_share(con, date(2026, 9, 30), date(2026, 10, 31)) == {"risk_appetite": round(2 / 3, 4)}
    hand_store.register_views(con)
    assert con.execute("SELECT count(*) FROM customer_tags_current").fetchall()[0][0] == 4
    assert con.execute("SELECT count(*) FROM customer_tags_history").fetchall()[0][0] == 7
    with pytest.raises(TagStoreError, match="no tag partition on or before 2026-01-01"):
        hand_store.customer_tags(con, "A", date(2026, 1, 1))
    with pytest.raises(TagStoreError, match="customer 'Z' has no tags"):
        hand_store.customer_tags(con, "Z")


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_for_downstream_systems(hand_store, tmp_path, fmt):
    con = make_connection(tmp_path)
    out = tmp_path / f"export.{fmt}"
    assert hand_store.export(con, date(2026, 10, 31), fmt, out) == 4
    frame = pd.read_parquet(out) if fmt == "parquet" else pd.read_csv(out)
    assert list(frame.customer_id) == ["A", "B", "C", "D"]
    if fmt == "csv":
        assert frame.probabilities.iloc[0] == '{"C1":0.4,"C2":0.6}'


def test_reason_contributions_equal_xgboosts_own_for_the_predicted_class(world):
    import xgboost as xgb

    from tagml.scoring.reasons import ReasonExplainer
    from tagml.scoring.score import resolve_champion

    champion = resolve_champion(world["client"], world["catalog"].get("risk_appetite"))
    frame = pd.read_parquet(world["features"]).head(500)
    X = frame[list(champion.info.features)].copy()
    numeric = [f for f in champion.info.features if f not in champion.info.categorical]
    X[numeric] = X[numeric].astype("float64")
    explainer = ReasonExplainer.for_model(world["con"], champion.model, champion.info.features, champion.info.categorical, world["features"])
    predicted = champion.model.predict_proba(X).argmax(axis=1)
    ours = explainer.contributions(X, predicted)
    matrix = xgb.DMatrix(np.asarray(explainer.prepare.transform(X), dtype=np.float32), missing=np.nan)
    reference = explainer.booster.predict(matrix, pred_contribs=True, approx_contribs=True)[np.arange(len(X)), predicted, :-1]
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    reasons = explainer.reasons(X, predicted, top=3)
    top_feature = [explainer.names[i] for i in reference.argmax(axis=1)]
    assert all(r[0].split(" ")[0].split("=")[0] == f for r, f, ref in zip(reasons, top_feature, reference.max(axis=1)) if ref > 0)


def test_low_confidence_inferences_are_stored_as_unknown(world, tmp_path):
    entry = world["catalog"].get("risk_appetite").model_dump(mode="json")
    entry["min_confidence"] = 0.6
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"tags": [entry]}))
    target = tmp_path / "data.parquet"
    score_partition(world["con"], world["client"], load_catalog(path), world["features"], world["staged"], AS_OF, target)
    rows = pd.read_parquet(target)
    top = rows.probabilities.map(lambda m: max(v for _, v in m))
    inferred = rows[rows.source == "model"]
    assert (inferred.value == "unknown").sum() == (top[inferred.index] < 0.6).sum() > 0
    assert (rows[rows.source == "observed"].value != "unknown").all()  # an observed label is never unknown


# ---- the blocking coverage check runs on the file before it is published ---------------------------


def _no_temporaries(directory: Path) -> bool:
    return not [p.name for p in directory.iterdir() if p.name.startswith(".")]


def test_observed_labels_outside_the_classes_are_never_stored_and_are_counted(world, tmp_path, staged_copy):
    """A source's label outside the tag's classes (C9 for C1-C5) is a data error: the customer keeps the
    model's inference, and the count per value is reported; it never becomes a stored tag value."""
    target = tmp_path / "tags" / f"as_of={AS_OF}" / "data.parquet"
    labels = pd.read_parquet(staged_copy / "tag_labels.parquet")
    tag = world["catalog"].get("risk_appetite")
    mine = labels.index[labels["tag"] == tag.label_tag]
    labels.loc[mine[: len(mine) // 2], "label"] = "C9"
    labels.to_parquet(staged_copy / "tag_labels.parquet", index=False)
    summary = score_partition(world["con"], world["client"], world["catalog"], world["features"], staged_copy, AS_OF, target)
    stored = pd.read_parquet(target)
    risk = stored[stored.tag == "risk_appetite"]
    assert "C9" not in set(risk.value) and "C9" not in set(risk.observed_value.dropna())
    assert set(risk.value) <= {*tag.classes, "unknown"}
    outside = summary.per_tag["risk_appetite"]["observed_labels_outside_classes"]
    assert set(outside) == {"C9"} and outside["C9"] > 0
    assert (risk.source == "observed").sum() > 0  # the valid half of the labels still wins


def test_an_expired_questionnaire_stays_visible_but_never_counts_as_observed(world, tmp_path, staged_copy, capsys):
    """risk_appetite's questionnaires are valid for 365 days (label.valid_days): one of 13 months is expired
    (the value is the model's, the old level and its date stay on the row), one of 11 months is observed."""
    from tagml.cli.lookup import print_tags
    from tagml.scoring.lookup import customer_tags

    labels = pd.read_parquet(staged_copy / "tag_labels.parquet")
    expired_id, valid_id = sorted(set(labels.customer_id[labels.tag == "risk_appetite"]))[:2]
    expired_on, valid_on = AS_OF - pd.Timedelta(days=396), AS_OF - pd.Timedelta(days=335)
    kept = labels[~(labels.customer_id.isin([expired_id, valid_id]) & (labels.tag == "risk_appetite"))]
    extra = pd.DataFrame(
        {
            "customer_id": [expired_id, valid_id],
            "tag": "risk_appetite",
            "label": ["C1", "C5"],
            "label_date": [expired_on, valid_on],
            "source": "risk_questionnaire",
        }
    )
    extra["known_date"] = extra.label_date
    pd.concat([kept, extra[kept.columns]]).to_parquet(staged_copy / "tag_labels.parquet", index=False)
    store = ParquetTagStore(tmp_path / "tags")
    score_partition(world["con"], world["client"], world["catalog"], world["features"], staged_copy, AS_OF, store.partition_path(AS_OF))
    risk = pd.read_parquet(store.partition_path(AS_OF), filters=[("tag", "=", "risk_appetite")]).set_index("customer_id")
    old, new = risk.loc[expired_id], risk.loc[valid_id]
    assert (old.assessment, old.source, old.value, old.observed_value, old.assessed_on) == ("expired", "model", old.inferred_value, "C1", expired_on)
    assert old.observed_mismatch == (old.inferred_value != "C1")
    assert (new.assessment, new.source, new.value, new.assessed_on) == ("valid", "observed", "C5", valid_on)
    # over every customer: only a valid assessment is ever observed, and customers without one say so
    assert ((risk.assessment == "valid") == (risk.source == "observed")).all()
    assert set(risk.assessment) == {"valid", "expired", "none"} and risk.assessed_on.isna().eq(risk.assessment == "none").all()
    print_tags(customer_tags(world["con"], store, expired_id, published=["risk_appetite"]))
    assert f"assessment C1 of {expired_on:%Y-%m-%d} expired, inferred {old.inferred_value}" in capsys.readouterr().out


def test_a_partition_failing_coverage_is_never_published(world, tmp_path, staged_copy):
    target = tmp_path / "tags" / f"as_of={AS_OF}" / "data.parquet"
    _score(world, target)
    before = pd.read_parquet(target)
    # a customer twice in the snapshot: every tag has a duplicate row
    doubled = tmp_path / "doubled.parquet"
    table = pq.read_table(world["features"])
    pq.write_table(pa.concat_tables([table, table.slice(0, 1)]), doubled)
    with pytest.raises(CoverageError) as failure:
        score_partition(world["con"], world["client"], world["catalog"], doubled, world["staged"], AS_OF, target)
    assert failure.value.coverage.metadata()["duplicates"] == 3 and "1 duplicate 'value_tier' rows" in str(failure.value)
    assert str(table.column("customer_id")[0]) not in str(failure.value)  # counts, never customer values
    pd.testing.assert_frame_equal(pd.read_parquet(target), before)


def test_check_coverage_counts_missing_extra_and_unknown(world, tmp_path):
    good = tmp_path / "good.parquet"
    _score(world, good)
    table = pq.read_table(good)
    con = world["con"]
    coverage = check_coverage(con, good, world["catalog"], {t.name: world["features"] for t in world["catalog"].tags})
    customers = pq.read_metadata(world["features"]).num_rows
    assert coverage.passed and coverage.customers == customers and coverage.rows == coverage.expected_rows == 3 * customers
    frame = table.to_pandas()
    dropped = frame[~((frame.tag == "lifecycle_stage") & (frame.index % 100 == 0))]
    stranger = frame.iloc[[0]].assign(customer_id="not-a-customer")
    # 'unknown' is a value only for tags with a min_confidence; nothing outside the classes is a value
    unknown = frame.iloc[[1]].assign(value="unknown")
    outside = frame[frame.tag == "risk_appetite"].iloc[[2]].assign(value="C9")
    broken = tmp_path / "broken.parquet"
    pq.write_table(pa.Table.from_pandas(pd.concat([dropped, stranger, unknown, outside]), schema=TAG_ROW_SCHEMA, preserve_index=False), broken)
    result = check_coverage(con, broken, world["catalog"], {t.name: world["features"] for t in world["catalog"].tags})
    lifecycle = next(t for t in result.tags if t.tag == "lifecycle_stage")
    missing = int(((frame.tag == "lifecycle_stage") & (frame.index % 100 == 0)).sum())
    assert lifecycle.customers_covered == customers - missing and lifecycle.rows == customers - missing
    first_tag = next(t for t in result.tags if t.tag == frame.iloc[0].tag)
    assert first_tag.rows_of_unknown_customers == 1
    risk = next(t for t in result.tags if t.tag == "risk_appetite")
    assert risk.invalid_values == 1 and "'risk_appetite' rows with a value outside its classes (e.g. ['C9'])" in " ".join(result.problems)
    assert not result.passed and f"{missing:,} of {customers:,} customers have no 'lifecycle_stage' row" in result.problems


# ---- exports ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_an_export_into_the_tag_store_or_the_warehouse_is_refused(tmp_path, fmt):
    warehouse = tmp_path / "warehouse"
    store = ParquetTagStore(warehouse / "customer_tags", protected=[warehouse])
    path = store.partition_path(date(2026, 10, 31))
    path.parent.mkdir(parents=True)
    pq.write_table(_rows(date(2026, 10, 31), {"A": "C1"}, "tagml-risk_appetite/1"), path)
    con = make_connection(tmp_path)
    fake = store.root / "as_of=2099-12-31" / "data.parquet"
    with pytest.raises(TagStoreError, match=r"export output .*as_of=2099-12-31/data.parquet is inside .*customer_tags; exports go outside"):
        store.export(con, date(2026, 10, 31), fmt, fake)
    # also through a relative path that only resolves into the store, and anywhere in the warehouse
    with pytest.raises(TagStoreError, match="is inside"):
        store.export(con, date(2026, 10, 31), fmt, store.root / "x" / ".." / f"export.{fmt}")
    with pytest.raises(TagStoreError, match=r"is inside .*warehouse;"):
        store.export(con, date(2026, 10, 31), fmt, warehouse / f"export.{fmt}")
    assert store.partitions() == [date(2026, 10, 31)] and not fake.parent.exists()
    assert sorted(p.name for p in warehouse.iterdir()) == ["customer_tags"]


def test_csv_export_defuses_spreadsheet_formulas(tmp_path):
    import csv

    store = ParquetTagStore(tmp_path / "tags")
    as_of = date(2026, 10, 31)
    hostile = {'=HYPERLINK("http://x")': "C1", "+1+2": "C2", "-2+3": "C1", "@SUM(A1)": "C2", "\tTAB": "C1", "\rCR": "C2", "C-7": "C1"}
    path = store.partition_path(as_of)
    path.parent.mkdir(parents=True)
    pq.write_table(_rows(as_of, hostile, "=cmd|' /C calc'!A0"), path)
    out = tmp_path / "export.csv"
    assert store.export(make_connection(tmp_path), as_of, "csv", out) == len(hostile)
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    ids = {r["customer_id"] for r in rows}
    assert ids == {"'" + i if i[0] in "=+-@\t\r" else i for i in hostile}
    assert "C-7" in ids  # only the first character matters
    assert {r["producer"] for r in rows} == {"'=cmd|' /C calc'!A0"}
    assert all(not cell or cell[0] not in "=+-@\t\r" for r in rows for cell in r.values())
    assert {r["probability"] for r in rows} == {"0.6"}  # numbers are not text cells: left alone
    assert rows[0]["probabilities"] == '{"C1":0.4,"C2":0.6}'


def test_truncated_feature_and_tag_partitions_are_named_with_the_repair(world, tmp_path):
    """A truncated Parquet file is an error naming the file and the partition to rebuild, not a bare
    ArrowInvalid / 'No magic bytes' traceback; the tag partition already stored is kept."""
    store = ParquetTagStore(tmp_path / "tags")
    target = store.partition_path(AS_OF)
    _score(world, target)
    before = target.read_bytes()
    truncated = tmp_path / "features.parquet"
    truncated.write_bytes(world["features"].read_bytes()[:2000])
    with pytest.raises(ScoringError, match=rf"{truncated.name} is not a readable Parquet file .*re-materialize the customer_features partition {AS_OF}"):
        score_partition(world["con"], world["client"], world["catalog"], truncated, world["staged"], AS_OF, target)
    assert target.read_bytes() == before
    target.write_bytes(before[: len(before) // 2])
    with pytest.raises(TagStoreError, match=rf"is not a readable Parquet file .*re-run the scoring job \(customer_tags\) for the partition {AS_OF}"):
        store.distribution(world["con"], AS_OF)


# ---- one version record, one inference: scoring and monitoring agree ---------------------------------


def test_scoring_and_the_reference_profile_infer_identical_values(world, tmp_path):
    """Drift's "PSI is 0 on the reference" needs the tag store and the reference profile to infer alike,
    `unknown` below min_confidence included: score the snapshot, profile the same rows, compare."""
    from tagml.monitoring.reference import monitored_model, reference_profile

    entry = world["catalog"].get("risk_appetite").model_dump(mode="json")
    entry["min_confidence"] = 0.6
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"tags": [entry]}))
    tag = load_catalog(path).get("risk_appetite")
    target = tmp_path / "data.parquet"
    score_partition(world["con"], world["client"], load_catalog(path), world["features"], world["staged"], AS_OF, target, with_reasons=False)
    scored = pd.read_parquet(target)
    version = monitored_model(world["client"], tag, world["first"].version)
    profile = reference_profile(world["con"], world["client"], version, tag, world["features"], {}, tmp_path / "reference", sample_rows=50)
    overall = profile.class_counts[profile.class_counts.slice_column == "(all)"].set_index("class").n.sort_index()
    stored = scored.inferred_value.value_counts().sort_index()
    assert "unknown" in stored.index
    assert overall.to_dict() == stored.to_dict()
    sums = {c: sum(dict(m)[c] for m in scored.probabilities) for c in version.classes}
    assert sums == pytest.approx(profile.probability_sums, rel=1e-9)


def test_a_version_without_recorded_feature_types_reads_the_same_kinds_everywhere(world):
    """Versions registered before feature types were recorded: scoring read the kinds from the signature,
    monitoring took every feature as numeric. Both now read the one version record."""
    from tagml.monitoring.reference import monitored_model
    from tagml.scoring.score import resolve_champion
    from tagml.training.versions import registered_model_name

    client, tag = world["client"], world["catalog"].get("risk_appetite")
    name, version = registered_model_name(tag.name), world["first"].version
    recorded = client.get_model_version(name, version).tags["feature_types"]
    client.delete_model_version_tag(name, version, "feature_types")
    try:
        scoring_kinds = resolve_champion(client, tag).info.kinds
        monitoring_kinds = monitored_model(client, tag, version).kinds
    finally:
        client.set_model_version_tag(name, version, "feature_types", recorded)
    assert scoring_kinds == monitoring_kinds == {f: k for f, k in json.loads(recorded).items() if f in scoring_kinds}
    assert "marital_status" in scoring_kinds and scoring_kinds["marital_status"] == "categorical"


def test_scoring_and_monitoring_do_not_import_the_trainer():
    """Naming a model or reading a version must not pull in Optuna and the calibration code."""
    code = "import sys, tagml.scoring.score, tagml.monitoring.reference, tagml.monitoring.drift; print(sorted(m for m in ('optuna', 'tagml.training.train') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    )
    assert out.stdout.strip() == "[]"
