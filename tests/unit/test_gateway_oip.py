"""The gateway's OIP front door in one process: the edge codec's checks (hostile
tensors, Triton's binary extension, typed gRPC contents), held revisions in the
pipeline table, and the OIP REST paths on the real app with the stage calls faked."""

from __future__ import annotations

import gzip
import json
import struct

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from gateway.app import create
from gateway.codec import (
    InferRequest,
    check_inputs,
    check_raw,
    grpc_inputs,
    infer_response,
    json_data_to_raw,
    message_json,
    parse_infer_request,
)
from gateway.pipelines import PipelineTable, compile_pipeline
from gateway.settings import GatewaySettings
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.plan_proto import to_proto
from sluice.tensors import TensorError, TensorSpec, decode_bytes, encode_bytes
from sluice.v1 import pipeline_pb2
from tests.gateway_oip_server import oip_stub


def plan(name: str = "p", revision: int = 1) -> PipelinePlan:
    first = StagePlan(
        "rt/prep", "rt", "prep", "", "", 100,
        inputs=(TensorSpec("x", "FP64", (-1, 2)), TensorSpec("name", "BYTES", (-1,))),
        outputs=(TensorSpec("x2", "FP64", (-1, 2)), TensorSpec("upper", "BYTES", (-1,))),
    )
    second = StagePlan(
        "rt/post", "rt", "post", "", "", 100,
        inputs=(TensorSpec("y", "FP64", (-1, 2)), TensorSpec("label", "BYTES", (-1,))),
        outputs=(TensorSpec("y", "FP64", (-1, 2)), TensorSpec("label", "BYTES", (-1,))),
        bindings=(Binding("y", "x2"), Binding("label", "upper")),
    )
    return PipelinePlan(name, 0, "http", (first, second)).at_revision(revision)


def pipeline_set(*plans: PipelinePlan, full: bool = False, removed: tuple[str, ...] = (), version: str = "1"):
    return pipeline_pb2.PipelineSet(version=version, full=full, pipelines=[to_proto(p) for p in plans], removed=removed)


def bytes_raw(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# --- the codec


def test_json_request_numeric_nested_and_bytes():
    body = json.dumps({
        "id": "r1",
        "inputs": [
            {"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [[1, 2], [3.5, 4]]},
            {"name": "name", "shape": [2], "datatype": "BYTES", "data": ["a", "béta"]},
        ],
        "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "label"}],
    }).encode()
    request = parse_infer_request(body, None)
    assert request.id == "r1" and request.outputs == {"y": True, "label": False} and not request.binary_output
    datatype, shape, raw = request.inputs["x"]
    assert (datatype, shape) == ("FP64", [2, 2])
    np.testing.assert_array_equal(np.frombuffer(raw, "<f8"), [1, 2, 3.5, 4])
    assert list(decode_bytes(request.inputs["name"][2], [2])) == [b"a", "béta".encode()]


def test_binary_extension_request():
    x = np.arange(6, dtype="<f4")
    names = bytes_raw(b"one", b"", b"three")
    header = json.dumps({"inputs": [
        {"name": "x", "shape": [3, 2], "datatype": "FP32", "parameters": {"binary_data_size": x.nbytes}},
        {"name": "name", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": len(names)}},
    ], "parameters": {"binary_data_output": True}}).encode()
    request = parse_infer_request(header + x.tobytes() + names, len(header))
    assert request.binary_output and request.outputs is None
    assert request.inputs["x"] == ("FP32", [3, 2], x.tobytes())
    assert request.inputs["name"] == ("BYTES", [3], names)


@pytest.mark.parametrize(
    "body, header_length, message",
    [
        (b"{not json", None, "not valid JSON"),
        (b"[]", None, "JSON object"),
        (b'{"inputs": []}', None, "non-empty list"),
        (b'{"inputs": [{"shape": [1], "datatype": "FP64", "data": [1]}]}', None, "'name'"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FLOAT", "data": [1]}]}', None, "unknown datatype"),
        (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP64", "data": [1]}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "shape": "2", "datatype": "FP64", "data": [1]}]}', None, "shape"),
        (b'{"inputs": [{"name": "x", "shape": [1.5], "datatype": "FP64", "data": [1]}]}', None, "non-negative"),
        (b'{"inputs": [{"name": "x", "shape": [1000000000000], "datatype": "FP64", "data": [1]}]}', None, "do not fill"),
        (b'{"inputs": [{"name": "x", "shape": [3], "datatype": "FP64", "data": [1, 2]}]}', None, "do not fill"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": ["1", "2"]}]}', None, "numbers"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [1, null]}]}', None, "numbers"),
        (b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "data": [[1], [2, 3]]}]}', None, "data"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [300]}]}', None, "range"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]}', None, "integers"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]}', None, "true/false"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}', None, "strings"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}, '
         b'{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}]}', None, "twice"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64"}]}', None, "no 'data'"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}], "outputs": {}}', None, "'outputs'"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}], '
         b'"outputs": [{"name": "y", "parameters": {"classification": 2}}]}', None, "classification"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}], '
         b'"parameters": {"binary_data_output": "yes"}}', None, "true or false"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1]}]}', 500, "holds only"),
        # binary: (JSON header, binary data) whose sizes lie
        ((b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "parameters": {"binary_data_size": 16}}]}',
          b"\0" * 8), None, "runs past"),
        ((b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "parameters": {"binary_data_size": 8}}]}',
          b"\0" * 16), None, "belong to no input"),
        ((b'{"inputs": [{"name": "x", "shape": [2], "datatype": "FP64", "parameters": {"binary_data_size": 8}}]}',
          b"\0" * 8), None, "needs 16 bytes"),
        ((b'{"inputs": [{"name": "x", "shape": [4000000000, 4000000000], "datatype": "BYTES", '
          b'"parameters": {"binary_data_size": 8}}]}', b"\0" * 8), None, "at least"),
        ((b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", "data": [1], '
          b'"parameters": {"binary_data_size": 8}}]}', b"\0" * 8), None, "both"),
        (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP64", '
         b'"parameters": {"binary_data_size": -8}}]}', None, "non-negative"),
    ],
)
def test_hostile_requests_are_refused_with_a_reason(body, header_length, message):
    if isinstance(body, tuple):
        header, data = body
        body, header_length = header + data, len(header)
    with pytest.raises(TensorError, match=message):
        parse_infer_request(body, header_length)


def test_bytes_layout_checked_without_allocating():
    check_raw("s", "BYTES", [2], bytes_raw(b"ab", b"c"))
    for raw, message in (
        (bytes_raw(b"ab"), "at least"),
        (bytes_raw(b"ab", b"c")[:-1], "runs past"),
        (bytes_raw(b"ab", b"c") + b"x", "longer"),
        (struct.pack("<I", 2**32 - 1) + b"\0" * 4, "runs past"),
    ):
        with pytest.raises(TensorError, match=message):
            check_raw("s", "BYTES", [2], raw)
    with pytest.raises(TensorError, match="needs"):
        check_raw("x", "FP64", [2**40, 2**40], b"\0" * 8)


def test_grpc_typed_bytes_and_numbers_become_raw_as_the_runtimes_read_them():
    request = pb.ModelInferRequest(model_name="p")
    t = request.inputs.add(name="name", datatype="BYTES", shape=[2])
    t.contents.bytes_contents.extend([b"hello", b"w"])
    x = request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    x.contents.fp32_contents.extend([1.5, 2.5])
    inputs = grpc_inputs(request)
    assert inputs["name"] == ("BYTES", [2], bytes_raw(b"hello", b"w"))  # not object pointers
    assert inputs["x"] == ("FP32", [1, 2], np.array([1.5, 2.5], "<f4").tobytes())


@pytest.mark.parametrize("build, message", [
    (lambda r: (r.inputs.add(name="x", datatype="FP64", shape=[3]), r.raw_input_contents.append(b"\0" * 8)), "needs 24"),
    (lambda r: (r.inputs.add(name="x", datatype="FP64", shape=[-3]), r.raw_input_contents.append(b"")), "non-negative"),
    (lambda r: (r.inputs.add(name="x", datatype="FP64", shape=[2**62, 2**62]), r.raw_input_contents.append(b"")), "needs"),
    (lambda r: (r.inputs.add(name="x", datatype="NOPE", shape=[1]), r.raw_input_contents.append(b"\0")), "unknown datatype"),
    (lambda r: (r.inputs.add(name="x", datatype="FP64", shape=[1]), r.inputs.add(name="y", datatype="FP64", shape=[1]),
                r.raw_input_contents.append(b"\0" * 8)), "2 inputs"),
    (lambda r: r.inputs.add(name="x", datatype="BYTES", shape=[10**12]).contents.bytes_contents.append(b"a"), "do not fill"),
])
def test_grpc_hostile_inputs(build, message):
    request = pb.ModelInferRequest(model_name="p")
    build(request)
    with pytest.raises(TensorError, match=message):
        grpc_inputs(request)


def test_inputs_checked_against_the_pipeline():
    pipeline = compile_pipeline(plan(), 0)
    good = {"x": ("FP64", [1, 2], b"\0" * 16), "name": ("BYTES", [1], bytes_raw(b"a"))}
    assert check_inputs(pipeline, good) == 1
    for inputs, message in (
        ({"x": good["x"]}, "missing input 'name'"),
        ({**good, "z": good["x"]}, "no input 'z'"),
        ({**good, "x": ("FP32", [1, 2], b"\0" * 8)}, "must be FP64"),
        ({**good, "x": ("FP64", [2], b"\0" * 16)}, r"shape \[-1, 2\]"),
        ({**good, "x": ("FP64", [1, 3], b"\0" * 24)}, r"shape \[-1, 2\]"),
    ):
        with pytest.raises(TensorError, match=message):
            check_inputs(pipeline, inputs)


def test_response_json_binary_and_non_utf8_bytes():
    pipeline = compile_pipeline(plan(), 0)
    y = np.array([[1.0, 2.0]])
    outputs = {"y": ("FP64", [1, 2], y.tobytes()), "label": ("BYTES", [1], bytes_raw(b"ok"))}
    body, length = infer_response(pipeline, InferRequest("7", {}, None, False), outputs)
    assert length is None
    assert json.loads(body) == {"model_name": "p", "model_version": "1", "id": "7", "outputs": [
        {"name": "y", "datatype": "FP64", "shape": [1, 2], "data": [1.0, 2.0]},
        {"name": "label", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]}
    body, length = infer_response(pipeline, InferRequest(None, {}, {"y": True, "label": False}, False), outputs)
    header = json.loads(body[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16} and "data" not in header["outputs"][0]
    assert body[length:] == y.tobytes()
    body, length = infer_response(pipeline, InferRequest(None, {}, None, False), {"label": ("BYTES", [1], bytes_raw(b"\xff"))})
    assert json.loads(body[:length])["outputs"][0]["parameters"] == {"binary_data_size": 5}


def test_message_json_writes_tritons_shape():
    config = mc.ModelConfig(name="p", platform="sluice-pipeline")
    config.input.add(name="x", data_type=mc.TYPE_FP64, dims=[-1, 4])
    data = message_json(config)
    assert data["max_batch_size"] == 0 and data["input"] == [
        {"name": "x", "data_type": "TYPE_FP64", "format": "FORMAT_NONE", "dims": [-1, 4], "is_shape_tensor": False,
         "allow_ragged_batch": False, "optional": False, "is_non_linear_format_io": False}]
    assert "dynamic_batching" not in data and "version_policy" not in data


def test_json_data_range_and_kinds():
    assert json_data_to_raw("b", "BOOL", [2], [True, False]) == b"\x01\x00"
    assert json_data_to_raw("u", "UINT64", [1], [2**64 - 1]) == b"\xff" * 8
    assert json_data_to_raw("s", "BYTES", [1, 2], [["a", "b"]]) == encode_bytes(np.array([b"a", b"b"], dtype=object))


# --- held revisions


async def test_replaced_revision_is_held_while_it_drains():
    table = PipelineTable()
    table.apply(pipeline_set(plan("p", 1), full=True), 0)
    dropped = table.apply(pipeline_set(plan("p", 2), version="2"), 0)
    assert [p.key for p in dropped] == [("p", 1)]
    assert table.get("p").revision == 2 and table.get("p", "2").revision == 2
    assert table.get("p", "1").revision == 1
    assert [p.version for p in table.held("p")] == ["1", "2"]
    assert table.get("p", "3") is None
    await table.drain(dropped)
    assert table.get("p", "1") is None and [p.version for p in table.held("p")] == ["2"]
    dropped = table.apply(pipeline_set(version="3", removed=("p",)), 0)
    assert table.get("p", "2") is None and table.held("p") == []  # deleted: not served at any version
    await table.drain(dropped)
    assert not table._draining


# --- OIP REST on the real app, stage calls faked


class FakeStub:
    def __init__(self, batch: dict[str, int]):
        self.batch = batch

    async def ModelConfig(self, request, metadata=(), timeout=None):
        if request.name not in self.batch:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")
        return pb.ModelConfigResponse(config=mc.ModelConfig(name=request.name, max_batch_size=self.batch[request.name]))


@pytest.fixture
async def app(tmp_path):
    (tmp_path / "ca.pem").write_bytes(b"unused: the watch is never started here")
    settings = GatewaySettings(grpc_port=0, max_body_bytes=4096, xds_token="t", xds_ca_file=str(tmp_path / "ca.pem"))
    app, _ = create(settings)
    table = app.state.table
    table.apply(pipeline_set(plan("p", 1), full=True), 0)
    executor = app.state.executor

    async def run(pipeline, inputs):
        table.enter(pipeline)
        try:
            _, shape, raw = inputs["x"]
            names = decode_bytes(inputs["name"][2], inputs["name"][1])
            label = encode_bytes(np.array([n.upper() for n in names], dtype=object))
            y = (np.frombuffer(raw, "<f8") * 2).tobytes()
            return {"y": ("FP64", shape, y), "label": ("BYTES", inputs["name"][1], label)}
        finally:
            table.leave(pipeline)

    executor.run = run
    executor.stub = FakeStub({"prep": 0, "post": 8})
    yield app
    await executor.close()


@pytest.fixture
async def client(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


INFER = {"inputs": [
    {"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [1, 2, 3, 4]},
    {"name": "name", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]},
]}


async def test_rest_health_metadata_config(client):
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2")).json()["name"] == "sluice-gateway"
    metadata = (await client.get("/v2/models/p")).json()
    assert metadata == {"name": "p", "versions": ["1"], "platform": "sluice-pipeline",
                        "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 2]},
                                   {"name": "name", "datatype": "BYTES", "shape": [-1]}],
                        "outputs": [{"name": "y", "datatype": "FP64", "shape": [-1, 2]},
                                    {"name": "label", "datatype": "BYTES", "shape": [-1]}]}
    assert (await client.get("/v2/models/p/versions/1")).json() == metadata
    assert (await client.get("/v2/models/p/ready")).status_code == 200
    config = (await client.get("/v2/models/p/config")).json()
    assert config["max_batch_size"] == 8  # the smallest stage limit; dims leave out the batch dimension
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [("x", "TYPE_FP64", [2]), ("name", "TYPE_STRING", [])]
    assert config["parameters"]["sluice.stages"]["string_value"] == "rt/prep,rt/post"


async def test_rest_infer_json_binary_gzip_and_stats(client):
    response = await client.post("/v2/models/p/infer", json={**INFER, "id": "a"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json" and response.headers["x-sluice-revision"] == "1"
    assert response.json()["outputs"] == [
        {"name": "y", "datatype": "FP64", "shape": [2, 2], "data": [2.0, 4.0, 6.0, 8.0]},
        {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["A", "B"]}]
    binary = await client.post("/v2/models/p/versions/1/infer", json={**INFER, "outputs": [{"name": "y", "parameters": {"binary_data": True}}]})
    length = int(binary.headers["inference-header-content-length"])
    header = json.loads(binary.content[:length])
    assert [o["name"] for o in header["outputs"]] == ["y"]
    np.testing.assert_array_equal(np.frombuffer(binary.content[length:], "<f8"), [2, 4, 6, 8])
    zipped = await client.post("/v2/models/p/infer", content=gzip.compress(json.dumps(INFER).encode()), headers={"content-encoding": "gzip"})
    assert zipped.status_code == 200 and zipped.json()["outputs"][1]["data"] == ["A", "B"]
    assert (await client.post("/v2/models/p/infer", json={"inputs": [INFER["inputs"][0]]})).status_code == 400
    stats = (await client.get("/v2/models/p/stats")).json()["model_stats"][0]
    assert stats["name"] == "p" and stats["version"] == "1"
    assert stats["inference_count"] == 6 and stats["execution_count"] == 3
    assert stats["inference_stats"]["success"]["count"] == 3 and stats["inference_stats"]["fail"]["count"] == 1
    assert stats["inference_stats"]["compute_infer"]["ns"] > 0 and stats["last_inference"] > 0
    assert stats["inference_stats"]["queue"] == {"count": 3, "ns": 0}  # one at a time: none waited for a folded run
    assert (await client.get("/v2/models/stats")).json()["model_stats"][0]["name"] == "p"


async def test_rest_errors_are_oip_shaped(client):
    for method, path, status in (
        ("GET", "/v2/models/nope", 404),
        ("GET", "/v2/models/nope/ready", 404),
        ("GET", "/v2/models/p/versions/9", 404),
        ("POST", "/v2/models/nope/infer", 404),
        ("GET", "/v2/models/p/infer", 405),
        ("GET", "/v2/no/such/path", 404),
    ):
        response = await client.request(method, path)
        assert response.status_code == status, (path, response.text)
        assert isinstance(response.json()["error"], str), response.text
    version = (await client.get("/v2/models/p/versions/9/config")).json()["error"]
    assert "no version '9'" in version and "versions served: 1" in version
    too_big = await client.post("/v2/models/p/infer", content=b"x" * 5000)
    assert too_big.status_code == 413 and "4096" in too_big.json()["error"]
    bomb = await client.post("/v2/models/p/infer", content=gzip.compress(b" " * 100_000), headers={"content-encoding": "gzip"})
    assert bomb.status_code == 413 and "decompressed" in bomb.json()["error"]
    unknown = await client.post("/v2/models/p/infer", content=b"{}", headers={"content-encoding": "br"})
    assert unknown.status_code == 415
    lying = await client.post("/v2/models/p/infer", content=b'{"inputs": []}', headers={"inference-header-content-length": "99"})
    assert lying.status_code == 400 and "holds only" in lying.json()["error"]
    sign = await client.post("/v2/models/p/infer", content=b'{"inputs": []}', headers={"inference-header-content-length": "-1"})
    assert sign.status_code == 400
    # the project's shape stays on the other paths
    assert (await client.post("/serve/nope", json={})).json()["error"]["code"] == "not_found"


async def test_version_selects_a_held_revision(app, client):
    table = app.state.table
    dropped = table.apply(pipeline_set(plan("p", 2), version="2"), 0)
    assert (await client.get("/v2/models/p")).json()["versions"] == ["1", "2"]
    old = await client.post("/v2/models/p/versions/1/infer", json=INFER)
    assert old.status_code == 200 and old.json()["model_version"] == "1"
    assert (await client.post("/v2/models/p/infer", json=INFER)).json()["model_version"] == "2"
    index = (await client.post("/v2/repository/index")).json()
    assert [(m["name"], m["version"], m["state"]) for m in index] == [("p", "2", "READY"), ("p", "1", "UNLOADING")]
    assert [m["state"] for m in (await client.post("/v2/repository/index", json={"ready": True})).json()] == ["READY"]
    await table.drain(dropped)
    gone = await client.post("/v2/models/p/versions/1/infer", json=INFER)
    assert gone.status_code == 404 and "versions served: 2" in gone.json()["error"]


async def test_openapi_describes_the_v2_paths(app):
    spec = app.openapi()
    infer = spec["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["requestBody"]["content"]["application/json"]["schema"]["required"] == ["inputs"]
    assert {"200", "400", "404", "413"} <= set(infer["responses"])
    assert "/v2/models/{name}/versions/{version}/config" in spec["paths"]


# --- hostile tensors at the gateway's OIP gRPC entry point (a real grpc.aio server)


def _grpc_request(*inputs: tuple[str, str, list[int]], raw: list[bytes] | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="p")
    for name, datatype, shape in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.extend(raw or [])
    return request


X2 = np.array([[1.0, 2.0]]).tobytes()
NAME = bytes_raw(b"ann")


def _valid() -> pb.ModelInferRequest:
    return _grpc_request(("x", "FP64", [1, 2]), ("name", "BYTES", [1]), raw=[X2, NAME])


def _typed_bytes() -> pb.ModelInferRequest:
    request = _grpc_request(("x", "FP64", [2, 2]), ("name", "BYTES", [2]))
    request.inputs[0].contents.fp64_contents.extend([1.0, 2.0, 3.0, 4.0])
    request.inputs[1].contents.bytes_contents.extend([b"ann", b"bo"])
    return request


def _with_x(datatype: str, shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    return _grpc_request(("x", datatype, shape), ("name", "BYTES", [1]), raw=[raw, NAME])


def _typed_x(shape: list[int], values: list[float]) -> pb.ModelInferRequest:
    request = _grpc_request(("x", "FP64", shape), ("name", "BYTES", [1]))
    request.inputs[0].contents.fp64_contents.extend(values)
    request.inputs[1].contents.bytes_contents.append(b"ann")
    return request


def _typed_bytes_lying_count() -> pb.ModelInferRequest:
    request = _typed_x([1, 2], [1.0, 2.0])
    request.inputs[1].shape[:] = [10**12]  # one element sent, a trillion claimed
    return request


def _thousand_inputs() -> pb.ModelInferRequest:
    request = _valid()
    for i in range(1000):
        request.inputs.add(name=f"extra{i}", datatype="FP64", shape=[1])
        request.raw_input_contents.append(struct.pack("<d", i))
    return request


def _mixed() -> pb.ModelInferRequest:
    request = _valid()
    request.inputs[0].contents.fp64_contents.extend([1.0, 2.0])
    return request


GRPC_CASES = [
    # (id, request, None for a correct answer, else a regex the INVALID_ARGUMENT message matches)
    ("valid", _valid, None),
    ("typed-bytes", _typed_bytes, None),
    ("huge-shape", lambda: _with_x("FP64", [2**40, 2**40], b"\0" * 8), "needs"),
    ("int64-overflow", lambda: _with_x("FP64", [2**62, 2**62, 2**62], b"\0" * 8), "needs"),
    ("max-int64-dim", lambda: _with_x("FP64", [2**63 - 1, 2], b"\0" * 16), "needs"),
    ("zero-times-huge", lambda: _with_x("FP64", [0, 2**62], b""), r"shape \[-1, 2\]"),
    ("negative-dim", lambda: _with_x("FP64", [-1, 2], X2), "non-negative"),
    ("very-negative", lambda: _with_x("FP64", [-(2**63), 2], X2), "non-negative"),
    ("rank-65", lambda: _with_x("FP64", [1] * 65, b"\0" * 8), "at most 64"),
    ("unknown-datatype", lambda: _with_x("FP128", [1, 2], X2), "unknown datatype"),
    ("wrong-datatype", lambda: _with_x("FP32", [1, 2], np.array([[1, 2]], "<f4").tobytes()), "must be FP64"),
    ("raw-short", lambda: _with_x("FP64", [1, 2], X2[:-1]), "needs 16"),
    ("raw-long", lambda: _with_x("FP64", [1, 2], X2 + b"\0" * 8), "needs 16"),
    ("typed-too-few", lambda: _typed_x([2, 2], [1.0] * 3), "do not fill"),
    ("typed-huge-shape", lambda: _typed_x([2**40, 2**40], [1.0]), "do not fill"),
    ("typed-bytes-lying-count", _typed_bytes_lying_count, r"input 'name': 1 values do not fill shape \[1000000000000\]"),
    ("bytes-lying-length", lambda: _grpc_request(("x", "FP64", [1, 2]), ("name", "BYTES", [1]),
                                                  raw=[X2, struct.pack("<I", 2**32 - 1) + b"ab"]), "runs past the end"),
    ("raw-and-typed-mixed", _mixed, "cannot be mixed"),
    ("more-raw-than-inputs", lambda: _grpc_request(("x", "FP64", [1, 2]), raw=[X2, NAME]), "2 entries for 1 inputs"),
    ("thousand-inputs", _thousand_inputs, "no input 'extra"),
]


@pytest.fixture
async def grpc_stub(app):
    async with oip_stub(app, options=[("grpc.max_receive_message_length", 1 << 24)]) as stub:
        yield stub


@pytest.mark.parametrize("make, problem", [c[1:] for c in GRPC_CASES], ids=[c[0] for c in GRPC_CASES])
async def test_grpc_entry_point_answers_or_refuses_hostile_tensors_with_a_reason(grpc_stub, make, problem):
    """A correct answer or INVALID_ARGUMENT naming the problem, never INTERNAL or a crash;
    and the gateway still answers a valid request afterwards."""
    import re

    request = make()
    if problem is None:
        response = await grpc_stub.ModelInfer(request, timeout=10)
        names = {o.name: i for i, o in enumerate(response.outputs)}
        rows = list(response.outputs[names["label"]].shape)[0]
        labels = decode_bytes(response.raw_output_contents[names["label"]], [rows])
        sent = request.inputs[1].contents.bytes_contents or decode_bytes(request.raw_input_contents[1], [rows])
        assert [bytes(v) for v in labels] == [bytes(v).upper() for v in sent]  # the text itself, not object pointers
    else:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await grpc_stub.ModelInfer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
        assert re.search(problem, refused.value.details() or ""), refused.value.details()
    assert (await grpc_stub.ModelInfer(_valid(), timeout=10)).outputs
