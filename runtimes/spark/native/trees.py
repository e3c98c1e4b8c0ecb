"""Decision trees, random forests and gradient-boosted trees (classifiers and regressors).

All trees of a model are flattened into one set of node arrays; a batch descends every
tree at once, one level per step, so a step is a handful of NumPy gathers over
(rows x trees). Leaves point at themselves, so extra steps are harmless.

Splits follow Spark: a continuous split sends ``x <= threshold`` left (NaN goes right);
a categorical split keeps the smaller side's category set, and a value outside
``[0, numCategories)`` (or not a whole number) goes wherever "not in that set" leads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from runtimes.spark.native.base import DOUBLE, ColumnType, Frame, StageMeta, unsupported
from runtimes.spark.native.persist import read_data, require_spark3
from runtimes.spark.native.predictor import Predictor, ProbabilisticClassifier, normalize_counts
from runtimes.spark.native.registry import register


class Forest:
    """The nodes of one or more trees, evaluated together."""

    def __init__(self, trees: list[list[dict[str, Any]]], stats_width: int):
        nodes = [node for tree in trees for node in tree]
        total = len(nodes)
        self.roots = np.zeros(len(trees), dtype=np.int64)
        self.feature = np.zeros(total, dtype=np.int64)
        self.threshold = np.zeros(total, dtype=np.float64)
        self.left = np.arange(total, dtype=np.int64)
        self.right = np.arange(total, dtype=np.int64)
        self.prediction = np.zeros(total, dtype=np.float64)
        self.impurity = np.zeros(total, dtype=np.float64)
        self.stats = np.zeros((total, stats_width), dtype=np.float64)
        categorical: dict[int, tuple[int, set[int]]] = {}
        base = 0
        for t, tree in enumerate(trees):
            position = {node["id"]: base + i for i, node in enumerate(tree)}
            self.roots[t] = position[0]
            for i, node in enumerate(tree):
                g = base + i
                self.prediction[g] = node["prediction"]
                self.impurity[g] = node["impurity"]
                stats = node["impurityStats"] or []
                self.stats[g, : min(len(stats), stats_width)] = stats[:stats_width]
                if node["leftChild"] < 0:
                    continue
                split = node["split"]
                self.feature[g] = split["featureIndex"]
                self.left[g], self.right[g] = position[node["leftChild"]], position[node["rightChild"]]
                if split["numCategories"] >= 0:
                    cats = {int(c) for c in split["leftCategoriesOrThreshold"]}
                    categorical[g] = (int(split["numCategories"]), cats)
                else:
                    self.threshold[g] = split["leftCategoriesOrThreshold"][0]
            base += len(tree)
        self.depth = max((self._depth(r) for r in self.roots), default=0)
        self._build_categorical(categorical, total)

    def _depth(self, root: int) -> int:
        depth, level = 0, [root]
        while True:
            level = [c for g in level if self.left[g] != g for c in (self.left[g], self.right[g])]
            if not level:
                return depth
            depth += 1

    def _build_categorical(self, categorical: dict[int, tuple[int, set[int]]], total: int) -> None:
        self.is_categorical = np.zeros(total, dtype=bool)
        if not categorical:
            return
        width = max(n for n, _ in categorical.values())
        self.num_categories = np.zeros(total, dtype=np.int64)
        self.goes_left = np.zeros((total, max(width, 1)), dtype=bool)
        # CategoricalSplit keeps the left set when it is at most half the categories,
        # else the right set; values in neither set go the "not contained" way
        self.outside_left = np.zeros(total, dtype=bool)
        for g, (n, left) in categorical.items():
            self.is_categorical[g] = True
            self.num_categories[g] = n
            self.goes_left[g, sorted(c for c in left if 0 <= c < n)] = True
            self.outside_left[g] = len(left) > n // 2

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """Global leaf index per (row, tree)."""
        n = x.shape[0]
        node = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        rows = np.arange(n).reshape(-1, 1)
        for _ in range(self.depth):
            v = x[rows, self.feature[node]]
            go_left = v <= self.threshold[node]
            if self.is_categorical.any():
                go_left = np.where(self.is_categorical[node], self._categorical_left(node, v), go_left)
            node = np.where(go_left, self.left[node], self.right[node])
        return node

    def _categorical_left(self, node: np.ndarray, v: np.ndarray) -> np.ndarray:
        whole = np.isfinite(v) & (v == np.floor(v))
        inside = whole & (v >= 0) & (v < self.num_categories[node])
        cat = np.where(inside, v, 0).astype(np.int64)
        return np.where(inside, self.goes_left[node, np.minimum(cat, self.goes_left.shape[1] - 1)], self.outside_left[node])


def _tree_nodes(meta: StageMeta) -> list[dict[str, Any]]:
    return sorted(read_data(meta), key=lambda node: node["id"])


def _ensemble(meta: StageMeta) -> tuple[list[list[dict[str, Any]]], np.ndarray]:
    """Nodes of each tree of an ensemble, and the tree weights."""
    by_tree: dict[int, list[dict[str, Any]]] = {}
    for row in read_data(meta):
        by_tree.setdefault(row["treeID"], []).append(row["nodeData"])
    info = sorted(read_data(meta, "treesMetadata"), key=lambda r: r["_1"])
    for row in info:
        tree_meta = json.loads(row["_2"])
        if (tree_meta.get("paramMap") or {}).get("leafCol"):
            raise unsupported(meta, "leafCol is not produced natively")
    trees = [sorted(by_tree[row["_1"]], key=lambda node: node["id"]) for row in info]
    return trees, np.array([row["_3"] for row in info], dtype=np.float64)


class _TreeClassifier(ProbabilisticClassifier):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        self.num_features = int(meta.extra["numFeatures"])
        self.num_classes = int(meta.extra.get("numClasses", 2))
        self.check_thresholds()

    def raw2probability(self, raw: np.ndarray) -> np.ndarray:
        return normalize_counts(raw)


@register("org.apache.spark.ml.classification.DecisionTreeClassificationModel")
class DecisionTreeClassifier(_TreeClassifier):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.forest = Forest([_tree_nodes(meta)], self.num_classes)

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        return self.forest.stats[self.forest.leaves(x)[:, 0]]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forest.prediction[self.forest.leaves(x)[:, 0]]


@register("org.apache.spark.ml.classification.RandomForestClassificationModel")
class RandomForestClassifier(_TreeClassifier):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        trees, _ = _ensemble(meta)
        self.forest = Forest(trees, self.num_classes)

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        counts = self.forest.stats[self.forest.leaves(x)]  # (rows, trees, classes)
        total = counts.sum(axis=2, keepdims=True)
        votes = np.where(total != 0.0, counts / np.where(total != 0.0, total, 1.0), 0.0)
        return votes.sum(axis=1)


@register("org.apache.spark.ml.classification.GBTClassificationModel")
class GBTClassifier(_TreeClassifier):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        trees, self.weights = _ensemble(meta)
        self.forest = Forest(trees, 0)

    def _margin(self, x: np.ndarray) -> np.ndarray:
        return self.forest.prediction[self.forest.leaves(x)] @ self.weights

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        m = self._margin(x)
        return np.column_stack((-m, m))

    def raw2probability(self, raw: np.ndarray) -> np.ndarray:
        # LogLoss.computeProbability(raw0) = 1 / (1 + exp(-2 * raw0)); then 1 - p0
        p0 = 1.0 / (1.0 + np.exp(-2.0 * raw[:, 0]))
        return np.column_stack((p0, 1.0 - p0))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.thresholds is not None:
            return super().predict(x)
        return (self._margin(x) > 0.0).astype(np.float64)


class _TreeRegressor(Predictor):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        self.num_features = int(meta.extra["numFeatures"])


@register("org.apache.spark.ml.regression.DecisionTreeRegressionModel")
class DecisionTreeRegressor(_TreeRegressor):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.forest = Forest([_tree_nodes(meta)], 0)
        self.variance_col = meta.get("varianceCol", "")

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        out = super().output_types(types)
        if self.variance_col:
            out[self.variance_col] = DOUBLE
        return out

    def transform(self, frame: Frame) -> None:
        leaf = self.forest.leaves(self.features_of(frame))[:, 0]
        if self.prediction_col:
            frame[self.prediction_col] = self.forest.prediction[leaf]
        if self.variance_col:
            frame[self.variance_col] = self.forest.impurity[leaf]


@register("org.apache.spark.ml.regression.RandomForestRegressionModel")
class RandomForestRegressor(_TreeRegressor):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        trees, _ = _ensemble(meta)
        self.forest = Forest(trees, 0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forest.prediction[self.forest.leaves(x)].sum(axis=1) / len(self.forest.roots)


@register("org.apache.spark.ml.regression.GBTRegressionModel")
class GBTRegressor(_TreeRegressor):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        trees, self.weights = _ensemble(meta)
        self.forest = Forest(trees, 0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.forest.prediction[self.forest.leaves(x)] @ self.weights
