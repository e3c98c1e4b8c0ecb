"""Real crashes under load: each test SIGKILLs one process of a running mesh (real
processes, real Envoys) while 8 client threads send requests through the gateway and
count every answer (bench/load.py), then restarts it and checks what the clients saw.

Two meshes: ``mesh`` (tests/e2e/conftest.py: one instance of everything, dev mode) and
``replicated`` (two scikit runtime processes, each with its sidecar, behind one Envoy
cluster; two gateway processes behind the gateway's sidecar; secure mode, so the
clients carry a ``serve:*`` token). The scenarios are bench/faults.py's, which prints
the same runs as a table. Every process is stopped by PID by the mesh fixtures.
"""

from __future__ import annotations

import threading

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc

from bench.faults import (
    RECORDS, create_iris, fault_mesh, gateway_killed, manager_killed, only_replica_killed, replica_killed,
    serve_headers,
)
from sluice.local.healer import Healer
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def replicated(tmp_path_factory, model_store):
    with fault_mesh(tmp_path_factory.mktemp("replicated"), replicas=2, secure=True) as mesh:
        create_iris(mesh)
        mesh.serve_headers = serve_headers(mesh)
        yield mesh


def healer_for(mesh) -> Healer:
    messages: list[str] = []
    healer = Healer(mesh, report=messages.append, initial_s=0.2, poll_s=0.05)
    healer.messages = messages
    return healer


def failures(run) -> list[str]:
    return [f"{a.status} {a.failure}" for a in run.failed]


# --- one instance of everything (conftest's mesh) ------------------------------------------------


def test_only_replica_killed_fails_fast_with_503_naming_the_stage_and_serving_resumes_after_restart(mesh, iris):
    with healer_for(mesh) as healer:
        run = only_replica_killed(mesh, {}, "runtime-scikit", healer)
    assert [r["key"] for r in healer.restarts] == ["runtime-scikit"]
    failed = run.failed
    assert failed, "the SIGKILL of the only replica failed no request"
    # every failure is a quick 503 whose JSON error names the failing stage: no hang, no transport error
    assert all(a.status == 503 for a in failed), failures(run)[:5]
    assert max(a.latency_s for a in failed) < 1.0, sorted(a.latency_s for a in failed)[-5:]
    for answer in failed:  # both stages run on the killed runtime: a request fails at either
        error = httpx.Response(503, content=answer.failure.encode()).json()["error"]
        stage = error["details"]["stage"]
        assert error["code"] == "stage_unavailable" and error["details"]["pipeline"] == "iris", error
        assert error["details"]["stage_name"] == IRIS_CHAIN[stage] and f"stage {stage} ({IRIS_CHAIN[stage]})" in error["message"], error
    # the outage is bounded by the restart: requests sent 2 s after it all succeed, the first within 2 s
    assert run.resumed_s() < 2.0, run.resumed_s()
    assert run.load.failures(since=run.recovered_at + 2.0) == []


def test_only_gateway_killed_in_flight_may_fail_new_requests_succeed_within_2s_of_restart(mesh, iris):
    run = gateway_killed(mesh, {}, "gateway", healer=None)
    # while it was down its sidecar answered 503 at once (nothing hung)
    during = run.load.failures(run.fault_at, run.recovered_at)
    assert during and all(a.status in (502, 503) for a in during), [f for f in failures(run) if not f.startswith("503 upstream")][:5]
    assert max(a.latency_s for a in during) < 1.0, sorted((round(a.latency_s, 3), a.failure[:80]) for a in during)[-5:]
    assert run.resumed_s() < 2.0, run.resumed_s()
    assert run.load.failures(since=run.recovered_at + 2.0) == []
    assert run.notes["serving_again_s"] < 2.0


# --- two replicas of the runtime and of the gateway, secure mode -----------------------------


def test_one_of_two_runtime_replicas_killed_mid_request_loses_no_request_and_comes_back(replicated):
    run = replica_killed(replicated, replicated.serve_headers)
    assert failures(run) == []
    assert len(run.load.answers) > 200
    notes = run.notes
    assert notes["requests_open_at_kill"] > 0  # the SIGKILL landed while its sidecar had requests open to it
    assert notes["envoy_retries"] > 0  # calls that met the dead replica were retried on the other
    assert notes["ejections"] >= 1  # outlier detection ejected it
    assert notes["left_registry_s"] < 10  # its heartbeats stopped: the registry dropped it (TTL 3 s)
    # restarted, it registered again and its new process answers stage calls
    assert len(replicated.instances("scikit")) == 2 and all(replicated.procs[k].alive() for k in replicated.instances("scikit"))


def test_manager_killed_loses_no_request_and_keeps_pipelines_runtimes_tokens(replicated):
    admin = httpx.Client(base_url=replicated.manager_url, headers=replicated.admin_headers, timeout=10)
    before = (admin.get("/api/v1/pipelines").json(), admin.get("/api/v1/runtimes").json(), admin.get("/api/v1/tokens").json())
    run = manager_killed(replicated, replicated.serve_headers)
    assert failures(run) == []
    assert len(run.load.window(run.fault_at, run.recovered_at)) > 50  # served while the manager was down
    after = (admin.get("/api/v1/pipelines").json(), admin.get("/api/v1/runtimes").json(), admin.get("/api/v1/tokens").json())
    assert after[0] == before[0]
    assert _instances(after[1]) == _instances(before[1])  # the same registered instances, all healthy
    assert after[2] == before[2]
    # every Envoy reconnected (awaited in the scenario) and still routes the pipeline's stages
    dump = httpx.get(f"{replicated.admin_url('gateway')}/config_dump?resource=dynamic_scoped_route_configs", timeout=5).json()
    assert "egress.iris" in {s["name"] for c in dump["configs"] for s in c.get("scoped_route_configs", [])}
    admin.close()


def _instances(runtimes: list[dict]) -> dict[str, set[tuple[int, bool]]]:
    return {r["name"]: {(i["port"], i["healthy"]) for i in r["instances"]} for r in runtimes}


class GrpcLoad:
    """Two more clients on the gateway's OIP gRPC API (tritonclient), counting answers."""

    def __init__(self, mesh):
        self.address, self.headers = f"127.0.0.1:{mesh.ports.gateway}", mesh.serve_headers
        self.answered, self.failures = 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def _run(self) -> None:
        client = tgrpc.InferenceServerClient(self.address)
        inputs = []
        for name, value in RECORDS[0].items():
            tensor = tgrpc.InferInput(name, [1], "FP64")
            tensor.set_data_from_numpy(np.array([value]))
            inputs.append(tensor)
        while not self._stop.is_set():
            try:
                label = client.infer("iris", inputs, headers=self.headers).as_numpy("label").reshape(-1)[0]
                self.answered += 1
                if label not in (b"virginica", "virginica"):
                    self.failures.append(repr(label))
            except Exception as exc:  # InferenceServerException: any error counts
                self.failures.append(str(exc)[:200])
        client.close()

    def __enter__(self) -> "GrpcLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def test_one_of_two_gateways_killed_loses_no_request_and_the_healer_brings_it_back(replicated):
    with GrpcLoad(replicated) as grpc_load, healer_for(replicated) as healer:
        run = gateway_killed(replicated, replicated.serve_headers, "gateway-1", healer)
    assert failures(run) == []
    assert grpc_load.failures == [] and grpc_load.answered > 20  # the gRPC API too: no gateway answers before its pipelines are in
    assert [r["key"] for r in healer.restarts] == ["gateway-1"]
    assert any(m.startswith("gateway-1 (pid") and "killed by SIGKILL" in m for m in healer.messages), healer.messages
    assert run.notes["serving_again_s"] < 15  # its sidecar sends it requests again (after any ejection)
