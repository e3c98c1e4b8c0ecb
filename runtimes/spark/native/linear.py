"""Linear models: LogisticRegression (binomial and multinomial) and LinearRegression."""

from __future__ import annotations

import numpy as np

from runtimes.spark.native.base import StageMeta
from runtimes.spark.native.persist import read_data_row, require_spark3, to_matrix, to_vector
from runtimes.spark.native.predictor import Predictor, ProbabilisticClassifier, softmax
from runtimes.spark.native.registry import register


@register("org.apache.spark.ml.classification.LogisticRegressionModel")
class LogisticRegression(ProbabilisticClassifier):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        data = read_data_row(meta)
        self.num_classes = int(data["numClasses"])
        self.num_features = int(data["numFeatures"])
        self.multinomial = bool(data["isMultinomial"])
        self.coef = to_matrix(data["coefficientMatrix"])  # (classes or 1, features)
        self.intercept = to_vector(data["interceptVector"])
        self.check_thresholds()
        if not self.multinomial:
            self.coef1, self.intercept1 = self.coef[0], float(self.intercept[0])
            t = self._binary_threshold()
            self.threshold = t
            self.raw_threshold = -np.inf if t == 0.0 else np.inf if t == 1.0 else float(np.log(t / (1.0 - t)))

    def _binary_threshold(self) -> float:
        # LogisticRegressionModel.getThreshold: thresholds, when set, win over threshold
        if self.thresholds is not None:
            t0, t1 = self.thresholds
            return float(1.0 / (1.0 + t0 / t1))
        return float(self.meta.get("threshold", 0.5))

    def _margin(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef1 + self.intercept1

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return x @ self.coef.T + self.intercept
        m = self._margin(x)
        return np.column_stack((-m, m))

    def raw2probability(self, raw: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return softmax(raw)
        p0 = 1.0 / (1.0 + np.exp(-raw[:, 0]))
        return np.column_stack((p0, 1.0 - p0))

    def raw2prediction(self, raw: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return super().raw2prediction(raw)
        return (raw[:, 1] > self.raw_threshold).astype(np.float64)

    def probability2prediction(self, prob: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return super().probability2prediction(prob)
        return (prob[:, 1] > self.threshold).astype(np.float64)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.multinomial:
            return super().predict(x)
        score = 1.0 / (1.0 + np.exp(-self._margin(x)))
        return (score > self.threshold).astype(np.float64)


@register("org.apache.spark.ml.regression.LinearRegressionModel")
class LinearRegression(Predictor):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        data = read_data_row(meta)
        self.coef = to_vector(data["coefficients"])
        self.intercept = float(data["intercept"])
        self.num_features = len(self.coef)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.coef + self.intercept
