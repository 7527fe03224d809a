"""Reason codes: per-customer feature contributions of the tree model turned into readable codes.

xgboost's own contributions (the fast Saabas approximation, `approx_contribs=True`; exact TreeSHAP
costs several times the prediction) toward the predicted class are ranked, and the top positive ones
become codes such as `share_equity high` (above the population median at as_of) or `region=east`.
"""

from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from features.warehouse import quote, sql_literal


def unwrap_pipeline(model: Any) -> Pipeline | None:
    """The fitted preprocessing + classifier pipeline inside a (possibly calibrated) model."""
    calibrated = getattr(model, "calibrated_classifiers_", None)
    if calibrated:
        model = calibrated[0].estimator
    model = getattr(model, "estimator", model)  # FrozenEstimator
    return model if isinstance(model, Pipeline) else None


class ReasonExplainer:
    def __init__(self, pipeline: Pipeline, medians: dict[str, float], categorical: tuple[str, ...]):
        self.prepare = pipeline.named_steps["prepare"]
        self.booster = pipeline.named_steps["model"].get_booster()
        self.names = list(self.prepare.get_feature_names_out())
        self.categorical = np.array([n in categorical for n in self.names])
        self.binary = getattr(pipeline.named_steps["model"], "n_classes_", 2) == 2
        medians_by_position = np.array([medians.get(n, np.nan) for n in self.names])
        self._median = medians_by_position
        self._high = np.array([f"{n} high" for n in self.names], dtype=object)
        self._low = np.array([f"{n} low" for n in self.names], dtype=object)

    @classmethod
    def for_model(cls, con: duckdb.DuckDBPyConnection, model: Any, features: tuple[str, ...], categorical: tuple[str, ...], features_path: Path) -> "ReasonExplainer | None":
        """An explainer for xgboost pipelines (None for other families), with medians of the snapshot."""
        pipeline = unwrap_pipeline(model)
        if pipeline is None or type(pipeline.named_steps.get("model")).__name__ != "XGBClassifier":
            return None
        numeric = [f for f in features if f not in categorical]
        medians: dict[str, float] = {}
        if numeric:
            row = con.execute(
                "SELECT " + ", ".join(f"median({quote(f)}::DOUBLE)" for f in numeric) + f" FROM read_parquet({sql_literal(features_path)})"
            ).fetchall()[0]
            medians = dict(zip(numeric, row))
        return cls(pipeline, medians, categorical)

    def contributions(self, X: pd.DataFrame) -> np.ndarray:
        import xgboost as xgb

        matrix = xgb.DMatrix(np.asarray(self.prepare.transform(X), dtype=np.float32), missing=np.nan)
        return self.booster.predict(matrix, pred_contribs=True, approx_contribs=True)

    def reasons(self, X: pd.DataFrame, predicted: np.ndarray, top: int = 3) -> list[list[str]]:
        """For each row, up to `top` codes of the features pushing hardest toward its predicted class."""
        contribs = self.contributions(X)
        n = len(X)
        if contribs.ndim == 2:  # binary: contributions are toward class 1
            toward = contribs[:, :-1] * np.where(predicted == 1, 1.0, -1.0)[:, None]
        else:
            toward = contribs[np.arange(n), predicted, :-1]
        order = np.argsort(-toward, axis=1)[:, :top]
        strength = np.take_along_axis(toward, order, axis=1)
        numeric_values = np.column_stack(
            [np.full(n, np.nan) if cat else X[name].to_numpy(dtype=float, na_value=np.nan) for name, cat in zip(self.names, self.categorical)]
        )
        columns = []
        for j in range(order.shape[1]):
            idx = order[:, j]
            codes = np.empty(n, dtype=object)
            numeric_rows = ~self.categorical[idx]
            if numeric_rows.any():
                rows = np.nonzero(numeric_rows)[0]
                above = numeric_values[rows, idx[rows]] > self._median[idx[rows]]
                codes[rows] = np.where(above, self._high[idx[rows]], self._low[idx[rows]])
            for r in np.nonzero(~numeric_rows)[0]:
                codes[r] = f"{self.names[idx[r]]}={X.iloc[r][self.names[idx[r]]]}"
            codes[strength[:, j] <= 0] = None
            columns.append(codes)
        return [[c for c in row if c is not None] for row in zip(*columns)]
