"""The CPU fallback serves Triton-layout ONNX models as Triton would."""

from __future__ import annotations

import asyncio
import shutil

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_iris

from runtimes.sdk.model import ModelArtifact, ModelLoadError
from runtimes.triton.batching import BatchTooLargeError
from runtimes.triton.fallback import load
from runtimes.triton.settings import FallbackSettings
from sluice.tensors import TensorError

WAIT = 5.0
X, Y = load_iris(return_X_y=True)
FEATURES = X.astype(np.float32)


def direct(trained, name, feed):
    session = ort.InferenceSession(str(trained.root / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))


def copy_model(trained, name, tmp_path, edit=lambda text: text):
    """A copy of a generated model whose config.pbtxt went through ``edit``."""
    target = tmp_path / name
    shutil.copytree(trained.root / name, target)
    config = target / "config.pbtxt"
    config.write_text(edit(config.read_text()))
    return target


async def test_iris_matches_onnxruntime_and_scikit_learn(trained, load_model):
    model = load_model("iris_onnx")
    rows = FEATURES[::5]  # 30 rows, within max_batch_size 32
    out = await model.predict({"input": rows})
    reference = direct(trained, "iris_onnx", {"input": rows})
    np.testing.assert_array_equal(out["probabilities"], reference["probabilities"])
    np.testing.assert_allclose(out["probabilities"], trained.iris.predict_proba(X[::5]), atol=1e-5)
    assert out["label"].shape == (30, 1)  # config.pbtxt's dims [1], reshaped from the graph's [batch]
    np.testing.assert_array_equal(out["label"][:, 0], trained.iris.predict(X[::5]))


async def test_mlp_matches_onnxruntime_and_a_numpy_forward_pass(trained, train_triton, load_model):
    model = load_model("mlp")
    out = await model.predict({"input": FEATURES[:50]})
    np.testing.assert_array_equal(out["probabilities"], direct(trained, "mlp", {"input": FEATURES[:50]})["probabilities"])
    np.testing.assert_allclose(out["probabilities"], train_triton.forward(trained.mlp, FEATURES[:50]), atol=1e-5)
    np.testing.assert_allclose(out["probabilities"].sum(axis=1), 1.0, atol=1e-6)


async def test_risk_mlp_takes_fp64_probabilities(trained, train_triton, load_model):
    model = load_model("risk_mlp")
    p = np.linspace(0, 1, 11)
    probability = np.stack([1 - p, p], axis=1)
    out = await model.predict({"probability": probability})
    assert out["risk"].shape == (11, 1) and out["risk"].dtype == np.float32
    np.testing.assert_allclose(out["risk"], train_triton.forward(trained.risk_mlp, probability), atol=1e-5)


async def test_inputs_are_cast_to_the_declared_datatype(load_model):
    model = load_model("iris_onnx")
    as_fp64 = await model.predict({"input": X[:4]})
    as_fp32 = await model.predict({"input": FEATURES[:4]})
    np.testing.assert_array_equal(as_fp64["probabilities"], as_fp32["probabilities"])
    as_lists = await model.predict({"input": X[:4].tolist()})
    np.testing.assert_array_equal(as_lists["probabilities"], as_fp32["probabilities"])


async def test_signature_and_platform(load_model):
    model = load_model("mlp")
    expected = "onnxruntime-cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "onnxruntime-cpu"
    assert model.platform == expected
    assert [s.as_dict() for s in model.inputs] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert [s.as_dict() for s in model.outputs] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]


async def test_concurrent_predicts_run_as_fewer_batches(train_triton, trained, load_model):
    model = load_model("mlp", max_queue_delay_us=200_000)
    assert model.batcher.max_queue_delay_s == pytest.approx(0.2)  # the setting beats config.pbtxt
    requests = [FEATURES[i : i + 1 + i % 3] for i in range(16)]
    results = await asyncio.wait_for(asyncio.gather(*(model.predict({"input": r}) for r in requests)), WAIT)
    assert model.batches_run == 1
    assert model.batcher.batch_sizes == [sum(len(r) for r in requests)]
    for r, result in zip(requests, results):
        np.testing.assert_allclose(result["probabilities"], train_triton.forward(trained.mlp, r), atol=1e-5)


async def test_batching_switched_off_runs_each_request_alone(load_model):
    model = load_model("mlp", dynamic_batching=False)
    assert model.batcher is None
    await asyncio.wait_for(asyncio.gather(*(model.predict({"input": FEATURES[i : i + 1]}) for i in range(16))), WAIT)
    assert model.batches_run == 16


async def test_no_dynamic_batching_in_config_runs_each_request_alone(trained, tmp_path, load_model):
    def drop_batching(text):
        return text[: text.index("dynamic_batching {")]

    model = load_model("mlp", root=copy_model(trained, "mlp", tmp_path, drop_batching).parent)
    assert model.batcher is None
    await asyncio.wait_for(asyncio.gather(*(model.predict({"input": FEATURES[i : i + 1]}) for i in range(8))), WAIT)
    assert model.batches_run == 8
    with pytest.raises(BatchTooLargeError):  # max_batch_size still holds
        await model.predict({"input": np.zeros((65, 4), np.float32)})


async def test_max_batch_size_is_enforced(load_model):
    model = load_model("mlp")
    with pytest.raises(BatchTooLargeError, match="65 rows, more than max_batch_size 64"):
        await model.predict({"input": np.zeros((65, 4), np.float32)})
    assert model.batches_run == 0
    out = await model.predict({"input": np.zeros((64, 4), np.float32)})
    assert out["probabilities"].shape == (64, 3)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({}, "needs input"),
        ({"input": np.zeros((1, 4)), "extra": np.zeros(1)}, "has no input"),
        ({"input": np.zeros((2, 5))}, r"must have shape \[-1, 4\], got \[2, 5\]"),
        ({"input": np.zeros(4)}, r"got \[4\]"),
        ({"input": np.array([["a", "b", "c", "d"]])}, "cannot be read as FP32"),
    ],
)
async def test_bad_inputs_are_refused_with_the_reason(load_model, inputs, message):
    model = load_model("mlp")
    with pytest.raises(TensorError, match=message):
        await model.predict(inputs)
    assert model.batches_run == 0


async def test_a_failing_run_reaches_every_caller_of_the_batch(load_model):
    model = load_model("mlp")

    class Broken:
        def run(self, names, feed):
            raise RuntimeError("onnxruntime fell over")

    model._session = Broken()
    results = await asyncio.wait_for(
        asyncio.gather(*(model.predict({"input": FEATURES[i : i + 1]}) for i in range(4)), return_exceptions=True), WAIT
    )
    assert [str(r) for r in results] == ["onnxruntime fell over"] * 4
    assert model.batches_run == 1


async def test_a_version_directory_is_accepted_as_the_path(trained):
    model = load(ModelArtifact("mlp", "", trained.root / "mlp" / "1"), FallbackSettings())
    await model.close()
    assert model.output_specs["probabilities"].shape == (-1, 3)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t: t.replace('name: "input"', 'name: "features"'), "has no input 'features'"),
        (lambda t: t.replace("TYPE_FP32", "TYPE_FP64", 1), "FP64 in config.pbtxt but FP32 in the ONNX graph"),
        (lambda t: t.replace("dims: 4", "dims: 5"), r"shape \[-1, 5\] in config.pbtxt but \[-1, 4\] in the ONNX graph"),
        (lambda t: t.replace("onnxruntime_onnx", "tensorrt_plan"), "serve it from a real Triton"),
        (lambda t: t.replace("max_batch_size: 64", "max_batch_size: -1"), "max_batch_size must be >= 0"),
    ],
)
def test_a_config_that_does_not_fit_the_model_is_refused(trained, tmp_path, edit, message):
    path = copy_model(trained, "mlp", tmp_path, edit)
    with pytest.raises(ModelLoadError, match=message):
        load(ModelArtifact("mlp", "1", path), FallbackSettings())


def test_missing_files_are_load_errors(trained, tmp_path):
    with pytest.raises(ModelLoadError, match="no config.pbtxt"):
        load(ModelArtifact("mlp", "1", tmp_path), FallbackSettings())
    path = copy_model(trained, "mlp", tmp_path)
    with pytest.raises(ModelLoadError, match=r"no version 2; it has \[1\]"):
        load(ModelArtifact("mlp", "2", path), FallbackSettings())
    (path / "1" / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match="model.onnx does not exist"):
        load(ModelArtifact("mlp", "1", path), FallbackSettings())


def test_settings_from_the_environment():
    settings = FallbackSettings.from_env({"SLUICE_TRITON_DYNAMIC_BATCHING": "off", "SLUICE_TRITON_MAX_QUEUE_DELAY_US": "250"})
    assert settings == FallbackSettings(dynamic_batching=False, max_queue_delay_us=250, intra_op_threads=0)
    assert FallbackSettings.from_env({}) == FallbackSettings()
    with pytest.raises(ValueError, match="SLUICE_TRITON"):
        FallbackSettings.from_env({"SLUICE_TRITON_MAX_QUEUE_DELAY_US": "soon"})


@pytest.fixture
def echo_model(tmp_path):
    """A Triton-layout ONNX model that returns its BYTES input."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])],
        "echo",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 1])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["batch", 1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    (tmp_path / "echo" / "1").mkdir(parents=True)
    onnx.save(proto, tmp_path / "echo" / "1" / "model.onnx")
    (tmp_path / "echo" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx" max_batch_size: 8 '
        'input { name: "text" data_type: TYPE_STRING dims: 1 } output { name: "same" data_type: TYPE_STRING dims: 1 }'
    )
    return tmp_path / "echo"


async def test_bytes_reach_onnxruntime_as_text(echo_model, load_model):
    model = load_model("echo", root=echo_model.parent)
    assert model.inputs[0].datatype == "BYTES"
    out = await model.predict({"text": np.array([[b"caf\xc3\xa9"], [b"x"]], dtype=object)})
    assert out["same"].tolist() == [["café"], ["x"]]
    with pytest.raises(TensorError, match="cannot be read as BYTES"):
        await model.predict({"text": np.array([[b"\xff"]], dtype=object)})
