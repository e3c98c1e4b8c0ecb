"""One Zipkin trace per request, across every Envoy hop and stage, with the real
Zipkin server: for stages called one by one (``iris-apart``: its classifier stage has a
retry policy of its own, so fusion never joins it to the scaler) and for a fused run
(``iris``: both stages in one call, each with its own span inside the runtime's);
and serving that does not notice Zipkin going away.
"""

from __future__ import annotations

import httpx
import pytest

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.local.procs import free_port
from tests.conftest import eventually
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e
RECORD = [{"sepal_length": 5.9, "sepal_width": 3.0, "petal_length": 5.1, "petal_width": 1.8}]


@pytest.fixture(scope="module")
def traced_mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("traced"),
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        zipkin_port=free_port(),
    )
    with mesh:
        created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": IRIS_CHAIN}, timeout=10)
        assert created.status_code == 201, created.text
        apart = [{"runtime": "scikit", "model": "iris_scaler"},
                 {"runtime": "scikit", "model": "iris_classifier", "retries": {"attempts": 2, "on": ["unavailable"]}}]
        created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris-apart", "stages": apart}, timeout=10)
        assert created.status_code == 201, created.text
        yield mesh


def fetch_trace(mesh: LocalMesh, trace_id: str, expected_spans: int) -> list[dict]:
    spans: list[dict] = []

    def complete() -> bool:
        nonlocal spans
        response = httpx.get(f"{mesh.zipkin_url}/api/v2/trace/{trace_id}", timeout=5)
        spans = response.json() if response.status_code == 200 else []
        return len(spans) >= expected_spans

    # Envoy flushes its span buffer every 5 s; the services every 0.5 s
    eventually(complete, timeout_s=20, interval_s=0.25)
    return spans


def test_one_trace_holds_every_hop_and_stage(traced_mesh):
    response = httpx.post(f"{traced_mesh.gateway_url}/serve/iris-apart", json=RECORD, timeout=10)
    assert response.status_code == 200
    trace_id = response.headers["x-trace-id"]
    assert len(trace_id) == 32 and int(trace_id, 16)

    # gateway sidecar ingress, gateway server, and per stage: gateway client span,
    # gateway sidecar egress, runtime sidecar ingress, runtime server span
    spans = fetch_trace(traced_mesh, trace_id, expected_spans=2 + 2 * 4)
    assert {s["traceId"] for s in spans} == {trace_id}
    by_id = {s["id"]: s for s in spans}
    roots = [s for s in spans if "parentId" not in s]
    assert len(roots) == 1 and roots[0]["localEndpoint"]["serviceName"] == "gateway-sidecar"
    assert all(s["parentId"] in by_id for s in spans if "parentId" in s), "a span's parent is missing"

    def service(span: dict) -> str:
        return span["localEndpoint"]["serviceName"]

    def parent(span: dict) -> dict:
        return by_id[span["parentId"]]

    gateway_server = [s for s in spans if service(s) == "gateway" and s.get("kind") == "SERVER"]
    assert len(gateway_server) == 1 and parent(gateway_server[0]) is roots[0]
    assert gateway_server[0]["tags"]["sluice.pipeline"] == "iris-apart"

    runtime_spans = sorted((s for s in spans if service(s) == "scikit"), key=lambda s: s["timestamp"])
    assert [s["tags"]["sluice.model"] for s in runtime_spans] == ["iris_scaler", "iris_classifier"]
    for index, runtime_span in enumerate(runtime_spans):
        assert runtime_span["tags"]["sluice.stage"] == str(index)
        runtime_sidecar = parent(runtime_span)
        assert service(runtime_sidecar) == "scikit-sidecar"
        assert runtime_sidecar["tags"]["sluice.direction"] == "ingress"
        egress = parent(runtime_sidecar)
        assert service(egress) == "gateway-sidecar" and egress["tags"]["sluice.direction"] == "egress"
        assert egress["tags"]["sluice.model"] == runtime_span["tags"]["sluice.model"]
        stage = parent(egress)
        assert service(stage) == "gateway" and stage["tags"]["sluice.stage"] == str(index)
        assert stage["tags"]["sluice.model"] == runtime_span["tags"]["sluice.model"]
        assert parent(stage) is gateway_server[0]


def test_a_fused_run_is_one_call_with_a_span_per_stage_inside_the_runtime(traced_mesh):
    response = httpx.post(f"{traced_mesh.gateway_url}/serve/iris", json=RECORD, timeout=10)
    assert response.status_code == 200
    # gateway sidecar ingress, gateway server, its one call, egress, runtime sidecar,
    # the runtime's call span and, under it, one span per stage
    spans = fetch_trace(traced_mesh, response.headers["x-trace-id"], expected_spans=2 + 4 + 2)
    by_id = {s["id"]: s for s in spans}
    (call,) = [s for s in spans if s["localEndpoint"]["serviceName"] == "gateway" and s.get("kind") == "CLIENT"]
    assert call["tags"]["sluice.stage"] == "0+1" and call["tags"]["sluice.model"] == "iris_scaler+iris_classifier"
    stages = sorted((s for s in spans if s["tags"].get("sluice.fused") == "true" and s["localEndpoint"]["serviceName"] == "scikit"),
                    key=lambda s: s["timestamp"])
    assert [(s["tags"]["sluice.stage"], s["tags"]["sluice.model"]) for s in stages] == [("0", "iris_scaler"), ("1", "iris_classifier")]
    runtime_call = by_id[stages[0]["parentId"]]
    assert stages[1]["parentId"] == runtime_call["id"] and runtime_call.get("kind") == "SERVER"
    sidecar = by_id[runtime_call["parentId"]]
    assert sidecar["localEndpoint"]["serviceName"] == "scikit-sidecar"
    assert by_id[by_id[sidecar["parentId"]]["parentId"]] is call
    # each stage's span lies inside the runtime's call, the classifier after the scaler
    assert runtime_call["timestamp"] <= stages[0]["timestamp"] <= stages[1]["timestamp"]
    assert stages[1]["timestamp"] + stages[1]["duration"] <= runtime_call["timestamp"] + runtime_call["duration"] + 1


def test_serving_survives_zipkin_going_down(traced_mesh):
    url = f"{traced_mesh.gateway_url}/serve/iris"
    assert httpx.post(url, json=RECORD, timeout=10).status_code == 200
    traced_mesh.stop_zipkin()
    with httpx.Client(timeout=10) as client:
        statuses = [client.post(url, json=RECORD).status_code for _ in range(50)]
    assert statuses == [200] * 50
    # and after Envoy's span flush has hit the dead collector, still fine
    eventually(lambda: _collector_failed(traced_mesh), timeout_s=15, interval_s=0.25)
    assert httpx.post(url, json=RECORD, timeout=10).status_code == 200


def _collector_failed(mesh: LocalMesh) -> bool:
    stats = httpx.get(f"{mesh.admin_url('gateway')}/stats?filter=cluster.zipkin.upstream_cx_connect_fail", timeout=5).text
    return any(int(line.rsplit(":", 1)[1]) > 0 for line in stats.splitlines() if line.strip())
