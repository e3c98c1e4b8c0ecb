"""The ADS server against a real Envoy, in both xDS variants (state of the world and
delta): ACKs, a NACK that keeps the last good config and recovery; pipeline route
scopes arriving in Envoy's config_dump; and a delta client that, with 500 pipelines
present, gets one resource for one pipeline's change. The control plane's layers,
cache and node tracker are driven directly.
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
from manager.xds.layers import MeshLayers
from manager.xds.resources import LISTENER, PUSH_ORDER, SCOPED_ROUTE, MeshSettings, NodeInfo
from manager.xds.snapshot import ResourceSet, Snapshot, SnapshotCache, resource
from manager.xds.status import NodeTracker
from sluice.local.envoy import Sidecar
from sluice.plan import PipelinePlan, StagePlan
from sluice.local.procs import Supervisor, free_port
from sluice.tensors import TensorSpec
from sluice.wire import route_key

VARIANTS = ["GRPC", "DELTA_GRPC"]


async def until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def plan(name: str, revision: int = 1, runtime: str = "scikit") -> PipelinePlan:
    spec = (TensorSpec("x", "FP64", (-1, 4)),)
    return PipelinePlan(name, revision, "http", (StagePlan(f"{runtime}/m", runtime, "m", "", route_key(name, revision, 0), 2000, spec, spec),))


def broken(snapshot: Snapshot) -> Snapshot:
    """The same snapshot, but the ingress listener's router filter loses its typed_config,
    which Envoy rejects."""
    (layer,) = snapshot.layers[LISTENER]
    ingress = layer.items["ingress"]
    listener = listener_pb2.Listener.FromString(ingress.body.value)
    hcm = hcm_pb2.HttpConnectionManager()
    listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    hcm.http_filters[0].ClearField("typed_config")
    listener.filter_chains[0].filters[0].typed_config.Pack(hcm)
    bad = ResourceSet("broken", {**layer.items, "ingress": resource(LISTENER, listener)})
    return Snapshot({**snapshot.layers, LISTENER: (bad,)})


class Harness:
    """The manager's xDS side without the manager: layers -> snapshots -> cache -> streams."""

    def __init__(self) -> None:
        self.layers = MeshLayers(MeshSettings())
        self.cache = SnapshotCache()
        self.tracker = NodeTracker(self.cache, self.provide)
        self.broken = False
        self.sent: list[int] = []  # resources per response, as Envoy received them

    def provide(self, node: NodeInfo) -> None:
        snapshot = self.layers.snapshot_for(node)
        self.cache.set_snapshot(node.id, broken(snapshot) if self.broken else snapshot)

    def push(self) -> None:
        for status in self.tracker.nodes().values():
            self.provide(status.info)

    def status(self, node_id: str):
        return self.tracker.nodes()[node_id]


@pytest.fixture
async def xds():
    harness = Harness()
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(harness.cache, harness.tracker), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield harness, port
    await server.stop(0)


@pytest.fixture
def envoys(tmp_path):
    supervisor = Supervisor(tmp_path / "logs")
    yield supervisor
    supervisor.stop_all()


async def start_envoy(envoys, tmp_path, xds_port: int, api: str, role: str = "service") -> tuple[str, str]:
    node_id = f"{role}-{api.lower()}"
    sidecar = Sidecar(
        node_id, "svc", role, ingress_port=free_port(), service_port=free_port(), admin_port=free_port(),
        xds_host="127.0.0.1", xds_port=xds_port, egress_port=free_port() if role == "gateway" else 0, xds_api=api,
    )
    bootstrap = tmp_path / f"{node_id}.yaml"
    bootstrap.write_text(sidecar.bootstrap())
    envoys.start(node_id, sidecar.command(bootstrap))
    admin = f"http://127.0.0.1:{sidecar.admin_port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{admin}/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    await until(ready, 20)
    return node_id, admin


def dump(admin: str, resource: str) -> list[dict]:
    return httpx.get(f"{admin}/config_dump?resource={resource}", timeout=5).json().get("configs", [])


@pytest.mark.parametrize("api", VARIANTS)
async def test_envoy_acks_then_nacks_and_keeps_last_good_config(xds, envoys, tmp_path, caplog, api):
    harness, port = xds
    node_id, admin = await start_envoy(envoys, tmp_path, port, api)
    status = harness.status(node_id)
    good = harness.cache.snapshot(node_id).version(LISTENER)
    await until(lambda: status.acked.get(LISTENER) == good)

    def listener_version() -> str:
        (listener,) = [c for c in dump(admin, "dynamic_listeners") if c.get("name") == "ingress"]
        return listener["active_state"]["version_info"]

    if api == "GRPC":  # delta carries per-resource versions instead
        assert listener_version() == good

    caplog.set_level(logging.ERROR, logger="manager.xds.ads")
    harness.broken = True
    harness.push()
    bad = harness.cache.snapshot(node_id).version(LISTENER)
    assert bad != good
    await until(lambda: status.nacks == 1)
    assert status.rejected[LISTENER] == bad
    assert "router" in status.last_nack.lower() or "typed_config" in status.last_nack
    assert any("rejected Listener" in r.message and status.last_nack in r.message for r in caplog.records)
    # Envoy keeps serving the last good listener; the bad version counts as settled
    assert harness.tracker.converged(None, (LISTENER,))
    if api == "GRPC":
        assert listener_version() == good

    harness.broken = False
    harness.push()
    assert await harness.tracker.wait_converged(None, PUSH_ORDER, timeout=10)
    assert status.acked[LISTENER] == harness.cache.snapshot(node_id).version(LISTENER)


@pytest.mark.parametrize("api", VARIANTS)
async def test_pipeline_scopes_converge_in_envoy(xds, envoys, tmp_path, api):
    harness, port = xds
    harness.layers.set_pipelines({"iris": [plan("iris")], "other": [plan("other", runtime="spark")]})
    node_id, admin = await start_envoy(envoys, tmp_path, port, api, role="gateway")
    assert await harness.tracker.wait_converged("gateway", PUSH_ORDER, timeout=10)

    def scopes() -> dict[str, list[str]]:
        out = {}
        for config in dump(admin, "dynamic_scoped_route_configs"):
            for scope in config.get("scoped_route_configs", []):
                routes = scope["route_configuration"]["virtual_hosts"][0]["routes"]
                out[scope["key"]["fragments"][0]["string_key"]] = [r.get("name") for r in routes]
        return out

    await until(lambda: scopes().keys() == {"iris", "other"})
    assert scopes()["iris"] == ["iris.r1.s0", "unknown-stage"]
    clusters = {c["cluster"]["name"] for c in dump(admin, "dynamic_active_clusters")}
    assert {"runtime_scikit", "runtime_spark"} <= clusters

    # a replace (both revisions routed), then the withdrawal of the old one, then a delete
    harness.layers.set_pipelines({"iris": [plan("iris"), plan("iris", 2)]})
    harness.push()
    await until(lambda: scopes().get("iris") == ["iris.r1.s0", "iris.r2.s0", "unknown-stage"])
    harness.layers.set_pipelines({"iris": [plan("iris", 2)], "other": []})
    harness.push()
    await until(lambda: scopes() == {"iris": ["iris.r2.s0", "unknown-stage"]})
    assert await harness.tracker.wait_converged("gateway", PUSH_ORDER, timeout=10)


async def test_delta_sends_one_resource_for_one_pipeline_among_500(xds, envoys, tmp_path):
    harness, port = xds
    harness.layers.set_pipelines({f"p{i}": [plan(f"p{i}")] for i in range(500)})
    node_id, admin = await start_envoy(envoys, tmp_path, port, "DELTA_GRPC", role="gateway")
    assert await harness.tracker.wait_converged("gateway", PUSH_ORDER, timeout=20)
    sent: list[tuple[str, int, int]] = []
    from manager.xds import ads

    original = ads.DeltaStream._send

    async def recording(self, type_url, version, upserts, removals, state):
        sent.append((type_url, len(upserts), len(removals)))
        await original(self, type_url, version, upserts, removals, state)

    ads.DeltaStream._send = recording
    try:
        harness.layers.set_pipelines({"p7": [plan("p7"), plan("p7", 2)], "p8": []})
        harness.push()
        assert await harness.tracker.wait_converged("gateway", PUSH_ORDER, timeout=10)
    finally:
        ads.DeltaStream._send = original
    assert sent == [(SCOPED_ROUTE, 1, 1)]
    names = {s["name"] for c in dump(admin, "dynamic_scoped_route_configs") for s in c.get("scoped_route_configs", [])}
    assert len(names) == 499 and "egress.p8" not in names and "egress.p7" in names
