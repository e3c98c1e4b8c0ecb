"""Consul discovery against a real agent (``consul agent -dev``), when a ``consul``
binary is on PATH: a runtime registers through runtimes/sdk/consul.py, its endpoint
appears in ConsulRegistry once Consul's gRPC check passes, leaves when the check
fails, and the service is gone from the agent after shutdown.

Without the binary the test is skipped; the same code is then exercised against an
imitation of Consul's HTTP API in tests/unit/test_consul_registry.py.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from manager.registry.base import Endpoint
from manager.registry.consul import ConsulRegistry
from runtimes.sdk.consul import ConsulRegistration
from sluice import consul as sluice_consul
from sluice.local.procs import Supervisor, free_port, wait_until

NO_BINARY = (
    "no consul binary on PATH: the Consul backend is tested against an imitation of its HTTP API "
    "in tests/unit/test_consul_registry.py"
)


def _has_leader(http_port: int):
    def check() -> bool:
        reply = httpx.get(f"http://127.0.0.1:{http_port}/v1/status/leader", timeout=1)
        return reply.status_code == 200 and reply.json() not in ("", None)

    return check


@pytest.fixture
def agent(tmp_path):
    binary = shutil.which("consul")
    if binary is None:
        pytest.skip(NO_BINARY)
    ports = {name: free_port() for name in ("http", "dns", "server", "serf-lan", "serf-wan", "grpc")}
    flags = subprocess.run([binary, "agent", "-h"], capture_output=True, text=True, timeout=30)
    if "-grpc-tls-port" in flags.stdout + flags.stderr:  # Consul >= 1.14: dev mode also opens 8503
        ports["grpc-tls"] = free_port()
    argv = [binary, "agent", "-dev", "-bind=127.0.0.1", "-client=127.0.0.1", "-log-level=warn"]
    argv += [f"-{name}-port={port}" for name, port in ports.items()]
    supervisor = Supervisor(tmp_path / "logs")
    proc = supervisor.start("consul", argv)
    try:
        wait_until(_has_leader(ports["http"]), 30, "the Consul dev agent to elect itself", proc)
        yield f"127.0.0.1:{ports['http']}"
    finally:
        supervisor.stop_all()


async def until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s}s"
        await asyncio.sleep(0.05)


async def test_registered_runtime_appears_and_leaves_with_its_check(agent: str) -> None:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)

    registration = ConsulRegistration(agent, "scikit", "scikit", "127.0.0.1", port, ["iris"], check_interval="1s")
    registry = ConsulRegistry(agent, wait_s=5.0)
    found: list[tuple] = []

    async def heard(*runtime) -> None:
        found.append(runtime)

    registry.on_runtime(heard)
    mine = {"scikit": [Endpoint("scikit", "127.0.0.1", port, registration.service_id)]}
    try:
        registration.start()
        await asyncio.wait_for(registration.registered.wait(), 10)
        await registry.start()
        await until(lambda: registry.endpoints() == mine, 15, "endpoint after Consul's gRPC check passed")
        await until(lambda: found, 5, "runtime announced")
        assert found[0] == ("scikit", "scikit", "127.0.0.1", port, ["iris"])

        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await until(lambda: registry.endpoints() == {}, 15, "endpoint removed after the check failed")
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        await until(lambda: registry.endpoints() == mine, 15, "endpoint back after the check passed")
    finally:
        await registration.stop()
        await registry.stop()
        await server.stop(None)

    client = sluice_consul.client(agent, timeout_s=5)
    try:
        assert registration.service_id not in await client.agent.services()
    finally:
        await client.close()
