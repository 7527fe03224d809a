"""Model families as scikit-learn pipelines that accept raw feature values.

Categorical columns are encoded inside the pipeline, so scoring takes the same raw columns as
training, and a category never seen in training becomes "missing" instead of an error.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, OrdinalEncoder, StandardScaler


def _tree_preprocessor(categorical: Sequence[str], numeric: Sequence[str]) -> ColumnTransformer:
    encoder = OrdinalEncoder(handle_unknown="use_encoded_value", unknown_value=np.nan, encoded_missing_value=np.nan)
    return ColumnTransformer(
        [("categorical", encoder, list(categorical)), ("numeric", "passthrough", list(numeric))],
        verbose_feature_names_out=False,
    )


def _linear_preprocessor(categorical: Sequence[str], numeric: Sequence[str]) -> ColumnTransformer:
    numeric_steps = Pipeline([("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)), ("scale", StandardScaler())])
    categorical_steps = Pipeline(
        [
            ("impute", SimpleImputer(strategy="constant", fill_value="missing", keep_empty_features=True)),
            ("onehot", OneHotEncoder(handle_unknown="ignore", min_frequency=10)),
        ]
    )
    return ColumnTransformer([("categorical", categorical_steps, list(categorical)), ("numeric", numeric_steps, list(numeric))])


def build_pipeline(
    family: str,
    params: Mapping[str, Any],
    categorical: Sequence[str],
    numeric: Sequence[str],
    n_classes: int,
    seed: int,
    threads: int,
) -> Pipeline:
    """An unfitted pipeline (preprocessing + classifier) for one model family."""
    if family == "xgboost":
        from xgboost import XGBClassifier

        clf = XGBClassifier(
            objective="multi:softprob" if n_classes > 2 else "binary:logistic",
            tree_method="hist",
            n_jobs=threads,
            random_state=seed,
            eval_metric="mlogloss" if n_classes > 2 else "logloss",
            **{k: (int(v) if k in ("max_depth", "n_estimators") else v) for k, v in params.items()},
        )
        return Pipeline([("prepare", _tree_preprocessor(categorical, numeric)), ("model", clf)])
    if family == "logistic_regression":
        clf = LogisticRegression(C=float(params.get("C", 1.0)), max_iter=2000, random_state=seed)
        return Pipeline([("prepare", _linear_preprocessor(categorical, numeric)), ("model", clf)])
    raise ValueError(f"unknown model family {family!r}")
