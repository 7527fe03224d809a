"""Reason codes: per-customer feature contributions of the tree model turned into readable codes.

Contributions are Saabas path attributions (what xgboost's `approx_contribs=True` computes): along
the path to each leaf, the change in the node's mean value is credited to the split's feature. They
are computed here for the *predicted class only*, from precomputed per-leaf path tables and the leaf
indices (`pred_leaf`), which costs about as much as a prediction; xgboost's own call computes every
class (K times the work) and exact TreeSHAP more still. The top positive contributions become codes
such as `share_equity high` (above the population median at as_of) or `region=east`.
"""

from concurrent.futures import ThreadPoolExecutor
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


def leaf_path_tables(booster: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tree: for each node id, the (feature index, value change) pairs on the path to it, padded."""
    frame = booster.trees_to_dataframe()
    tables = []
    for _, tree in frame.groupby("Tree", sort=True):
        size = int(tree["Node"].max()) + 1
        nodes = tree["Node"].to_numpy()
        leaf = np.zeros(size, bool)
        leaf[nodes] = (tree["Feature"] == "Leaf").to_numpy()
        cover = np.zeros(size)
        cover[nodes] = tree["Cover"].to_numpy()
        value = np.zeros(size)
        value[nodes] = np.where(leaf[nodes], tree["Gain"].to_numpy(), 0.0)
        child = lambda ids: np.array([int(i.split("-")[1]) if isinstance(i, str) else -1 for i in ids])  # noqa: E731
        yes, no, feature = np.full(size, -1), np.full(size, -1), np.full(size, -1)
        yes[nodes], no[nodes] = child(tree["Yes"]), child(tree["No"])
        internal = nodes[~leaf[nodes]]
        feature[internal] = [int(f[1:]) for f in tree.set_index("Node").loc[internal, "Feature"]]
        order = []  # nodes parents-first, so children's values are known when walked in reverse
        stack = [0]
        while stack:
            node = stack.pop()
            order.append(node)
            if not leaf[node]:
                stack += [yes[node], no[node]]
        for node in reversed(order):
            if not leaf[node]:
                y, n = yes[node], no[node]
                value[node] = (cover[y] * value[y] + cover[n] * value[n]) / max(cover[y] + cover[n], 1e-12)
        paths: dict[int, list[tuple[int, float]]] = {0: []}
        for node in order:
            if not leaf[node]:
                for c in (yes[node], no[node]):
                    paths[c] = paths[node] + [(feature[node], value[c] - value[node])]
        depth = max(len(p) for p in paths.values()) or 1
        features = np.zeros((size, depth), np.int32)
        deltas = np.zeros((size, depth), np.float32)
        for node, path in paths.items():
            if leaf[node] and path:
                features[node, : len(path)] = [f for f, _ in path]
                deltas[node, : len(path)] = [d for _, d in path]
        tables.append((features, deltas))
    return tables


class ReasonExplainer:
    ROWS_PER_PASS = 20_000  # bounds the one-hot leaf matrix to ~rows x trees entries per pass

    def __init__(self, pipeline: Pipeline, medians: dict[str, float], categorical: tuple[str, ...], threads: int = 2):
        from scipy import sparse

        self.threads = threads
        self.prepare = pipeline.named_steps["prepare"]
        self.booster = pipeline.named_steps["model"].get_booster()
        classes = getattr(pipeline.named_steps["model"], "n_classes_", 2)
        self.groups = 1 if classes == 2 else classes
        self.names = list(self.prepare.get_feature_names_out())
        self.categorical = np.array([n in categorical for n in self.names])
        self._median = np.array([medians.get(n, np.nan) for n in self.names])
        self._high = np.array([f"{n} high" for n in self.names], dtype=object)
        self._low = np.array([f"{n} low" for n in self.names], dtype=object)
        tables = leaf_path_tables(self.booster)
        # per class: one sparse (all leaves of the class's trees) x (features) matrix of path
        # contributions; a row's contributions are then (one-hot of its leaves) @ that matrix
        self.class_trees, self.leaf_offsets, self.leaf_contributions = [], [], []
        for k in range(self.groups):
            trees = [t for t in range(len(tables)) if t % self.groups == k]
            sizes = [tables[t][0].shape[0] for t in trees]
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            rows, cols, vals = [], [], []
            for offset, t in zip(offsets, trees):
                features, deltas = tables[t]
                node, step = np.nonzero(deltas)
                rows.append(offset + node)
                cols.append(features[node, step])
                vals.append(deltas[node, step])
            matrix = sparse.csr_matrix(
                (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(int(sum(sizes)), len(self.names))
            )
            self.class_trees.append(np.array(trees))
            self.leaf_offsets.append(offsets)
            self.leaf_contributions.append(matrix)
    @classmethod
    def for_model(
        cls, con: duckdb.DuckDBPyConnection, model: Any, features: tuple[str, ...], categorical: tuple[str, ...], features_path: Path, threads: int = 2
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
        return cls(pipeline, medians, categorical, threads)

    def contributions(self, X: pd.DataFrame, predicted: np.ndarray) -> np.ndarray:
        """(rows, features) Saabas contributions toward each row's predicted class."""
        import xgboost as xgb
        from scipy import sparse

        values = np.asarray(self.prepare.transform(X), dtype=np.float32)
        # xgboost computes leaf indices on one thread; it releases the GIL, so split the rows
        parts = np.array_split(np.arange(len(X)), max(1, min(self.threads, len(X) // 1000)))
        with ThreadPoolExecutor(len(parts)) as pool:
            chunks = pool.map(lambda idx: self.booster.predict(xgb.DMatrix(values[idx], missing=np.nan), pred_leaf=True), parts)
            leaves = np.concatenate([c.reshape(len(p), -1) for c, p in zip(chunks, parts)]).astype(np.int64)
        n = len(X)
        out = np.zeros((n, len(self.names)), np.float64)
        for k in range(self.groups):
            rows_k = np.nonzero(predicted == k)[0] if self.groups > 1 else np.arange(n)
            trees, offsets, contributions = self.class_trees[k], self.leaf_offsets[k], self.leaf_contributions[k]
            for start in range(0, rows_k.size, self.ROWS_PER_PASS):
                rows = rows_k[start : start + self.ROWS_PER_PASS]
                columns = (leaves[np.ix_(rows, trees)] + offsets[None, :]).ravel()
                onehot = sparse.csr_matrix(
                    (np.ones(columns.size, np.float32), columns, np.arange(0, columns.size + 1, trees.size)),
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
            for r in np.nonzero(~numeric_rows)[0]:
                codes[r] = f"{self.names[idx[r]]}={X.iloc[r][self.names[idx[r]]]}"
            codes[strength[:, j] <= 0] = None
            columns.append(codes)
        return [[c for c in row if c is not None] for row in zip(*columns)]
