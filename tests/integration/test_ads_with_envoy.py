"""The ADS server against a real Envoy: ACKs, a NACK that keeps the last good config,
and recovery — with the manager's snapshot cache driven directly.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import httpx
import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc

from manager.xds.ads import AdsServicer
from manager.xds.resources import LISTENER, MeshState, NodeInfo, build_resources
from manager.xds.snapshot import Snapshot, SnapshotCache
from sluice.envoy import Sidecar
from sluice.procs import Supervisor, free_port


async def until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def broken(by_type: dict) -> dict:
    """The same resources, but the ingress listener's router filter loses its typed_config,
    which Envoy rejects."""
    listener = listener_pb2.Listener()
    listener.CopyFrom(by_type[LISTENER][0])
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.http_filters[0].ClearField("typed_config")
    listener.filter_chains[0].filters[0].typed_config.Pack(hcm)
    return {**by_type, LISTENER: [listener]}


@pytest.fixture
async def ads():
    variant = {"state": MeshState(), "broken": False}

    def build(node: NodeInfo) -> Snapshot:
        resources = build_resources(node, variant["state"])
        return Snapshot.of(broken(resources) if variant["broken"] else resources)

    cache = SnapshotCache(build)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(cache), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield cache, port, variant
    await server.stop(0)


async def test_envoy_acks_then_nacks_and_keeps_last_good_config(ads, tmp_path, caplog):
    cache, xds_port, variant = ads
    sidecar = Sidecar("svc-1", "svc", "service", ingress_port=free_port(), service_port=free_port(),
                      admin_port=free_port(), xds_host="127.0.0.1", xds_port=xds_port)
    bootstrap = tmp_path / "bootstrap.yaml"
    bootstrap.write_text(sidecar.bootstrap())
    supervisor = Supervisor(tmp_path / "logs")
    supervisor.start("envoy", sidecar.command(bootstrap))
    admin = f"http://127.0.0.1:{sidecar.admin_port}"
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            async def ready() -> bool:
                try:
                    return (await client.get(f"{admin}/ready")).status_code == 200
                except httpx.HTTPError:
                    return False

            await until(ready)
            status = cache.nodes()["svc-1"]
            good = status.snapshot.versions[LISTENER]
            await until(lambda: _true(status.acked.get(LISTENER) == good))

            async def listener_version() -> str:
                dump = (await client.get(f"{admin}/config_dump?resource=dynamic_listeners")).json()
                return dump["configs"][0]["active_state"]["version_info"]

            assert await listener_version() == good

            caplog.set_level(logging.ERROR, logger="manager.xds.ads")
            variant["broken"] = True
            cache.rebuild()
            bad = status.snapshot.versions[LISTENER]
            assert bad != good
            await until(lambda: _true(status.nacks == 1))
            assert status.rejected[LISTENER] == bad
            assert "router" in status.last_nack.lower() or "typed_config" in status.last_nack
            assert any("rejected Listener" in r.message and status.last_nack in r.message for r in caplog.records)
            # Envoy keeps serving the last good listener; the bad version counts as settled
            assert await listener_version() == good
            assert cache.converged(None, (LISTENER,))

            variant["broken"] = False
            variant["state"] = MeshState(stage_retries=3)  # any change: a new good version
            cache.rebuild()
            assert await _wait_converged(cache)
            assert await listener_version() == status.snapshot.versions[LISTENER]
    finally:
        supervisor.stop_all()


async def _true(value: bool) -> bool:
    return value


async def _wait_converged(cache: SnapshotCache) -> bool:
    return await cache.wait_converged(None, (LISTENER,), timeout=10)
