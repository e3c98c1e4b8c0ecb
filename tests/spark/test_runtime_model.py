"""The Spark runtime's model layer: path choice, signatures, micro-batching, fallback."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import LogisticRegression
from pyspark.ml.feature import SQLTransformer, StringIndexer, Tokenizer, VectorAssembler, Word2Vec

from models.train_product_matching import train_pm_spark
from runtimes.sdk.model import ModelArtifact, ModelLoadError
from runtimes.spark.model import JVM, NATIVE, load
from sluice.tensors import TensorError, TensorSpec

pytestmark = [pytest.mark.spark, pytest.mark.asyncio(loop_scope="module")]


def artifact(path: Path, name: str = "m", **manifest) -> ModelArtifact:
    """The artifact as the SDK hands it over: files on disk, manifest already parsed."""
    return ModelArtifact(name=name, version="1", path=path, manifest={"framework": "spark", **manifest})


def save(model: PipelineModel, path: Path) -> Path:
    model.write().save(str(path / "pipeline"))
    return path


def pm_data(n: int = 80, k: int = 6, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, k))
    y = (x[:, 0] - 0.5 * x[:, 3] + 0.3 * rng.normal(size=n) > 0).astype(float)
    return x, y


@pytest.fixture(scope="module")
def pm_dir(spark, tmp_path_factory) -> Path:
    features, labels = pm_data()
    return train_pm_spark(features, labels, tmp_path_factory.mktemp("pm_spark"))


@pytest.fixture(scope="module")
def categorical_dir(spark, tmp_path_factory) -> Path:
    """StringIndexer(skip) -> VectorAssembler -> LogisticRegression, no signature in model.json."""
    rows = [("a" if i % 3 else "b", float(i % 5), float(i % 2)) for i in range(30)]
    df = spark.createDataFrame(rows, "cat string, x double, label double")
    model = Pipeline(
        stages=[
            StringIndexer(inputCol="cat", outputCol="ci", handleInvalid="skip"),
            VectorAssembler(inputCols=["ci", "x"], outputCol="f"),
            LogisticRegression(featuresCol="f", maxIter=10),
        ]
    ).fit(df)
    return save(model, tmp_path_factory.mktemp("categorical"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pm_jvm(pm_dir):
    model = load(artifact(pm_dir, "pm_spark", **{**json.loads((pm_dir / "model.json").read_text()), "execution": "spark"}))
    yield model
    await model.close()


async def test_product_matching_artifact_runs_the_same_on_both_paths(pm_dir, pm_jvm):
    manifest = json.loads((pm_dir / "model.json").read_text())
    native = load(ModelArtifact("pm_spark", "1", pm_dir, manifest))
    assert (native.platform, pm_jvm.platform) == (NATIVE, JVM)
    assert [s.as_dict() for s in native.inputs] == [{"name": "features", "datatype": "FP64", "shape": [-1, 6]}]
    assert [s.name for s in native.outputs] == ["prediction", "probability"]

    features, labels = pm_data(n=40, seed=2)
    got, expected = await native.predict({"features": features}), await pm_jvm.predict({"features": features})
    assert got["probability"].shape == (40, 2)
    np.testing.assert_allclose(got["probability"], expected["probability"], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(got["prediction"], expected["prediction"])
    assert (got["prediction"] == labels).mean() > 0.8  # it learned something


async def test_concurrent_jvm_predicts_are_micro_batched(pm_jvm):
    rng = np.random.default_rng(3)
    requests = [{"features": rng.normal(size=(n, 6))} for n in (1, 3, 2, 5, 1, 4, 2, 1)]
    alone = [await pm_jvm.predict(r) for r in requests]
    before = len(pm_jvm.batcher.batch_sizes)
    together = await asyncio.gather(*(pm_jvm.predict(r) for r in requests))
    assert pm_jvm.batcher.batch_sizes[before:] == [len(requests)]  # one Spark job for all
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a["prediction"], b["prediction"])
        np.testing.assert_allclose(a["probability"], b["probability"], rtol=1e-12)


async def test_derived_signature_and_skipped_rows_on_both_paths(categorical_dir):
    native = load(artifact(categorical_dir))
    jvm = load(artifact(categorical_dir, execution="spark"))
    try:
        expected_inputs = [TensorSpec("cat", "BYTES", (-1,)), TensorSpec("x", "FP64", (-1,))]
        assert native.inputs == jvm.inputs == expected_inputs
        names = ["rawPrediction", "probability", "prediction", "row_index"]
        assert [s.name for s in native.outputs] == [s.name for s in jvm.outputs] == names
        assert native.output_specs["probability"].shape == jvm.output_specs["probability"].shape == (-1, 2)

        batch = {"cat": np.array([b"a", b"zz", b"b", b"", b"a"], dtype=object), "x": np.arange(5.0)}
        got, expected = await native.predict(batch), await jvm.predict(batch)
        np.testing.assert_array_equal(got["row_index"], [0, 2, 4])  # unseen labels skipped
        for name in names:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-9, atol=1e-9)
    finally:
        await jvm.close()


async def test_bad_request_fails_alone_in_a_micro_batch(spark, tmp_path):
    rows = [("a", 0.0), ("b", 1.0), ("a", 0.0), ("b", 1.0)]
    df = spark.createDataFrame(rows, "cat string, label double")
    stages = [StringIndexer(inputCol="cat", outputCol="ci"), VectorAssembler(inputCols=["ci"], outputCol="f")]
    model = Pipeline(stages=[*stages, LogisticRegression(featuresCol="f", maxIter=5)]).fit(df)
    jvm = load(artifact(save(model, tmp_path), execution="spark"))
    try:
        good = {"cat": np.array([b"a", b"b"], dtype=object)}
        bad = {"cat": np.array([b"unseen"], dtype=object)}
        results = await asyncio.gather(jvm.predict(good), jvm.predict(bad), jvm.predict(good), return_exceptions=True)
        assert isinstance(results[1], TensorError) and "Unseen label: unseen" in str(results[1])
        np.testing.assert_array_equal(results[0]["prediction"], results[2]["prediction"])
        with pytest.raises(TensorError, match="missing"):
            await jvm.predict({})
    finally:
        await jvm.close()


async def test_unsupported_stage_falls_back_to_spark(spark, tmp_path):
    rows = [("the cat sat", 0.0), ("a dog ran", 1.0), ("the cat ran", 0.0), ("a dog sat", 1.0)] * 3
    df = spark.createDataFrame(rows, "text string, label double")
    model = Pipeline(
        stages=[
            Tokenizer(inputCol="text", outputCol="words"),
            Word2Vec(inputCol="words", outputCol="emb", vectorSize=3, minCount=1, seed=7, maxIter=1),
            LogisticRegression(featuresCol="emb", maxIter=5),
        ]
    ).fit(df)
    path = save(model, tmp_path)
    with pytest.raises(ModelLoadError, match="Word2Vec"):
        load(artifact(path, execution="native"))
    fallback = load(artifact(path))
    try:
        assert fallback.platform == JVM
        assert fallback.inputs == [TensorSpec("text", "BYTES", (-1,))]  # typed by the Tokenizer that reads it
        got = await fallback.predict({"text": np.array([b"the cat sat", b"a dog ran"], dtype=object)})
        expected = model.transform(spark.createDataFrame([(t,) for t in ("the cat sat", "a dog ran")], "text string"))
        expected = [r["probability"].toArray() for r in expected.select("probability").collect()]
        np.testing.assert_allclose(got["probability"], np.array(expected), rtol=1e-12)
    finally:
        await fallback.close()


async def test_sql_transformer_needs_declared_inputs(spark, tmp_path):
    rows = [(float(i), float(i % 2)) for i in range(10)]
    df = spark.createDataFrame(rows, "x double, label double")
    model = Pipeline(
        stages=[
            SQLTransformer(statement="SELECT *, x * x AS x2 FROM __THIS__"),
            VectorAssembler(inputCols=["x", "x2"], outputCol="features"),
            LogisticRegression(maxIter=5),
        ]
    ).fit(df)
    path = save(model, tmp_path)
    with pytest.raises(ModelLoadError, match="declare inputs"):
        load(artifact(path))
    declared = load(artifact(path, inputs=[{"name": "x", "datatype": "FP64", "shape": [-1]}]))
    try:
        assert declared.platform == JVM
        assert [s.name for s in declared.outputs] == ["rawPrediction", "probability", "prediction"]
        got = await declared.predict({"x": np.array([0.0, 3.0])})
        assert got["prediction"].shape == (2,) and got["probability"].shape == (2, 2)
    finally:
        await declared.close()


async def test_vector_input_feeds_a_vector_assembler(spark, tmp_path):
    from pyspark.ml.linalg import Vectors

    rows = [(Vectors.dense([float(i), 1.0 - i]), float(i % 3), float(i % 2)) for i in range(12)]
    df = spark.createDataFrame(rows, ["v", "x", "label"])
    model = Pipeline(stages=[VectorAssembler(inputCols=["v", "x"], outputCol="features"), LogisticRegression(maxIter=5)])
    path = save(model.fit(df), tmp_path)
    inputs = [{"name": "v", "datatype": "FP64", "shape": [-1, 2]}, {"name": "x", "datatype": "FP64", "shape": [-1]}]
    native, jvm = load(artifact(path, inputs=inputs)), load(artifact(path, inputs=inputs, execution="spark"))
    try:
        batch = {"v": np.array([[1.0, 2.0], [0.5, -1.0]]), "x": np.array([2.0, 0.0])}
        got, expected = await native.predict(batch), await jvm.predict(batch)
        assert native.platform == NATIVE
        np.testing.assert_allclose(got["probability"], expected["probability"], rtol=1e-9)
        with pytest.raises(TensorError, match="shape"):
            await native.predict({"v": np.zeros((2, 3)), "x": np.zeros(2)})
    finally:
        await jvm.close()
