"""The iris pipeline through the real mesh: results, routing, the API's errors."""

from __future__ import annotations

import time

import httpx
import joblib
import numpy as np
import pytest
import tritonclient.grpc as triton
from sklearn.datasets import load_iris

from tests.conftest import STORE, eventually
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_records() -> tuple[list[dict], np.ndarray]:
    X = load_iris().data
    return [dict(zip(FEATURES, map(float, row))) for row in X], X


def in_process(X: np.ndarray) -> tuple[list[str], np.ndarray]:
    scaler = joblib.load(STORE / "iris_scaler" / "1" / "model.joblib")
    classifier = joblib.load(STORE / "iris_classifier" / "1" / "model.joblib")
    scaled = scaler.transform(X)
    return list(classifier.predict(scaled)), classifier.predict_proba(scaled)


def test_iris_equals_in_process_scikit_learn(iris, gateway):
    records, X = iris_records()
    response = gateway.post("/serve/iris", json=records)
    assert response.status_code == 200, response.text
    answer = response.json()
    labels, probabilities = in_process(X)
    assert [r["label"] for r in answer] == labels
    np.testing.assert_allclose([r["probabilities"] for r in answer], probabilities, rtol=0, atol=1e-12)
    assert set(labels) == {"setosa", "versicolor", "virginica"}


def test_api_v1_serve_is_the_same_endpoint(iris, gateway):
    record = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    a = gateway.post("/serve/iris", json=[record]).json()
    b = gateway.post("/api/v1/serve/iris", json=[record]).json()
    assert a == b and a[0]["label"] == "setosa"
    single = gateway.post("/serve/iris", json=record).json()
    assert single == a[0]


def test_routes_and_clusters_come_from_ads(iris, mesh):
    dump = httpx.get(f"{mesh.admin_url('gateway')}/config_dump", timeout=5).json()["configs"]
    by_type = {c["@type"].rsplit(".", 1)[-1]: c for c in dump}
    routes = by_type["RoutesConfigDump"]
    assert not routes.get("static_route_configs")
    assert [rc["route_config"]["name"] for rc in routes["dynamic_route_configs"]] == ["ingress"]
    # the stage routes live in the pipeline's own route scope on the egress, keyed by its name
    scopes = by_type["ScopedRoutesConfigDump"]["dynamic_scoped_route_configs"]
    (iris,) = [s for c in scopes for s in c["scoped_route_configs"] if s["key"]["fragments"][0]["string_key"] == "iris"]
    names = {r.get("name") for vh in iris["route_configuration"]["virtual_hosts"] for r in vh["routes"]}
    assert {"iris.r1.s0", "iris.r1.s1"} <= names
    clusters = by_type["ClustersConfigDump"]
    assert [c["cluster"]["name"] for c in clusters["static_clusters"]] == ["xds"]
    assert "runtime_scikit" in {c["cluster"]["name"] for c in clusters["dynamic_active_clusters"]}
    listeners = by_type["ListenersConfigDump"]
    assert not listeners.get("static_listeners")
    assert {l["name"] for l in listeners["dynamic_listeners"]} == {"ingress", "egress"}


def test_tritonclient_calls_the_runtime_directly(mesh, iris):
    runtime = mesh.runtime("scikit")
    # the process, then through its sidecar: mTLS, as the manager calls it (mesh CA, manager's identity)
    credentials, options = mesh.runtime_grpc_credentials("scikit", role="manager")
    for port, tls in ((runtime.local_port, {}), (runtime.public_port, {"creds": credentials, "channel_args": options})):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}", **tls)
        assert client.is_server_live() and client.is_model_ready("iris_scaler")
        metadata = client.get_model_metadata("iris_scaler", as_json=True)
        assert [i["name"] for i in metadata["inputs"]] == FEATURES
        inputs = []
        for name, value in zip(FEATURES, (5.1, 3.5, 1.4, 0.2)):
            tensor = triton.InferInput(name, [1], "FP64")
            tensor.set_data_from_numpy(np.array([value]))
            inputs.append(tensor)
        result = client.infer("iris_scaler", inputs)
        scaler = joblib.load(STORE / "iris_scaler" / "1" / "model.joblib")
        np.testing.assert_allclose(result.as_numpy("features"), scaler.transform([[5.1, 3.5, 1.4, 0.2]]))
        client.close()


def test_curl_style_form_content_type_is_read_as_json(manager):
    # curl -d '{...}' without -H declares a form body; the seed's commands rely on it working
    body = b'{"name":"curl-style","transportType":"http","chain":["scikit/iris_scaler","scikit/iris_classifier"]}'
    created = manager.post("/api/v1/pipelines", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert created.status_code == 201, created.text
    assert manager.delete("/api/v1/pipelines/curl-style").status_code == 204
    form = manager.post("/api/v1/pipelines", content=b"name=x&chain=y", headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 422


def test_pipeline_crud_and_errors(manager, gateway, iris):
    assert [p["name"] for p in manager.get("/api/v1/pipelines").json()] == ["iris"]
    assert manager.get("/api/v1/pipelines/iris").json()["stages"][1]["bindings"] == {"features": "features"}
    duplicate = manager.post("/api/v1/pipelines", json={"name": "iris", "chain": IRIS_CHAIN})
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "exists"
    missing = manager.get("/api/v1/pipelines/nope")
    assert missing.status_code == 404 and "nope" in missing.json()["error"]["message"]
    malformed = manager.post("/api/v1/pipelines", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 422 and "error" in malformed.json()
    no_chain = manager.post("/api/v1/pipelines", json={"name": "x"})
    assert no_chain.status_code == 422
    bad_entry = manager.post("/api/v1/pipelines", json={"name": "x", "chain": ["no-slash"]})
    assert bad_entry.status_code == 422 and "no-slash" in bad_entry.text
    unknown_runtime = manager.post("/api/v1/pipelines", json={"name": "x", "chain": ["spark/iris_scaler"]})
    assert unknown_runtime.status_code == 422
    assert unknown_runtime.json()["error"]["details"]["runtime"] == "spark"
    assert "unknown runtime 'spark'" in unknown_runtime.json()["error"]["message"]
    unknown_model = manager.post("/api/v1/pipelines", json={"name": "x", "chain": ["scikit/nope"]})
    assert unknown_model.status_code == 422 and "'nope'" in unknown_model.json()["error"]["message"]
    mismatch = manager.post("/api/v1/pipelines", json={"name": "x", "chain": ["scikit/iris_classifier", "scikit/iris_scaler"]})
    assert mismatch.status_code == 422
    error = mismatch.json()["error"]
    assert error["code"] == "signature_mismatch" and error["details"]["stage"] == 1
    assert error["details"]["tensor"] == "sepal_length"
    assert manager.get("/api/v1/pipelines/x").status_code == 404  # nothing half-made was stored


def test_serve_errors(gateway, iris):
    unknown = gateway.post("/serve/nope", json=[{}])
    assert unknown.status_code == 404 and unknown.json()["error"]["details"]["pipeline"] == "nope"
    bad_json = gateway.post("/serve/iris", content=b"[{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and "JSON" in bad_json.json()["error"]["message"]
    missing = gateway.post("/serve/iris", json=[{"sepal_length": 1.0}])
    assert missing.status_code == 422 and "sepal_width" in missing.json()["error"]["message"]
    wrong_type = gateway.post("/serve/iris", json=[{f: "x" for f in FEATURES}])
    assert wrong_type.status_code == 422
    empty = gateway.post("/serve/iris", json=[])
    assert empty.status_code == 422
    too_big = gateway.post("/serve/iris", content=b"[" + b" " * 70_000 + b"]", headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    assert gateway.post("/serve/iris", json=[dict(zip(FEATURES, (5.1, 3.5, 1.4, 0.2)))]).status_code == 200


def test_delete_answers_404_within_one_second(manager, gateway, iris):
    created = manager.post("/api/v1/pipelines", json={"name": "short-lived", "chain": IRIS_CHAIN})
    assert created.status_code == 201
    record = [dict(zip(FEATURES, (6.0, 2.9, 4.5, 1.5)))]
    assert gateway.post("/serve/short-lived", json=record).status_code == 200
    deleted_at = time.monotonic()
    assert manager.delete("/api/v1/pipelines/short-lived").status_code == 204
    eventually(lambda: gateway.post("/serve/short-lived", json=record).status_code == 404, timeout_s=1.0)
    assert time.monotonic() - deleted_at < 1.0
    assert manager.get("/api/v1/pipelines/short-lived").status_code == 404
    assert manager.delete("/api/v1/pipelines/short-lived").status_code == 404


def test_manager_healthz_reports_its_store_registry_and_xds_state(mesh, manager, iris):
    health = manager.get("/healthz")
    assert health.status_code == 200
    body = health.json()
    assert (body["status"], body["store"], body["registry"]) == ("ok", "ok", "ok")
    # manager, repository, the runtime and the gateway sidecars hold ADS streams; one gateway watches
    assert body["xds"]["nodes"] == 4 and body["xds"]["gateways"] == 1 and body["xds"]["lagging"] == []
