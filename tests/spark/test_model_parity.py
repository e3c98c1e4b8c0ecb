"""Parity of the predictors with real Spark: linear models, trees, naive Bayes."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml import Pipeline
from pyspark.ml.classification import (
    DecisionTreeClassifier,
    GBTClassifier,
    LogisticRegression,
    NaiveBayes,
    RandomForestClassifier,
)
from pyspark.ml.feature import StringIndexer, VectorAssembler
from pyspark.ml.linalg import Vectors
from pyspark.ml.regression import DecisionTreeRegressor, GBTRegressor, LinearRegression, RandomForestRegressor

pytestmark = pytest.mark.spark

NAN = float("nan")


def labelled(n: int, seed: int) -> list[tuple]:
    """(features, binary label, 3-class label, continuous target), deterministic."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    score = 1.5 * x[:, 0] - x[:, 1] + 0.5 * rng.normal(size=n)
    label3 = np.digitize(score, [-0.7, 0.7])
    target = 2.0 * x[:, 0] + x[:, 2] ** 2
    return [
        (Vectors.dense(x[i].tolist()), float(score[i] > 0), float(label3[i]), float(target[i])) for i in range(n)
    ]


SCHEMA = "f vector, label double, label3 double, target double"
PROBES = [(Vectors.dense([NAN, 0.0, 1.0]), 0.0, 0.0, 0.0), (Vectors.dense([40.0, -40.0, 0.0]), 0.0, 0.0, 0.0)]


@pytest.fixture(scope="module")
def rows():
    return labelled(60, seed=7)


def test_logistic_regression_binomial(parity, rows):
    df = parity.frame(rows, SCHEMA)
    model = LogisticRegression(featuresCol="f", regParam=0.01, maxIter=15).fit(df)  # few iterations: fast
    variants = [
        model,
        model.copy({model.threshold: 0.3, model.rawPredictionCol: "", model.probabilityCol: ""}),  # predict()
        model.copy({model.thresholds: [0.4, 0.6], model.rawPredictionCol: ""}),  # probability2prediction
        model.copy({model.threshold: 0.0}),
    ]
    for variant in variants:
        parity.check([variant], rows + PROBES, SCHEMA)


def test_logistic_regression_multinomial(parity, rows):
    df = parity.frame(rows, SCHEMA)
    model = LogisticRegression(featuresCol="f", labelCol="label3", family="multinomial", maxIter=15).fit(df)
    variants = [
        model,
        model.copy({model.thresholds: [0.5, 0.2, 0.0], model.rawPredictionCol: ""}),
        model.copy({model.thresholds: [0.5, 0.2, 0.3]}),  # raw2prediction through probabilities
        model.copy({model.rawPredictionCol: "", model.probabilityCol: ""}),
    ]
    for variant in variants:
        got = parity.check([variant], rows + PROBES, SCHEMA)
    assert set(got["prediction"][:-2]) == {0.0, 1.0, 2.0}


def test_linear_regression(parity, rows):
    model = LinearRegression(featuresCol="f", labelCol="target", regParam=0.1, solver="normal")
    stages = [model.fit(parity.frame(rows, SCHEMA))]
    parity.check(stages, rows + PROBES, SCHEMA)


def tree_rows(n: int, seed: int) -> list[tuple]:
    """Two continuous and two categorical features (5 and 3 categories)."""
    rng = np.random.default_rng(seed)
    cats1, cats2 = list("abcde"), ["x", "y", "z"]
    out = []
    for _ in range(n):
        x1, x2 = rng.normal(size=2)
        c1, c2 = rng.integers(5), rng.integers(3)
        label = float((x1 + (c1 in (1, 3)) - 0.3 * c2 + 0.2 * rng.normal()) > 0.5)
        label3 = float(min(2, max(0, int(x1 + c2))))
        target = 3.0 * x1 - x2 + 2.0 * (c1 == 4)
        out.append((float(x1), float(x2), cats1[c1], cats2[c2], label, label3, float(target)))
    return out


TREE_SCHEMA = "x1 double, x2 double, c1 string, c2 string, label double, label3 double, target double"


def test_trees_with_categorical_splits(parity):
    rows = tree_rows(80, seed=11)
    prep = [
        StringIndexer(inputCols=["c1", "c2"], outputCols=["i1", "i2"], handleInvalid="keep"),
        VectorAssembler(inputCols=["x1", "i1", "x2", "i2"], outputCol="f", handleInvalid="keep"),
    ]

    def outputs(prefix: str) -> dict:
        return {"predictionCol": f"{prefix}_pred", "rawPredictionCol": f"{prefix}_raw", "probabilityCol": f"{prefix}_prob"}

    predictors = [
        DecisionTreeClassifier(featuresCol="f", maxDepth=4, **outputs("dt")),
        RandomForestClassifier(featuresCol="f", numTrees=4, maxDepth=3, seed=1, **outputs("rf")),
        GBTClassifier(featuresCol="f", maxIter=3, maxDepth=2, seed=1, predictionCol="gbt_pred")
        .setRawPredictionCol("gbt_raw")
        .setProbabilityCol("gbt_prob"),
        RandomForestClassifier(featuresCol="f", labelCol="label3", numTrees=3, maxDepth=3, seed=2, **outputs("rf3")),
        DecisionTreeRegressor(featuresCol="f", labelCol="target", maxDepth=4, predictionCol="dtr", varianceCol="dtr_var"),
        RandomForestRegressor(featuresCol="f", labelCol="target", numTrees=3, maxDepth=3, seed=3, predictionCol="rfr"),
        GBTRegressor(featuresCol="f", labelCol="target", maxIter=3, maxDepth=2, seed=4, predictionCol="gbtr"),
    ]
    stages = Pipeline(stages=prep + predictors).fit(parity.frame(rows, TREE_SCHEMA)).stages
    probes = [
        (NAN, 0.0, "a", "x", 0.0, 0.0, 0.0),  # NaN goes right
        (0.3, NAN, "unseen", "z", 0.0, 0.0, 0.0),  # category index 5: outside every categorical split
        (0.5, 0.5, "e", "unseen", 0.0, 0.0, 0.0),
    ]
    parity.check(stages, rows + probes, TREE_SCHEMA)

    dt, rf = stages[2], stages[3]
    with_thresholds = [
        dt.copy({dt.thresholds: [0.3, 0.7], dt.rawPredictionCol: ""}),
        rf.copy({rf.thresholds: [0.6, 0.4]}),
    ]
    parity.check(stages[:2] + with_thresholds, rows + probes, TREE_SCHEMA)


def nb_rows() -> list[tuple]:
    rng = np.random.default_rng(5)
    out = []
    for i in range(40):
        label = float(i % 3)
        counts = rng.poisson(lam=[1 + label, 2.0, 3 - label, 0.5]).astype(float)
        binary = (counts > 1).astype(float)
        real = rng.normal(loc=label, scale=1.0 + label / 2, size=4)
        out.append((Vectors.dense(counts.tolist()), Vectors.dense(binary.tolist()), Vectors.dense(real.tolist()), label))
    return out


NB_SCHEMA = "counts vector, binary vector, real vector, label double"


def test_naive_bayes_model_types(parity):
    rows = nb_rows()

    def nb(model_type: str, features: str) -> NaiveBayes:
        return NaiveBayes(
            featuresCol=features,
            modelType=model_type,
            predictionCol=f"{model_type}_pred",
            rawPredictionCol=f"{model_type}_raw",
            probabilityCol=f"{model_type}_prob",
            smoothing=0.5,
        )

    estimators = [nb("multinomial", "counts"), nb("complement", "counts"), nb("bernoulli", "binary"), nb("gaussian", "real")]
    stages = Pipeline(stages=estimators).fit(parity.frame(rows, NB_SCHEMA)).stages
    zero = Vectors.dense([0.0] * 4)
    probe = [(zero, zero, Vectors.dense([NAN, 0.0, 0.0, 0.0]), 0.0), (Vectors.dense([50.0, 0, 0, 0]), zero, zero, 0.0)]
    parity.check(stages, rows + probe, NB_SCHEMA)
    multinomial = stages[0]
    parity.check([multinomial.copy({multinomial.thresholds: [0.2, 0.5, 0.3]})], rows, NB_SCHEMA)


@pytest.mark.parametrize(
    ("model_type", "column", "bad", "match"),
    [("multinomial", "counts", -1.0, "nonnegative"), ("bernoulli", "binary", 0.5, "0 or 1")],
)
def test_naive_bayes_rejects_invalid_features(parity, model_type, column, bad, match):
    rows = nb_rows()[:12]
    model = NaiveBayes(featuresCol=column, modelType=model_type).fit(parity.frame(rows, NB_SCHEMA))
    broken = list(rows[0])
    broken[0 if column == "counts" else 1] = Vectors.dense([1.0, bad, 0.0, 1.0])
    parity.check_rejected([model], rows + [tuple(broken)], NB_SCHEMA, match=match)
