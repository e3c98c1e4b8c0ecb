"""Builds each Envoy sidecar's listeners, routes, clusters and endpoints.

A sidecar says what it fronts in its bootstrap's node metadata (``sluice.*`` keys:
role, ingress port, local service port, protocol); the mesh state says which
runtimes and pipeline stages exist. From the two, ``build_resources`` makes the
xDS v3 messages for that node:

* every sidecar: an ``ingress`` listener on its public port to its local process;
* the gateway's sidecar, also: an ``egress`` listener (gRPC, h2c) whose RDS route
  table has one route per pipeline stage, matched on the ``x-sluice-route`` header,
  to an EDS cluster per runtime, with the stage's timeout and retry policy.

Tracing (Zipkin) is added to every HTTP connection manager when the mesh state
names a collector.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

# The _pb2 modules must be imported for json_format to resolve their "@type"s.
import envoy.config.cluster.v3.cluster_pb2 as cluster_pb2
import envoy.config.endpoint.v3.endpoint_pb2 as endpoint_pb2
import envoy.config.listener.v3.listener_pb2 as listener_pb2
import envoy.config.route.v3.route_pb2 as route_pb2
import envoy.config.trace.v3.zipkin_pb2  # noqa: F401
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2  # noqa: F401
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
#: the order in which types are pushed: clusters warm before anything points at them
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

ROUTE_HEADER = "x-sluice-route"
#: the egress fallback route's answer: the call reached no runtime, so it is safe to retry
UNROUTED = "sluice: no route for this stage"
EGRESS_ROUTES = "egress"
INGRESS_ROUTES = "ingress"
ZIPKIN_CLUSTER = "zipkin"

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
_H2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


@dataclass(frozen=True)
class NodeInfo:
    """What a sidecar fronts, from its bootstrap's node metadata."""

    id: str
    service: str
    role: str  # "gateway", "runtime" or "service"
    ingress_port: int
    service_port: int
    protocol: str = "http"  # of the local process: "http" or "grpc"
    egress_port: int = 0  # gateway only: where the gateway sends stage calls
    grpc_port: int = 0  # gateway only: its local gRPC API

    @classmethod
    def from_node(cls, node_id: str, cluster: str, metadata: struct_pb2.Struct) -> "NodeInfo":
        meta = json_format.MessageToDict(metadata)

        def num(key: str) -> int:
            return int(float(meta.get(f"sluice.{key}", 0) or 0))

        return cls(
            id=node_id,
            service=str(meta.get("sluice.service", cluster or node_id)),
            role=str(meta.get("sluice.role", "service")),
            ingress_port=num("ingress_port"),
            service_port=num("service_port"),
            protocol=str(meta.get("sluice.protocol", "http")),
            egress_port=num("egress_port"),
            grpc_port=num("grpc_port"),
        )


@dataclass(frozen=True)
class StageRoute:
    key: str  # x-sluice-route value
    runtime: str
    timeout_ms: int
    pipeline: str
    stage: int
    model: str


@dataclass(frozen=True)
class MeshState:
    """Everything sidecar configuration depends on besides the node itself."""

    runtimes: frozenset[str] = frozenset()
    endpoints: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()  # runtime -> ((host, port), ...)
    routes: tuple[StageRoute, ...] = ()
    listener_address: str = "127.0.0.1"
    stage_retries: int = 2
    zipkin: tuple[str, int] | None = None
    trace_sample_percent: float = 100.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


def runtime_cluster(runtime: str) -> str:
    # no dots: Envoy's stat tag extraction would split the name at them
    return "runtime_" + runtime.replace(".", "_")


def _parse(message: type[Message], d: dict[str, Any]) -> Message:
    return json_format.ParseDict(d, message())


@lru_cache(maxsize=1024)
def _ip(host: str) -> str:
    """EDS endpoints must be IP addresses; resolve names once."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        return socket.gethostbyname(host)


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, port: int, h2: bool) -> Message:
    d: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", port)}}]}],
        },
    }
    if h2:
        d["typed_extension_protocol_options"] = _H2_OPTIONS
    return _parse(cluster_pb2.Cluster, d)


def _runtime_cluster(name: str) -> Message:
    return _parse(
        cluster_pb2.Cluster,
        {
            "name": name,
            "type": "EDS",
            "eds_cluster_config": {"eds_config": {"ads": {}, "resource_api_version": "V3"}},
            "connect_timeout": "1s",
            "typed_extension_protocol_options": _H2_OPTIONS,
            "circuit_breakers": {
                "thresholds": [{"max_connections": 1024, "max_pending_requests": 1024, "max_requests": 4096, "max_retries": 64}]
            },
            "outlier_detection": {
                "consecutive_5xx": 5,
                "consecutive_gateway_failure": 3,
                "interval": "2s",
                "base_ejection_time": "5s",
                "max_ejection_percent": 50,
            },
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        },
    )


def _tracing(state: MeshState, node: NodeInfo, direction: str) -> dict[str, Any] | None:
    if state.zipkin is None:
        return None
    return {
        "provider": {
            "name": "envoy.tracers.zipkin",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig",
                "collector_cluster": ZIPKIN_CLUSTER,
                "collector_endpoint": "/api/v2/spans",
                "collector_endpoint_version": "HTTP_JSON",
                "shared_span_context": False,
                "trace_id_128bit": True,
                # Envoy names its spans after the bootstrap's node.cluster; ``collector_service``
                # is not a span name but an HttpService (where to send spans), so it stays unset.
            },
        },
        "random_sampling": {"value": state.trace_sample_percent},
        "custom_tags": [
            {"tag": "sluice.node", "literal": {"value": node.id}},
            {"tag": "sluice.direction", "literal": {"value": direction}},
            {"tag": "sluice.pipeline", "request_header": {"name": "x-sluice-pipeline"}},
            {"tag": "sluice.stage", "request_header": {"name": "x-sluice-stage"}},
            {"tag": "sluice.model", "request_header": {"name": "x-sluice-model"}},
        ],
    }


def _hcm(stat_prefix: str, route_spec: dict[str, Any], tracing: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [_ROUTER],
        "generate_request_id": True,
        "stream_idle_timeout": "300s",
        **route_spec,
    }
    if tracing:
        config["tracing"] = tracing
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": config}


def _listener(name: str, address: str, port: int, hcm: dict[str, Any]) -> Message:
    return _parse(
        listener_pb2.Listener,
        {
            "name": name,
            "address": _address(address, port),
            "filter_chains": [{"filters": [hcm]}],
        },
    )


def _rds(name: str) -> dict[str, Any]:
    return {"rds": {"route_config_name": name, "config_source": {"ads": {}, "resource_api_version": "V3"}}}


def _ingress(node: NodeInfo, state: MeshState) -> tuple[Message, Message, list[Message]]:
    local = "local_" + node.service.replace(".", "_")
    clusters = [_static_cluster(local, node.service_port, h2=node.protocol == "grpc")]
    routes: list[dict[str, Any]] = []
    if node.role == "gateway" and node.grpc_port:
        local_grpc = f"{local}_grpc"
        clusters.append(_static_cluster(local_grpc, node.grpc_port, h2=True))
        routes.append(
            {
                "match": {"prefix": "/", "grpc": {}},
                "route": {"cluster": local_grpc, "timeout": "0s"},
            }
        )
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": local, "timeout": "0s"}})
    route_config = _parse(
        route_pb2.RouteConfiguration,
        {"name": INGRESS_ROUTES, "virtual_hosts": [{"name": "local", "domains": ["*"], "routes": routes}]},
    )
    hcm = _hcm("ingress", _rds(INGRESS_ROUTES), _tracing(state, node, "ingress"))
    return _listener("ingress", state.listener_address, node.ingress_port, hcm), route_config, clusters


def _egress_routes(state: MeshState) -> Message:
    retry_on = "connect-failure,refused-stream,reset,unavailable"
    routes = [
        {
            "name": r.key,
            "match": {"prefix": "/", "headers": [{"name": ROUTE_HEADER, "string_match": {"exact": r.key}}]},
            "route": {
                "cluster": runtime_cluster(r.runtime),
                "timeout": f"{r.timeout_ms / 1000:.3f}s",
                "retry_policy": {
                    "retry_on": retry_on,
                    "num_retries": state.stage_retries,
                    "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
                },
            },
            "decorator": {"operation": f"{r.pipeline}/{r.stage} {r.model}"},
        }
        for r in state.routes
    ]
    routes.append(
        {
            "name": "unknown-stage",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": UNROUTED}},
        }
    )
    return _parse(
        route_pb2.RouteConfiguration,
        {"name": EGRESS_ROUTES, "virtual_hosts": [{"name": "stages", "domains": ["*"], "routes": routes}]},
    )


def build_resources(node: NodeInfo, state: MeshState) -> dict[str, list[Message]]:
    """All xDS resources for one sidecar, by type URL."""
    listener, ingress_routes, clusters = _ingress(node, state)
    listeners = [listener]
    route_configs: list[Message] = [ingress_routes]
    assignments: list[Message] = []
    if node.role == "gateway" and node.egress_port:
        hcm = _hcm("egress", _rds(EGRESS_ROUTES), _tracing(state, node, "egress"))
        listeners.append(_listener("egress", "127.0.0.1", node.egress_port, hcm))
        route_configs.append(_egress_routes(state))
        endpoints = dict(state.endpoints)
        for runtime in sorted(state.runtimes):
            name = runtime_cluster(runtime)
            clusters.append(_runtime_cluster(name))
            lb = [{"endpoint": {"address": _address(_ip(h), p)}} for h, p in endpoints.get(runtime, ())]
            assignments.append(
                _parse(
                    endpoint_pb2.ClusterLoadAssignment,
                    {"cluster_name": name, "endpoints": [{"lb_endpoints": lb}] if lb else []},
                )
            )
    if state.zipkin is not None:
        host, port = state.zipkin
        clusters.append(
            _parse(
                cluster_pb2.Cluster,
                {
                    "name": ZIPKIN_CLUSTER,
                    "type": "STRICT_DNS",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": ZIPKIN_CLUSTER,
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(host, port)}}]}],
                    },
                },
            )
        )
    return {CLUSTER: clusters, ENDPOINT: assignments, LISTENER: listeners, ROUTE: route_configs}
