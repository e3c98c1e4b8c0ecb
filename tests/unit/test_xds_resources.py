"""manager.xds.resources + manager.xds.snapshot: per-node xDS resources, content-hash versions, ACK tracking."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.route_pb2 import RouteConfiguration
from envoy.config.trace.v3.zipkin_pb2 import ZipkinConfig
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from google.protobuf import struct_pb2

from manager.xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    ROUTE_HEADER,
    MeshState,
    NodeInfo,
    StageRoute,
    build_resources,
)
from manager.xds.snapshot import SNAPSHOT_CHANGED, Snapshot, SnapshotCache

_H2 = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

GATEWAY = NodeInfo(
    id="gateway-1", service="gateway", role="gateway", ingress_port=8083, service_port=18083,
    protocol="http", egress_port=18100, grpc_port=18084,
)
RUNTIME = NodeInfo(id="scikit-1", service="scikit", role="runtime", ingress_port=9001, service_port=19001, protocol="grpc")

ROUTES = (
    StageRoute(key="p.r1.s0", runtime="scikit", timeout_ms=2500, pipeline="p", stage=0, model="scaler"),
    StageRoute(key="p.r1.s1", runtime="spark", timeout_ms=40, pipeline="p", stage=1, model="classifier"),
)
STATE = MeshState(
    runtimes=frozenset({"spark", "scikit"}),
    endpoints=(("scikit", (("10.0.0.5", 9001), ("localhost", 9002))),),
    routes=ROUTES,
    listener_address="0.0.0.0",
    stage_retries=3,
)


def _by_name(messages: list) -> dict:
    return {getattr(m, "name", "") or m.cluster_name: m for m in messages}


def _hcm(listener: Listener) -> HttpConnectionManager:
    (chain,) = listener.filter_chains
    (flt,) = chain.filters
    hcm = HttpConnectionManager()
    assert flt.typed_config.Unpack(hcm)
    return hcm


# --- NodeInfo -----------------------------------------------------------------------


def test_node_info_from_metadata_struct() -> None:
    node = Node(id="gateway-1", cluster="gw-cluster")
    node.metadata.update(
        {
            "sluice.service": "gateway",
            "sluice.role": "gateway",
            "sluice.protocol": "http",
            "sluice.ingress_port": 8083,  # Struct numbers are doubles
            "sluice.service_port": "18083",  # a template may render a string
            "sluice.egress_port": 18100.0,
            "sluice.grpc_port": 18084,
        }
    )
    node = Node.FromString(node.SerializeToString())
    assert NodeInfo.from_node(node.id, node.cluster, node.metadata) == GATEWAY


def test_node_info_defaults() -> None:
    info = NodeInfo.from_node("n1", "my-cluster", struct_pb2.Struct())
    assert info == NodeInfo(id="n1", service="my-cluster", role="service", ingress_port=0, service_port=0)
    assert NodeInfo.from_node("n1", "", struct_pb2.Struct()).service == "n1"
    meta = struct_pb2.Struct()
    meta.update({"sluice.egress_port": "", "sluice.ingress_port": None})
    assert NodeInfo.from_node("n1", "c", meta).egress_port == 0


# --- gateway node -----------------------------------------------------------------------


def test_gateway_listeners() -> None:
    listeners = _by_name(build_resources(GATEWAY, STATE)[LISTENER])
    assert list(listeners) == ["ingress", "egress"]
    ingress, egress = listeners["ingress"], listeners["egress"]
    assert (ingress.address.socket_address.address, ingress.address.socket_address.port_value) == ("0.0.0.0", 8083)
    assert (egress.address.socket_address.address, egress.address.socket_address.port_value) == ("127.0.0.1", 18100)
    for name, listener in listeners.items():
        hcm = _hcm(listener)
        assert hcm.stat_prefix == name
        assert hcm.rds.route_config_name == name
        assert hcm.rds.config_source.HasField("ads")
        assert [f.name for f in hcm.http_filters] == ["envoy.filters.http.router"]
        assert not hcm.HasField("tracing")


def test_gateway_egress_routes_match_the_route_header() -> None:
    routes = _by_name(build_resources(GATEWAY, STATE)[ROUTE])
    assert list(routes) == ["ingress", "egress"]
    (vhost,) = routes["egress"].virtual_hosts
    by_name = {r.name: r for r in vhost.routes}
    assert list(by_name) == ["p.r1.s0", "p.r1.s1", "unknown-stage"]

    first = by_name["p.r1.s0"]
    (header,) = first.match.headers
    assert header.name == ROUTE_HEADER and header.string_match.exact == "p.r1.s0"
    assert first.route.cluster == "runtime_scikit"
    assert (first.route.timeout.seconds, first.route.timeout.nanos) == (2, 500_000_000)
    policy = first.route.retry_policy
    assert policy.num_retries.value == 3
    assert set(policy.retry_on.split(",")) == {"connect-failure", "refused-stream", "reset", "unavailable"}
    assert first.decorator.operation == "p/0 scaler"

    second = by_name["p.r1.s1"]
    assert second.route.cluster == "runtime_spark"
    assert (second.route.timeout.seconds, second.route.timeout.nanos) == (0, 40_000_000)

    fallback = by_name["unknown-stage"]
    assert not fallback.match.headers
    assert fallback.direct_response.status == 404


def test_gateway_ingress_routes_grpc_first() -> None:
    ingress = _by_name(build_resources(GATEWAY, STATE)[ROUTE])["ingress"]
    (vhost,) = ingress.virtual_hosts
    assert [(r.match.HasField("grpc"), r.route.cluster) for r in vhost.routes] == [
        (True, "local_gateway_grpc"),
        (False, "local_gateway"),
    ]
    assert all(r.route.timeout.seconds == 0 for r in vhost.routes)  # streaming: no route timeout


def test_gateway_clusters() -> None:
    clusters = _by_name(build_resources(GATEWAY, STATE)[CLUSTER])
    assert list(clusters) == ["local_gateway", "local_gateway_grpc", "runtime_scikit", "runtime_spark"]
    local = clusters["local_gateway"]
    assert local.type == Cluster.STATIC and _H2 not in local.typed_extension_protocol_options  # HTTP/1 API
    grpc = clusters["local_gateway_grpc"]
    assert grpc.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 18084
    assert _H2 in grpc.typed_extension_protocol_options
    for name in ("runtime_scikit", "runtime_spark"):
        cluster = clusters[name]
        assert cluster.type == Cluster.EDS
        assert cluster.eds_cluster_config.eds_config.HasField("ads")
        options = HttpProtocolOptions()
        assert cluster.typed_extension_protocol_options[_H2].Unpack(options)
        assert options.explicit_http_config.HasField("http2_protocol_options")
        assert cluster.outlier_detection.consecutive_5xx.value == 5
        assert cluster.circuit_breakers.thresholds[0].max_requests.value == 4096


def test_gateway_endpoints_come_from_the_registry() -> None:
    assignments = _by_name(build_resources(GATEWAY, STATE)[ENDPOINT])
    assert list(assignments) == ["runtime_scikit", "runtime_spark"]
    (group,) = assignments["runtime_scikit"].endpoints
    addresses = [(e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value) for e in group.lb_endpoints]
    assert addresses == [("10.0.0.5", 9001), ("127.0.0.1", 9002)]  # names resolved to IPs
    assert list(assignments["runtime_spark"].endpoints) == []  # known runtime, no healthy instance


def test_gateway_without_egress_port_has_no_egress() -> None:
    node = dataclasses.replace(GATEWAY, egress_port=0)
    resources = build_resources(node, STATE)
    assert [m.name for m in resources[LISTENER]] == ["ingress"]
    assert resources[ENDPOINT] == []


# --- runtime node -----------------------------------------------------------------------


def test_runtime_node_gets_only_its_ingress() -> None:
    resources = build_resources(RUNTIME, STATE)
    (listener,) = resources[LISTENER]
    assert listener.name == "ingress" and listener.address.socket_address.port_value == 9001
    (routes,) = resources[ROUTE]
    assert routes.name == "ingress"
    assert [r.route.cluster for r in routes.virtual_hosts[0].routes] == ["local_scikit"]
    (cluster,) = resources[CLUSTER]
    assert cluster.name == "local_scikit" and cluster.type == Cluster.STATIC
    assert cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value == 19001
    assert _H2 in cluster.typed_extension_protocol_options  # the runtime speaks gRPC
    assert resources[ENDPOINT] == []


# --- tracing ------------------------------------------------------------------------------


def test_zipkin_only_when_configured() -> None:
    for node in (GATEWAY, RUNTIME):
        resources = build_resources(node, STATE)
        assert "zipkin" not in _by_name(resources[CLUSTER])
        assert all(not _hcm(listener).HasField("tracing") for listener in resources[LISTENER])

    traced = dataclasses.replace(STATE, zipkin=("zipkin.local", 9411), trace_sample_percent=25.0)
    for node in (GATEWAY, RUNTIME):
        resources = build_resources(node, traced)
        zipkin = _by_name(resources[CLUSTER])["zipkin"]
        address = zipkin.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
        assert (zipkin.type, address.address, address.port_value) == (Cluster.STRICT_DNS, "zipkin.local", 9411)
        for listener in resources[LISTENER]:
            tracing = _hcm(listener).tracing
            assert tracing.random_sampling.value == 25.0
            config = ZipkinConfig()
            assert tracing.provider.typed_config.Unpack(config)
            assert config.collector_cluster == "zipkin"
            assert config.collector_endpoint == "/api/v2/spans"
            assert config.collector_endpoint_version == ZipkinConfig.HTTP_JSON
            assert config.trace_id_128bit
            assert not config.HasField("collector_service")  # an HttpService, not a span name
            tags = {t.tag: t for t in tracing.custom_tags}
            assert tags["sluice.node"].literal.value == node.id
            assert tags["sluice.direction"].literal.value == listener.name
            assert tags["sluice.pipeline"].request_header.name == "x-sluice-pipeline"


# --- Snapshot -------------------------------------------------------------------------------


def _snap(node: NodeInfo = GATEWAY, state: MeshState = STATE) -> Snapshot:
    return Snapshot.of(build_resources(node, state))


def test_snapshot_versions_are_content_hashes() -> None:
    a, b = _snap(), _snap()
    assert list(a.versions) == list(PUSH_ORDER)
    assert a.versions == b.versions
    assert all(len(v) == 16 and int(v, 16) >= 0 for v in a.versions.values())
    assert a.resources[CLUSTER]["runtime_scikit"] == b.resources[CLUSTER]["runtime_scikit"]
    # frozenset order and the extra dict do not matter
    reordered = dataclasses.replace(STATE, runtimes=frozenset(["scikit", "spark"]), extra={"x": 1})
    assert _snap(state=reordered).versions == a.versions


def test_a_route_change_changes_only_the_route_version() -> None:
    before = _snap()
    changed = dataclasses.replace(STATE, routes=(dataclasses.replace(ROUTES[0], timeout_ms=999), ROUTES[1]))
    after = _snap(state=changed)
    assert [t for t in PUSH_ORDER if before.versions[t] != after.versions[t]] == [ROUTE]
    # and a runtime node does not see gateway routes at all
    assert _snap(RUNTIME).versions == _snap(RUNTIME, changed).versions


def test_an_endpoint_change_changes_only_the_endpoint_version() -> None:
    moved = dataclasses.replace(STATE, endpoints=(("scikit", (("10.0.0.5", 9001),)),))
    before, after = _snap(), _snap(state=moved)
    assert [t for t in PUSH_ORDER if before.versions[t] != after.versions[t]] == [ENDPOINT]


def test_a_new_runtime_changes_clusters_and_endpoints() -> None:
    more = dataclasses.replace(STATE, runtimes=STATE.runtimes | {"triton"})
    before, after = _snap(), _snap(state=more)
    assert [t for t in PUSH_ORDER if before.versions[t] != after.versions[t]] == [CLUSTER, ENDPOINT]


def test_snapshot_select() -> None:
    snap = _snap()
    everything = snap.select(CLUSTER, [])
    assert len(everything) == 4 and all(a.type_url == CLUSTER for a in everything)
    picked = snap.select(ENDPOINT, ["runtime_spark", "runtime.nope"])
    assert len(picked) == 1
    assignment = ClusterLoadAssignment()
    assert picked[0].Unpack(assignment) and assignment.cluster_name == "runtime_spark"
    route = RouteConfiguration()
    assert snap.select(ROUTE, ["egress"])[0].Unpack(route) and route.name == "egress"
    assert snap.select("type.googleapis.com/unknown", []) == []


# --- SnapshotCache ------------------------------------------------------------------------


class Mesh:
    """A mutable MeshState holder whose build function the cache calls."""

    def __init__(self) -> None:
        self.state = STATE
        self.builds = 0

    def build(self, node: NodeInfo) -> Snapshot:
        self.builds += 1
        return Snapshot.of(build_resources(node, self.state))


async def _ack_all(cache: SnapshotCache, node_id: str) -> None:
    for type_url in PUSH_ORDER:
        await cache.record_ack(node_id, type_url, cache.snapshot(node_id).versions[type_url])


async def test_converged_after_every_type_is_acked() -> None:
    mesh = Mesh()
    cache = SnapshotCache(mesh.build)
    inbox: asyncio.Queue = asyncio.Queue()
    status = cache.attach(GATEWAY, inbox)
    assert status.streams == 1 and mesh.builds == 1
    assert not cache.converged("gateway", PUSH_ORDER)
    for type_url in PUSH_ORDER[:-1]:
        await cache.record_ack(GATEWAY.id, type_url, cache.snapshot(GATEWAY.id).versions[type_url])
    assert not cache.converged("gateway", PUSH_ORDER)
    assert cache.converged("gateway", PUSH_ORDER[:-1])
    await cache.record_ack(GATEWAY.id, ROUTE, "stale-version")
    assert not cache.converged("gateway", PUSH_ORDER)
    await _ack_all(cache, GATEWAY.id)
    assert cache.converged("gateway", PUSH_ORDER)


async def test_rebuild_wakes_streams_only_on_real_changes() -> None:
    mesh = Mesh()
    cache = SnapshotCache(mesh.build)
    inbox: asyncio.Queue = asyncio.Queue()
    cache.attach(GATEWAY, inbox)
    await _ack_all(cache, GATEWAY.id)

    cache.rebuild()  # same state: same versions, nobody woken
    assert inbox.empty() and cache.converged(None, PUSH_ORDER)

    old = dict(cache.snapshot(GATEWAY.id).versions)
    mesh.state = dataclasses.replace(STATE, routes=ROUTES[:1])
    cache.rebuild()
    assert inbox.get_nowait() is SNAPSHOT_CHANGED and inbox.empty()
    new = cache.snapshot(GATEWAY.id).versions
    assert [t for t in PUSH_ORDER if old[t] != new[t]] == [ROUTE]
    assert cache.converged("gateway", (CLUSTER, ENDPOINT, LISTENER))
    assert not cache.converged("gateway", (ROUTE,))


async def test_a_nack_counts_as_settled() -> None:
    mesh = Mesh()
    cache = SnapshotCache(mesh.build)
    cache.attach(GATEWAY, asyncio.Queue())
    await _ack_all(cache, GATEWAY.id)
    mesh.state = dataclasses.replace(STATE, routes=ROUTES[:1])
    cache.rebuild()
    new_route_version = cache.snapshot(GATEWAY.id).versions[ROUTE]
    await cache.record_nack(GATEWAY.id, ROUTE, new_route_version, "Proto constraint validation failed")
    assert cache.converged("gateway", PUSH_ORDER)
    status = cache.nodes()[GATEWAY.id]
    assert (status.nacks, cache.nacks, status.last_nack) == (1, 1, "Proto constraint validation failed")
    assert status.acked[ROUTE] != new_route_version  # the last good version stays acknowledged


async def test_converged_ignores_other_roles_and_closed_streams() -> None:
    cache = SnapshotCache(Mesh().build)
    gateway_inbox: asyncio.Queue = asyncio.Queue()
    cache.attach(GATEWAY, gateway_inbox)
    cache.attach(RUNTIME, asyncio.Queue())
    await _ack_all(cache, GATEWAY.id)
    assert cache.converged("gateway", PUSH_ORDER)
    assert not cache.converged(None, PUSH_ORDER)  # the runtime has not acked
    assert not cache.converged("runtime", PUSH_ORDER)

    cache.detach(GATEWAY.id, gateway_inbox)
    cache.detach(GATEWAY.id, gateway_inbox)  # twice: never below zero
    assert cache.nodes()[GATEWAY.id].streams == 0
    other_runtime = dataclasses.replace(RUNTIME, id="scikit-2")
    assert cache.converged("gateway", PUSH_ORDER)
    inbox2: asyncio.Queue = asyncio.Queue()
    cache.attach(other_runtime, inbox2)
    cache.detach(other_runtime.id, inbox2)
    assert not cache.converged(None, PUSH_ORDER)  # scikit-1 is still connected and unacked


async def test_attach_rebuilds_when_the_node_changes() -> None:
    mesh = Mesh()
    cache = SnapshotCache(mesh.build)
    cache.attach(GATEWAY, asyncio.Queue())
    cache.attach(GATEWAY, asyncio.Queue())  # a second stream, same node: no rebuild
    assert mesh.builds == 1 and cache.nodes()[GATEWAY.id].streams == 2
    cache.attach(dataclasses.replace(GATEWAY, egress_port=18200), asyncio.Queue())
    assert mesh.builds == 2
    listener = Listener()
    assert cache.snapshot(GATEWAY.id).select(LISTENER, ["egress"])[0].Unpack(listener)
    assert listener.address.socket_address.port_value == 18200


async def test_wait_converged() -> None:
    cache = SnapshotCache(Mesh().build)
    cache.attach(GATEWAY, asyncio.Queue())
    waiter = asyncio.create_task(cache.wait_converged("gateway", PUSH_ORDER, timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    await _ack_all(cache, GATEWAY.id)
    assert await asyncio.wait_for(waiter, 1) is True


async def test_wait_converged_wakes_on_a_nack() -> None:
    cache = SnapshotCache(Mesh().build)
    cache.attach(GATEWAY, asyncio.Queue())
    waiter = asyncio.create_task(cache.wait_converged("gateway", (LISTENER,), timeout=5))
    await asyncio.sleep(0)
    await cache.record_nack(GATEWAY.id, LISTENER, cache.snapshot(GATEWAY.id).versions[LISTENER], "bad listener")
    assert await asyncio.wait_for(waiter, 1) is True


async def test_wait_converged_times_out(caplog: pytest.LogCaptureFixture) -> None:
    cache = SnapshotCache(Mesh().build)
    cache.attach(GATEWAY, asyncio.Queue())
    assert await cache.wait_converged("gateway", PUSH_ORDER, timeout=0.05) is False
    assert "did not acknowledge" in caplog.text
    assert await SnapshotCache(Mesh().build).wait_converged(None, PUSH_ORDER, timeout=0.05) is True  # no nodes
