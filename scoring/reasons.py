"""Reason codes: per-customer feature contributions of the tree model turned into readable codes.

Contributions are Saabas path attributions (what xgboost's `approx_contribs=True` computes): along
the path to each leaf, the change in the node's mean value is credited to the split's feature, so a
row's contributions depend only on the leaves it reaches. They are computed for the *predicted class
only*: per class, a *leaf booster* (that class's trees with each leaf's value replaced by its node id)
gives, in xgboost's own predictor, the leaf each row reaches in each of those trees; the leaves are
then mapped to precomputed per-leaf path contributions with one sparse product (a gather and a sum,
not a walk). xgboost's own call walks every class's trees (K times the work) and exact TreeSHAP
costs more still. The top positive contributions become codes such as `share_equity high` (above
the population median at as_of) or `region=east`.
"""

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
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
    """The trees of an xgboost booster, read from its JSON dump: per tree, the Saabas path of every leaf
    (the (feature, change in node mean) of each split on the way from the root), and per class a
    *leaf booster* that tells which leaf each row reaches."""

    def __init__(self, booster: Any):
        self.model = json.loads(booster.save_raw(raw_format="json"))
        trees = self.model["learner"]["gradient_booster"]["model"]["trees"]
        self.tree_class = np.array(self.model["learner"]["gradient_booster"]["model"]["tree_info"], dtype=np.int64)
        self.width = max(len(t["left_children"]) for t in trees)
        self.paths: list[dict[int, list[tuple[int, float]]]] = []
        for tree in trees:
            n = len(tree["left_children"])
            left = np.array(tree["left_children"], np.int32)
            right = np.array(tree["right_children"], np.int32)
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

    def leaf_booster(self, trees: np.ndarray, threads: int | None) -> Any:
        """A booster of `trees` only, each its own output with the *node id* of its leaves as leaf value: its raw
        margin prediction is the (rows, trees) leaf each row reaches, decided by xgboost's own predictor (the same
        splits, missing-value directions and float32 comparisons as the model's predict), with no second walk of
        ours. Node ids are small integers, exact in float32, and the base score is 0.

        Measured on a 6-class champion (366 trees per class, depth 5), 50,000 rows: 0.7 s, where the numpy walk of
        the same trees it replaced took 4.2 s; xgboost's `pred_leaf` (every class's trees) is slower still."""
        import xgboost as xgb

        # shallow copies along the path to what changes: a deep copy of the whole model cost seconds per class
        model = {**self.model, "learner": {**self.model["learner"]}}
        learner = model["learner"]
        learner["gradient_booster"] = {**learner["gradient_booster"], "model": {**learner["gradient_booster"]["model"]}}
        learner["learner_model_param"] = {**learner["learner_model_param"]}
        gbtree = learner["gradient_booster"]["model"]
        gbtree["gbtree_model_param"] = {**gbtree["gbtree_model_param"]}
        source = gbtree["trees"]
        chosen = []
        for position, t in enumerate(trees):
            tree = {**source[int(t)], "id": position}
            values = list(tree["split_conditions"])
            for node, child in enumerate(tree["left_children"]):
                if child < 0:  # a leaf: its value becomes its node id
                    values[node] = float(node)
            tree["split_conditions"] = tree["base_weights"] = values
            chosen.append(tree)
        n = len(chosen)
        gbtree.update(trees=chosen, tree_info=list(range(n)), iteration_indptr=[0, n])
        gbtree["gbtree_model_param"]["num_trees"] = str(n)
        gbtree["gbtree_model_param"]["num_parallel_tree"] = "1"
        params = learner["learner_model_param"]
        params.update(num_class=str(n), num_target="1", base_score="[" + ",".join(["0"] * n) + "]", boost_from_average="0")
        learner["objective"] = {"name": "multi:softprob", "softmax_multiclass_param": {"num_class": str(n)}}
        booster = xgb.Booster()
        booster.load_model(bytearray(json.dumps(model).encode()))
        if threads:
            booster.set_param({"nthread": int(threads)})
        return booster


def leaves(leaf_booster: Any, values: np.ndarray) -> np.ndarray:
    """(rows, trees) node id of the leaf each row of `values` (the model's float32 input) reaches in each tree of `leaf_booster`."""
    margins = leaf_booster.inplace_predict(values, predict_type="margin", missing=np.nan)
    return np.asarray(margins, dtype=np.float32).reshape(values.shape[0], -1).astype(np.int64)


def numeric_code(feature: str, above: bool) -> str:
    """A numeric feature's reason code: above or below the snapshot's median (a categorical one's is `feature=value`)."""
    return f"{feature} {'high' if above else 'low'}"


def code_features(names: list[str], categorical: np.ndarray) -> tuple[dict[str, int], dict[str, int]]:
    """How a stored reason code maps back to its feature's index in `names`: every numeric code, and the
    categorical features by name (their codes are `name=value`)."""
    numeric = {numeric_code(n, above): j for j, n in enumerate(names) if not categorical[j] for above in (True, False)}
    return numeric, {n: j for j, n in enumerate(names) if categorical[j]}


def explains(model: Any) -> bool:
    """Whether reason codes are computed for `model` (xgboost pipelines)."""
    pipeline = unwrap_pipeline(model)
    return pipeline is not None and type(pipeline.named_steps.get("model")).__name__ == "XGBClassifier"


def snapshot_medians(con: duckdb.DuckDBPyConnection, features_path: Path, numeric: Sequence[str]) -> dict[str, float]:
    """The median of each numeric feature over the snapshot, in one pass ("high"/"low" in a reason is against it)."""
    if not numeric:
        return {}
    row = con.execute("SELECT " + ", ".join(f"median({quote(f)}::DOUBLE)" for f in numeric) + f" FROM read_parquet({sql_literal(features_path)})").fetchall()[0]
    return dict(zip(numeric, row))


class ReasonExplainer:
    ROWS_PER_PASS = 16_384  # bounds the (rows x trees) leaf and one-hot arrays to a few tens of MB

    def __init__(self, pipeline: Pipeline, medians: dict[str, float], categorical: tuple[str, ...]):
        self.prepare = pipeline.named_steps["prepare"]
        self.booster = pipeline.named_steps["model"].get_booster()
        self.names = list(self.prepare.get_feature_names_out())
        self.categorical = np.array([n in categorical for n in self.names])
        self._median = np.array([medians.get(n, np.nan) for n in self.names])
        self._high = np.array([numeric_code(n, above=True) for n in self.names], dtype=object)
        self._low = np.array([numeric_code(n, above=False) for n in self.names], dtype=object)
        ensemble = TreeEnsemble(self.booster)
        classifier = pipeline.named_steps["model"]
        classes = getattr(classifier, "n_classes_", 2)
        self.groups = 1 if classes == 2 else classes
        self.width = ensemble.width
        # per class: its trees' leaf booster and a sparse (leaf slots of the class's trees) x (features) matrix of path contributions
        self.leaf_boosters, self.leaf_contributions = [], []
        for k in range(self.groups):
            trees = np.nonzero(ensemble.tree_class == k)[0]
            rows, cols, vals = [], [], []
            for position, t in enumerate(trees):
                for node, path in ensemble.paths[t].items():
                    for feature, delta in path:
                        rows.append(position * self.width + node)
                        cols.append(feature)
                        vals.append(delta)
            self.leaf_boosters.append(ensemble.leaf_booster(trees, getattr(classifier, "n_jobs", None)) if trees.size else None)
            self.leaf_contributions.append(sparse.csr_matrix((vals, (rows, cols)), shape=(trees.size * self.width, len(self.names))))

    @classmethod
    def for_model(
        cls,
        con: duckdb.DuckDBPyConnection,
        model: Any,
        features: tuple[str, ...],
        categorical: tuple[str, ...],
        features_path: Path,
        medians: Mapping[str, float] | None = None,
    ) -> "ReasonExplainer | None":
        """An explainer for xgboost pipelines (None for other families), with medians of the snapshot (`medians`: the
        snapshot's medians already computed, e.g. by one `snapshot_medians` pass for every tag scored from it)."""
        pipeline = unwrap_pipeline(model)
        if not explains(model):
            return None
        numeric = [f for f in features if f not in categorical]
        known = dict(medians or {})
        missing = [f for f in numeric if f not in known]
        if missing:
            known.update(snapshot_medians(con, features_path, missing))
        return cls(pipeline, {f: known[f] for f in numeric}, categorical)

    def model_values(self, X: pd.DataFrame) -> np.ndarray:
        """The booster's float32 input for `X` (the pipeline's own preparation)."""
        return np.ascontiguousarray(self.prepare.transform(X), dtype=np.float32)

    def contributions(self, X: pd.DataFrame, predicted: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        """(rows, features) Saabas contributions toward each row's predicted class: the leaves each row reaches in
        that class's trees (its leaf booster), then one sparse product with the precomputed path contributions.
        `values`: `model_values(X)` when the caller has it already."""
        values = self.model_values(X) if values is None else values
        n = len(X)
        out = np.zeros((n, len(self.names)), np.float64)
        for k in range(self.groups):
            rows_k = np.nonzero(predicted == k)[0] if self.groups > 1 else np.arange(n)
            booster, contributions = self.leaf_boosters[k], self.leaf_contributions[k]
            if booster is None or rows_k.size == 0:
                continue
            trees = contributions.shape[0] // self.width
            slots = (np.arange(trees, dtype=np.int64) * self.width)[None, :]
            for start in range(0, rows_k.size, self.ROWS_PER_PASS):
                rows = rows_k[start : start + self.ROWS_PER_PASS]
                columns = (leaves(booster, values[rows]) + slots).ravel()
                onehot = sparse.csr_matrix(
                    (np.ones(columns.size, np.float64), columns, np.arange(0, columns.size + 1, trees)),
                    shape=(rows.size, contributions.shape[0]),
                )
                out[rows] = (onehot @ contributions).toarray()
        if self.groups == 1:  # binary: margins push toward class 1
            out *= np.where(predicted == 1, 1.0, -1.0)[:, None]
        return out

    def reasons(self, X: pd.DataFrame, predicted: np.ndarray, top: int = 3) -> list[list[str]]:
        """For each row, up to `top` codes of the features pushing hardest toward its predicted class."""
        return self.reason_codes(X, predicted, top).to_pylist()

    def reason_features(self, X: pd.DataFrame, predicted: np.ndarray, top: int = 3, values: np.ndarray | None = None) -> np.ndarray:
        """(rows, top) index (into `names`) of the features pushing hardest toward each row's predicted class,
        strongest first; -1 where fewer than `top` features push toward it at all."""
        toward = self.contributions(X, predicted, values)
        order = np.argsort(-toward, axis=1)[:, :top]
        strength = np.take_along_axis(toward, order, axis=1)
        chosen = np.full((len(X), top), -1, np.int64)
        chosen[:, : order.shape[1]] = np.where(strength > 0, order, -1)
        return chosen

    def reason_codes(self, X: pd.DataFrame, predicted: np.ndarray, top: int = 3) -> pa.ListArray:
        """`reasons` as the tag store's list<string> column, built from numpy without a Python list per row."""
        return self.codes(X, self.reason_features(X, predicted, top))

    def codes(self, X: pd.DataFrame, features: np.ndarray) -> pa.ListArray:
        """The reason codes of `reason_features`: `name high|low` against the snapshot's median, `name=value` for a
        categorical feature (both read from `X`, so the same features give tonight's codes)."""
        n = len(X)
        if features.shape[1] == 0:
            return pa.array([[] for _ in range(n)], pa.list_(pa.string()))
        numeric_values = np.column_stack(
            [np.full(n, np.nan) if cat else X[name].to_numpy(dtype=float, na_value=np.nan) for name, cat in zip(self.names, self.categorical)]
        )
        columns = []
        for j in range(features.shape[1]):
            present = features[:, j] >= 0
            idx = np.where(present, features[:, j], 0)
            codes = np.empty(n, dtype=object)
            numeric_rows = present & ~self.categorical[idx]
            if numeric_rows.any():
                rows = np.nonzero(numeric_rows)[0]
                above = numeric_values[rows, idx[rows]] > self._median[idx[rows]]
                codes[rows] = np.where(above, self._high[idx[rows]], self._low[idx[rows]])
            categorical_rows = present & self.categorical[idx]
            for position in np.unique(idx[categorical_rows]):
                rows = np.nonzero(categorical_rows & (idx == position))[0]
                name = self.names[position]
                codes[rows] = [f"{name}={value}" for value in X[name].to_numpy()[rows]]
            columns.append(codes)
        codes = np.column_stack(columns)
        kept = pd.notna(codes)
        offsets = np.concatenate([[0], np.cumsum(kept.sum(axis=1))]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(codes[kept], pa.string()))
