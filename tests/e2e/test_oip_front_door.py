"""The whole Open Inference Protocol at the gateway's front door, on a real mesh, with
clients nobody here wrote: ``tritonclient.http`` and ``tritonclient.grpc`` (health,
metadata, config, statistics, repository index, infer with numeric and BYTES inputs,
binary and JSON outputs, the same answers as ``/serve``), a KServe-docs-style JSON
body, and hostile requests that must get a clear 400 (INVALID_ARGUMENT), never a 5xx.

Pipelines: ``iris`` (scikit/iris_scaler -> scikit/iris_classifier: four FP64 columns
in, BYTES labels and FP64 probabilities out) and ``pm`` (the product-matching
featurizer scikit/pm_scikit: four BYTES columns in, FP64 features out).
"""

from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from models.listings import DEMO_RECORDS
from runtimes.scikit.transformers import COLUMNS
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec

pytestmark = pytest.mark.e2e
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
IRIS = ["scikit/iris_scaler", "scikit/iris_classifier"]
X = load_iris().data  # 150 x 4 FP64
# the KServe docs' V2 example, as a user would paste it (curl -d @iris-input-v2.json)
KSERVE_BODY = """{
  "inputs": [
    {"name": "sepal_length", "shape": [2], "datatype": "FP64", "data": [6.8, 6.0]},
    {"name": "sepal_width", "shape": [2], "datatype": "FP64", "data": [2.8, 3.4]},
    {"name": "petal_length", "shape": [2], "datatype": "FP64", "data": [4.8, 4.5]},
    {"name": "petal_width", "shape": [2], "datatype": "FP64", "data": [1.4, 1.6]}
  ]
}"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("oip"),
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier", "pm_scikit"))],
        MeshPorts.ephemeral(),
        env={"SLUICE_GATEWAY_MAX_BODY_BYTES": str(1 << 20)},
    )
    with mesh:
        for name, chain in (("iris", IRIS), ("pm", ["scikit/pm_scikit"])):
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "chain": chain}, timeout=10)
            assert created.status_code == 201, created.text
        yield mesh


@pytest.fixture(scope="module")
def address(mesh) -> str:
    return f"127.0.0.1:{mesh.ports.gateway}"


@pytest.fixture(scope="module")
def http_client(address):
    client = thttp.InferenceServerClient(address, network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(address):
    client = tgrpc.InferenceServerClient(address)
    yield client
    client.close()


def served(gateway: httpx.Client, pipeline: str, records: list[dict]) -> list[dict]:
    response = gateway.post(f"/serve/{pipeline}", json=records)
    assert response.status_code == 200, response.text
    return response.json()


def iris_inputs(module, binary: bool = True):
    inputs = []
    for i, name in enumerate(FEATURES):
        tensor = module.InferInput(name, [len(X)], "FP64")
        if module is thttp:
            tensor.set_data_from_numpy(X[:, i].copy(), binary_data=binary)
        else:
            tensor.set_data_from_numpy(X[:, i].copy())
        inputs.append(tensor)
    return inputs


def pm_inputs(module, binary: bool = True):
    inputs = []
    for column in COLUMNS:
        values = np.array([r[column].encode() for r in DEMO_RECORDS], dtype=object)
        tensor = module.InferInput(column, [len(values)], "BYTES")
        if module is thttp:
            tensor.set_data_from_numpy(values, binary_data=binary)
        else:
            tensor.set_data_from_numpy(values)
        inputs.append(tensor)
    return inputs


def check_iris(result, expected: list[dict]) -> None:
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").reshape(-1)]
    assert labels == [r["label"] for r in expected]
    np.testing.assert_array_equal(result.as_numpy("probabilities"), [r["probabilities"] for r in expected])


# --- tritonclient.http


def test_http_health_metadata_and_config(http_client):
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.is_model_ready("iris") and not http_client.is_model_ready("nope")
    assert http_client.is_model_ready("iris", "1") and not http_client.is_model_ready("iris", "7")
    server = http_client.get_server_metadata()
    assert server["name"] == "sluice-gateway" and "binary_tensor_data" in server["extensions"]
    metadata = http_client.get_model_metadata("iris")
    assert metadata["name"] == "iris" and metadata["versions"] == ["1"] and metadata["platform"] == "sluice-pipeline"
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [(f, "FP64", [-1]) for f in FEATURES]
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("label", "BYTES"), ("probabilities", "FP64")]
    config = http_client.get_model_config("iris")
    # the scikit runtime states no batch limit: max_batch_size 0, dims carry the rows dimension
    assert config["max_batch_size"] == 0 and config["platform"] == "sluice-pipeline"
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [(f, "TYPE_FP64", [-1]) for f in FEATURES]
    assert [(o["name"], o["data_type"], o["dims"]) for o in config["output"]] == [
        ("label", "TYPE_STRING", [-1]), ("probabilities", "TYPE_FP64", [-1, 3])]
    with pytest.raises(InferenceServerException, match="no pipeline 'nope'"):
        http_client.get_model_metadata("nope")


def test_http_infer_numeric_binary_and_json_equals_serve(http_client, gateway):
    expected = served(gateway, "iris", [dict(zip(FEATURES, map(float, row))) for row in X])
    # binary inputs, every output binary (tritonclient's default when no outputs are named)
    check_iris(http_client.infer("iris", iris_inputs(thttp)), expected)
    # JSON inputs, one output JSON and one binary
    outputs = [thttp.InferRequestedOutput("label", binary_data=False), thttp.InferRequestedOutput("probabilities", binary_data=True)]
    result = http_client.infer("iris", iris_inputs(thttp, binary=False), outputs=outputs, request_id="r-1")
    check_iris(result, expected)
    response = result.get_response()
    assert response["id"] == "r-1" and response["model_version"] == "1"
    label, probabilities = response["outputs"]
    assert label["data"][:2] == ["setosa", "setosa"] and probabilities["parameters"]["binary_data_size"] == 150 * 3 * 8
    # only the outputs asked for
    only = http_client.infer("iris", iris_inputs(thttp), outputs=[thttp.InferRequestedOutput("label", binary_data=False)])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["label"]


def test_http_infer_bytes_equals_serve(http_client, gateway):
    expected = served(gateway, "pm", DEMO_RECORDS)
    for binary in (True, False):
        result = http_client.infer("pm", pm_inputs(thttp, binary), outputs=[thttp.InferRequestedOutput("features", binary_data=not binary)])
        np.testing.assert_array_equal(result.as_numpy("features"), [r["features"] for r in expected])


def test_http_statistics_and_index(http_client):
    http_client.infer("iris", iris_inputs(thttp))
    stats = http_client.get_inference_statistics("iris")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("iris", "1")]
    assert stats[0]["inference_stats"]["success"]["count"] >= 1 and stats[0]["inference_count"] >= 150
    index = http_client.get_model_repository_index()
    assert {(m["name"], m["version"], m["state"]) for m in index} == {("iris", "1", "READY"), ("pm", "1", "READY")}


# --- tritonclient.grpc


def test_grpc_health_metadata_config_statistics_index(grpc_client):
    assert grpc_client.is_server_live() and grpc_client.is_server_ready() and grpc_client.is_model_ready("pm")
    assert "statistics" in grpc_client.get_server_metadata(as_json=True)["extensions"]
    metadata = grpc_client.get_model_metadata("pm", as_json=True)
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [(c, "BYTES") for c in COLUMNS]
    config = grpc_client.get_model_config("pm", as_json=True)["config"]
    assert [i["data_type"] for i in config["input"]] == ["TYPE_STRING"] * 4 and config["name"] == "pm"
    grpc_client.infer("pm", pm_inputs(tgrpc))
    stats = grpc_client.get_inference_statistics("pm", as_json=True)["model_stats"]
    assert stats[0]["name"] == "pm" and int(stats[0]["inference_stats"]["success"]["count"]) >= 1
    assert int(stats[0]["execution_count"]) >= 1 and int(stats[0]["inference_stats"]["compute_infer"]["ns"]) > 0
    everything = grpc_client.get_inference_statistics(as_json=True)["model_stats"]
    assert {s["name"] for s in everything} == {"iris", "pm"}
    index = grpc_client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["version"], m["state"]) for m in index} == {("iris", "1", "READY"), ("pm", "1", "READY")}
    with pytest.raises(InferenceServerException, match="no pipeline 'nope'") as caught:
        grpc_client.get_model_config("nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def test_grpc_infer_numeric_and_bytes_equals_serve(grpc_client, gateway):
    expected = served(gateway, "iris", [dict(zip(FEATURES, map(float, row))) for row in X])
    check_iris(grpc_client.infer("iris", iris_inputs(tgrpc)), expected)
    only = grpc_client.infer("iris", iris_inputs(tgrpc), outputs=[tgrpc.InferRequestedOutput("probabilities")])
    assert [o.name for o in only.get_response().outputs] == ["probabilities"]
    pm = served(gateway, "pm", DEMO_RECORDS)
    result = grpc_client.infer("pm", pm_inputs(tgrpc))
    np.testing.assert_array_equal(result.as_numpy("features"), [r["features"] for r in pm])


def test_grpc_typed_bytes_contents(address, gateway):
    """Typed BYTES (``bytes_contents``, no raw contents) are the same strings to the stage."""
    request = pb.ModelInferRequest(model_name="pm")
    for column in COLUMNS:
        tensor = request.inputs.add(name=column, datatype="BYTES", shape=[len(DEMO_RECORDS)])
        tensor.contents.bytes_contents.extend(r[column].encode() for r in DEMO_RECORDS)
    with grpc.insecure_channel(address) as channel:
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    features = np.frombuffer(response.raw_output_contents[0], "<f8").reshape(len(DEMO_RECORDS), -1)
    np.testing.assert_array_equal(features, [r["features"] for r in served(gateway, "pm", DEMO_RECORDS)])


def test_grpc_hostile_inputs_are_invalid_argument(address):
    def infer(build):
        request = pb.ModelInferRequest(model_name="iris")
        build(request)
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        return caught.value

    def wrong_length(r):
        for name in FEATURES:
            r.inputs.add(name=name, datatype="FP64", shape=[2])
            r.raw_input_contents.append(b"\0" * 8)

    def huge(r):
        for name in FEATURES:
            r.inputs.add(name=name, datatype="FP64", shape=[2**40, 2**40])
            r.raw_input_contents.append(b"\0" * 8)

    def wrong_datatype(r):
        for name in FEATURES:
            r.inputs.add(name=name, datatype="FP32", shape=[1])
            r.raw_input_contents.append(b"\0" * 4)

    for build, message in ((wrong_length, "needs 16 bytes"), (huge, "needs"), (wrong_datatype, "must be FP64")):
        error = infer(build)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()


# --- plain HTTP: the KServe docs' curl, errors, versions


def test_kserve_docs_style_json(gateway):
    for headers in ({"Content-Type": "application/json"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        response = gateway.post("/v2/models/iris/infer", content=KSERVE_BODY.encode(), headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        outputs = {o["name"]: o for o in response.json()["outputs"]}
        assert outputs["label"] == {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["versicolor", "versicolor"]}
        assert outputs["probabilities"]["shape"] == [2, 3] and len(outputs["probabilities"]["data"]) == 6
    assert gateway.get("/v2/health/ready").status_code == 200
    assert gateway.get("/v2/models/iris").json()["inputs"][0] == {"name": "sepal_length", "datatype": "FP64", "shape": [-1]}


def binary_body(header: dict, *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + b"".join(blobs), {"Inference-Header-Content-Length": str(len(text)), "Content-Type": "application/octet-stream"}


def test_hostile_http_requests_get_clear_400s(gateway):
    column = lambda name, **t: {"name": name, "datatype": "FP64", "shape": [1], **t}  # noqa: E731
    full = [column(f, data=[1.0]) for f in FEATURES]
    cases = {
        "shape mismatch": {"inputs": [{**full[0], "shape": [2]}, *full[1:]]},
        "datatype mismatch": {"inputs": [{**full[0], "datatype": "FP32"}, *full[1:]]},
        "unknown datatype": {"inputs": [{**full[0], "datatype": "DOUBLE"}, *full[1:]]},
        "huge shape": {"inputs": [{**full[0], "shape": [10**15]}, *full[1:]]},
        "rank": {"inputs": [{**full[0], "shape": [1, 1], "data": [[1.0]]}, *full[1:]]},
        "missing input": {"inputs": full[1:]},
        "unknown input": {"inputs": [*full, column("petal_colour", data=[1.0])]},
        "unknown output": {"inputs": full, "outputs": [{"name": "nope"}]},
        "strings as numbers": {"inputs": [{**full[0], "data": ["1.0"]}, *full[1:]]},
    }
    for what, body in cases.items():
        response = gateway.post("/v2/models/iris/infer", json=body)
        assert response.status_code == 400, (what, response.text)
        assert isinstance(response.json()["error"], str) and response.json()["error"], what
    sizes = [column(f, parameters={"binary_data_size": 8}) for f in FEATURES]
    for what, (body, headers) in {
        "short binary": binary_body({"inputs": sizes}, b"\0" * 24),
        "extra binary": binary_body({"inputs": sizes}, b"\0" * 40),
        "binary length vs shape": binary_body({"inputs": [{**sizes[0], "shape": [3]}, *sizes[1:]]}, b"\0" * 32),
    }.items():
        response = gateway.post("/v2/models/iris/infer", content=body, headers=headers)
        assert response.status_code == 400, (what, response.text)
    body, headers = binary_body({"inputs": sizes}, b"\0" * 32)
    for lie in (str(len(body) + 1), "-4", "ten", "3"):
        response = gateway.post("/v2/models/iris/infer", content=body, headers={**headers, "Inference-Header-Content-Length": lie})
        assert response.status_code == 400 and "error" in response.json(), (lie, response.text)
    assert gateway.post("/v2/models/iris/infer", content=body, headers=headers).status_code == 200
    too_big = gateway.post("/v2/models/iris/infer", content=b" " * ((1 << 20) + 1))
    assert too_big.status_code == 413 and isinstance(too_big.json()["error"], str)
    unknown = gateway.post("/v2/models/nope/infer", json={"inputs": full})
    assert unknown.status_code == 404 and unknown.json() == {"error": "no pipeline 'nope'"}


def test_versions_select_a_held_revision_else_404_naming_them(manager, gateway, grpc_client):
    created = manager.post("/api/v1/pipelines", json={"name": "iris-v", "chain": IRIS})
    assert created.status_code == 201, created.text
    stages = [{"runtime": "scikit", "model": "iris_scaler", "timeout_ms": 3000}, {"runtime": "scikit", "model": "iris_classifier"}]
    replaced = manager.put("/api/v1/pipelines/iris-v", json={"name": "iris-v", "stages": stages})  # a new revision
    assert replaced.status_code == 200, replaced.text
    revision = str(gateway.get("/v2/models/iris-v").json()["versions"][-1])
    assert revision != "1"
    ok = gateway.post(f"/v2/models/iris-v/versions/{revision}/infer", content=KSERVE_BODY.encode())
    assert ok.status_code == 200 and ok.json()["model_version"] == revision
    gone = gateway.post("/v2/models/iris-v/versions/1/infer", content=KSERVE_BODY.encode())
    assert gone.status_code == 404 and gone.json()["error"] == f"pipeline 'iris-v' has no version '1'; versions served: {revision}"
    with pytest.raises(InferenceServerException, match=f"versions served: {revision}") as caught:
        grpc_client.get_model_metadata("iris-v", "1")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert manager.delete("/api/v1/pipelines/iris-v").status_code == 204


# --- our runtimes answer ModelConfig and ModelStatistics too


def test_runtime_config_and_statistics(mesh, grpc_client):
    runtime = tgrpc.InferenceServerClient(f"127.0.0.1:{mesh.runtime('scikit').local_port}")
    try:
        config = runtime.get_model_config("iris_classifier", as_json=True)["config"]
        assert config["name"] == "iris_classifier" and config.get("max_batch_size", 0) == 0
        assert [(o["name"], o["data_type"]) for o in config["output"]] == [("label", "TYPE_STRING"), ("probabilities", "TYPE_FP64")]
        grpc_client.infer("iris", iris_inputs(tgrpc))
        stats = runtime.get_inference_statistics("iris_classifier", as_json=True)["model_stats"]
        assert stats[0]["name"] == "iris_classifier" and int(stats[0]["inference_stats"]["success"]["count"]) >= 1
        assert {s["name"] for s in runtime.get_inference_statistics(as_json=True)["model_stats"]} == {"iris_scaler", "iris_classifier", "pm_scikit"}
    finally:
        runtime.close()
