"""Fairness slices: performance and tag share by gender and age band on the test set, for a tag that does not use
gender as a feature, logged to a real MLflow store; small groups are "too few"; foreign ids are "not available"."""

import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tagml.training.catalog import load_catalog
from tagml.training.dataset import build_training_set
from tagml.training.fairness import MEASURED, TOO_FEW, fairness_slices, load_demographics
from tagml.training.tracking import connect_tracking
from tagml.training.train import train_tag
from tests.conftest import WINDOW_END, make_connection, shipped_slices

CLASSES = ("no", "yes")


def _rows(n: int, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    test = pd.DataFrame({"customer_id": [f"c{i}" for i in range(n)], "as_of": pd.Timestamp("2026-06-30")})
    y = rng.integers(0, 2, n)
    p = np.clip(y * 0.6 + rng.random(n) * 0.5, 0, 1)
    return test, y, np.column_stack([1 - p, p])


def test_groups_by_gender_and_age_band_with_small_groups_too_few():
    test, y, proba = _rows(200)
    births = [date(2000, 1, 1)] * 100 + [date(1980, 1, 1)] * 80 + [date(1950, 1, 1)] * 20  # 26, 46 and 76 at the as_of
    demographics = pd.DataFrame({"customer_id": test["customer_id"], "gender": ["F", "M"] * 100, "birth_date": pd.to_datetime(births)})
    report = fairness_slices(test, y, proba, CLASSES, "macro_f1", None, demographics)
    rows = {(r["attribute"], r["group"]): r for r in report.rows}
    assert report.available and set(rows) == {("gender", "F"), ("gender", "M"), ("age_band", "18-29"), ("age_band", "45-59"), ("age_band", "60+")}
    assert rows[("age_band", "18-29")]["rows"] == 100 and rows[("age_band", "18-29")]["status"] == MEASURED
    assert rows[("age_band", "60+")] == {"attribute": "age_band", "group": "60+", "rows": 20, "status": TOO_FEW}  # no numbers for 20 rows
    female = rows[("gender", "F")]
    assert female["share_no"] + female["share_yes"] == pytest.approx(1.0) and 0 <= female["accuracy"] <= 1
    metrics = report.metrics()
    assert "fairness_age_band_18-29_macro_f1" in metrics and not [k for k in metrics if "60plus" in k]


def test_ids_that_are_not_staged_customers_are_not_available():
    test, y, proba = _rows(100)
    others = pd.DataFrame({"customer_id": [f"x{i}" for i in range(100)], "gender": "F", "birth_date": pd.Timestamp("1990-01-01")})
    report = fairness_slices(test, y, proba, CLASSES, "accuracy", None, others)
    assert not report.available and "not available" in report.note and not report.rows and not report.metrics()
    assert not fairness_slices(test, y, proba, CLASSES, "accuracy", None, None).available


def test_demographics_are_the_staged_customers_gender_and_birth_date_only(bank):
    demographics = load_demographics(bank["staged"])
    assert list(demographics.columns) == ["customer_id", "gender", "birth_date"]
    assert len(demographics) == bank["config"].customers
    assert load_demographics(Path("/nonexistent")) is None


@pytest.mark.slow
def test_training_logs_fairness_slices_for_a_tag_that_does_not_use_gender(bank, tmp_path):
    entry = load_catalog().get("risk_appetite").model_dump(mode="json")
    entry["model"].update(trials=1, timeout_seconds=60, baseline=None)
    entry["model"]["search_space"]["n_estimators"] = {"low": 10, "high": 20, "integer": True}
    tag = type(load_catalog().get("risk_appetite")).model_validate(entry)
    con = make_connection(tmp_path)
    try:
        data = build_training_set(con, bank["staged"], tag, WINDOW_END, tmp_path / "sets", seed=0)
    finally:
        con.close()
    assert "gender" not in data.feature_names
    client = connect_tracking(f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = train_tag(
        tag, data, client, shipped_slices(data), artifact_location=str(tmp_path / "artifacts"), threads=1, demographics=load_demographics(bank["staged"])
    )
    metrics = client.get_run(result.run_id).data.metrics
    assert {"fairness_gender_F_macro_f1", "fairness_gender_M_accuracy", "fairness_gender_F_share_C3"} <= set(metrics)
    assert [k for k in metrics if k.startswith("fairness_age_band_") and k.endswith("_macro_f1")]
    logged = json.loads(Path(client.download_artifacts(result.run_id, "fairness/fairness.json", str(tmp_path / "dl"))).read_text())
    attributes = {r["attribute"] for r in logged["rows"] if r["status"] == MEASURED}
    assert logged["available"] and attributes == {"gender", "age_band"}
    assert sum(r["rows"] for r in logged["rows"] if r["attribute"] == "gender") == len(data.part("test")[0])
