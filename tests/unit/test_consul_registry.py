"""Consul discovery without an agent: py-consul's real client against an imitation of
Consul's documented HTTP API (tests/unit/fake_consul.py).

Covers the translation of ``/v1/health/service`` answers into endpoints, the blocking
query loop (changes arrive, spurious wake-ups are ignored, no busy loop), back-off on
500s and refused connections with the last endpoints kept, the index reset when it
goes backwards, checks failing and passing, the runtime side's registration, and the
manager learning a discovered runtime's signatures over OIP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from manager.control import ControlPlane
from manager.registry.base import Endpoint
from manager.registry.consul import ConsulRegistry, Instance, instances, next_index
from manager.settings import ManagerSettings
from manager import tls
from manager.ca import CertificateAuthority
from manager.store import Store
from sluice.wire import runtime_cluster
from runtimes.sdk.app import _registration
from runtimes.sdk.consul import ConsulRegistration
from runtimes.sdk.model import Model, ModelArtifact
from runtimes.sdk.registration import Registration
from runtimes.sdk.server import InferenceService
from runtimes.sdk.settings import RuntimeSettings
from sluice.consul import split_address
from sluice.tensors import TensorSpec
from tests.unit.fake_consul import NODE, SERF_CHECK, FakeConsul, health_entry

CATALOG = "/v1/catalog/services"
HEALTH = "/v1/health/service/scikit"


async def until(check: Callable[[], bool], timeout_s: float = 3.0, what: str = "condition") -> float:
    """Await ``check()`` becoming true (polled every 10 ms); fail after ``timeout_s``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not met within {timeout_s}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


class Heard:
    """Records ``on_change`` and ``on_runtime`` calls."""

    def __init__(self) -> None:
        self.changes = 0
        self.runtimes: list[tuple[str, str, str, int, list[str]]] = []

    def __call__(self) -> None:
        self.changes += 1

    async def runtime(self, name: str, kind: str, host: str, port: int, models: list[str]) -> None:
        self.runtimes.append((name, kind, host, port, models))


@pytest.fixture
async def fake():
    consul = FakeConsul()
    await consul.start()
    yield consul
    await consul.stop()


@pytest.fixture
async def make_registry(fake: FakeConsul):
    started: list[ConsulRegistry] = []

    async def make(wait_s: float = 5.0, backoff_min_s: float = 0.05, backoff_max_s: float = 0.2):
        registry = ConsulRegistry(fake.address, wait_s=wait_s, backoff_min_s=backoff_min_s, backoff_max_s=backoff_max_s)
        heard = Heard()
        registry.on_change(heard)
        registry.on_runtime(heard.runtime)
        await registry.start()
        started.append(registry)
        return registry, heard

    yield make
    for registry in started:
        await registry.stop()


def ep(port: int, instance: str, host: str = "10.0.0.1") -> Endpoint:
    return Endpoint("scikit", host, port, instance)


# --- translation of documented answers


def test_documented_health_answer_becomes_endpoints() -> None:
    node_fallback = health_entry("sk-1", "scikit", "", 9001, ["sluice-runtime", "scikit"],
                                 {"sluice-runtime": "scikit", "kind": "scikit", "models": "iris, iris:2"}, "passing")
    renamed = health_entry("sk-2", "sluice-scikit-v2", "10.0.0.2", 9002, ["sluice-runtime"],
                           {"sluice-runtime": "scikit", "kind": "scikit", "models": ""}, "passing")
    no_meta = health_entry("spark-1", "spark", "10.0.0.3", 9100, ["sluice-runtime"], {}, "passing")
    failing = health_entry("sk-3", "scikit", "10.0.0.4", 9003, ["sluice-runtime"], {}, "critical")
    warning = health_entry("sk-4", "scikit", "10.0.0.5", 9004, ["sluice-runtime"], {}, "warning")
    node_down = health_entry("sk-5", "scikit", "10.0.0.6", 9005, ["sluice-runtime"], {}, "passing")
    node_down["Checks"][0] = {**SERF_CHECK, "Status": "critical"}

    found = instances([failing, node_fallback, warning, renamed, no_meta, node_down])

    assert found == [
        Instance(Endpoint("scikit", "10.0.0.2", 9002, "sk-2"), "scikit", ()),
        Instance(Endpoint("scikit", NODE["Address"], 9001, "sk-1"), "scikit", ("iris", "iris:2")),
        Instance(Endpoint("spark", "10.0.0.3", 9100, "spark-1"), "", ()),
    ]
    assert instances(None) == [] and instances([]) == []


def test_index_rules_from_the_blocking_query_docs() -> None:
    assert next_index(0, "15") == 15
    assert next_index(15, "15") == 15  # wait expired, nothing new
    assert next_index(15, "7") == 0  # went backwards: reset
    assert next_index(0, "0") == 1  # never block on 0 (it returns at once)


def test_consul_address_forms() -> None:
    assert split_address("10.0.0.9:8501") == ("http", "10.0.0.9", 8501)
    assert split_address("https://consul.internal:8501") == ("https", "consul.internal", 8501)
    assert split_address("consul") == ("http", "consul", 8500)
    with pytest.raises(ValueError):
        ConsulRegistry(":8500")


# --- the blocking-query loop against the imitation


async def test_discovers_tagged_services_only(fake: FakeConsul, make_registry) -> None:
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001, models="iris,iris:2")
    await fake.add("redis", "redis", "10.0.0.7", 6379, tags=["primary"])
    registry, heard = await make_registry()

    await until(lambda: registry.endpoints() == {"scikit": [ep(9001, "sk-1")]}, what="endpoint discovered")
    assert heard.changes == 1
    await until(lambda: heard.runtimes, what="runtime announced")
    assert heard.runtimes == [("scikit", "scikit", "10.0.0.1", 9001, ["iris", "iris:2"])]
    assert not fake.seen("/v1/health/service/redis")
    first = fake.seen(HEALTH)[0]
    assert first.query.get("passing") == "1" and first.query.get("tag") == "sluice-runtime"
    assert "index" not in first.query  # the first query does not block


async def test_changes_arrive_and_spurious_wakeups_are_ignored(fake: FakeConsul, make_registry) -> None:
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001)
    registry, heard = await make_registry()
    await until(lambda: heard.changes == 1, what="first sync")

    await fake.add("sk-2", "scikit", "10.0.0.2", 9001)
    await until(lambda: len(registry.endpoints().get("scikit", [])) == 2, what="second instance")
    assert heard.changes == 2
    assert registry.endpoints()["scikit"] == [ep(9001, "sk-1"), ep(9001, "sk-2", "10.0.0.2")]

    await fake.touch()  # a write elsewhere wakes the query; same data comes back
    touched = str(fake.index)
    await until(lambda: any(r.query.get("index") == touched for r in fake.seen(HEALTH)), what="re-blocked at new index")
    assert heard.changes == 2


async def test_no_busy_loop_while_nothing_changes(fake: FakeConsul, make_registry) -> None:
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001)
    registry, heard = await make_registry(wait_s=0.25)
    await until(lambda: heard.changes == 1, what="first sync")

    before, window = len(fake.requests), 1.0
    await asyncio.sleep(window)  # measuring idleness: a window is the point here
    idle = fake.requests[before:]
    # two watches (catalog, one service), each answered once per 0.25 s wait: ~8 requests
    assert 4 <= len(idle) <= 12, [(r.path, r.query) for r in idle]
    assert all(r.query.get("index") == str(fake.index) and r.query.get("wait") == "0.25s" for r in idle)
    assert heard.changes == 1


async def test_failing_check_removes_the_endpoint_and_passing_brings_it_back(fake: FakeConsul, make_registry) -> None:
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001)
    await fake.add("sk-2", "scikit", "10.0.0.2", 9001)
    registry, heard = await make_registry()
    await until(lambda: len(registry.endpoints().get("scikit", [])) == 2, what="both instances")
    await until(lambda: len(heard.runtimes) == 2, what="both announced")

    await fake.set_status("sk-2", "critical")
    await until(lambda: registry.endpoints() == {"scikit": [ep(9001, "sk-1")]}, what="failing instance removed")
    assert heard.changes == 2

    await fake.set_status("sk-2", "passing")
    await until(lambda: len(registry.endpoints()["scikit"]) == 2, what="instance back")
    assert heard.changes == 3
    await until(lambda: len(heard.runtimes) == 3, what="re-announced on return")
    assert heard.runtimes[-1][2:4] == ("10.0.0.2", 9001)


async def test_service_leaving_the_catalog_drops_its_endpoints(fake: FakeConsul, make_registry) -> None:
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001)
    registry, heard = await make_registry()
    await until(lambda: heard.changes == 1, what="first sync")
    await fake.remove("sk-1")
    await until(lambda: registry.endpoints() == {}, what="service gone")
    assert heard.changes == 2


async def test_server_errors_back_off_and_keep_the_last_endpoints(fake: FakeConsul, make_registry) -> None:
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001)
    registry, heard = await make_registry(backoff_min_s=0.05, backoff_max_s=0.2)
    await until(lambda: heard.changes == 1, what="first sync")
    known = registry.endpoints()

    fake.fail(HEALTH, 4)
    start = len(fake.seen(HEALTH))
    await fake.touch()  # wake the held query; the next four answers are 500s
    await until(lambda: any(r.status == 500 for r in fake.seen(HEALTH)[start:]), what="a failure")
    assert registry.endpoints() == known  # kept during the outage
    assert "consul" in (registry.health() or "") and "failing" in registry.health()  # the manager's /healthz says so
    # four failures, then a query that succeeds and blocks again
    await until(lambda: len(fake.seen(HEALTH)[start:]) >= 5, what="retried past the failures")
    tries = fake.seen(HEALTH)[start:]
    assert [r.status for r in tries[:4]] == [500] * 4 and tries[4].status in (0, 200)
    gaps = [b.at - a.at for a, b in zip(tries, tries[1:5])]
    for gap, expected in zip(gaps, [0.05, 0.1, 0.2, 0.2]):  # doubling, capped at 0.2 s
        assert gap >= expected * 0.9, gaps
    assert gaps[0] < 0.2, gaps  # and it started from the minimum
    assert registry.endpoints() == known and heard.changes == 1

    await fake.add("sk-2", "scikit", "10.0.0.2", 9001)  # the loop is healthy again
    await until(lambda: len(registry.endpoints()["scikit"]) == 2, what="change after recovery")
    assert registry.health() is None


async def test_connection_refused_retries_then_recovers(fake: FakeConsul, make_registry, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="manager.registry.consul")
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001)
    registry, heard = await make_registry(backoff_min_s=0.05, backoff_max_s=0.2)
    await until(lambda: heard.changes == 1, what="first sync")
    known, port = registry.endpoints(), fake.port

    await fake.stop()
    refused = lambda: [r for r in caplog.records if "health of scikit" in r.getMessage()]  # noqa: E731
    await until(lambda: len(refused()) >= 4, what="retries while the agent is down")
    times = [r.created for r in refused()]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 0.045 for g in gaps), gaps  # spaced out, never a tight loop
    assert registry.endpoints() == known and heard.changes == 1

    await fake.add("sk-2", "scikit", "10.0.0.2", 9001)
    await fake.start(port)
    await until(lambda: len(registry.endpoints().get("scikit", [])) == 2, what="recovered after restart")


async def test_index_going_backwards_is_reset(fake: FakeConsul, make_registry) -> None:
    await fake.add("sk-1", "scikit", "10.0.0.1", 9001)
    for _ in range(10):
        await fake.touch()
    registry, heard = await make_registry(wait_s=5.0)
    high = str(fake.index)
    await until(lambda: any(r.query.get("index") == high for r in fake.seen(HEALTH)), what="blocking at high index")

    start = len(fake.seen(HEALTH))
    await fake.rewind(3)
    await until(lambda: any("index" not in r.query for r in fake.seen(HEALTH)[start:]), 2.0, "index reset to 0")
    await fake.add("sk-2", "scikit", "10.0.0.2", 9001)  # index 4: far below the old one
    # with the old index kept, this would wait out the 5 s blocking query
    await until(lambda: len(registry.endpoints().get("scikit", [])) == 2, 2.0, "change after the rewind")
    assert all(int(r.query.get("index", 0)) <= fake.index for r in fake.seen(HEALTH)[start:])


# --- the runtime side and the manager's learning


def _health_server() -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    return server, servicer, port


async def test_runtime_registers_with_a_grpc_check_and_deregisters(fake: FakeConsul, make_registry) -> None:
    server, servicer, port = _health_server()
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    registration = ConsulRegistration(fake.address, "scikit", "scikit", "127.0.0.1", port, ["iris", "iris:2"],
                                      check_interval="0.1s", recheck_s=0.1)
    try:
        registration.start()
        await asyncio.wait_for(registration.registered.wait(), 3)
        service_id = f"scikit-127.0.0.1-{port}"
        body = fake.registered[service_id]
        assert (body["name"], body["id"], body["address"], body["port"]) == ("scikit", service_id, "127.0.0.1", port)
        assert body["tags"] == ["sluice-runtime", "scikit"]
        assert body["meta"] == {"sluice-runtime": "scikit", "kind": "scikit", "models": "iris,iris:2"}
        (check,) = body["checks"]
        assert check["grpc"] == f"127.0.0.1:{port}" and check["interval"] == "0.1s"
        assert check["DeregisterCriticalServiceAfter"] == "1m"

        registry, heard = await make_registry()
        mine = {"scikit": [Endpoint("scikit", "127.0.0.1", port, service_id)]}
        await until(lambda: registry.endpoints() == mine, what="passing after the gRPC check")

        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until(lambda: registry.endpoints() == {}, what="removed when the check fails")
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await until(lambda: registry.endpoints() == mine, what="back when it passes")

        del fake.registered[service_id]  # the agent forgot it (restart): registered again
        await until(lambda: service_id in fake.registered, what="re-registered")
    finally:
        await registration.stop()
        await server.stop(None)
    assert service_id not in fake.registered
    await until(lambda: registry.endpoints() == {}, what="gone after deregistration")


def test_runtime_picks_consul_when_its_address_is_set(monkeypatch) -> None:
    settings = RuntimeSettings(name="scikit", port=19000, public_host="10.0.0.5", public_port=9001)
    monkeypatch.delenv("SLUICE_CONSUL_ADDR", raising=False)
    assert isinstance(_registration(settings, "scikit", ["iris"]), Registration)
    monkeypatch.setenv("SLUICE_CONSUL_ADDR", "10.0.0.9:8500")
    chosen = _registration(settings, "scikit", ["iris"])
    assert isinstance(chosen, ConsulRegistration) and chosen.address == "10.0.0.9:8500"
    assert (chosen.service["address"], chosen.service["port"]) == ("10.0.0.5", 9001)  # the sidecar's address
    assert chosen.service["check"]["grpc"] == "10.0.0.5:9001"


class Echo(Model):
    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": inputs["x"]}


async def test_manager_learns_signatures_of_a_discovered_runtime(fake: FakeConsul, tmp_path) -> None:
    model = Echo(ModelArtifact("echo", "1", tmp_path), [TensorSpec("x", "FP32", (-1, 4))], [TensorSpec("y", "FP32", (-1, 4))])
    # the manager dials runtimes over mTLS as spiffe://sluice/manager: serve the runtime as
    # its sidecar would, with a certificate from the same mesh CA
    ca = CertificateAuthority.ephemeral()
    tls.install(tls.ManagerTls(ca))
    issued = ca.issue_for("runtime", "echoes")
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService("echoes", "python", {"echo": model}), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(issued.key_pem, issued.cert_pem)], issued.ca_pem, True))
    await server.start()
    await fake.add("echoes-1", "echoes", "127.0.0.1", port, kind="python", models="echo")
    store = Store(":memory:")
    control = ControlPlane(ManagerSettings(), store, ConsulRegistry(fake.address, wait_s=5.0))
    try:
        await control.start()
        await until(lambda: "echoes" in control.runtimes, what="runtime learned")
        row = control.runtimes["echoes"]
        assert row.kind == "python"
        assert row.models["echo"].signature.inputs == (TensorSpec("x", "FP32", (-1, 4)),)
        assignment = ClusterLoadAssignment.FromString(control.layers.endpoints.items[runtime_cluster("echoes")].body.value)
        addresses = [e.endpoint.address.socket_address for e in assignment.endpoints[0].lb_endpoints]
        assert [(a.address, a.port_value) for a in addresses] == [("127.0.0.1", port)]
        assert store.runtimes()[0].name == "echoes"
    finally:
        await control.stop()
        await server.stop(None)
        store.close()
