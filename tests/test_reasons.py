"""Reason codes from leaf boosters on real trained xgboost pipelines (binary and multi-class): the leaves they
report are xgboost's own (`pred_leaf`), and the contributions equal xgboost's Saabas `approx_contribs` for the
predicted class, with missing values and unseen categories among the rows."""

import pickle

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from tagml.scoring.reasons import ReasonExplainer, TreeEnsemble, leaves
from tagml.training.models import build_pipeline

CATEGORICAL = ("region",)
NUMERIC = ("age", "aum_total", "share_equity", "txn_count_3m", "tenure_months", "logins_1m")


@pytest.fixture(scope="module")
def frame(bank_features) -> pd.DataFrame:
    frame = pd.read_parquet(next(iter(bank_features.values())), columns=["customer_id", *CATEGORICAL, *NUMERIC])
    frame[list(NUMERIC)] = frame[list(NUMERIC)].astype("float64")
    return frame


def _trained(frame: pd.DataFrame, classes: int):
    # a real target the trees can learn: bands of a mix of features
    score = frame.age.rank(pct=True) + frame.aum_total.rank(pct=True) * 0.5 + (frame.region == frame.region.iloc[0]) * 0.3
    y = pd.qcut(score, classes, labels=False).to_numpy()
    pipeline = build_pipeline("xgboost", {"n_estimators": 40, "max_depth": 4}, CATEGORICAL, NUMERIC, classes, seed=0, threads=1)
    return pipeline.fit(frame[list(CATEGORICAL + NUMERIC)], y)


def _hostile_rows(frame: pd.DataFrame) -> pd.DataFrame:
    X = frame[list(CATEGORICAL + NUMERIC)].head(600).copy()
    X.loc[X.index[:50], "age"] = np.nan  # missing values take each split's default direction
    X.loc[X.index[50:80], "region"] = "atlantis"  # an unseen category is missing for the encoder
    return X


@pytest.mark.parametrize("classes", [2, 4])
def test_leaf_boosters_reach_xgboosts_own_leaves_and_contributions(frame, classes):
    pipeline = _trained(frame, classes)
    X = _hostile_rows(frame)
    explainer = ReasonExplainer(pipeline, {n: float(frame[n].median()) for n in NUMERIC}, CATEGORICAL)
    values = np.asarray(explainer.prepare.transform(X), dtype=np.float32)
    booster = explainer.booster
    reference_leaves = booster.predict(xgb.DMatrix(values, missing=np.nan), pred_leaf=True).astype(np.int64)
    tree_class = TreeEnsemble(booster).tree_class
    for k in range(explainer.groups):
        trees = np.nonzero(tree_class == k)[0]
        np.testing.assert_array_equal(leaves(explainer.leaf_boosters[k], values), reference_leaves[:, trees])

    proba = pipeline.predict_proba(X)
    predicted = proba.argmax(axis=1)
    ours = explainer.contributions(X, predicted)
    reference = booster.predict(xgb.DMatrix(values, missing=np.nan), pred_contribs=True, approx_contribs=True)
    if classes == 2:  # one margin toward class 1: a row predicted 0 is explained by the push away from it
        reference = reference[:, :-1] * np.where(predicted == 1, 1.0, -1.0)[:, None]
    else:
        reference = reference[np.arange(len(X)), predicted, :-1]
    np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-5)  # xgboost sums in float32, we in float64
    assert np.abs(ours).sum() > 0

    reasons = explainer.reasons(X, predicted, top=3)
    strongest = [explainer.names[i] for i in reference.argmax(axis=1)]
    assert all(r[0].split(" ")[0].split("=")[0] == f for r, f, best in zip(reasons, strongest, reference.max(axis=1)) if best > 0)
    assert any(r and r[0].startswith("region=") for r in reasons) or not (reference.argmax(axis=1) == 0).any()

    # Spark ships the explainer to its workers: a pickled copy explains alike
    copy = pickle.loads(pickle.dumps(explainer))
    np.testing.assert_array_equal(copy.contributions(X, predicted), ours)
