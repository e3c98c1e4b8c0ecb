"""The manager's xDS side without Envoy:

* manager.xds.resources: per-sidecar listeners/clusters/ingress routes, the gateway's
  egress listener (scoped routes, the "no route" local reply), Zipkin tracing, runtime
  clusters and endpoint assignments, pipeline route scopes;
* sluice.wire.runtime_cluster: injective cluster names;
* manager.xds.snapshot: content-hash versions, immutable ResourceSets with a change
  history, layered Snapshots, the passive SnapshotCache;
* manager.xds.layers: incremental mesh layers shared by every gateway snapshot;
* manager.xds.status: the NodeTracker callbacks and convergence;
* manager.xds.ads.DeltaStream: the delta diff, driven through a fake gRPC context.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

import pytest
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.core.v3.base_pb2 import Node
from envoy.config.endpoint.v3.endpoint_pb2 import ClusterLoadAssignment
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.config.route.v3.scoped_route_pb2 import ScopedRouteConfiguration
from envoy.config.trace.v3.zipkin_pb2 import ZipkinConfig
from envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2 import (
    HttpConnectionManager,
)
from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import status_pb2

import manager.xds.layers as layers_module
from manager.xds.ads import DeltaStream
from manager.xds.auth import NodeClaims
from manager.xds.layers import MeshLayers
from manager.xds.resources import (
    CLUSTER,
    ENDPOINT,
    LISTENER,
    PUSH_ORDER,
    ROUTE,
    SCOPED_ROUTE,
    MeshSettings,
    NodeInfo,
    endpoints_resource,
    node_resources,
    pipeline_scope_resource,
    retry_policy,
    runtime_cluster_resource,
)
from manager.xds.snapshot import HISTORY, SNAPSHOT_CHANGED, ResourceSet, Snapshot, SnapshotCache, resource
from manager.xds.status import NodeTracker
from sluice.plan import PipelinePlan, StagePlan
from sluice.tensors import TensorSpec
from sluice.wire import PIPELINE_HEADER, ROUTE_HEADER, UNROUTED, pipeline_scope, route_key, runtime_cluster

_H2 = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

GATEWAY = NodeInfo(
    id="gateway-1", service="gateway", role="gateway", ingress_port=8083, service_port=18083,
    protocol="http", egress_port=18100, grpc_port=18084,
)
RUNTIME = NodeInfo(id="scikit-1", service="scikit", role="runtime", ingress_port=9001, service_port=19001, protocol="grpc")
SERVICE = NodeInfo(id="manager-1", service="sluice.manager", role="service", ingress_port=8080, service_port=18080)
SETTINGS = MeshSettings(listener_address="0.0.0.0", stage_retries=3)
TRACED = dataclasses.replace(SETTINGS, zipkin=("zipkin.local", 9411), trace_sample_percent=25.0)
SPEC = (TensorSpec("x", "FP32", (-1, 4)),)


def plan(name: str, revision: int = 1, runtimes: tuple[str, ...] = ("scikit",), timeout_ms: int = 2000) -> PipelinePlan:
    """A pipeline with one stage per runtime, model ``m<index>``."""
    return PipelinePlan(
        name, revision, "http",
        tuple(
            StagePlan(f"{rt}/m{i}", rt, f"m{i}", "", route_key(name, revision, i), timeout_ms, SPEC, SPEC)
            for i, rt in enumerate(runtimes)
        ),
    )


def _by_name(messages: list) -> dict:
    return {getattr(m, "name", "") or m.cluster_name: m for m in messages}


def _hcm(listener: Listener) -> HttpConnectionManager:
    (chain,) = listener.filter_chains
    (flt,) = chain.filters
    assert flt.name == "envoy.filters.network.http_connection_manager"
    hcm = HttpConnectionManager()
    assert flt.typed_config.Unpack(hcm)
    return hcm


def _socket(address) -> tuple[str, int]:
    return address.socket_address.address, address.socket_address.port_value


# --- NodeInfo ---------------------------------------------------------------------------------


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


# --- node_resources: every sidecar's own resources ----------------------------------------------


@pytest.mark.parametrize(
    "node, local, h2",
    [(GATEWAY, "local_gateway", False), (RUNTIME, "local_scikit", True), (SERVICE, "local_sluice_manager", False)],
)
def test_every_role_gets_an_ingress_to_its_local_process(node: NodeInfo, local: str, h2: bool) -> None:
    built = node_resources(node, SETTINGS)
    ingress = _by_name(built[LISTENER])["ingress"]
    assert _socket(ingress.address) == ("0.0.0.0", node.ingress_port)  # the mesh's listener address
    hcm = MessageToDict(_hcm(ingress), preserving_proto_field_name=True)
    assert hcm["stat_prefix"] == "ingress"
    assert hcm["rds"] == {"route_config_name": "ingress", "config_source": {"ads": {}, "resource_api_version": "V3"}}
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"]
    assert "tracing" not in hcm and "scoped_routes" not in hcm
    # only the gateway's ingress reshapes a reply: its cluster's overflow (manager.xds.limits)
    assert ("local_reply_config" in hcm) == (node.role == "gateway")

    (routes,) = built[ROUTE]
    assert routes.name == "ingress"
    (vhost,) = routes.virtual_hosts
    assert list(vhost.domains) == ["*"]
    assert vhost.routes[-1].route.cluster == local and not vhost.routes[-1].match.HasField("grpc")
    assert all(r.route.timeout.ToSeconds() == 0 for r in vhost.routes)  # streaming: no route timeout

    cluster = _by_name(built[CLUSTER])[local]
    assert cluster.type == Cluster.STATIC
    (group,) = cluster.load_assignment.endpoints
    assert [_socket(e.endpoint.address) for e in group.lb_endpoints] == [("127.0.0.1", node.service_port)]
    assert (_H2 in cluster.typed_extension_protocol_options) is h2  # HTTP/2 only to a gRPC process
    # mesh-wide resources (runtime clusters, endpoints, scopes) are layered beside, not here
    assert not [c for c in built[CLUSTER] if c.name.startswith("runtime_")]
    assert not built.get(ENDPOINT) and not built.get(SCOPED_ROUTE)


def test_gateway_ingress_routes_grpc_first_to_the_grpc_api() -> None:
    built = node_resources(GATEWAY, SETTINGS)
    (vhost,) = built[ROUTE][0].virtual_hosts
    assert [(r.match.HasField("grpc"), r.route.cluster) for r in vhost.routes] == [
        (True, "local_gateway_grpc"),
        (False, "local_gateway"),
    ]
    clusters = _by_name(built[CLUSTER])
    assert list(clusters) == ["local_gateway", "local_gateway_grpc"]
    grpc = clusters["local_gateway_grpc"]
    assert _socket(grpc.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address) == ("127.0.0.1", 18084)
    assert _H2 in grpc.typed_extension_protocol_options


def test_gateway_egress_uses_scoped_routes_keyed_on_the_pipeline_header() -> None:
    listeners = _by_name(node_resources(GATEWAY, SETTINGS)[LISTENER])
    assert list(listeners) == ["ingress", "egress"]
    egress = listeners["egress"]
    assert _socket(egress.address) == ("127.0.0.1", 18100)  # loopback only, whatever the listener address
    hcm = MessageToDict(_hcm(egress), preserving_proto_field_name=True)
    assert hcm["stat_prefix"] == "egress"
    assert "rds" not in hcm
    ads = {"ads": {}, "resource_api_version": "V3"}
    assert hcm["scoped_routes"] == {
        "name": "egress",
        "scope_key_builder": {"fragments": [{"header_value_extractor": {"name": PIPELINE_HEADER, "index": 0}}]},
        "rds_config_source": ads,
        "scoped_rds": {"scoped_rds_config_source": ads},
    }
    # the local rate limit is off unless a stage's route enables it (manager.xds.traffic)
    assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.local_ratelimit", "envoy.filters.http.router"]


def test_gateway_egress_answers_no_route_with_a_404_unrouted() -> None:
    egress = _by_name(node_resources(GATEWAY, SETTINGS)[LISTENER])["egress"]
    (mapper,) = _hcm(egress).local_reply_config.mappers
    assert list(mapper.filter.response_flag_filter.flags) == ["NR"]
    assert mapper.status_code.value == 404
    assert mapper.body.inline_string == UNROUTED


@pytest.mark.parametrize(
    "node",
    [dataclasses.replace(GATEWAY, egress_port=0), dataclasses.replace(RUNTIME, egress_port=18100), SERVICE],
    ids=["gateway-without-egress-port", "runtime-with-egress-port", "service"],
)
def test_only_a_gateway_with_an_egress_port_gets_an_egress(node: NodeInfo) -> None:
    built = node_resources(node, SETTINGS)
    assert [m.name for m in built[LISTENER]] == ["ingress"]
    assert [m.name for m in built[ROUTE]] == ["ingress"]


def test_zipkin_only_when_configured() -> None:
    for node in (GATEWAY, RUNTIME):
        built = node_resources(node, SETTINGS)
        assert "zipkin" not in _by_name(built[CLUSTER])
        assert all(not _hcm(listener).HasField("tracing") for listener in built[LISTENER])

    for node in (GATEWAY, RUNTIME):
        built = node_resources(node, TRACED)
        zipkin = _by_name(built[CLUSTER])["zipkin"]
        address = zipkin.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
        assert (zipkin.type, _socket(address)) == (Cluster.STRICT_DNS, ("zipkin.local", 9411))
        directions = []
        for listener in built[LISTENER]:
            tracing = _hcm(listener).tracing
            assert tracing.random_sampling.value == 25.0
            assert tracing.provider.name == "envoy.tracers.zipkin"
            config = ZipkinConfig()
            assert tracing.provider.typed_config.Unpack(config)
            assert config.collector_cluster == "zipkin"
            assert config.collector_endpoint == "/api/v2/spans"
            assert config.collector_endpoint_version == ZipkinConfig.HTTP_JSON
            assert config.trace_id_128bit and not config.shared_span_context.value
            assert not config.HasField("collector_service")  # an HttpService, not a span name
            tags = {t.tag: MessageToDict(t) for t in tracing.custom_tags}
            assert tags == {
                "sluice.node": {"tag": "sluice.node", "literal": {"value": node.id}},
                "sluice.direction": {"tag": "sluice.direction", "literal": {"value": listener.name}},
                "sluice.pipeline": {"tag": "sluice.pipeline", "requestHeader": {"name": "x-sluice-pipeline"}},
                "sluice.stage": {"tag": "sluice.stage", "requestHeader": {"name": "x-sluice-stage"}},
                "sluice.model": {"tag": "sluice.model", "requestHeader": {"name": "x-sluice-model"}},
            }
            directions.append(listener.name)
        assert directions == (["ingress", "egress"] if node is GATEWAY else ["ingress"])


# --- runtime clusters and endpoints ---------------------------------------------------------------


def test_runtime_cluster_is_eds_over_ads_with_http2_breakers_and_outlier_detection() -> None:
    cluster = runtime_cluster_resource("serving.scikit")
    assert cluster.name == runtime_cluster("serving.scikit") == "runtime_serving_dscikit"
    assert cluster.type == Cluster.EDS
    d = MessageToDict(cluster, preserving_proto_field_name=True)
    assert d["eds_cluster_config"] == {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
    options = HttpProtocolOptions()
    assert cluster.typed_extension_protocol_options[_H2].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    (thresholds,) = d["circuit_breakers"]["thresholds"]
    assert thresholds == {"max_connections": 128, "max_pending_requests": 128, "max_requests": 512, "max_retries": 64}  # ClusterLimits()
    assert d["outlier_detection"] == {
        "consecutive_5xx": 5, "consecutive_gateway_failure": 2, "enforcing_consecutive_gateway_failure": 100,
        "interval": "1s", "base_ejection_time": "2s", "max_ejection_time": "30s", "max_ejection_percent": 50,
    }
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0  # never route to ejected hosts
    assert not cluster.HasField("load_assignment")  # endpoints come through EDS


def test_endpoint_assignment_takes_addresses_resolved_at_registration_only() -> None:
    # host names are resolved when an instance registers (manager.auth.networks), never
    # while building snapshots: a name that reaches this point is left out, not looked up
    assignment = endpoints_resource("scikit", (("10.0.0.5", 9001), ("localhost", 9002), ("::1", 9003)))
    assert assignment.cluster_name == "runtime_scikit"
    (group,) = assignment.endpoints
    assert [_socket(e.endpoint.address) for e in group.lb_endpoints] == [("10.0.0.5", 9001), ("::1", 9003)]


def test_endpoint_assignment_without_endpoints_is_empty() -> None:
    assignment = endpoints_resource("spark", ())
    assert assignment.cluster_name == "runtime_spark" and list(assignment.endpoints) == []


def test_runtime_cluster_names_are_injective_and_dot_free() -> None:
    names = ["a.b", "a_b", "a__b", "a_db", "a._b", "a_.b", "a_d.b"]
    clusters = [runtime_cluster(n) for n in names]
    assert clusters[:4] == ["runtime_a_db", "runtime_a__b", "runtime_a____b", "runtime_a__db"]
    assert len(set(clusters)) == len(names)
    # exhaustively over the characters that could collide, up to length 5
    alphabet = "a_.d"
    seen: dict[str, str] = {}
    for length in range(6):
        for chars in itertools.product(alphabet, repeat=length):
            name = "".join(chars)
            cluster = runtime_cluster(name)
            assert "." not in cluster
            assert seen.setdefault(cluster, name) == name, f"{name!r} and {seen[cluster]!r} share {cluster!r}"


# --- pipeline route scopes ------------------------------------------------------------------------


def test_retry_policy() -> None:
    policy = retry_policy(3)
    assert policy.num_retries.value == 3
    assert set(policy.retry_on.split(",")) == {"connect-failure", "refused-stream", "reset", "unavailable"}
    assert (policy.retry_back_off.base_interval.ToMilliseconds(), policy.retry_back_off.max_interval.ToMilliseconds()) == (5, 50)


def test_pipeline_scope_has_a_route_per_stage_per_live_revision_and_a_fallback() -> None:
    revisions = [plan("iris", 1, ("scikit", "spark"), timeout_ms=2500), plan("iris", 2, ("scikit", "a.b"), timeout_ms=40)]
    scope = pipeline_scope_resource("iris", revisions, retry_policy(3))
    assert isinstance(scope, ScopedRouteConfiguration)
    assert scope.name == pipeline_scope("iris") == "egress.iris"
    assert [f.string_key for f in scope.key.fragments] == ["iris"]  # matched against x-sluice-pipeline
    config = scope.route_configuration
    assert config.name == "egress.iris"
    (vhost,) = config.virtual_hosts
    assert list(vhost.domains) == ["*"]
    routes = {r.name: r for r in vhost.routes}
    assert list(routes) == ["iris.r1.s0", "iris.r1.s1", "iris.r2.s0", "iris.r2.s1", "unknown-stage"]

    expected = {
        "iris.r1.s0": ("runtime_scikit", "2.500s", "iris/0 m0"),
        "iris.r1.s1": ("runtime_spark", "2.500s", "iris/1 m1"),
        "iris.r2.s0": ("runtime_scikit", "0.040s", "iris/0 m0"),
        "iris.r2.s1": ("runtime_a_db", "0.040s", "iris/1 m1"),
    }
    for key, (cluster, timeout, operation) in expected.items():
        d = MessageToDict(routes[key], preserving_proto_field_name=True)
        assert d["match"] == {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": key}}]}
        assert (d["route"]["cluster"], d["route"]["timeout"], d["decorator"]["operation"]) == (cluster, timeout, operation)
        assert routes[key].route.retry_policy == retry_policy(3)

    fallback = MessageToDict(routes["unknown-stage"], preserving_proto_field_name=True)
    assert fallback == {
        "name": "unknown-stage",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": UNROUTED}},
    }


# --- snapshot: resources, resource sets, snapshots ------------------------------------------------


def _cluster(name: str, timeout_s: int = 1) -> Cluster:
    cluster = Cluster(name=name)
    cluster.connect_timeout.seconds = timeout_s
    return cluster


def _r(name: str, timeout_s: int = 1):
    return resource(CLUSTER, _cluster(name, timeout_s))


def test_resource_versions_are_content_hashes() -> None:
    a, again = _r("a"), _r("a")
    assert a == again and a.version == again.version and a.digest == again.digest
    assert len(a.version) == 16 and int(a.version, 16) == a.digest
    assert _r("a", 2).version != a.version  # other bytes
    assert _r("b").version != a.version  # other name
    assert a.name == "a" and a.body.type_url == CLUSTER and Cluster.FromString(a.body.value) == _cluster("a")
    assignment = resource(ENDPOINT, ClusterLoadAssignment(cluster_name="runtime_x"))
    assert assignment.name == "runtime_x"  # named by cluster_name


def test_update_without_a_change_returns_the_same_set() -> None:
    s = ResourceSet.of("clusters", [_r("a"), _r("b")])
    assert s.update() is s
    assert s.update([_r("a")]) is s  # same content: not a change
    assert s.update(removals=["missing"]) is s
    assert s.generation == 0 and s.changed_since(0) == set()


def test_update_makes_a_new_set_one_generation_later() -> None:
    s0 = ResourceSet.of("clusters", [_r("a"), _r("b")])
    s1 = s0.update([_r("a", 2), _r("c")], ["b"])
    assert s1 is not s0 and s1.lineage == "clusters" and s1.generation == 1
    assert sorted(s1.items) == ["a", "c"] and s1.items["a"] == _r("a", 2)
    assert sorted(s0.items) == ["a", "b"] and s0.items["a"] == _r("a")  # the old set is untouched
    assert s1.changed_since(0) == {"a", "b", "c"}
    assert s1.digest == ResourceSet.of("other", [_r("a", 2), _r("c")]).digest


def test_digest_is_order_independent_and_returns_after_add_then_remove() -> None:
    resources = [_r(n) for n in "abcde"]
    forward = ResourceSet.of("x", resources)
    backward = ResourceSet.of("x", reversed(resources))
    stepwise = ResourceSet("x", {})
    for r in [resources[2], resources[0], resources[4], resources[1], resources[3]]:
        stepwise = stepwise.update([r])
    assert forward.digest == backward.digest == stepwise.digest
    assert Snapshot({CLUSTER: (forward,)}).version(CLUSTER) == Snapshot({CLUSTER: (stepwise,)}).version(CLUSTER)

    added = forward.update([_r("f")])
    assert added.digest != forward.digest
    removed = added.update(removals=["f"])
    assert removed.digest == forward.digest and removed.generation == 2
    assert removed.changed_since(0) == {"f"}
    replaced = forward.update([_r("a", 9)]).update([_r("a")])
    assert replaced.digest == forward.digest
    assert Snapshot({CLUSTER: (replaced,)}).version(CLUSTER) == Snapshot({CLUSTER: (forward,)}).version(CLUSTER)


def test_changed_since_over_several_generations() -> None:
    s = ResourceSet("x", {})
    generations = [s]
    for name in ["a", "b", "a", "c"]:
        s = s.update([_r(name, timeout_s=len(generations))])
        generations.append(s)
    assert s.generation == 4
    assert s.changed_since(4) == set()
    assert s.changed_since(3) == {"c"}
    assert s.changed_since(2) == {"a", "c"}
    assert s.changed_since(1) == {"a", "b", "c"}
    assert s.changed_since(0) == {"a", "b", "c"}
    assert generations[2].changed_since(1) == {"b"}  # each set keeps its own history


def test_changed_since_beyond_the_history_is_unknown() -> None:
    s = ResourceSet("x", {})
    for i in range(HISTORY + 5):
        s = s.update([_r(f"r{i}")])
    assert s.generation == HISTORY + 5
    oldest_remembered = s.generation - HISTORY  # the changes of every later generation are known
    assert s.changed_since(oldest_remembered) == {f"r{i}" for i in range(5, HISTORY + 5)}
    assert s.changed_since(oldest_remembered - 1) is None
    assert s.changed_since(0) is None
    assert s.changed_since(s.generation - 1) == {f"r{HISTORY + 4}"}
    assert ResourceSet("fresh", {}).changed_since(-1) is None  # no history at all


def test_snapshot_version_get_count_select_over_layers() -> None:
    own = ResourceSet.of("own", [_r("local"), _r("zipkin")])
    shared = ResourceSet.of("shared", [_r("runtime_a"), _r("runtime_b")])
    snap = Snapshot({CLUSTER: (own, shared), ENDPOINT: ()})
    flat = Snapshot({CLUSTER: (ResourceSet.of("flat", [*own.items.values(), *shared.items.values()]),)})
    assert snap.version(CLUSTER) == flat.version(CLUSTER)  # the XOR of the layers: the layering does not matter
    assert len(snap.version(CLUSTER)) == 16
    assert snap.version(ENDPOINT) == snap.version(LISTENER) == "0" * 16  # nothing there
    assert snap.versions == {CLUSTER: snap.version(CLUSTER), ENDPOINT: "0" * 16}
    assert snap.count(CLUSTER) == 4 and snap.count(ENDPOINT) == 0 and snap.count(LISTENER) == 0
    assert snap.get(CLUSTER, "runtime_b") is shared.items["runtime_b"]
    assert snap.get(CLUSTER, "local") is own.items["local"]
    assert snap.get(CLUSTER, "nope") is None and snap.get(LISTENER, "local") is None
    assert sorted(r.name for r in snap.resources(CLUSTER)) == ["local", "runtime_a", "runtime_b", "zipkin"]
    assert len(snap.select(CLUSTER, [])) == 4 and all(a.type_url == CLUSTER for a in snap.select(CLUSTER, []))
    (picked,) = snap.select(CLUSTER, ["runtime_a", "nope"])
    assert Cluster.FromString(picked.value).name == "runtime_a"
    assert snap.select("type.googleapis.com/unknown", []) == []

    moved = shared.update([_r("runtime_b", 5)])
    assert Snapshot({CLUSTER: (own, moved)}).version(CLUSTER) != snap.version(CLUSTER)


async def test_snapshot_cache_wakes_watchers_only_on_a_new_snapshot() -> None:
    cache = SnapshotCache()
    first, second = asyncio.Queue(), asyncio.Queue()
    cache.watch("n1", first)
    cache.watch("n1", second)
    other: asyncio.Queue = asyncio.Queue()
    cache.watch("n2", other)
    snap = Snapshot({CLUSTER: (ResourceSet.of("x", [_r("a")]),)})
    cache.set_snapshot("n1", snap)
    assert cache.snapshot("n1") is snap and cache.node_ids() == ["n1"]
    assert first.get_nowait() is SNAPSHOT_CHANGED and second.get_nowait() is SNAPSHOT_CHANGED
    assert other.empty()
    cache.set_snapshot("n1", snap)  # the very same snapshot: nobody woken
    assert first.empty() and second.empty()
    assert cache.unwatch("n1", first) == 1
    cache.set_snapshot("n1", Snapshot({}))
    assert first.empty() and second.get_nowait() is SNAPSHOT_CHANGED
    assert cache.unwatch("n1", second) == 0
    assert cache.unwatch("n1", second) == 0  # twice: harmless
    cache.clear("n1")
    assert cache.snapshot("n1") is None and cache.node_ids() == []
    cache.clear("n1")


# --- MeshLayers -----------------------------------------------------------------------------------


def test_one_pipeline_among_1000_changes_one_scope_resource() -> None:
    layers = MeshLayers(SETTINGS)
    layers.set_pipelines({f"p{i}": [plan(f"p{i}", runtimes=("scikit", "spark"))] for i in range(1000)})
    scopes, clusters, endpoints = layers.scopes, layers.clusters, layers.endpoints
    assert len(scopes.items) == 1000 and sorted(clusters.items) == ["runtime_scikit", "runtime_spark"]
    version = Snapshot({SCOPED_ROUTE: (scopes,)}).version(SCOPED_ROUTE)

    layers.set_pipelines({"p500": [plan("p500", 1, ("scikit", "spark")), plan("p500", 2, ("scikit", "spark"))]})
    assert layers.scopes.generation == scopes.generation + 1
    assert layers.scopes.changed_since(scopes.generation) == {"egress.p500"}
    assert len(layers.scopes.items) == 1000
    assert layers.scopes.items["egress.p1"] is scopes.items["egress.p1"]  # the others are not rebuilt
    assert layers.clusters is clusters and layers.endpoints is endpoints  # known runtimes: untouched
    assert Snapshot({SCOPED_ROUTE: (layers.scopes,)}).version(SCOPED_ROUTE) != version

    before = layers.scopes
    layers.set_pipelines({"p500": [plan("p500", 1, ("scikit", "spark")), plan("p500", 2, ("scikit", "spark"))]})
    assert layers.scopes is before  # the same revisions again: no change at all

    layers.set_pipelines({"p7": []})  # withdrawn
    assert layers.scopes.changed_since(before.generation) == {"egress.p7"}
    assert "egress.p7" not in layers.scopes.items and len(layers.scopes.items) == 999


def test_scope_resource_of_a_pipeline_is_its_route_scope() -> None:
    layers = MeshLayers(SETTINGS)
    layers.set_pipelines({"iris": [plan("iris", 3)]})
    stored = layers.scopes.items["egress.iris"]
    assert stored.body.type_url == SCOPED_ROUTE
    scope = ScopedRouteConfiguration.FromString(stored.body.value)
    assert scope == pipeline_scope_resource("iris", [plan("iris", 3)], retry_policy(SETTINGS.stage_retries))
    assert [r.route.retry_policy.num_retries.value for r in scope.route_configuration.virtual_hosts[0].routes[:-1]] == [3]


def test_runtimes_referenced_by_a_plan_get_a_cluster_and_an_assignment() -> None:
    layers = MeshLayers(SETTINGS)
    layers.set_pipelines({"p": [plan("p", runtimes=("a.b", "c"))]})
    assert sorted(layers.clusters.items) == ["runtime_a_db", "runtime_c"]
    assert sorted(layers.endpoints.items) == ["runtime_a_db", "runtime_c"]
    cluster = Cluster.FromString(layers.clusters.items["runtime_c"].body.value)
    assert cluster == runtime_cluster_resource("c")
    assignment = ClusterLoadAssignment.FromString(layers.endpoints.items["runtime_c"].body.value)
    assert assignment == endpoints_resource("c", ())  # no instance known yet
    clusters = layers.clusters
    layers.add_runtimes({"c", "a.b"})
    assert layers.clusters is clusters
    # withdrawing the pipeline keeps the clusters: a route never points at a missing cluster
    layers.set_pipelines({"p": []})
    assert layers.clusters is clusters


def test_endpoint_changes_rebuild_only_that_runtimes_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def counting(runtime: str, endpoints: tuple) -> ClusterLoadAssignment:
        built.append(runtime)
        return endpoints_resource(runtime, endpoints)

    monkeypatch.setattr(layers_module, "endpoints_resource", counting)
    layers = MeshLayers(SETTINGS)
    layers.add_runtimes({"scikit", "spark", "idle"})
    layers.set_endpoints({"scikit": (("10.0.0.1", 9001),), "spark": (("10.0.0.2", 9002),)})
    first = layers.endpoints
    assert ClusterLoadAssignment.FromString(first.items["runtime_spark"].body.value) == endpoints_resource("spark", (("10.0.0.2", 9002),))

    built.clear()
    layers.set_endpoints({"scikit": (("10.0.0.1", 9001), ("10.0.0.3", 9001)), "spark": (("10.0.0.2", 9002),)})
    assert built == ["scikit"]  # the others are not even rebuilt
    assert layers.endpoints.changed_since(first.generation) == {"runtime_scikit"}
    assert layers.endpoints.items["runtime_spark"] is first.items["runtime_spark"]
    (group,) = ClusterLoadAssignment.FromString(layers.endpoints.items["runtime_scikit"].body.value).endpoints
    assert len(group.lb_endpoints) == 2

    same = layers.endpoints
    layers.set_endpoints({"scikit": (("10.0.0.1", 9001), ("10.0.0.3", 9001)), "spark": (("10.0.0.2", 9002),)})
    assert layers.endpoints is same  # nothing changed: nothing rebuilt

    layers.set_endpoints({"scikit": (("10.0.0.1", 9001), ("10.0.0.3", 9001))})  # spark lost its instances
    assert layers.endpoints.changed_since(same.generation) == {"runtime_spark"}
    assert list(ClusterLoadAssignment.FromString(layers.endpoints.items["runtime_spark"].body.value).endpoints) == []
    assert "runtime_spark" in layers.clusters.items  # the cluster stays

    clusters = layers.clusters
    layers.set_endpoints({"scikit": (("10.0.0.1", 9001), ("10.0.0.3", 9001)), "new": (("10.0.0.9", 1),)})
    assert layers.clusters.changed_since(clusters.generation) == {"runtime_new"}  # a runtime seen first in the registry
    assert ClusterLoadAssignment.FromString(layers.endpoints.items["runtime_new"].body.value) == endpoints_resource("new", (("10.0.0.9", 1),))


def test_gateway_snapshots_share_the_mesh_layers() -> None:
    layers = MeshLayers(SETTINGS)
    layers.set_pipelines({"p": [plan("p")]})
    other_gateway = dataclasses.replace(GATEWAY, id="gateway-2", egress_port=18200)
    a, b = layers.snapshot_for(GATEWAY), layers.snapshot_for(other_gateway)
    assert list(a.layers) == list(PUSH_ORDER)
    for snap in (a, b):
        assert snap.layers[SCOPED_ROUTE] == (layers.scopes,) and snap.layers[SCOPED_ROUTE][0] is layers.scopes
        assert snap.layers[ENDPOINT][0] is layers.endpoints
        assert snap.layers[CLUSTER][1] is layers.clusters
    assert a.layers[LISTENER][0] is not b.layers[LISTENER][0]  # each node's own listeners
    assert a.get(LISTENER, "egress") != b.get(LISTENER, "egress")
    assert sorted(r.name for r in a.resources(CLUSTER)) == ["local_gateway", "local_gateway_grpc", "runtime_scikit"]
    assert a.get(SCOPED_ROUTE, "egress.p") is layers.scopes.items["egress.p"]
    assert [r.name for r in a.resources(ROUTE)] == ["ingress"]
    # a node's own layers are built once
    again = layers.snapshot_for(GATEWAY)
    assert all(again.layers[t][0] is a.layers[t][0] for t in PUSH_ORDER)
    assert again.versions == a.versions

    layers.set_pipelines({"q": [plan("q", runtimes=("spark",))]})
    after = layers.snapshot_for(GATEWAY)
    changed = [t for t in PUSH_ORDER if after.version(t) != a.version(t)]
    assert changed == [CLUSTER, ENDPOINT, SCOPED_ROUTE]  # a new runtime and a new scope; listeners, routes as they were


@pytest.mark.parametrize("node", [RUNTIME, SERVICE, dataclasses.replace(GATEWAY, egress_port=0)], ids=["runtime", "service", "gateway-without-egress"])
def test_nodes_without_an_egress_get_no_mesh_resources(node: NodeInfo) -> None:
    layers = MeshLayers(TRACED)
    layers.set_pipelines({"p": [plan("p")]})
    layers.set_endpoints({"scikit": (("10.0.0.1", 9001),)})
    snap = layers.snapshot_for(node)
    assert snap.count(SCOPED_ROUTE) == 0 and snap.count(ENDPOINT) == 0
    assert [r.name for r in snap.resources(LISTENER)] == ["ingress"]
    assert not [r.name for r in snap.resources(CLUSTER) if r.name.startswith("runtime_")]
    assert "zipkin" in {r.name for r in snap.resources(CLUSTER)}
    shared = {id(layers.scopes), id(layers.clusters), id(layers.endpoints)}
    assert not [layer for t in PUSH_ORDER for layer in snap.layers[t] if id(layer) in shared]
    before = snap.versions
    layers.set_pipelines({"q": [plan("q", runtimes=("spark",))]})
    assert layers.snapshot_for(node).versions == before  # the mesh changes nothing for this node


# --- NodeTracker ----------------------------------------------------------------------------------


class Mesh:
    """Layers + cache + tracker, as the control plane wires them."""

    def __init__(self, settings: MeshSettings = SETTINGS) -> None:
        self.layers = MeshLayers(settings)
        self.cache = SnapshotCache()
        self.provided: list[NodeInfo] = []
        self.tracker = NodeTracker(self.cache, self.provide)

    def provide(self, node: NodeInfo) -> None:
        self.provided.append(node)
        self.cache.set_snapshot(node.id, self.layers.snapshot_for(node))

    def push(self) -> None:
        for status in self.tracker.nodes().values():
            self.cache.set_snapshot(status.info.id, self.layers.snapshot_for(status.info))

    def ack_all(self, node_id: str, types: tuple[str, ...] = PUSH_ORDER) -> None:
        for t in types:
            self.tracker.on_ack(node_id, t, self.cache.snapshot(node_id).version(t))


async def test_tracker_provides_a_snapshot_once_per_node() -> None:
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)
    mesh.tracker.on_node(GATEWAY)  # a second stream of the same node
    assert mesh.provided == [GATEWAY]
    assert mesh.tracker.nodes()[GATEWAY.id].streams == 2
    assert mesh.cache.snapshot(GATEWAY.id) is not None


async def test_converged_after_every_type_is_acked() -> None:
    mesh = Mesh()
    mesh.layers.set_pipelines({"p": [plan("p")]})
    mesh.tracker.on_node(GATEWAY)
    assert not mesh.tracker.converged("gateway", PUSH_ORDER)
    mesh.ack_all(GATEWAY.id, PUSH_ORDER[:-1])
    assert not mesh.tracker.converged("gateway", PUSH_ORDER)
    assert mesh.tracker.converged("gateway", PUSH_ORDER[:-1])
    mesh.tracker.on_ack(GATEWAY.id, ROUTE, "stale-version")
    assert not mesh.tracker.converged("gateway", PUSH_ORDER)
    mesh.ack_all(GATEWAY.id)
    assert mesh.tracker.converged("gateway", PUSH_ORDER)

    mesh.layers.set_pipelines({"q": [plan("q")]})  # a new scope only
    mesh.push()
    assert mesh.tracker.converged("gateway", (CLUSTER, ENDPOINT, LISTENER, ROUTE))
    assert not mesh.tracker.converged("gateway", (SCOPED_ROUTE,))


async def test_types_a_node_holds_nothing_of_need_no_ack() -> None:
    mesh = Mesh()
    mesh.tracker.on_node(RUNTIME)
    mesh.ack_all(RUNTIME.id, (CLUSTER, LISTENER, ROUTE))  # no endpoints, no scopes for a runtime
    assert mesh.tracker.converged(None, PUSH_ORDER)


async def test_a_nack_counts_as_settled() -> None:
    mesh = Mesh()
    mesh.layers.add_runtimes({"scikit"})  # so that the pipeline below changes only the scopes
    mesh.tracker.on_node(GATEWAY)
    mesh.ack_all(GATEWAY.id)
    good = mesh.cache.snapshot(GATEWAY.id).version(SCOPED_ROUTE)
    mesh.layers.set_pipelines({"p": [plan("p")]})
    mesh.push()
    new = mesh.cache.snapshot(GATEWAY.id).version(SCOPED_ROUTE)
    assert not mesh.tracker.converged("gateway", PUSH_ORDER)
    mesh.tracker.on_nack(GATEWAY.id, SCOPED_ROUTE, new, "Proto constraint validation failed")
    assert mesh.tracker.converged("gateway", PUSH_ORDER)
    status = mesh.tracker.nodes()[GATEWAY.id]
    assert (status.nacks, mesh.tracker.nacks, status.last_nack) == (1, 1, "Proto constraint validation failed")
    assert status.acked[SCOPED_ROUTE] == good  # the last good version stays acknowledged


async def test_converged_filters_by_role_and_forgets_closed_nodes() -> None:
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)
    mesh.tracker.on_node(RUNTIME)
    mesh.ack_all(GATEWAY.id)
    assert mesh.tracker.converged("gateway", PUSH_ORDER)
    assert not mesh.tracker.converged(None, PUSH_ORDER)  # the runtime has not acked
    assert not mesh.tracker.converged("runtime", PUSH_ORDER)

    mesh.tracker.on_stream_closed(RUNTIME.id)
    assert RUNTIME.id not in mesh.tracker.nodes() and mesh.cache.snapshot(RUNTIME.id) is None
    assert mesh.tracker.converged(None, PUSH_ORDER)
    mesh.tracker.on_stream_closed(RUNTIME.id)  # unknown now: ignored
    mesh.tracker.on_ack(RUNTIME.id, CLUSTER, "x")  # a late ACK of a forgotten node: ignored
    assert RUNTIME.id not in mesh.tracker.nodes()


async def test_a_node_stays_while_one_of_its_streams_is_open() -> None:
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)
    mesh.tracker.on_node(GATEWAY)
    mesh.tracker.on_stream_closed(GATEWAY.id)
    assert mesh.tracker.nodes()[GATEWAY.id].streams == 1
    assert mesh.cache.snapshot(GATEWAY.id) is not None
    mesh.tracker.on_stream_closed(GATEWAY.id)
    assert GATEWAY.id not in mesh.tracker.nodes() and mesh.cache.snapshot(GATEWAY.id) is None


async def test_a_node_reconnecting_with_new_metadata_is_rebuilt() -> None:
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)
    mesh.tracker.on_stream_closed(GATEWAY.id)
    moved = dataclasses.replace(GATEWAY, egress_port=18200)
    mesh.tracker.on_node(moved)
    assert mesh.provided == [GATEWAY, moved]
    listener = Listener.FromString(mesh.cache.snapshot(GATEWAY.id).get(LISTENER, "egress").body.value)
    assert listener.address.socket_address.port_value == 18200


async def test_a_node_reconnecting_with_new_metadata_before_its_old_stream_closed_stays_tracked() -> None:
    """Envoy restarted with a new bootstrap (same node id) and reconnected before the manager
    saw its old stream end: when the old stream finally closes, the new one is still open,
    so the node must stay tracked and keep its snapshot."""
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)  # the old stream
    moved = dataclasses.replace(GATEWAY, egress_port=18200)
    mesh.tracker.on_node(moved)  # the new stream, new metadata
    mesh.tracker.on_stream_closed(GATEWAY.id)  # the old stream ends
    assert GATEWAY.id in mesh.tracker.nodes()
    assert mesh.tracker.nodes()[GATEWAY.id].info == moved
    assert mesh.cache.snapshot(GATEWAY.id) is not None


async def test_wait_converged_wakes_on_an_ack_and_on_a_nack() -> None:
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)
    waiter = asyncio.create_task(mesh.tracker.wait_converged("gateway", PUSH_ORDER, timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    mesh.ack_all(GATEWAY.id)
    assert await asyncio.wait_for(waiter, 2) is True

    mesh.layers.set_pipelines({"p": [plan("p")]})
    mesh.push()
    waiter = asyncio.create_task(mesh.tracker.wait_converged("gateway", (SCOPED_ROUTE,), timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    mesh.tracker.on_nack(GATEWAY.id, SCOPED_ROUTE, mesh.cache.snapshot(GATEWAY.id).version(SCOPED_ROUTE), "bad scope")
    assert await asyncio.wait_for(waiter, 2) is True


async def test_wait_converged_times_out(caplog: pytest.LogCaptureFixture) -> None:
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)
    assert await mesh.tracker.wait_converged("gateway", PUSH_ORDER, timeout=0.05) is False
    assert "did not acknowledge" in caplog.text
    assert await Mesh().tracker.wait_converged(None, PUSH_ORDER, timeout=0.05) is True  # no nodes


# --- DeltaStream, driven by hand ------------------------------------------------------------------


def _gateway_node(node_id: str = "gw") -> Node:
    node = Node(id=node_id, cluster="gateway")
    node.metadata.update(
        {"sluice.role": "gateway", "sluice.service": "gateway", "sluice.ingress_port": 8083, "sluice.service_port": 18083, "sluice.egress_port": 18100}
    )
    return node


class Recorder:
    """The stream's callbacks: the mesh's NodeTracker (which provides snapshots and tracks ACKs),
    plus a record of what the stream reported."""

    def __init__(self, mesh: Mesh) -> None:
        self.tracker = mesh.tracker
        self.acks: asyncio.Queue = asyncio.Queue()
        self.nacks: list[tuple[str, str, str]] = []
        self.closed: list[str] = []
        self.pushes = 0

    def on_node(self, info: NodeInfo) -> None:
        self.tracker.on_node(info)

    def on_push(self, size: int = 0) -> None:
        self.pushes += 1

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        self.tracker.on_ack(node_id, type_url, version)
        self.acks.put_nowait((type_url, version))

    def on_nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        self.tracker.on_nack(node_id, type_url, version, message)
        self.nacks.append((type_url, version, message))
        self.acks.put_nowait(("NACK", version))

    def on_stream_closed(self, node_id: str) -> None:
        self.tracker.on_stream_closed(node_id)
        self.closed.append(node_id)


class FakeContext:
    """A grpc.aio context that keeps what the stream writes, with the stream's warming state at that moment."""

    def __init__(self) -> None:
        self.writes: asyncio.Queue = asyncio.Queue()
        self.stream: DeltaStream | None = None
        self.written_while_warming: list[str] = []

    async def write(self, message: discovery_pb2.DeltaDiscoveryResponse) -> None:
        types = self.stream.types
        if message.type_url in (LISTENER, SCOPED_ROUTE, ROUTE) and (types[CLUSTER].pending or types[ENDPOINT].pending):
            self.written_while_warming.append(message.type_url)
        self.writes.put_nowait(message)

    async def abort(self, code, details: str) -> None:
        raise AssertionError(f"stream aborted: {code} {details}")


class DeltaClient:
    """Envoy's side of one delta stream: requests in, responses out.

    A stream handles each request, then flushes, without yielding to the event loop in
    between (the fake context's write does not suspend), so when an awaited ACK or
    response arrives, everything that request caused has been written."""

    def __init__(self, mesh: Mesh) -> None:
        self.callbacks = Recorder(mesh)
        self.context = FakeContext()
        # the stream's token names the gateway node the tests announce (manager.xds.auth)
        self.stream = DeltaStream(mesh.cache, self.callbacks, self.context, NodeClaims("gw", "gateway", "gateway"))
        self.context.stream = self.stream
        self.requests: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.create_task(self.stream.run(self._requests()))

    async def _requests(self):
        while (request := await self.requests.get()) is not None:
            yield request

    def send(self, **fields) -> None:
        self.requests.put_nowait(discovery_pb2.DeltaDiscoveryRequest(**fields))

    async def response(self) -> discovery_pb2.DeltaDiscoveryResponse:
        return await asyncio.wait_for(self.context.writes.get(), 2)

    async def acks(self) -> list[tuple[str, str]]:
        """The ACKs (and "nothing to send" settlements) the stream reported for the last input."""
        got = [await asyncio.wait_for(self.callbacks.acks.get(), 2)]
        while not self.callbacks.acks.empty():
            got.append(self.callbacks.acks.get_nowait())
        return got

    def nothing_written(self) -> bool:
        return self.context.writes.empty()

    async def ack(self, response: discovery_pb2.DeltaDiscoveryResponse) -> list[tuple[str, str]]:
        self.send(type_url=response.type_url, response_nonce=response.nonce)
        return await self.acks()

    async def close(self) -> None:
        self.requests.put_nowait(None)
        await asyncio.wait_for(self.task, 2)


def _names(response: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return sorted(r.name for r in response.resources)


@pytest.fixture
def mesh() -> Mesh:
    mesh = Mesh()
    mesh.layers.set_pipelines({f"p{i}": [plan(f"p{i}")] for i in range(5)})
    return mesh


async def test_delta_wildcard_sends_everything_then_only_what_changes(mesh: Mesh) -> None:
    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=SCOPED_ROUTE)  # names nothing: the wildcard
    first = await client.response()
    snapshot = mesh.cache.snapshot("gw")
    assert first.type_url == SCOPED_ROUTE
    assert _names(first) == [f"egress.p{i}" for i in range(5)]
    assert list(first.removed_resources) == []
    assert first.system_version_info == snapshot.version(SCOPED_ROUTE)
    for r in first.resources:
        assert (r.version, r.resource) == (snapshot.get(SCOPED_ROUTE, r.name).version, snapshot.get(SCOPED_ROUTE, r.name).body)

    assert (SCOPED_ROUTE, snapshot.version(SCOPED_ROUTE)) in await client.ack(first)
    assert client.nothing_written()  # acknowledged, nothing changed: nothing more to send

    mesh.layers.set_pipelines({"p2": [plan("p2"), plan("p2", 2)]})
    mesh.push()
    change = await client.response()
    assert _names(change) == ["egress.p2"] and list(change.removed_resources) == []
    assert change.resources[0].version == mesh.layers.scopes.items["egress.p2"].version
    await client.ack(change)

    mesh.layers.set_pipelines({"p3": []})
    mesh.push()
    removal = await client.response()
    assert list(removal.resources) == [] and list(removal.removed_resources) == ["egress.p3"]
    assert removal.system_version_info == mesh.cache.snapshot("gw").version(SCOPED_ROUTE)
    await client.ack(removal)

    mesh.push()  # a new snapshot with nothing new for this type
    assert await client.acks() == [(SCOPED_ROUTE, mesh.cache.snapshot("gw").version(SCOPED_ROUTE))]
    assert client.nothing_written()

    await client.close()
    assert client.callbacks.closed == ["gw"]
    assert client.callbacks.pushes == 3


async def test_delta_holds_a_change_until_the_pending_response_is_acked(mesh: Mesh) -> None:
    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=SCOPED_ROUTE)
    first = await client.response()
    mesh.layers.set_pipelines({"p1": [plan("p1", 2)]})
    mesh.push()  # queued before the ACK below: handled while `first` is unacknowledged
    acks = await client.ack(first)
    assert acks[0] == (SCOPED_ROUTE, first.system_version_info)  # the ACK matched: nothing was sent in between
    held = await client.response()
    assert _names(held) == ["egress.p1"] and list(held.removed_resources) == []
    assert client.nothing_written()
    await client.close()


async def test_delta_nack_is_reported_and_not_resent(mesh: Mesh) -> None:
    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=SCOPED_ROUTE)
    first = await client.response()
    await client.ack(first)
    mesh.layers.set_pipelines({"p0": [plan("p0", 2)]})
    mesh.push()
    bad = await client.response()
    client.send(type_url=SCOPED_ROUTE, response_nonce=bad.nonce, error_detail=status_pb2.Status(code=3, message="bad scope"))
    got = await client.acks()
    assert client.callbacks.nacks == [(SCOPED_ROUTE, bad.system_version_info, "bad scope")]
    assert got[0] == ("NACK", bad.system_version_info)
    assert client.nothing_written()  # the rejected version is not pushed again
    client.send(type_url=SCOPED_ROUTE, response_nonce="stale-nonce")  # answers nothing pending: ignored
    mesh.layers.set_pipelines({"p0": [plan("p0", 3)]})
    mesh.push()
    fixed = await client.response()
    assert _names(fixed) == ["egress.p0"]
    await client.close()


async def test_delta_explicit_subscription_gets_only_its_names(mesh: Mesh) -> None:
    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=SCOPED_ROUTE, resource_names_subscribe=["egress.p1", "egress.absent"])
    first = await client.response()
    assert _names(first) == ["egress.p1"]
    await client.ack(first)
    mesh.layers.set_pipelines({"p2": [plan("p2", 2)]})  # not subscribed
    mesh.push()
    await client.acks()
    assert client.nothing_written()
    mesh.layers.set_pipelines({"p1": [plan("p1", 2)], "absent": [plan("absent")]})
    mesh.push()
    change = await client.response()
    assert _names(change) == ["egress.absent", "egress.p1"]
    await client.close()


async def test_delta_reconnect_sends_only_what_differs_from_initial_versions(mesh: Mesh) -> None:
    held = {r.name: r.version for r in mesh.layers.scopes.items.values()}
    held["egress.gone"] = "0123456789abcdef"  # withdrawn while Envoy was away
    mesh.layers.set_pipelines({"p1": [plan("p1", 2)]})  # changed while Envoy was away

    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=SCOPED_ROUTE, initial_resource_versions=held)
    response = await client.response()
    assert _names(response) == ["egress.p1"]
    assert list(response.removed_resources) == ["egress.gone"]
    await client.close()

    # a client that already holds exactly the current resources gets an empty first answer
    # (Envoy waits for one on every new subscription, until its initial fetch times out)
    current = {r.name: r.version for r in mesh.layers.scopes.items.values()}
    again = DeltaClient(mesh)
    again.send(node=_gateway_node(), type_url=SCOPED_ROUTE, initial_resource_versions=current)
    empty = await again.response()
    assert _names(empty) == [] and list(empty.removed_resources) == []
    assert empty.system_version_info == mesh.cache.snapshot("gw").version(SCOPED_ROUTE)
    await again.close()


async def test_delta_holds_routes_until_clusters_are_acked(mesh: Mesh) -> None:
    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=CLUSTER)
    clusters = await client.response()
    assert _names(clusters) == ["local_gateway", "runtime_scikit"]
    client.send(type_url=SCOPED_ROUTE)  # subscribed while the clusters are unacknowledged
    client.send(type_url=CLUSTER, response_nonce=clusters.nonce)
    assert (CLUSTER, clusters.system_version_info) in await client.acks()
    scopes = await client.response()
    assert scopes.type_url == SCOPED_ROUTE and len(scopes.resources) == 5
    await client.ack(scopes)

    # a pipeline on a new runtime: its cluster first, its scope only after the cluster's ACK
    mesh.layers.set_pipelines({"p9": [plan("p9", runtimes=("spark",))]})
    mesh.push()
    new_cluster = await client.response()
    assert new_cluster.type_url == CLUSTER and _names(new_cluster) == ["runtime_spark"]
    assert client.nothing_written()
    await client.ack(new_cluster)
    new_scope = await client.response()
    assert new_scope.type_url == SCOPED_ROUTE and _names(new_scope) == ["egress.p9"]
    assert client.context.written_while_warming == []
    await client.close()


async def test_delta_answers_every_new_subscription_even_when_empty(mesh: Mesh) -> None:
    # Envoy holds a wildcard subscription (and its listener) warming until a first answer
    # comes, so an empty type is answered with an empty response, not with silence
    mesh.layers.set_pipelines({name: [] for name in [r.name.removeprefix("egress.") for r in mesh.layers.scopes.items.values()]})
    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=SCOPED_ROUTE)
    first = await client.response()
    assert first.type_url == SCOPED_ROUTE and _names(first) == [] and list(first.removed_resources) == []
    await client.close()


async def test_delta_answers_a_name_that_does_not_exist_as_removed(mesh: Mesh) -> None:
    client = DeltaClient(mesh)
    client.send(node=_gateway_node(), type_url=ENDPOINT, resource_names_subscribe=["runtime_scikit", "runtime_nowhere"])
    response = await client.response()
    assert _names(response) == ["runtime_scikit"]
    assert list(response.removed_resources) == ["runtime_nowhere"]
    await client.close()


async def test_a_node_that_misses_the_deadline_costs_one_timeout_then_is_waited_for_again_once_caught_up() -> None:
    mesh = Mesh()
    mesh.tracker.on_node(GATEWAY)
    mesh.ack_all(GATEWAY.id)
    stuck = dataclasses.replace(GATEWAY, id="gateway-stuck")
    mesh.tracker.on_node(stuck)  # connected, never acknowledges anything
    assert await mesh.tracker.wait_converged("gateway", PUSH_ORDER, timeout=0.2) is False
    assert mesh.tracker.nodes()[stuck.id].lagging and not mesh.tracker.nodes()[GATEWAY.id].lagging

    mesh.layers.set_pipelines({"p": [plan("p")]})
    mesh.push()
    mesh.ack_all(GATEWAY.id)
    started = time.monotonic()
    assert await mesh.tracker.wait_converged("gateway", PUSH_ORDER, timeout=5) is True  # not waited for
    assert time.monotonic() - started < 0.5

    mesh.ack_all(stuck.id)  # it caught up: waited for again at the next change
    assert not mesh.tracker.nodes()[stuck.id].lagging
    mesh.layers.set_pipelines({"q": [plan("q")]})
    mesh.push()
    mesh.ack_all(GATEWAY.id)
    assert not mesh.tracker.converged("gateway", PUSH_ORDER)
