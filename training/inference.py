"""Inference of a model tag, in one place: the model's input from feature rows, and probabilities to a
value (the most probable class, or a binary tag's positive class at or above its version's decision threshold;
`unknown` below the tag's min_confidence). The gate and evaluation decide with `decide` too.

Scoring writes the tag store with it and monitoring profiles a version's reference population with
it: drift's "PSI is 0 on the reference" holds only because both infer the same way.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from tagml.training.catalog import UNKNOWN
from tagml.training.versions import ModelVersionInfo


@dataclass(frozen=True)
class Inference:
    proba: np.ndarray  # rows x classes, in the version's class order
    top: np.ndarray  # index of the most probable class per row
    confidence: np.ndarray  # probability of that class
    values: np.ndarray  # the inferred value per row: a class, or UNKNOWN below min_confidence
    value_index: np.ndarray  # the inferred value's index in the version's classes, -1 for UNKNOWN


def model_input(frame: pd.DataFrame, version: ModelVersionInfo) -> pd.DataFrame:
    """The version's features from `frame`, numeric ones as float64 (as the model was trained)."""
    X = frame[list(version.features)].copy()
    categorical = set(version.categorical)
    numeric = [f for f in version.features if f not in categorical]
    X[numeric] = X[numeric].astype("float64")
    return X


def decide(proba: np.ndarray, threshold: float | None) -> np.ndarray:
    """The decided class index per row: the positive class (index 1) where its probability reaches `threshold`,
    or the most probable class when there is no threshold (DecisionSpec policy argmax)."""
    if threshold is None:
        return proba.argmax(axis=1)
    return (proba[:, 1] >= threshold).astype(int)


def infer(model: Any, X: pd.DataFrame, version: ModelVersionInfo, min_confidence: float | None) -> Inference:
    """Probabilities and inferred values of `model` on `X` (from `model_input`), decided by the version's threshold."""
    return inference_of(model.predict_proba(X), version, min_confidence)


def inference_of(proba: np.ndarray, version: ModelVersionInfo, min_confidence: float | None) -> Inference:
    """The inferred values of probabilities `proba` (the model's, or the same model's from an earlier night)."""
    top = decide(proba, version.decision_threshold)
    confidence = proba[np.arange(len(top)), top]
    value_index = np.where(confidence < min_confidence, -1, top) if min_confidence else np.asarray(top)
    values = np.array([*version.classes, UNKNOWN], dtype=object)[value_index]
    return Inference(proba, top, confidence, values, value_index)
