"""Triton-layout models as pipeline stages: the triton runtime (CPU fallback) beside
scikit in one real mesh, answers compared with scikit-learn and onnxruntime in-process;
and a Triton-like server registered from outside by ``runtimes.triton.register``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import joblib
import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_iris

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.local.procs import Supervisor
from tests.conftest import ROOT, STORE, TRITON_REPOSITORY, eventually

pytestmark = pytest.mark.e2e
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
SCALED_CHAIN = ["scikit/iris_scaler", "triton/mlp_scaled"]
TTL_S = 3.0  # the manager's heartbeat TTL in this mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("triton-mesh"),
        [
            RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier")),
            RuntimeSpec("triton", "triton", ("iris_onnx", "mlp", "mlp_scaled")),
        ],
        MeshPorts.ephemeral(),
        env={"SLUICE_MANAGER_HEARTBEAT_TTL_S": str(TTL_S)},
    )
    with mesh:
        yield mesh


@pytest.fixture(scope="module")
def scaled(manager):
    response = manager.post("/api/v1/pipelines", json={"name": "scaled", "chain": SCALED_CHAIN})
    assert response.status_code == 201, response.text
    return response.json()


def onnx_run(model: str, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(str(TRITON_REPOSITORY / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def scaled_in_process(X: np.ndarray) -> np.ndarray:
    """iris_scaler (scikit-learn) then mlp_scaled (onnxruntime), in this process."""
    scaler = joblib.load(STORE / "iris_scaler" / "1" / "model.joblib")
    return onnx_run("mlp_scaled", {"features": scaler.transform(X)})[0]


def records(X: np.ndarray) -> list[dict]:
    return [dict(zip(FEATURES, map(float, row))) for row in X]


def test_runtime_reports_the_config_pbtxt_signatures(manager):
    runtime = manager.get("/api/v1/runtimes/triton").json()
    assert runtime["kind"] == "triton" and len(runtime["instances"]) == 1
    models = {m["name"]: m for m in runtime["models"]}
    assert set(models) == {"iris_onnx", "mlp", "mlp_scaled"}
    assert models["mlp_scaled"]["inputs"] == [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}]
    assert models["mlp_scaled"]["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}]
    assert models["mlp_scaled"]["platform"] == "onnxruntime-cpu" and models["mlp_scaled"]["versions"] == ["1"]
    # config.pbtxt's reshape: the graph's [batch] label is served as [batch, 1]
    assert {"name": "label", "datatype": "INT64", "shape": [-1, 1]} in models["iris_onnx"]["outputs"]


def test_scikit_then_triton_equals_in_process(scaled, gateway):
    X, y = load_iris(return_X_y=True)
    expected = scaled_in_process(X)
    got = []
    for chunk in np.array_split(X, 3):  # 50 rows each: within mlp_scaled's max_batch_size of 64
        response = gateway.post("/serve/scaled", json=records(chunk))
        assert response.status_code == 200, response.text
        got += [r["probabilities"] for r in response.json()]
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-6, atol=1e-7)
    assert (np.array(got).argmax(axis=1) == y).mean() > 0.95
    assert scaled["stages"][1]["bindings"] == {"features": "features"}


def test_triton_model_as_first_stage(manager, gateway):
    assert manager.post("/api/v1/pipelines", json={"name": "onnx-iris", "chain": ["triton/iris_onnx"]}).status_code == 201
    X = load_iris().data[::5].astype(np.float32)  # 30 rows
    response = gateway.post("/serve/onnx-iris", json=[{"input": row.tolist()} for row in X])
    assert response.status_code == 200, response.text
    label, probabilities = onnx_run("iris_onnx", {"input": X})
    answer = response.json()
    assert [r["label"] for r in answer] == label.reshape(-1, 1).tolist()
    np.testing.assert_allclose([r["probabilities"] for r in answer], probabilities, rtol=1e-6, atol=1e-7)


def test_more_rows_than_max_batch_size_is_a_422_naming_the_stage(scaled, gateway):
    response = gateway.post("/serve/scaled", json=records(load_iris().data))  # 150 rows > 64
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "stage_rejected_input"
    assert error["details"]["stage"] == 1 and error["details"]["stage_name"] == "triton/mlp_scaled"
    assert "150 rows, more than max_batch_size 64" in error["message"]
    # the runtime keeps serving
    assert gateway.post("/serve/scaled", json=records(load_iris().data[:64])).status_code == 200


def test_datatype_mismatch_with_a_triton_stage_is_refused(manager):
    # iris_scaler gives FP64 features; mlp wants FP32 "input": refused, nothing stored
    response = manager.post("/api/v1/pipelines", json={"name": "fp-mismatch", "chain": ["scikit/iris_scaler", "triton/mlp"]})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "signature_mismatch" and error["details"] == {"stage": 1, "tensor": "input"}
    assert "FP32" in error["message"] and "FP64" in error["message"]
    assert manager.get("/api/v1/pipelines/fp-mismatch").status_code == 404


async def test_concurrent_one_row_requests_each_get_their_own_row(mesh, scaled):
    X = load_iris().data
    rows = X[np.random.default_rng(7).choice(len(X), 48, replace=False)]
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10) as client:
        responses = await asyncio.gather(*(client.post("/serve/scaled", json=records(row[None])) for row in rows))
    assert [r.status_code for r in responses] == [200] * len(rows)
    got = np.array([r.json()[0]["probabilities"] for r in responses])
    np.testing.assert_allclose(got, scaled_in_process(rows), rtol=1e-6, atol=1e-7)


def test_register_helper_announces_an_outside_server_and_withdraws_it(mesh, manager, gateway, tmp_path):
    """The helper registers an OIP server it did not start (here the triton runtime's
    process, standing in for a real Triton) under a second name, heartbeats, and
    deregisters on SIGTERM. As in compose, the server has its own sidecar for that name
    (a runtime's name is its sidecar's mTLS identity) and is discovered on its own port."""
    public_port = mesh.front_runtime("triton-ext", mesh.runtime("triton").local_port)
    address = f"127.0.0.1:{public_port}"
    supervisor = Supervisor(tmp_path)
    argv = [sys.executable, "-m", "runtimes.triton.register", "--address", address,
            "--discover", f"127.0.0.1:{mesh.runtime('triton').local_port}",
            "--name", "triton-ext", "--models", "mlp", "--manager", mesh.manager_url]
    helper = supervisor.start("register", argv, cwd=ROOT)
    try:
        def registered() -> bool:
            response = manager.get("/api/v1/runtimes/triton-ext")
            return response.status_code == 200 and bool(response.json()["instances"])

        eventually(registered, timeout_s=15)
        registered_at = time.monotonic()
        runtime = manager.get("/api/v1/runtimes/triton-ext").json()
        assert runtime["kind"] == "triton" and [m["name"] for m in runtime["models"]] == ["mlp"]
        assert runtime["instances"][0]["port"] == public_port
        assert manager.post("/api/v1/pipelines", json={"name": "ext", "chain": ["triton-ext/mlp"]}).status_code == 201
        X = load_iris().data[:10].astype(np.float32)
        response = gateway.post("/serve/ext", json=[{"input": row.tolist()} for row in X])
        assert response.status_code == 200, response.text
        np.testing.assert_allclose([r["probabilities"] for r in response.json()], onnx_run("mlp", {"input": X})[0], rtol=1e-6, atol=1e-7)
        # past the manager's 3 s heartbeat TTL the instance is still there: the helper heartbeats
        time.sleep(max(0.0, registered_at + TTL_S + 1.0 - time.monotonic()))
        assert registered() and helper.alive()
        assert helper.log_tail().count("registered as") == 1  # never dropped and re-registered
    finally:
        supervisor.stop_all()
    assert helper.popen.returncode == 0, helper.log_tail()
    eventually(lambda: not manager.get("/api/v1/runtimes/triton-ext").json()["instances"], timeout_s=2)
    assert gateway.post("/serve/ext", json=[{"input": [5.1, 3.5, 1.4, 0.2]}]).status_code == 503
