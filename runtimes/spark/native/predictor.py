"""What regressors and classifiers share: the features column, and Spark's rules for
turning raw scores into probabilities and predictions.

``ProbabilisticClassifier.transform`` follows ``ProbabilisticClassificationModel.transform``
branch for branch: rawPrediction from the features; probability from the raw scores
when they are output (else from the features); prediction from the raw scores, else
from the probabilities, else from the model's own ``predict``. The branches give the
same numbers except at exact ties, which is why they are kept apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtimes.spark.native.base import DOUBLE, ColumnType, Frame, Stage, StageMeta, unsupported, vector


def spark_argmax(m: np.ndarray) -> np.ndarray:
    """Row-wise ``DenseVector.argmax``: first maximum, comparisons with NaN never win."""
    best = m[:, 0].copy()
    idx = np.zeros(m.shape[0], dtype=np.float64)
    for j in range(1, m.shape[1]):
        win = m[:, j] > best
        best = np.where(win, m[:, j], best)
        idx = np.where(win, float(j), idx)
    return idx


def softmax(raw: np.ndarray) -> np.ndarray:
    """Spark's ``Utils.softmax``: a +Inf score takes all the mass (the first one)."""
    # the running max starts at -Double.MaxValue and skips NaN
    top = np.fmax.reduce(raw, axis=1, initial=-np.finfo(np.float64).max)
    exp = np.exp(raw - top.reshape(-1, 1))
    prob = exp * (1.0 / exp.sum(axis=1)).reshape(-1, 1)
    inf = raw == np.inf
    if inf.any():
        rows = inf.any(axis=1)
        one_hot = np.zeros_like(raw)
        one_hot[np.nonzero(rows)[0], inf[rows].argmax(axis=1)] = 1.0
        prob = np.where(rows.reshape(-1, 1), one_hot, prob)
    return prob


def normalize_counts(raw: np.ndarray) -> np.ndarray:
    """``normalizeToProbabilitiesInPlace``: divide by the sum unless it is zero."""
    total = raw.sum(axis=1).reshape(-1, 1)
    return np.where(total != 0.0, raw / np.where(total != 0.0, total, 1.0), raw)


class Predictor(Stage):
    """featuresCol (a vector of ``num_features``) -> predictionCol."""

    num_features = -1

    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.features = meta.get("featuresCol", "features")
        self.reads = [self.features]
        self.prediction_col = meta.get("predictionCol", "prediction")
        if meta.get("leafCol"):
            raise unsupported(meta, "leafCol is not produced natively")

    def input_type(self, column: str) -> ColumnType:
        return vector(self.num_features)

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {self.prediction_col: DOUBLE} if self.prediction_col else {}

    def features_of(self, frame: Frame) -> np.ndarray:
        return frame.vector(self.features, self.num_features)

    def transform(self, frame: Frame) -> None:
        if self.prediction_col:
            frame[self.prediction_col] = self.predict(self.features_of(frame))

    def predict(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class ProbabilisticClassifier(Predictor):
    num_classes = 2

    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.raw_col = meta.get("rawPredictionCol", "rawPrediction")
        self.probability_col = meta.get("probabilityCol", "probability")
        thresholds = meta.get("thresholds")
        self.thresholds = np.asarray(thresholds, dtype=np.float64) if thresholds is not None else None

    def check_thresholds(self) -> None:
        if self.thresholds is not None and len(self.thresholds) != self.num_classes:
            raise unsupported(self.meta, f"{len(self.thresholds)} thresholds for {self.num_classes} classes")

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        out = {}
        if self.raw_col:
            out[self.raw_col] = vector(self.num_classes)
        if self.probability_col:
            out[self.probability_col] = vector(self.num_classes)
        return {**out, **super().output_types(types)}

    def transform(self, frame: Frame) -> None:
        if not (self.raw_col or self.probability_col or self.prediction_col):
            return
        x = self.features_of(frame)
        raw = prob = None
        if self.raw_col:
            raw = self.predict_raw(x)
            frame[self.raw_col] = raw
        if self.probability_col:
            prob = self.raw2probability(raw if raw is not None else self.predict_raw(x))
            frame[self.probability_col] = prob
        if self.prediction_col:
            if raw is not None:
                pred = self.raw2prediction(raw)
            elif prob is not None:
                pred = self.probability2prediction(prob)
            else:
                pred = self.predict(x)
            frame[self.prediction_col] = pred

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def raw2probability(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def raw2prediction(self, raw: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            return spark_argmax(raw)
        return self.probability2prediction(self.raw2probability(raw))

    def probability2prediction(self, prob: np.ndarray) -> np.ndarray:
        if self.thresholds is None:
            return spark_argmax(prob)
        t = self.thresholds
        return spark_argmax(np.where(t == 0.0, np.inf, prob / np.where(t == 0.0, 1.0, t)))

    def predict(self, x: np.ndarray) -> np.ndarray:
        # ClassificationModel.predict: raw2prediction(predictRaw(features))
        return self.raw2prediction(self.predict_raw(x))
