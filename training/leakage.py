"""The leakage guard: columns that carry the label rather than predict it.

By name (the column is excluded and the exclusion reported): label, target, outcome, the label's date,
the tag's own name and the like, in any casing or separator. By content, on the assembled training set
before anything is trained or stored: a feature identical to the label after encoding, or one whose
single-feature ROC AUC reaches the tag's `leakage.max_single_feature_auc`, fails the run by name.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from tagml.features.pii import contains_tokens, name_tokens
from tagml.training.catalog import TagSpec

# a whole column name meaning the label itself
LEAKY_NAMES = ("y", "class", "source", "target", "label", "outcome", "label date", "known date", "label source")
# a part of a column name that says it holds the label or the outcome
LEAKY_NAME_PARTS = ("target", "label", "outcome", "bad flag", "default flag", "is bad", "is default", "label date", "known date")
FOLDS = 5  # categorical target rates are computed out of fold: an id-like column cannot score by memorising
SMOOTHING = 10  # rows of the overall rate mixed into each category's rate: rare categories stay near it


def leak_by_name(tag: TagSpec) -> Callable[[str], str | None]:
    """For one tag: why a column's name says it holds the label (e.g. "named 'target'"), or None."""
    parts = [tuple(p.split()) for p in LEAKY_NAME_PARTS]
    own = [name_tokens(n) for n in {tag.name, tag.label_tag}]
    exact = [tuple(n.split()) for n in LEAKY_NAMES]

    def check(column: str) -> str | None:
        tokens = name_tokens(column)
        if tokens in exact:
            return f"named {' '.join(tokens)!r}"
        found = next((p for p in parts if contains_tokens(tokens, p)), None) or next((t for t in own if contains_tokens(tokens, t)), None)
        return f"contains {' '.join(found)!r}" if found else None

    return check


@dataclass(frozen=True)
class Leak:
    column: str
    auc: float
    identical: bool  # a 1:1 mapping of the label's values

    def describe(self) -> str:
        return f"{self.column!r} (identical to the label after encoding)" if self.identical else f"{self.column!r} (single-feature ROC AUC {self.auc:.3f})"


def single_feature_aucs(frame: pd.DataFrame, features: tuple[str, ...], categorical: tuple[str, ...], label: pd.Series, seed: int = 0) -> dict[str, float]:
    """Each feature's ROC AUC as the only predictor of the label (one-vs-rest, the best class; 0.5 = no signal).

    Numeric features rank by value (a missing value ranks lowest: missingness can leak too); categorical
    ones by their category's label rate, learned on the other folds.
    """
    y = label.to_numpy()
    classes = list(pd.unique(y))
    classes = classes[:1] if len(classes) == 2 else classes  # binary: one side is the other's mirror
    targets = np.stack([y == c for c in classes], axis=1)
    fold = np.random.default_rng(seed).permutation(len(y)) % FOLDS
    scores = {}
    for name in features:
        column = frame[name]
        if name in categorical:
            encoded = _out_of_fold_rates(column.astype("string").fillna("\x00missing").to_numpy(), targets, fold)
            scores[name] = max(_auc(rankdata(encoded[:, k]), targets[:, k]) for k in range(len(classes)))
        else:
            values = column.to_numpy(dtype="float64")
            finite = values[~np.isnan(values)]
            ranks = rankdata(np.where(np.isnan(values), (finite.min() - 1) if finite.size else 0.0, values))
            scores[name] = max(_auc(ranks, targets[:, k]) for k in range(len(classes)))
    return scores


def _out_of_fold_rates(keys: np.ndarray, targets: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Per row and class: the smoothed rate of the class among rows of the same category in the other folds."""
    codes, uniques = pd.factorize(keys)
    encoded = np.empty(targets.shape)
    for k in range(FOLDS):
        fit = fold != k
        counts = np.bincount(codes[fit], minlength=len(uniques))
        prior = targets[fit].mean(axis=0)
        for c in range(targets.shape[1]):
            sums = np.bincount(codes[fit], weights=targets[fit, c], minlength=len(uniques))
            # a category unseen in the other folds gets the prior: count 0 leaves only the smoothing term
            encoded[~fit, c] = ((sums + SMOOTHING * prior[c]) / (counts + SMOOTHING))[codes[~fit]]
    return encoded


def _auc(ranks: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC from the score's ranks (ties averaged), folded so that a perfectly inverted feature also scores 1.0."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if not n_pos or not n_neg:
        return 0.5
    auc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(max(auc, 1 - auc))


def identical_to_label(column: pd.Series, label: pd.Series) -> bool:
    """Each value of the column goes with one label and each label with one value (a re-encoding of the label)."""
    codes, uniques = pd.factorize(column, use_na_sentinel=False)  # a missing value is one more value
    if len(uniques) != label.nunique():
        return False  # cheap: a re-encoding has exactly as many values as the label
    pairs = pd.DataFrame({"x": codes, "y": label.to_numpy()})
    return bool(pairs.groupby("x")["y"].nunique().max() == 1 and pairs.groupby("y")["x"].nunique().max() == 1)


def find_leaks(
    frame: pd.DataFrame, features: tuple[str, ...], categorical: tuple[str, ...], label: pd.Series, tag: TagSpec
) -> tuple[dict[str, float], list[Leak]]:
    """(every feature's single-feature AUC, the features that leak the label and are not allowed by the catalog)."""
    scores = single_feature_aucs(frame, features, categorical, label)
    leaks = []
    for name in features:
        if name in tag.leakage.allow:
            continue
        identical = identical_to_label(frame[name], label)
        if identical or scores[name] >= tag.leakage.max_single_feature_auc:
            leaks.append(Leak(name, scores[name], identical))
    return scores, leaks


def leakage_message(tag: TagSpec, leaks: list[Leak]) -> str:
    return (
        f"tag {tag.name!r}: feature(s) that give the label away: {', '.join(leak.describe() for leak in leaks)} "
        f"(threshold leakage.max_single_feature_auc = {tag.leakage.max_single_feature_auc}). "
        "Remove them from the feature source or list them in features.exclude; if the signal is genuine, acknowledge it in leakage.allow."
    )
