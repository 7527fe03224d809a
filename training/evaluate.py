"""Held-out evaluation: overall, per class, calibration, per slice, and the plots logged to MLflow."""

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
)

from tagml.core.storage import quote, sql_literal
from tagml.training.catalog import CONTRACT_SLICES, LOWER_IS_BETTER, DecisionSpec, TagSpec
from tagml.training.dataset import SPLIT_COLUMN, TrainingSet
from tagml.training.inference import decide

# evaluation's own slice (drift does not slice by age); bands [0, 30), [30, 45), [45, 60), [60, 200)
AGE_BAND_SQL = (
    "CASE WHEN age >= 0 AND age < 30 THEN '<30' WHEN age >= 30 AND age < 45 THEN '30-44' "
    "WHEN age >= 45 AND age < 60 THEN '45-59' WHEN age >= 60 AND age < 200 THEN '60+' END"
)
MISSING_SLICE = "missing"  # the slice of rows whose slice value is NULL (an MLflow metric name: no brackets)
MIN_SLICE_LEVELS, MAX_SLICE_LEVELS, MAX_DEFAULT_SLICES = 2, 20, 3  # a bring-your-own table's default slices
UNSAFE_METRIC_CHARACTERS = re.compile(r"[^A-Za-z0-9_.\-]")
MAX_SLICE_METRIC_LENGTH = 180  # MLflow allows 250 characters


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: |confidence - accuracy| averaged over equal-width confidence bins, weighted by size."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(total)


def debiased_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = 10, draws: int = 200, seed: int = 0) -> float:
    """ECE minus the ECE a perfectly calibrated model with the same confidences would show on this many rows.

    Plain ECE is biased upwards on small test sets (a few hundred rows give ~0.03 from sampling alone);
    the promotion gate compares this estimate with its threshold so that small tags are not rejected by noise.
    """
    confidence = proba.max(axis=1)
    rng = np.random.default_rng(seed)
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    sizes = np.bincount(which, minlength=bins) / len(confidence)
    mean_conf = np.bincount(which, weights=confidence, minlength=bins) / np.maximum(np.bincount(which, minlength=bins), 1)
    noise = []
    for _ in range(draws):
        correct = rng.random(len(confidence)) < confidence
        acc = np.bincount(which, weights=correct, minlength=bins) / np.maximum(np.bincount(which, minlength=bins), 1)
        noise.append(float((sizes * np.abs(mean_conf - acc)).sum()))
    return max(expected_calibration_error(y, proba, bins) - float(np.mean(noise)), 0.0)


def _auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    if n_classes == 2:
        return float(roc_auc_score(y, proba[:, 1])) if len(np.unique(y)) == 2 else float("nan")
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=list(range(n_classes)))) if len(np.unique(y)) == n_classes else float("nan")


def _log_loss(y: np.ndarray, proba: np.ndarray, n_classes: int) -> float:
    clipped = np.clip(proba, 1e-12, 1)  # float32 models' rows sum to 1 only approximately
    return float(log_loss(y, clipped / clipped.sum(axis=1, keepdims=True), labels=list(range(n_classes))))


_PROBABILITY_METRICS = {"log_loss": _log_loss, "roc_auc_ovr": _auc}
_DECISION_METRICS = {
    "macro_f1": lambda y, pred, n: float(f1_score(y, pred, average="macro", labels=list(range(n)), zero_division=0)),
    "accuracy": lambda y, pred, n: float(accuracy_score(y, pred)),
    "balanced_accuracy": lambda y, pred, n: float(balanced_accuracy_score(y, pred)),
}


def metric_value(y: np.ndarray, proba: np.ndarray, n_classes: int, metric: str, threshold: float | None = None) -> float:
    """One promotion metric, without the others (the pruner asks for it every few boosting rounds)."""
    if metric in _PROBABILITY_METRICS:
        return _PROBABILITY_METRICS[metric](y, proba, n_classes)
    return _DECISION_METRICS[metric](y, decide(proba, threshold), n_classes)


BOOTSTRAP_DRAWS = 200
BOOTSTRAP_LEVEL = 0.9  # the interval of the difference the gate treats as sampling noise


def improvement_interval(
    y: np.ndarray, proba: np.ndarray, other: np.ndarray, n_classes: int, metric: str, threshold: float | None = None, seed: int = 0
) -> dict[str, float]:
    """How much better `proba` scores than `other` at `metric` on the same rows (positive = better, for log loss
    too), with a paired bootstrap interval: both models resampled on the same rows, so that what they share
    (hard customers) cancels out. A test set of a few thousand rows moves macro F1 by about 0.01 from sampling
    alone; the gate reads the interval so that a difference of that size is not taken for a verdict."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    point = sign * (metric_value(y, proba, n_classes, metric, threshold) - metric_value(y, other, n_classes, metric))
    ours, theirs = resample_measure(y, proba, n_classes, metric, threshold), resample_measure(y, other, n_classes, metric)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        rows = rng.integers(0, len(y), len(y))
        if metric == "roc_auc_ovr" and len(np.unique(y[rows])) < n_classes:
            continue  # AUC needs every class in the resample
        draws.append(sign * (ours(rows) - theirs(rows)))
    tail = (1 - BOOTSTRAP_LEVEL) / 2
    low, high = (float(np.quantile(draws, q)) for q in (tail, 1 - tail)) if draws else (point, point)
    return {"improvement": float(point), "low": low, "high": high, "level": BOOTSTRAP_LEVEL, "draws": len(draws)}


INTERVAL_METRICS = ("macro_f1", "accuracy", "balanced_accuracy", "log_loss", "roc_auc_ovr")  # the card's overall intervals


def _confusion_measure(metric: str, n_classes: int, present_classes_only: bool) -> Callable[[np.ndarray], float]:
    """A decision metric from the confusion matrix (rows observed, columns decided), computed as sklearn does.

    Bootstrap draws count the resampled rows into a matrix with one bincount instead of calling sklearn per
    draw: sklearn's input validation made 200 draws per metric and slice most of a model card's cost.
    `present_classes_only`: macro F1 over the classes observed in the rows (a slice's own macro F1)."""

    def macro_f1(cm: np.ndarray) -> float:
        tp = np.diag(cm).astype(float)
        denominator = 2 * tp + (cm.sum(axis=0) - tp) + (cm.sum(axis=1) - tp)
        f1 = np.divide(2 * tp, denominator, out=np.zeros(n_classes), where=denominator > 0)
        return float(f1[cm.sum(axis=1) > 0].mean() if present_classes_only else f1.mean())

    def accuracy(cm: np.ndarray) -> float:
        return float(np.trace(cm) / cm.sum())

    def balanced_accuracy(cm: np.ndarray) -> float:
        observed = cm.sum(axis=1)
        return float((np.diag(cm)[observed > 0] / observed[observed > 0]).mean())

    return {"macro_f1": macro_f1, "accuracy": accuracy, "balanced_accuracy": balanced_accuracy}[metric]


def _row_log_loss(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    """Each row's log loss as `_log_loss` computes the mean (clipped, renormalised, then clipped to [eps, 1 - eps] as sklearn does)."""
    clipped = np.clip(proba, 1e-12, 1)
    normalised = clipped / clipped.sum(axis=1, keepdims=True)
    eps = np.finfo(normalised.dtype).eps
    return -np.log(np.clip(normalised[np.arange(len(y)), y], eps, 1 - eps))


def _resampled_auc(y: np.ndarray, proba: np.ndarray, n_classes: int) -> Callable[[np.ndarray], float]:
    """One-vs-rest macro AUC (binary: of the positive class) of a resample, from each row's resample count.

    The Mann-Whitney form of what sklearn's roc_auc_score computes: per class, rows grouped by equal score;
    each positive weight counts the negative weight below its score plus half the tied one."""
    columns = [1] if n_classes == 2 else list(range(n_classes))
    prepared = []
    for column in columns:
        scores, group = np.unique(proba[:, column], return_inverse=True)
        prepared.append((group.ravel(), (y == column).astype(float), len(scores)))

    def measure(rows: np.ndarray) -> float:
        counts = np.bincount(rows, minlength=len(y)).astype(float)
        aucs = []
        for group, positive, groups in prepared:
            pos = np.bincount(group, weights=counts * positive, minlength=groups)
            neg = np.bincount(group, weights=counts * (1 - positive), minlength=groups)
            below = np.cumsum(neg) - neg
            aucs.append(float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum())))
        return float(np.mean(aucs))

    return measure


def resample_measure(
    y: np.ndarray, proba: np.ndarray, n_classes: int, metric: str, threshold: float | None = None, present_classes_only: bool = False
) -> Callable[[np.ndarray], float]:
    """`metric` of the resample given by row indices (duplicates allowed): from counts, ranks and per-row losses
    where it can be, else sklearn on the resampled rows (a class missing overall: AUC is nan either way)."""
    y = np.asarray(y)
    if metric in _DECISION_METRICS:
        codes = y * n_classes + decide(proba, threshold)
        confusion = _confusion_measure(metric, n_classes, present_classes_only and metric == "macro_f1")
        return lambda rows: confusion(np.bincount(codes[rows], minlength=n_classes * n_classes).reshape(n_classes, n_classes))
    if metric == "roc_auc_ovr" and len(np.unique(y)) == n_classes:
        return _resampled_auc(y, proba, n_classes)
    if metric == "log_loss":
        losses = _row_log_loss(y, proba)
        return lambda rows: float(losses[rows].mean())
    return lambda rows: metric_value(y[rows], proba[rows], n_classes, metric, threshold)


def metric_interval(
    y: np.ndarray,
    proba: np.ndarray,
    n_classes: int,
    metric: str,
    threshold: float | None = None,
    seed: int = 0,
    present_classes_only: bool = False,
) -> dict[str, float]:
    """`metric` on these rows with its percentile bootstrap interval (BOOTSTRAP_DRAWS resamples, BOOTSTRAP_LEVEL);
    `present_classes_only`: macro F1 over the classes observed (a slice's score, `slice_score`). Resamples lacking a
    class AUC needs are skipped. Decision metrics, AUC and log loss are resampled from counts, ranks and per-row losses
    (the same resamples, the same numbers as sklearn on each: tests/test_bootstrap.py)."""
    y = np.asarray(y)
    point = slice_score(y, proba, metric, n_classes, threshold) if present_classes_only else metric_value(y, proba, n_classes, metric, threshold)
    measure = resample_measure(y, proba, n_classes, metric, threshold, present_classes_only)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        rows = rng.integers(0, len(y), len(y))
        if metric == "roc_auc_ovr" and len(np.unique(y[rows])) < len(np.unique(y)):
            continue
        draws.append(measure(rows))
    draws = [d for d in draws if np.isfinite(d)]
    tail = (1 - BOOTSTRAP_LEVEL) / 2
    low, high = (float(np.quantile(draws, q)) for q in (tail, 1 - tail)) if draws else (float(point), float(point))
    return {"value": float(point), "low": low, "high": high, "level": BOOTSTRAP_LEVEL, "draws": len(draws)}


def reliability_bins(y: np.ndarray, proba: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """The top-label reliability table behind `expected_calibration_error`: per non-empty confidence bin its
    range, rows, mean confidence and observed accuracy."""
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    return [
        {
            "low": float(edges[b]),
            "high": float(edges[b + 1]),
            "rows": int(mask.sum()),
            "confidence": float(confidence[mask].mean()),
            "accuracy": float(correct[mask].mean()),
        }
        for b in range(bins)
        if (mask := which == b).any()
    ]


def core_metrics(y: np.ndarray, proba: np.ndarray, n_classes: int, threshold: float | None = None) -> dict[str, float]:
    """Every metric; the class-decision ones (macro_f1, accuracy, balanced_accuracy) at a binary tag's `threshold`."""
    pred = decide(proba, threshold)
    return {
        **{name: score(y, pred, n_classes) for name, score in _DECISION_METRICS.items()},
        **{name: score(y, proba, n_classes) for name, score in _PROBABILITY_METRICS.items()},
        "calibration_error": expected_calibration_error(y, proba),
        "calibration_error_debiased": debiased_calibration_error(y, proba),
    }


def per_class_metrics(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], threshold: float | None = None) -> dict[str, float]:
    pred = decide(proba, threshold)
    precision, recall, _, support = precision_recall_fscore_support(y, pred, labels=list(range(len(classes))), zero_division=0)
    out: dict[str, float] = {}
    for k, c in enumerate(classes):
        out[f"precision_{c}"] = float(precision[k])
        out[f"recall_{c}"] = float(recall[k])
        out[f"support_{c}"] = float(support[k])
    return out


class DecisionError(ValueError):
    """A binary tag's decision policy cannot be met on the validation part (named tag, target and what was reached)."""


def choose_threshold(decision: DecisionSpec, y: np.ndarray, proba: np.ndarray) -> float | None:
    """The positive-class probability at or above which a binary tag decides positive, from validation `y` and
    `proba` (None: argmax). A target no threshold reaches gets the closest one (`decision_shortfall` says so)."""
    p, positive = proba[:, 1], y == 1
    if decision.policy == "argmax":
        return None
    if decision.threshold is not None:
        return decision.threshold
    ranked = np.sort(p)[::-1]
    ends = np.flatnonzero(np.append(ranked[1:] != ranked[:-1], True))  # the last row of each run of equal probabilities
    if decision.top_share is not None:  # the threshold whose share is closest: equal probabilities fall on one side together
        return float(ranked[ends[int(np.abs((ends + 1) / len(p) - decision.top_share).argmin())]])
    if decision.target_recall is not None:
        if not positive.any():
            return 0.5
        ranked = np.sort(p[positive])[::-1]
        return float(ranked[max(int(np.ceil(decision.target_recall * len(ranked))), 1) - 1])
    hits = np.cumsum(positive[np.argsort(p)[::-1]])
    candidates, precision = ranked[ends], hits[ends] / (ends + 1)  # highest threshold first
    reaching = np.flatnonzero(precision >= decision.target_precision)
    return float(candidates[reaching[-1]] if len(reaching) else candidates[int(precision.argmax())])


def decision_shortfall(decision: DecisionSpec, y: np.ndarray, proba: np.ndarray, threshold: float | None) -> str | None:
    """Why `threshold` misses the decision's target precision or recall on validation, or None when it meets it."""
    pred, positive = decide(proba, threshold) == 1, y == 1
    for target, reached, what in (
        (decision.target_precision, positive[pred].mean() if pred.any() else 0.0, "precision"),
        (decision.target_recall, pred[positive].mean() if positive.any() else 0.0, "recall"),
    ):
        if target is not None and reached < target:
            return f"decision.target_{what} {target}: no threshold reaches it on the validation part (best {reached:.4f})"
    return None


def slice_sources(tag: TagSpec, data: TrainingSet) -> tuple[str, ...]:
    """The slices of `tag` (rule tag names or feature columns): its declared `slices`; on the contract's features
    value_tier and region; on a bring-your-own table its categorical features with 2-20 levels on the training
    part, fewest levels first (ties in feature order), up to 3, so that its slice floor checks something."""
    if tag.slices is not None:
        return tag.slices
    if tag.label is None or tag.label.feature_source == "customer_features":
        return CONTRACT_SLICES
    train = data.frame.loc[data.frame[SPLIT_COLUMN] == "train"]
    levels = {name: train[name].nunique(dropna=True) for name in data.feature_names if name in data.categorical}
    candidates = [name for name in data.feature_names if MIN_SLICE_LEVELS <= levels.get(name, 0) <= MAX_SLICE_LEVELS]
    return tuple(sorted(candidates, key=lambda name: levels[name])[:MAX_DEFAULT_SLICES])


def slice_metric_name(key: str) -> str:
    """An MLflow metric name for a slice value `name=value`, whatever the column and value hold: readable where
    it can be, with a hash of the original where characters were replaced or it was cut (no two collide)."""
    name = key.replace("=", "_").replace("<", "lt").replace("+", "plus")
    safe = UNSAFE_METRIC_CHARACTERS.sub("_", name)
    if safe != name or len(safe) > MAX_SLICE_METRIC_LENGTH:
        safe = f"{safe[:MAX_SLICE_METRIC_LENGTH]}_{hashlib.sha256(key.encode()).hexdigest()[:10]}"
    return f"slice_{safe}"


def evaluation_slices(catalog_slices: Mapping[str, str], columns: Sequence[str]) -> dict[str, str]:
    """SQL per slice over feature columns: the age band where there is an age, and the catalog's slices as
    drift defines them (tagml.scoring.rules.slice_expressions: the value_tier rule's bands, region), so the
    promotion gate and drift judge the same segments."""
    return {**({"age_band": AGE_BAND_SQL} if "age" in columns else {}), **catalog_slices}


def slices(frame: pd.DataFrame, expressions: Mapping[str, str]) -> dict[str, pd.Series]:
    """Each slice's value per row of `frame` (`expressions` from `evaluation_slices`: catalog SQL from its
    checked parse tree), evaluated by DuckDB over the frame alone with external access off."""
    if not expressions:
        return {}
    con = duckdb.connect(":memory:", config={"threads": 1})
    try:
        con.register("frame", frame.reset_index(drop=True).assign(_row=np.arange(len(frame))))
        con.execute("SET enable_external_access = false")
        cols = ", ".join(f"coalesce(({expr})::VARCHAR, {sql_literal(MISSING_SLICE)}) AS {quote(name)}" for name, expr in expressions.items())
        values = con.execute(f"SELECT {cols} FROM frame ORDER BY _row").df()
    finally:
        con.close()
    return {name: values[name].set_axis(frame.index) for name in expressions}


def slice_score(y: np.ndarray, proba: np.ndarray, metric: str, n_classes: int, threshold: float | None) -> float:
    if metric == "macro_f1":
        # averaged over the classes that occur in the slice: retirees are rarely young families
        return float(f1_score(y, decide(proba, threshold), average="macro", labels=np.unique(y), zero_division=0))
    return metric_value(y, proba, n_classes, metric, threshold)


def slice_metrics(
    frame: pd.DataFrame,
    y: np.ndarray,
    proba: np.ndarray,
    metric: str,
    n_classes: int,
    expressions: Mapping[str, str],
    threshold: float | None = None,
    min_rows: int = 30,
) -> dict[str, float]:
    """The promotion metric per slice value (slices with fewer than `min_rows` rows are skipped)."""
    out = {}
    for name, values in slices(frame, expressions).items():
        for value in sorted(values.unique()):
            mask = (values == value).to_numpy()
            if mask.sum() >= min_rows:
                out[f"{name}={value}"] = slice_score(y[mask], proba[mask], metric, n_classes, threshold)
    return out


def slice_intervals(
    frame: pd.DataFrame,
    y: np.ndarray,
    proba: np.ndarray,
    metric: str,
    n_classes: int,
    expressions: Mapping[str, str],
    threshold: float | None = None,
    seed: int = 0,
    min_rows: int = 30,
) -> dict[str, dict[str, float]]:
    """`slice_metrics` with each value's bootstrap interval and rows (the same slices, the same score)."""
    out = {}
    for name, values in slices(frame, expressions).items():
        for value in sorted(values.unique()):
            mask = (values == value).to_numpy()
            if mask.sum() >= min_rows:
                interval = metric_interval(y[mask], proba[mask], n_classes, metric, threshold, seed, present_classes_only=True)
                out[f"{name}={value}"] = {**interval, "rows": int(mask.sum())}
    return out


@contextmanager
def _figure(path: Path, size: tuple[float, float]):
    """A matplotlib figure (headless backend) saved to `path` and closed on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


def plot_confusion(y: np.ndarray, proba: np.ndarray, classes: Sequence[str], path: Path, threshold: float | None = None) -> Path:
    matrix = confusion_matrix(y, decide(proba, threshold), labels=list(range(len(classes))), normalize="true")
    with _figure(path, (5, 4)) as ax:
        ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
        ax.set_yticks(range(len(classes)), classes)
        for i in range(len(classes)):
            for j in range(len(classes)):
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("observed (row-normalised)")
    return path


def plot_calibration(y: np.ndarray, proba: np.ndarray, path: Path, bins: int = 10) -> Path:
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == y
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    xs = [confidence[which == b].mean() for b in range(bins) if (which == b).any()]
    ys = [correct[which == b].mean() for b in range(bins) if (which == b).any()]
    with _figure(path, (4, 4)) as ax:
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.plot(xs, ys, "o-")
        ax.set_xlabel("predicted probability of the top class")
        ax.set_ylabel("observed accuracy")
    return path


def plot_importance(names: Sequence[str], importance: np.ndarray, path: Path, top: int = 20) -> Path:
    order = np.argsort(importance)[::-1][:top][::-1]
    with _figure(path, (6, 5)) as ax:
        ax.barh([names[i] for i in order], importance[order])
        ax.set_xlabel("gain importance")
    return path
