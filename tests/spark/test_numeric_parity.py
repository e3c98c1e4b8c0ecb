"""Parity of the numeric feature transformers with real Spark (VectorAssembler ... PCA)."""

from __future__ import annotations

import numpy as np
import pytest
from pyspark.ml import Pipeline
from pyspark.ml.feature import (
    PCA,
    Binarizer,
    Bucketizer,
    MaxAbsScaler,
    MinMaxScaler,
    Normalizer,
    StandardScaler,
    VectorAssembler,
)
from pyspark.ml.linalg import Vectors

pytestmark = pytest.mark.spark

NAN, INF = float("nan"), float("inf")


def vector_rows(n: int = 10, k: int = 4, seed: int = 0) -> list[tuple]:
    """Random vectors with a constant column (index 2)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 3.0, size=(n, k))
    data[:, 2] = 1.5
    return [(Vectors.dense(row.tolist()),) for row in data]


def fit(df, *estimators):
    return Pipeline(stages=list(estimators)).fit(df).stages


def test_vector_assembler_mixes_scalars_and_vectors(parity):
    rows = [(1.0, Vectors.dense([2.0, 0.0]), 3), (0.0, Vectors.dense([0.0, 0.0]), -1), (-2.5, Vectors.dense([NAN, 1.0]), 0)]
    stage = VectorAssembler(inputCols=["a", "v", "b"], outputCol="out")
    got = parity.check([stage], rows, "a double, v vector, b int")
    assert got["out"].shape == (3, 4)


@pytest.mark.parametrize("mode", ["keep", "skip"])
def test_vector_assembler_nan_keep_and_skip(parity, mode):
    rows = [(1.0, 2.0), (NAN, 1.0), (3.0, NAN), (4.0, 5.0)]
    stage = VectorAssembler(inputCols=["a", "b"], outputCol="out", handleInvalid=mode)
    got = parity.check([stage], rows, "a double, b double")
    assert len(got.rows) == (4 if mode == "keep" else 2)


def test_vector_assembler_nan_error(parity):
    stage = VectorAssembler(inputCols=["a", "b"], outputCol="out")
    parity.check_rejected([stage], [(1.0, 2.0), (NAN, 1.0)], "a double, b double", match="Encountered NaN")


def test_scalers(parity):
    rows = vector_rows()
    df = parity.frame(rows, "v vector")
    stages = fit(
        df,
        *[
            StandardScaler(inputCol="v", outputCol=f"std_{m}_{s}", withMean=m, withStd=s)
            for m in (False, True)
            for s in (False, True)
        ],
        MinMaxScaler(inputCol="v", outputCol="minmax"),
        MinMaxScaler(inputCol="v", outputCol="minmax_wide", min=-3.0, max=7.0),
        MaxAbsScaler(inputCol="v", outputCol="maxabs"),
    )
    # new rows: outside the training range, NaN, zero vector
    probe = [(Vectors.dense([100.0, -100.0, 1.5, 0.0]),), (Vectors.dense([NAN, 1.0, 2.0, -INF]),), (Vectors.dense([0.0] * 4),)]
    got = parity.check(stages, rows + probe, "v vector")
    assert got["minmax"][1, 2] == 0.5  # constant column -> middle of [min, max]


def test_maxabs_scaler_zero_column(parity):
    rows = [(Vectors.dense([1.0, 0.0, -4.0]),), (Vectors.dense([-2.0, 0.0, 2.0]),)]
    stages = fit(parity.frame(rows, "v vector"), MaxAbsScaler(inputCol="v", outputCol="out"))
    parity.check(stages, rows + [(Vectors.dense([5.0, 3.0, NAN]),)], "v vector")


def test_normalizer_norms(parity):
    zero = (Vectors.dense([0.0] * 4),)
    rows = [zero] + vector_rows() + [(Vectors.dense([NAN, 1.0, 0.0, 2.0]),), (Vectors.dense([-1.0, INF, 0.0, 2.0]),)]
    stages = [Normalizer(inputCol="v", outputCol=f"p{i}", p=p) for i, p in enumerate((1.0, 2.0, 3.0, INF))]
    got = parity.check(stages, rows, "v vector")
    np.testing.assert_array_equal(got["p1"][0], np.zeros(4))  # a zero vector stays as it is


def test_binarizer_scalars_and_vectors(parity):
    rows = [(0.5, 1.0, Vectors.dense([0.0, 0.6, -1.0, NAN])), (NAN, -0.2, Vectors.dense([0.5, 0.49, -0.2, 3.0]))]
    stages = [
        Binarizer(inputCol="a", outputCol="a_bin", threshold=0.5),
        Binarizer(inputCols=["a", "b"], outputCols=["a_multi", "b_multi"], thresholds=[0.0, -0.5]),
        Binarizer(inputCol="v", outputCol="v_pos", threshold=0.5),
        Binarizer(inputCol="v", outputCol="v_neg", threshold=-0.5),
    ]
    parity.check(stages, rows, "a double, b double, v vector")


SPLITS = [-INF, -1.0, 0.0, 2.5, INF]


@pytest.mark.parametrize("mode", ["keep", "skip"])
def test_bucketizer_boundaries_and_nan(parity, mode):
    values = [-5.0, -1.0, -0.5, -0.0, 0.0, 2.5, 3.0, INF, -INF, NAN]
    rows = [(v, float(i)) for i, v in enumerate(values)]
    stages = [
        Bucketizer(inputCol="x", outputCol="bucket", splits=SPLITS, handleInvalid=mode),
        Bucketizer(
            inputCols=["x", "y"], outputCols=["bx", "by"], splitsArray=[SPLITS, [0.0, 3.0, 9.0]], handleInvalid=mode
        ),
    ]
    got = parity.check(stages, rows, "x double, y double")
    assert len(got.rows) == (len(values) if mode == "keep" else len(values) - 1)


def test_bucketizer_nan_error(parity):
    stage = Bucketizer(inputCol="x", outputCol="b", splits=SPLITS)
    parity.check_rejected([stage], [(1.0,), (NAN,)], "x double", match="Bucketizer encountered NaN")


def test_bucketizer_out_of_bounds_is_an_error_in_every_mode(parity):
    stage = Bucketizer(inputCol="x", outputCol="b", splits=[0.0, 1.0, 2.0], handleInvalid="keep")
    parity.check_rejected([stage], [(1.0,), (2.5,)], "x double", match="out of Bucketizer bounds")


def test_pca(parity):
    rows = vector_rows(n=12, k=5, seed=3)
    stages = fit(parity.frame(rows, "v vector"), PCA(inputCol="v", outputCol="pc", k=3))
    got = parity.check(stages, rows + [(Vectors.dense([NAN, 0, 0, 0, 1.0]),)], "v vector")
    assert got["pc"].shape == (13, 3)
