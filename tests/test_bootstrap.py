"""The model card's bootstrap intervals, resampled from counts and per-row losses, equal sklearn called on every resample.

Warnings "y_pred contains classes not in y_true" come from the sklearn reference on resamples that miss a class.
"""

import numpy as np
import pytest

from tagml.training.evaluate import BOOTSTRAP_DRAWS, BOOTSTRAP_LEVEL, INTERVAL_METRICS, improvement_interval, metric_interval, metric_value, slice_score


def _reference(y, proba, n_classes, metric, threshold, seed, present_classes_only):
    """The interval as it was computed before: sklearn's metric on each resample's rows."""

    def measure(yy, pp):
        return slice_score(yy, pp, metric, n_classes, threshold) if present_classes_only else metric_value(yy, pp, n_classes, metric, threshold)

    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        rows = rng.integers(0, len(y), len(y))
        if metric == "roc_auc_ovr" and len(np.unique(y[rows])) < len(np.unique(y)):
            continue
        draws.append(measure(y[rows], proba[rows]))
    draws = [d for d in draws if np.isfinite(d)]
    tail = (1 - BOOTSTRAP_LEVEL) / 2
    return measure(y, proba), float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail)), len(draws)


@pytest.mark.parametrize("n_classes, threshold", [(2, None), (2, 0.3), (3, None), (5, None)])
# a slice's own score differs from the overall one only for macro F1 (averaged over the classes it observes)
@pytest.mark.parametrize("metric, present_classes_only", [("macro_f1", True), *((m, False) for m in INTERVAL_METRICS)])
def test_fast_bootstrap_equals_sklearn_on_every_resample(metric, n_classes, threshold, present_classes_only):
    rng = np.random.default_rng(n_classes)
    rows = 301  # odd, small: resamples miss classes
    # a class that is never observed and one that is rarely decided: the zero-division and absent-class paths
    y = rng.choice(n_classes, rows, p=np.r_[np.full(n_classes - 1, 1 / (n_classes - 1)) * 0.97, 0.03] if n_classes > 2 else None)
    if n_classes == 5 and metric != "roc_auc_ovr":
        y[y == 3] = 0  # AUC is not defined without every class (nan in both)
    proba = rng.dirichlet(np.ones(n_classes), rows).astype(np.float32 if n_classes == 3 else np.float64)
    got = metric_interval(y, proba, n_classes, metric, threshold, seed=7, present_classes_only=present_classes_only)
    point, low, high, draws = _reference(y, proba, n_classes, metric, threshold, 7, present_classes_only)
    assert got["draws"] == draws
    assert got["value"] == pytest.approx(point, abs=1e-12)
    assert got["low"] == pytest.approx(low, abs=1e-12)
    assert got["high"] == pytest.approx(high, abs=1e-12)


@pytest.mark.parametrize("metric", INTERVAL_METRICS)
def test_the_gates_paired_interval_equals_sklearn_on_every_resample(metric):
    rng = np.random.default_rng(3)
    y = rng.choice(3, 257)
    ours, theirs = rng.dirichlet(np.ones(3), 257), rng.dirichlet(np.ones(3), 257)
    sign = -1.0 if metric == "log_loss" else 1.0
    draws_rng, draws = np.random.default_rng(11), []
    for _ in range(BOOTSTRAP_DRAWS):
        rows = draws_rng.integers(0, len(y), len(y))
        if metric == "roc_auc_ovr" and len(np.unique(y[rows])) < 3:
            continue
        draws.append(sign * (metric_value(y[rows], ours[rows], 3, metric) - metric_value(y[rows], theirs[rows], 3, metric)))
    tail = (1 - BOOTSTRAP_LEVEL) / 2
    got = improvement_interval(y, ours, theirs, 3, metric, seed=11)
    assert got["draws"] == len(draws)
    assert got["low"] == pytest.approx(float(np.quantile(draws, tail)), abs=1e-12)
    assert got["high"] == pytest.approx(float(np.quantile(draws, 1 - tail)), abs=1e-12)
