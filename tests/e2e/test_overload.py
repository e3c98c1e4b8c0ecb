"""Overload is shed, never queued: a real mesh with small limits under 32 concurrent clients.

The mesh: manager, repository, gateway and one scikit runtime serving ``slow_echo``
(50 ms a call, ``tests.e2e.slow_model``), each with its Envoy sidecar. Limits:
the runtime's cluster on the gateway sidecar admits 3 concurrent stage calls
(``SLUICE_MANAGER_RUNTIME_LIMITS``), the runtime process serves 2 at once
(``SLUICE_RUNTIME_MAX_IN_FLIGHT``), the gateway sidecar admits 8 requests to the
gateway (``SLUICE_MANAGER_GATEWAY_MAX_REQUESTS``). 32 closed-loop clients then exceed
every one of them; each answer is counted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.e2e.slow_model import write_slow_echo

pytestmark = pytest.mark.e2e

CLIENTS = 32
REQUESTS_PER_CLIENT = 12
DELAY_S = 0.05
#: no answer, shed or served, may take longer than this (a queued request would)
ANSWER_BOUND_S = 3.0


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    workdir = tmp_path_factory.mktemp("overload")
    write_slow_echo(workdir / "models", delay_s=DELAY_S)  # the repository's first root (uploads)
    mesh = LocalMesh(
        workdir,
        [RuntimeSpec("scikit", "scikit", ("slow_echo",), env=(("SLUICE_RUNTIME_MAX_IN_FLIGHT", "2"),))],
        MeshPorts.ephemeral(),
        env={
            "SLUICE_MANAGER_RUNTIME_LIMITS": "scikit=3",
            "SLUICE_MANAGER_GATEWAY_MAX_REQUESTS": "8",
            "SLUICE_MANAGER_GATEWAY_MAX_PENDING": "4",
            "SLUICE_MANAGER_RETRY_AFTER_S": "2",
            "SLUICE_GATEWAY_RETRY_AFTER_S": "2",
            # every request its own stage call: folded runs (gateway.batching) would keep the
            # stage calls under the runtime's limits that this test means to exceed
            "SLUICE_GATEWAY_BATCH_MAX_ROWS": "0",
        },
    )
    with mesh:
        yield mesh


@pytest.fixture(scope="module")
def slow(manager):
    response = manager.post("/api/v1/pipelines", json={"name": "slow", "chain": ["scikit/slow_echo"]})
    assert response.status_code == 201, response.text
    return response.json()


class HealthProbe:
    """Checks the runtime's gRPC health (its own port) every 50 ms from a thread, timing each."""

    def __init__(self, address: str):
        self.address = address
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while not self._stop.wait(0.05):
                started = time.perf_counter()
                try:
                    answer = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    self.statuses[health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)] += 1
                except grpc.RpcError as exc:
                    self.statuses[exc.code().name] += 1
                self.latencies.append(time.perf_counter() - started)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


async def _load(url: str) -> list[tuple[int, float, dict[str, str], bytes]]:
    """CLIENTS closed-loop clients (asyncio, one connection each), REQUESTS_PER_CLIENT requests each."""

    async def client() -> list[tuple[int, float, dict[str, str], bytes]]:
        answers = []
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            for i in range(REQUESTS_PER_CLIENT):
                started = time.perf_counter()
                response = await http.post("/serve/slow", json=[{"x": float(i)}])
                answers.append((response.status_code, time.perf_counter() - started, dict(response.headers), response.content))
        return answers

    return [a for batch in await asyncio.gather(*(client() for _ in range(CLIENTS))) for a in batch]


def test_beyond_the_limits_requests_are_shed_with_503_and_retry_after_and_the_rest_succeed(mesh, slow):
    runtime = mesh.runtime_instances["runtime-scikit"]
    with HealthProbe(f"127.0.0.1:{runtime.local_port}") as probe:
        answers = asyncio.run(_load(mesh.gateway_url))

    assert len(answers) == CLIENTS * REQUESTS_PER_CLIENT  # every request answered (no client error, no hang)
    statuses = Counter(status for status, *_ in answers)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] > 0 and statuses[503] > 0, statuses
    assert max(elapsed for _, elapsed, _, _ in answers) < ANSWER_BOUND_S

    codes: Counter[str] = Counter()
    for status, elapsed, headers, body in answers:
        if status == 200:
            assert httpx.Response(200, content=body).json()[0]["y"] >= 0.0
            continue
        assert headers.get("retry-after") == "2", headers
        assert headers["content-type"].startswith("application/json")
        error = httpx.Response(503, content=body).json()["error"]
        assert set(error) == {"code", "message", "details"}
        codes[error["code"]] += 1
        if error["code"] == "stage_overloaded":  # a stage's limit: the answer names the stage
            assert error["details"]["stage"] == 0 and error["details"]["stage_name"] == "scikit/slow_echo"
            assert error["details"]["pipeline"] == "slow"
        else:  # the gateway sidecar's own limit, answered by Envoy in the same shape
            assert error["code"] == "overloaded", error
    # all three limits were met: the gateway sidecar's, the runtime cluster's (Envoy), the runtime's own
    assert codes["overloaded"] > 0 and codes["stage_overloaded"] > 0, codes
    messages = [httpx.Response(503, content=b).json()["error"]["message"] for s, _, _, b in answers if s == 503]
    assert any("concurrency limit (Envoy" in m for m in messages), "no stage call shed by the runtime's circuit breaker"
    assert any("limit of 2 inferences" in m for m in messages), "no stage call refused by the runtime's in-flight limit"

    # the runtime's health kept answering, promptly, all through the load
    assert set(probe.statuses) == {"SERVING"} and sum(probe.statuses.values()) >= 5, probe.statuses
    assert max(probe.latencies) < 1.0, max(probe.latencies)
    # and after the load the mesh serves every request again
    with httpx.Client(base_url=mesh.gateway_url, timeout=10) as client:
        assert client.post("/serve/slow", json=[{"x": 3.0}]).json() == [{"y": 3.0}]
