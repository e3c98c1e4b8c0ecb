"""Hostile tensors at a runtime's OIP gRPC entry point: a correct answer or INVALID_ARGUMENT
naming the problem, never a crash, a MemoryError, INTERNAL or a huge allocation.

A real runtime (the SDK's ``InferenceService`` on a grpc.aio server, in-process) serves
iris_classifier from models/store; hand-built ``ModelInferRequest``s go through a raw
gRPC stub, and after each one the runtime must still answer a valid request.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
import time
import tracemalloc
from collections.abc import Callable

import grpc
import joblib
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from models.train_iris import iris_data
from runtimes.scikit.model import load as sklearn_load
from runtimes.sdk.model import ModelArtifact
from runtimes.sdk.models import ModelSet
from tests.runtime_server import served, stub_of
from sluice.tensors import TensorError, request_inputs

MODEL = "iris_classifier"
X, _ = iris_data()
ROWS = np.ascontiguousarray(X[:2], dtype=np.float64)  # iris_classifier reads features as they are


@pytest.fixture(scope="module")
def artifact(model_store) -> ModelArtifact:
    path = model_store / MODEL / "1"
    return ModelArtifact(MODEL, "1", path, json.loads((path / "model.json").read_text()))


@pytest.fixture(scope="module")
def estimator(artifact: ModelArtifact):
    return joblib.load(artifact.path / "model.joblib")


@contextlib.asynccontextmanager
async def serving(artifact: ModelArtifact, **options):
    async with served(ModelSet([sklearn_load(artifact)]), "hostile", **options) as address, stub_of(address) as stub:
        yield stub


def request(*inputs: tuple[str, str, list[int]], raw: list[bytes] | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    for name, datatype, shape in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.extend(raw or [])
    return req


def features(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    return request(("features", datatype, shape), raw=[raw])


def typed(datatype: str, shape: list[int], **contents) -> pb.ModelInferRequest:
    req = request(("features", datatype, shape))
    req.inputs[0].contents.CopyFrom(pb.InferTensorContents(**contents))
    return req


def prefixed(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def valid() -> pb.ModelInferRequest:
    return features("FP64", [2, 4], ROWS.tobytes())


def mixed() -> pb.ModelInferRequest:
    req = valid()
    req.inputs[0].contents.fp64_contents.extend(ROWS.reshape(-1).tolist())
    return req


def thousand_inputs(raw: bool) -> pb.ModelInferRequest:
    req = valid() if raw else typed("FP64", [2, 4], fp64_contents=ROWS.reshape(-1).tolist())
    for i in range(999):
        tensor = req.inputs.add(name=f"extra{i}", datatype="FP64", shape=[1])
        if raw:
            req.raw_input_contents.append(struct.pack("<d", i))
        else:
            tensor.contents.fp64_contents.append(float(i))
    return req


def duplicated() -> pb.ModelInferRequest:
    req = valid()
    req.inputs.add(name="features", datatype="FP64", shape=[1, 4])
    req.raw_input_contents.append(ROWS[:1].tobytes())
    return req


EIGHT = b"\x00" * 8

# (case id, request, None for a correct answer else a regex the INVALID_ARGUMENT message matches)
CASES: list[tuple[str, Callable[[], pb.ModelInferRequest], str | None]] = [
    # shapes
    ("huge-shape", lambda: features("FP64", [2**40, 2**40], EIGHT), r"holds more than \d+ elements"),
    ("int64-overflow", lambda: features("FP64", [2**62, 2**62, 2**62], EIGHT), r"holds more than \d+ elements"),
    ("wraps-to-zero", lambda: features("FP64", [2**32, 2**32], b""), r"holds more than \d+ elements"),
    ("max-int64-dim", lambda: features("FP64", [2**63 - 1, 1], EIGHT), r"holds more than \d+ elements"),
    ("zero-times-huge", lambda: features("FP64", [0, 2**62], b""), r"holds more than \d+ elements"),
    ("negative-batch", lambda: features("FP64", [-1, 4], ROWS.tobytes()), "negative dimension"),
    ("negative-inner", lambda: features("FP64", [2, -4], ROWS.tobytes()), "negative dimension"),
    ("very-negative", lambda: features("FP64", [-(2**63), -1], EIGHT), "negative dimension"),
    ("rank-40", lambda: features("FP64", [1] * 40, EIGHT), "40 dimensions"),
    ("scalar-shape", lambda: features("FP64", [], EIGHT), "must have rank 2"),
    ("scalar-no-bytes", lambda: features("FP64", [], b""), "needs 8 bytes, got 0"),
    ("wrong-inner-dim", lambda: features("FP64", [2, 5], b"\x00" * 80), r"must have shape \[-1, 4\], got \[2, 5\]"),
    ("empty-batch", lambda: features("FP64", [0, 4], b""), None),
    # datatypes
    ("unknown-datatype", lambda: features("FP128", [2, 4], ROWS.tobytes()), "unknown datatype 'FP128'"),
    ("lowercase-datatype", lambda: features("fp64", [2, 4], ROWS.tobytes()), "unknown datatype 'fp64'"),
    ("empty-datatype", lambda: features("", [2, 4], ROWS.tobytes()), "unknown datatype ''"),
    ("fp32-for-fp64", lambda: features("FP32", [2, 4], ROWS.astype(np.float32).tobytes()), None),
    ("bytes-for-fp64", lambda: features("BYTES", [2, 4], prefixed(*[b"1.5"] * 8)), "must be FP64, got BYTES"),
    ("typed-unknown-datatype", lambda: typed("COMPLEX", [1], fp64_contents=[1.0]), "unknown datatype 'COMPLEX'"),
    # raw contents of the wrong length
    ("raw-short", lambda: features("FP64", [2, 4], ROWS.tobytes()[:-1]), "needs 64 bytes, got 63"),
    ("raw-long", lambda: features("FP64", [2, 4], ROWS.tobytes() + EIGHT), "needs 64 bytes, got 72"),
    ("raw-empty", lambda: features("FP64", [2, 4], b""), "needs 64 bytes, got 0"),
    # typed contents whose count does not match
    ("typed-ok", lambda: typed("FP64", [2, 4], fp64_contents=ROWS.reshape(-1).tolist()), None),
    ("typed-too-few", lambda: typed("FP64", [2, 4], fp64_contents=[1.0] * 7), "7 values do not fill shape"),
    ("typed-too-many", lambda: typed("FP64", [2, 4], fp64_contents=[1.0] * 9), "9 values do not fill shape"),
    ("typed-wrong-field", lambda: typed("FP64", [2, 4], fp32_contents=[1.0] * 8), "0 values do not fill shape"),
    ("typed-two-fields", lambda: typed("FP64", [2, 4], fp64_contents=[1.0] * 8, int_contents=[1]), "not int_contents"),
    ("typed-huge", lambda: typed("FP64", [2**40, 2**40], fp64_contents=[1.0]), "1 values do not fill shape"),
    ("typed-zero-times-huge", lambda: typed("FP64", [0, 2**62]), r"holds more than \d+ elements"),
    ("typed-uint8-range", lambda: typed("UINT8", [2, 4], uint_contents=[300] * 8), "out of UINT8's range"),
    ("typed-int8-range", lambda: typed("INT8", [2, 4], int_contents=[-129] * 8), "out of INT8's range"),
    ("typed-int8", lambda: typed("INT8", [2, 4], int_contents=[1, 2, 3, 4, 5, 6, 7, 8]), None),
    ("typed-bytes-count", lambda: typed("BYTES", [2, 4], bytes_contents=[b"1"] * 3), "3 values do not fill shape"),
    ("typed-bytes-huge", lambda: typed("BYTES", [2**40], bytes_contents=[b"1"]), "1 values do not fill shape"),
    # BYTES raw contents with truncated or lying length prefixes
    ("bytes-lying-length", lambda: features("BYTES", [1], struct.pack("<I", 2**32 - 1) + b"ab"), "runs past the end"),
    ("bytes-truncated-element", lambda: features("BYTES", [1], prefixed(b"abcdef")[:-2]), "runs past the end"),
    ("bytes-truncated-prefix", lambda: features("BYTES", [1], b"\x01\x00"), "shorter than its shape says"),
    ("bytes-missing-element", lambda: features("BYTES", [2, 1], prefixed(b"ab") + b"\x00\x00"), "shorter than its shape"),
    ("bytes-huge-shape", lambda: features("BYTES", [2**20, 2**20], prefixed(b"x")), r"holds more than \d+ elements"),
    ("bytes-shape-beyond-data", lambda: features("BYTES", [1 << 20], prefixed(b"x")), "needs at least 4194304 bytes"),
    ("bytes-trailing", lambda: features("BYTES", [1], prefixed(b"a", b"b")), "longer than its shape says"),
    # raw and typed mixed, raw entries that do not match the inputs
    ("mixed-raw-and-typed", mixed, "cannot be mixed"),
    ("more-raw-than-inputs", lambda: request(("features", "FP64", [2, 4]), raw=[ROWS.tobytes(), EIGHT]),
     "one entry per input: 2 entries for 1"),
    ("fewer-raw-than-inputs", lambda: request(("features", "FP64", [2, 4]), ("other", "FP64", [1]), raw=[ROWS.tobytes()]),
     "one entry per input: 1 entries for 2"),
    ("raw-without-inputs", lambda: request(raw=[ROWS.tobytes()]), "one entry per input"),
    ("no-inputs", lambda: request(), "missing input 'features'"),
    ("duplicated-input", duplicated, "'features' is given twice"),
    # a thousand inputs: the model reads its own, the rest cost little
    ("thousand-raw-inputs", lambda: thousand_inputs(raw=True), None),
    ("thousand-typed-inputs", lambda: thousand_inputs(raw=False), None),
]


def check_answer(response: pb.ModelInferResponse, estimator, rows: np.ndarray) -> None:
    assert [o.name for o in response.outputs] == ["label", "probabilities"]
    probabilities = np.frombuffer(response.raw_output_contents[1], dtype="<f8").reshape(list(response.outputs[1].shape))
    if not len(rows):  # an empty batch: empty answers
        assert probabilities.shape == (0, 3) and list(response.outputs[0].shape) == [0]
        return
    np.testing.assert_allclose(probabilities, estimator.predict_proba(rows).reshape(probabilities.shape), rtol=1e-5)


@pytest.mark.parametrize("make, problem", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_hostile_request_is_answered_or_refused_with_a_reason(artifact, estimator, make, problem) -> None:
    async with serving(artifact) as stub:
        req = make()
        if problem is None:
            response = await stub.ModelInfer(req, timeout=10)
            got = request_inputs(req)["features"]
            check_answer(response, estimator, got.astype(np.float64).reshape(-1, 4))
        else:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            assert err.value.details().startswith(f"{MODEL}: ")
            assert re.search(problem, err.value.details()), err.value.details()
        # the runtime still serves
        check_answer(await stub.ModelInfer(valid(), timeout=10), estimator, ROWS)


async def test_huge_shape_with_eight_bytes_is_refused_at_once_without_allocating(artifact) -> None:
    async with serving(artifact) as stub:
        await stub.ModelInfer(valid(), timeout=10)  # warm up
        tracemalloc.start()
        try:
            started = time.perf_counter()
            for shape in ([2**40, 2**40], [2**62, 4], [0, 2**62]):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfer(features("FP64", shape, EIGHT), timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert elapsed < 2.0
        assert peak < 8 << 20, f"{peak} bytes allocated to refuse a hostile shape"


async def test_the_element_cap_is_the_runtimes_setting(artifact, estimator) -> None:
    async with serving(artifact, max_tensor_elements=8) as stub:
        check_answer(await stub.ModelInfer(valid(), timeout=10), estimator, ROWS)  # 8 elements: allowed
        rows = np.ascontiguousarray(X[:3], dtype=np.float64)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(features("FP64", [3, 4], rows.tobytes()), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "holds more than 8 elements" in err.value.details()
        # the cap is for all inputs together
        req = valid()
        req.inputs.add(name="extra", datatype="FP64", shape=[1])
        req.raw_input_contents.append(EIGHT)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ModelInfer(req, timeout=10)
        assert "input 'extra'" in err.value.details() and "more than 0 elements" in err.value.details()


def test_request_inputs_refuses_before_allocating() -> None:
    tracemalloc.start()
    try:
        for shape, raw in (([2**40, 2**40], EIGHT), ([2**31, 2**31, 4], b""), ([2**40], prefixed(b"x"))):
            datatype = "BYTES" if len(shape) == 1 else "FP64"
            with pytest.raises(TensorError, match="holds more than"):
                request_inputs(features(datatype, shape, raw))
        with pytest.raises(TensorError, match="needs at least 400 bytes"):
            request_inputs(features("BYTES", [100], prefixed(b"x")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
