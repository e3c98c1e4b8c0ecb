"""NaiveBayes: multinomial, complement, bernoulli and gaussian models.

Raw scores are Spark's (log-space, the same formulas per model type), probabilities are
its softmax, and the input checks are its own: multinomial and complement need
non-negative features, bernoulli needs 0/1 features.
"""

from __future__ import annotations

import numpy as np

from runtimes.spark.native.base import InvalidInput, StageMeta, unsupported
from runtimes.spark.native.persist import read_data_row, require_spark3, to_matrix, to_vector
from runtimes.spark.native.predictor import ProbabilisticClassifier, softmax
from runtimes.spark.native.registry import register


@register("org.apache.spark.ml.classification.NaiveBayesModel")
class NaiveBayes(ProbabilisticClassifier):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        data = read_data_row(meta)
        self.pi = to_vector(data["pi"])
        self.theta = to_matrix(data["theta"])  # (classes, features)
        self.num_classes, self.num_features = self.theta.shape
        self.model_type = meta.get("modelType", "multinomial")
        self.check_thresholds()
        if self.model_type == "bernoulli":
            neg_theta = np.log1p(-np.exp(self.theta))
            self.weights = self.theta - neg_theta
            self.offset = self.pi + neg_theta.sum(axis=1)
        elif self.model_type == "gaussian":
            self.sigma = to_matrix(data["sigma"])
            self.log_var_sum = np.log(self.sigma).sum(axis=1)
        elif self.model_type not in ("multinomial", "complement"):
            raise unsupported(meta, f"modelType {self.model_type!r}")

    def predict_raw(self, x: np.ndarray) -> np.ndarray:
        if self.model_type == "gaussian":
            d = x[:, None, :] - self.theta[None, :, :]
            s = (d * d / self.sigma[None, :, :]).sum(axis=2)
            return self.pi - (s + self.log_var_sum) / 2.0
        if self.model_type == "bernoulli":
            if not ((x == 0.0) | (x == 1.0)).all():
                bad = x[~((x == 0.0) | (x == 1.0))][0]
                raise InvalidInput(f"Bernoulli naive Bayes requires 0 or 1 feature values but found {bad}.")
            return x @ self.weights.T + self.offset
        if not (x >= 0.0).all():
            raise InvalidInput(f"Naive Bayes requires nonnegative feature values but found {x[~(x >= 0.0)][0]}.")
        if self.model_type == "multinomial":
            return x @ self.theta.T + self.pi
        prob = x @ self.theta.T  # complement: minus the (stable) log-sum-exp
        top = prob.max(axis=1, keepdims=True)
        return prob - (np.log(np.exp(prob - top).sum(axis=1, keepdims=True)) + top)

    def raw2probability(self, raw: np.ndarray) -> np.ndarray:
        return softmax(raw)
