"""Reason codes: per-customer feature contributions of the tree model turned into readable codes.

Contributions are Saabas path attributions (what xgboost's `approx_contribs=True` computes): along
the path to each leaf, the change in the node's mean value is credited to the split's feature. They
are computed for the *predicted class only*: each row walks only that class's trees (vectorised in
numpy over rows x trees, from the model's exact JSON split values), and the leaves it lands in are
mapped to precomputed path contributions with one sparse product. xgboost's own call walks every
class's trees (K times the work) and exact TreeSHAP costs more still. The top positive contributions
become codes such as `share_equity high` (above the population median at as_of) or `region=east`.
"""

import json
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.pipeline import Pipeline

from tagml.core.storage import quote, sql_literal


def unwrap_pipeline(model: Any) -> Pipeline | None:
    """The fitted preprocessing + classifier pipeline inside a (possibly calibrated) model."""
    calibrated = getattr(model, "calibrated_classifiers_", None)
    if calibrated:
        model = calibrated[0].estimator
    model = getattr(model, "estimator", model)  # FrozenEstimator
    return model if isinstance(model, Pipeline) else None


class TreeEnsemble:
    """The trees of an xgboost booster as padded numpy arrays (tree x node), read from its JSON dump."""

    def __init__(self, booster: Any):
        model = json.loads(booster.save_raw(raw_format="json"))["learner"]["gradient_booster"]["model"]
        trees = model["trees"]
        self.tree_class = np.array(model["tree_info"], dtype=np.int64)
        width = max(len(t["left_children"]) for t in trees)
        shape = (len(trees), width)
        self.left = np.full(shape, -1, np.int32)
        self.right = np.full(shape, -1, np.int32)
        self.feature = np.zeros(shape, np.int32)
        self.threshold = np.zeros(shape, np.float32)
        self.default_left = np.zeros(shape, bool)
        self.paths: list[dict[int, list[tuple[int, float]]]] = []
        depth = 1
        for t, tree in enumerate(trees):
            n = len(tree["left_children"])
            left = np.array(tree["left_children"], np.int32)
            right = np.array(tree["right_children"], np.int32)
            self.left[t, :n], self.right[t, :n] = left, right
            self.feature[t, :n] = tree["split_indices"]
            self.threshold[t, :n] = np.array(tree["split_conditions"], np.float32)
            self.default_left[t, :n] = np.array(tree["default_left"], bool)
            hessian = np.array(tree["sum_hessian"], np.float64)
            # node mean values: leaves hold their value; children always have larger ids than parents
            mean = np.array(tree["split_conditions"], np.float64)
            for node in range(n - 1, -1, -1):
                if left[node] >= 0:
                    l, r = left[node], right[node]
                    mean[node] = (hessian[l] * mean[l] + hessian[r] * mean[r]) / max(hessian[l] + hessian[r], 1e-12)
            paths: dict[int, list[tuple[int, float]]] = {0: []}
            for node in range(n):
                if left[node] >= 0:
                    for child in (left[node], right[node]):
                        paths[int(child)] = paths[node] + [(int(tree["split_indices"][node]), mean[child] - mean[node])]
            self.paths.append({node: path for node, path in paths.items() if left[node] < 0})
            depth = max(depth, max(len(p) for p in paths.values()))
        self.depth = depth
        self.width = width
        # left and right child side by side: child of (tree, node) going right is at 2 * flat + 1
        self._children = np.stack([self.left, self.right], axis=2).astype(np.int64).ravel()

    def leaves(self, values: np.ndarray, trees: np.ndarray) -> np.ndarray:
        """(rows, trees) leaf node reached by each row in each of `trees`, as xgboost decides splits."""
        rows = values.shape[0]
        base = (trees.astype(np.int64) * self.width)[None, :]  # flat index of each tree's root
        row_base = (np.arange(rows, dtype=np.int64) * values.shape[1])[:, None]
        flat_values = values.ravel()
        node = np.zeros((rows, trees.size), np.int64)
        for _ in range(self.depth):
            at = base + node
            x = flat_values.take(row_base + self._feature.take(at))
            go_left = np.where(np.isnan(x), self._default_left.take(at), x < self._threshold.take(at))
            child = self._children.take(2 * at + ~go_left)
            if (child < 0).all():
                break
            node = np.where(child < 0, node, child)
        return node

    @property
    def _feature(self) -> np.ndarray:
        return self.feature.ravel()

    @property
    def _threshold(self) -> np.ndarray:
        return self.threshold.ravel()

    @property
    def _default_left(self) -> np.ndarray:
        return self.default_left.ravel()


class ReasonExplainer:
    ROWS_PER_PASS = 8_192  # bounds the (rows x trees) work arrays to a few tens of MB

    def __init__(self, pipeline: Pipeline, medians: dict[str, float], categorical: tuple[str, ...]):
        self.prepare = pipeline.named_steps["prepare"]
        self.booster = pipeline.named_steps["model"].get_booster()
        self.names = list(self.prepare.get_feature_names_out())
        self.categorical = np.array([n in categorical for n in self.names])
        self._median = np.array([medians.get(n, np.nan) for n in self.names])
        self._high = np.array([f"{n} high" for n in self.names], dtype=object)
        self._low = np.array([f"{n} low" for n in self.names], dtype=object)
        self.trees = TreeEnsemble(self.booster)
        classes = getattr(pipeline.named_steps["model"], "n_classes_", 2)
        self.groups = 1 if classes == 2 else classes
        # per class: a sparse (leaf slots of the class's trees) x (features) matrix of path contributions
        self.class_trees, self.leaf_contributions = [], []
        for k in range(self.groups):
            trees = np.nonzero(self.trees.tree_class == k)[0]
            rows, cols, vals = [], [], []
            for position, t in enumerate(trees):
                for node, path in self.trees.paths[t].items():
                    for feature, delta in path:
                        rows.append(position * self.trees.width + node)
                        cols.append(feature)
                        vals.append(delta)
            self.class_trees.append(trees)
            self.leaf_contributions.append(sparse.csr_matrix((vals, (rows, cols)), shape=(trees.size * self.trees.width, len(self.names))))

    @classmethod
    def for_model(
        cls, con: duckdb.DuckDBPyConnection, model: Any, features: tuple[str, ...], categorical: tuple[str, ...], features_path: Path
    ) -> "ReasonExplainer | None":
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

    def contributions(self, X: pd.DataFrame, predicted: np.ndarray) -> np.ndarray:
        """(rows, features) Saabas contributions toward each row's predicted class."""
        values = np.asarray(self.prepare.transform(X), dtype=np.float32)
        n = len(X)
        out = np.zeros((n, len(self.names)), np.float64)
        width = self.trees.width
        for k in range(self.groups):
            rows_k = np.nonzero(predicted == k)[0] if self.groups > 1 else np.arange(n)
            trees, contributions = self.class_trees[k], self.leaf_contributions[k]
            if trees.size == 0:
                continue
            slots = (np.arange(trees.size, dtype=np.int64) * width)[None, :]
            for start in range(0, rows_k.size, self.ROWS_PER_PASS):
                rows = rows_k[start : start + self.ROWS_PER_PASS]
                columns = (self.trees.leaves(values[rows], trees) + slots).ravel()
                onehot = sparse.csr_matrix(
                    (np.ones(columns.size, np.float64), columns, np.arange(0, columns.size + 1, trees.size)),
                    shape=(rows.size, contributions.shape[0]),
                )
                out[rows] = (onehot @ contributions).toarray()
        if self.groups == 1:  # binary: margins push toward class 1
            out *= np.where(predicted == 1, 1.0, -1.0)[:, None]
        return out

    def reasons(self, X: pd.DataFrame, predicted: np.ndarray, top: int = 3) -> list[list[str]]:
        """For each row, up to `top` codes of the features pushing hardest toward its predicted class."""
        toward = self.contributions(X, predicted)
        n = len(X)
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
            for position in np.unique(idx[~numeric_rows]):
                rows = np.nonzero(idx == position)[0]
                name = self.names[position]
                codes[rows] = [f"{name}={value}" for value in X[name].to_numpy()[rows]]
            codes[strength[:, j] <= 0] = None
            columns.append(codes)
        return [[c for c in row if c is not None] for row in zip(*columns)]
