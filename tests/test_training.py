"""Tag catalog, training sets, training and the champion/challenger registry, against a real MLflow
SQLite store and registry in a temp dir."""

import json
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from tagml.training.catalog import CatalogError, load_catalog
from tagml.training.dataset import SPLIT_COLUMN, TrainingDataError, build_training_set
from tagml.training.registry import (
    CHAMPION,
    RegistryError,
    apply_gate,
    champion_version,
    evaluate_gate,
    leaderboard,
    load_model,
    model_files,
    promote,
    rollback,
)
from tagml.training.tracking import TrackingUnavailableError, connect_tracking
from tagml.training.train import train_tag
from tagml.training.versions import registered_model_name
from tests.conftest import WINDOW_END, make_connection, shipped_slices

SHIPPED = load_catalog()


def _tag(**overrides):
    """The shipped risk_appetite entry with test-sized budgets and (optionally) other settings."""
    data = SHIPPED.get("risk_appetite").model_dump(mode="json")
    data["model"].update(trials=2, timeout_seconds=60)
    data["promotion"].update(max_calibration_error=0.5, slice_floor=0.0, margin=0.01)
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return load_catalog_from({"version": 1, "tags": [data]}).tags[0]


def load_catalog_from(payload: dict, tmp: Path | None = None):
    import tempfile

    directory = Path(tmp or tempfile.mkdtemp())
    path = directory / "catalog.yaml"
    path.write_text(yaml.safe_dump(payload))
    return load_catalog(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return {"uri": uri, "artifacts": str(root / "artifacts"), "client": connect_tracking(uri)}


@pytest.fixture(scope="module")
def risk_data(bank, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training_sets")
    con = make_connection(tmp)
    try:
        return build_training_set(con, bank["staged"], _tag(), WINDOW_END, tmp, seed=0)
    finally:
        con.close()


# ---- catalog ---------------------------------------------------------------------------------


def test_shipped_catalog_has_the_required_tags():
    kinds = {t.name: t.kind for t in SHIPPED.tags}
    assert kinds == {
        "risk_appetite": "model",
        "life_stage": "model",
        "churn_90d": "model",
        "value_tier": "rule",
        "lifecycle_stage": "rule",
        "suitability": "rule",
    }
    assert SHIPPED.get("risk_appetite").classes == ("C1", "C2", "C3", "C4", "C5")
    assert "gender" not in SHIPPED.get("risk_appetite").feature_names


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda t: t["model"].update(trials=0), "tag 'risk_appetite': model.trials"),
        (lambda t: t.update(kind="magic"), "tag 'risk_appetite': kind"),
        (lambda t: t["features"].update(exclude=["no_such_feature"]), "unknown feature names ['no_such_feature']"),
        (lambda t: t["model"]["search_space"].update(max_depth={"low": 5, "high": 2}), "tag 'risk_appetite': model.search_space.max_depth"),
        (lambda t: t.pop("owner"), "tag 'risk_appetite': owner"),
        (lambda t: t.update(surprise=1), "tag 'risk_appetite': surprise"),
        (lambda t: t.pop("model"), "needs 'model' and 'label'"),
    ],
)
def test_catalog_errors_name_the_entry_and_field(tmp_path, mutate, expected):
    entry = SHIPPED.get("risk_appetite").model_dump(mode="json")
    mutate(entry)
    with pytest.raises(CatalogError) as err:
        load_catalog_from({"version": 1, "tags": [entry]}, tmp_path)
    assert expected in str(err.value)


def test_catalog_rejects_duplicates_unknown_rule_labels_and_bad_yaml(tmp_path):
    entry = SHIPPED.get("value_tier").model_dump(mode="json")
    with pytest.raises(CatalogError, match="repeated: \\['value_tier'\\]"):
        load_catalog_from({"tags": [entry, entry]}, tmp_path)
    entry["rule"]["default"] = "platinum"
    with pytest.raises(CatalogError, match="tag 'value_tier'.*platinum"):
        load_catalog_from({"tags": [entry]}, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("tags: [\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(bad)


def test_catalog_hash_changes_with_content():
    assert _tag().content_hash() != _tag(model__trials=3).content_hash()
    assert _tag().content_hash() == _tag().content_hash()


# ---- training sets ----------------------------------------------------------------------------


def test_training_set_is_point_in_time_and_out_of_time(risk_data, bank):
    frame = risk_data.frame
    labels = pd.read_parquet(bank["staged"] / "tag_labels.parquet")
    labels = labels[labels.tag == "risk_appetite"].assign(label_date=lambda d: pd.to_datetime(d.label_date))
    assert len(frame) == len(labels)  # every questionnaire joined once, at its own date
    merged = frame.assign(as_of=pd.to_datetime(frame.as_of)).merge(labels, left_on=["customer_id", "as_of"], right_on=["customer_id", "label_date"])
    assert len(merged) == len(frame)
    by_split = frame.groupby(SPLIT_COLUMN)["as_of"].agg(["min", "max"])
    assert by_split.loc["train", "max"] <= by_split.loc["valid", "min"] <= by_split.loc["valid", "max"] <= by_split.loc["test", "min"]
    assert risk_data.snapshot_path.exists()
    assert "customer_id" in pd.read_parquet(risk_data.snapshot_path).columns
    assert not {"full_name", "phone", "national_id", "address"} & set(frame.columns)


def test_training_set_without_labels_is_a_named_error(bank, tmp_path):
    tag = _tag(label={"sources": ["relationship_manager"], "tag": "risk_appetite"})
    con = make_connection(tmp_path)
    with pytest.raises(TrainingDataError, match="tag 'risk_appetite': no usable labels"):
        build_training_set(con, bank["staged"], tag, WINDOW_END, tmp_path)
    assert not (tmp_path / "risk_appetite").exists()


# ---- training, registry, gate --------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_model(risk_data, store):
    tag = _tag()
    result = train_tag(tag, risk_data, store["client"], shipped_slices(risk_data), artifact_location=store["artifacts"], seed=0, threads=1)
    decision = apply_gate(store["client"], evaluate_gate(store["client"], tag, result.version, risk_data, shipped_slices(risk_data)))
    return {"tag": tag, "result": result, "decision": decision}


def test_first_model_becomes_champion_and_records_lineage(first_model, store, risk_data):
    client, result = store["client"], first_model["result"]
    assert first_model["decision"].promoted, first_model["decision"].reasons
    assert champion_version(client, "risk_appetite") == result.version
    version = client.get_model_version(registered_model_name("risk_appetite"), result.version)
    assert version.tags["snapshot_id"] == risk_data.snapshot_id
    assert version.tags["catalog_hash"] == first_model["tag"].content_hash()
    assert json.loads(version.tags["feature_list"]) == list(risk_data.feature_names)
    assert version.tags["gate.decision"] == "promoted"
    assert set(result.metrics) >= {"macro_f1", "accuracy", "log_loss", "roc_auc_ovr", "calibration_error", "recall_C5"}
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/calibration_curve.png", "evaluation/feature_importance.png"} <= artifacts
    nested = client.search_runs([client.get_run(result.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'")
    assert len([r for r in nested if r.info.run_name.startswith("trial-")]) == 2
    # the catalog's value tiers, as drift slices them; the gate judged the very slices training logged
    tiers = {k.split("=", 1)[1] for k in result.slice_metrics if k.startswith("value_tier=")}
    assert tiers and tiers <= set(load_catalog().get("value_tier").classes)
    assert set(first_model["decision"].checks["slices"]) == set(result.slice_metrics)


def test_champion_loads_by_alias_and_scores_raw_input_with_unseen_category(first_model, risk_data, store):
    X, _ = risk_data.part("test")
    X = X.head(50).copy()
    X["region"] = "atlantis"  # never seen in training
    X["education"] = None
    client = store["client"]
    version = str(client.get_model_version_by_alias(registered_model_name("risk_appetite"), CHAMPION).version)
    model = load_model(client, "risk_appetite", version)
    proba = model.predict_proba(X)
    assert proba.shape == (50, 5)
    assert np.allclose(proba.sum(axis=1), 1)
    with model_files(client, "risk_appetite", version) as path:
        pyfunc = mlflow.pyfunc.load_model(str(path))
    assert np.allclose(np.asarray(pyfunc.predict(X)), proba)


def test_no_customer_ids_or_pii_reach_mlflow_artifacts(first_model, risk_data, store):
    root = Path(store["artifacts"])
    text = " ".join(p.read_text(errors="ignore") for p in root.rglob("*") if p.is_file() and p.suffix in {".json", ".txt", ".yaml", ".MLmodel", ""})
    ids = risk_data.frame["customer_id"].head(200)
    assert text, "expected logged text artifacts"
    assert not [i for i in ids if i in text]
    assert "customer_id" not in text and "full_name" not in text and "national_id" not in text


def test_worse_challenger_is_not_promoted_and_reason_is_recorded(first_model, risk_data, store):
    client = store["client"]
    worse_tag = _tag(features={"include": ["region", "city_tier"]}, model__search_space={"n_estimators": {"low": 2, "high": 3, "integer": True}})
    from tagml.training.dataset import TrainingSet

    worse_data = TrainingSet(**{**risk_data.__dict__, "feature_names": ("region", "city_tier"), "categorical": ("region",)})
    result = train_tag(worse_tag, worse_data, store["client"], shipped_slices(worse_data), artifact_location=store["artifacts"], threads=1)
    decision = apply_gate(client, evaluate_gate(client, first_model["tag"], result.version, risk_data, shipped_slices(risk_data)))
    assert not decision.promoted
    assert champion_version(client, "risk_appetite") == first_model["result"].version
    reasons = json.loads(client.get_model_version(registered_model_name("risk_appetite"), result.version).tags["gate.reasons"])
    assert any("does not beat champion" in r for r in reasons)
    assert client.get_model_version(registered_model_name("risk_appetite"), result.version).tags["gate.decision"] == "rejected"
    assert str(client.get_model_version_by_alias(registered_model_name("risk_appetite"), "challenger").version) == result.version

    # a person overrides the gate, then rolls back: the previous champion returns, both recorded
    promote(client, "risk_appetite", result.version, by="tester", reason="trial in production", force=True)
    assert champion_version(client, "risk_appetite") == result.version
    restored = rollback(client, "risk_appetite", by="tester")
    assert restored == first_model["result"].version == champion_version(client, "risk_appetite")
    history = json.loads(client.get_registered_model(registered_model_name("risk_appetite")).tags["champion_history"])
    assert [h["by"] for h in history][-2:] == ["tester", "tester"]
    assert "rollback" in history[-1]["reason"]

    board = leaderboard(client, first_model["tag"])
    assert list(board["version"].head(1)) == [first_model["result"].version]
    assert "champion" in board.set_index("version").loc[first_model["result"].version, "alias"]


def test_same_seed_and_data_give_the_same_metrics(risk_data, store, first_model):
    again = train_tag(first_model["tag"], risk_data, store["client"], shipped_slices(risk_data), artifact_location=store["artifacts"], seed=0, threads=1)
    assert again.metrics == pytest.approx(first_model["result"].metrics, rel=1e-9)
    assert again.best_params == first_model["result"].best_params


def test_registry_errors_are_named(store):
    with pytest.raises(RegistryError, match="no version 999"):
        promote(store["client"], "risk_appetite", "999", by="tester")


def test_unreachable_mlflow_fails_fast_by_name():
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailableError, match="127.0.0.1:9.*unreachable"):
        connect_tracking("http://127.0.0.1:9", timeout_seconds=2)
    assert time.perf_counter() - started < 30


def test_logged_signature_accepts_missing_values_and_integer_counts_as_doubles(first_model, risk_data, store):
    with model_files(store["client"], "risk_appetite", first_model["result"].version) as path:
        model = mlflow.pyfunc.load_model(str(path))
    schema = model.metadata.get_input_schema()
    assert all(not c.required for c in schema.inputs)
    assert {c.name for c in schema.inputs if c.type.name == "string"} == set(risk_data.categorical)
    X, _ = risk_data.part("test")
    X = X.head(20).copy()
    X.loc[X.index[0], [c.name for c in schema.inputs if c.type.name == "double"]] = np.nan  # a customer with no history
    assert np.asarray(model.predict(X)).shape == (20, 5)


def test_evaluation_slices_are_the_catalogs_value_tiers_as_drift_and_scoring_see_them(tmp_path):
    """Evaluation had its own 3 value-tier bands (mass/affluent/hnw) while the catalog's rule, which scores
    the tag and slices drift, has 4: the gate judged segments no one else knew."""
    from tagml.scoring.rules import rule_batches, rule_case_sql, slice_expressions
    from tagml.training.evaluate import evaluation_slices, slices

    catalog = load_catalog()
    frame = pd.DataFrame(
        {
            "customer_id": [f"C{i}" for i in range(6)],
            "age": [25.0, 30.0, 44.0, 59.0, 60.0, None],
            "region": ["north", None, "east", "east", "south", "north"],
            "aum_total": [0.0, 49_999.0, 50_000.0, 2_000_000.0, 7_000_000.0, None],
        },
        index=[10, 11, 12, 13, 14, 15],
    )
    columns = ["age", "region", "aum_total"]
    values = slices(frame, evaluation_slices(slice_expressions(catalog, set(columns)), columns))
    assert set(values) == {"age_band", "region", "value_tier"}
    tier = catalog.get("value_tier")
    assert set(values["value_tier"]) == set(tier.classes)  # all four tiers, no label outside the catalog's classes
    frame.to_parquet(tmp_path / "features.parquet")
    scored = pd.concat(
        b.to_pandas()
        for b in rule_batches(
            make_connection(tmp_path), tmp_path / "features.parquet", tier, f"SELECT customer_id, {rule_case_sql(tier)} AS value FROM features", 100
        )
    )
    assert values["value_tier"].tolist() == scored.set_index("customer_id").loc[frame.customer_id, "value"].tolist()
    assert list(values["value_tier"].index) == list(frame.index)
    assert values["age_band"].tolist() == ["<30", "30-44", "30-44", "45-59", "60+", "missing"]
    assert values["region"].tolist() == ["north", "missing", "east", "east", "south", "north"]
