"""Builds each Envoy sidecar's listeners, routes, clusters and endpoints.

A sidecar says what it fronts in its bootstrap's node metadata (``sluice.*`` keys:
role, ingress port, local service port, protocol); the mesh says which runtimes and
pipelines exist. From the two come the xDS v3 messages:

* every sidecar (``node_resources``): an ``ingress`` listener on its public port to
  its local process, over RDS;
* the gateway's sidecar, also: an ``egress`` listener (gRPC, h2c) whose HTTP
  connection manager uses scoped routes: one route scope per pipeline
  (``pipeline_scope``), keyed on the ``x-sluice-pipeline`` header, holding inline the
  routes of every live revision of that pipeline (one per stage, matched on
  ``x-sluice-route``, with the stage's timeout and retry policy) to an EDS cluster per
  runtime (``runtime_cluster_resource``, ``endpoints_resource``). A change to one
  pipeline is then one scope resource, whatever the number of pipelines.

A call that matches no route (no scope for its pipeline, or no route for its stage)
gets a 404 whose body is ``sluice.wire.UNROUTED``: it reached no runtime, and the
gateway may retry it. Tracing (Zipkin) is added to every HTTP connection manager when
the mesh names a collector.
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
import envoy.config.route.v3.route_components_pb2 as route_components_pb2
import envoy.config.route.v3.route_pb2 as route_pb2
import envoy.config.route.v3.scoped_route_pb2 as scoped_route_pb2
import envoy.config.trace.v3.zipkin_pb2  # noqa: F401
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2  # noqa: F401
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
from google.protobuf import duration_pb2, json_format, struct_pb2
from google.protobuf.message import Message

from sluice.plan import PipelinePlan
from sluice.wire import (
    EGRESS, INGRESS, MODEL_HEADER, PIPELINE_HEADER, ROUTE_HEADER, STAGE_HEADER, UNROUTED, ZIPKIN_CLUSTER,
    pipeline_scope, runtime_cluster,
)

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
#: the order in which types are pushed: clusters warm before anything points at them
PUSH_ORDER = (CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)

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
class MeshSettings:
    """What sidecar configuration depends on besides the node, the runtimes and the pipelines."""

    listener_address: str = "127.0.0.1"
    stage_retries: int = 2
    zipkin: tuple[str, int] | None = None
    trace_sample_percent: float = 100.0


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


def _tracing(state: MeshSettings, node: NodeInfo, direction: str) -> dict[str, Any] | None:
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
            {"tag": "sluice.pipeline", "request_header": {"name": PIPELINE_HEADER}},
            {"tag": "sluice.stage", "request_header": {"name": STAGE_HEADER}},
            {"tag": "sluice.model", "request_header": {"name": MODEL_HEADER}},
        ],
    }


def _hcm(stat_prefix: str, route_spec: dict[str, Any], tracing: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [_ROUTER],
        "generate_request_id": True,
        "stream_idle_timeout": "300s",
        **route_spec,
        **extra,
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


def _ingress(node: NodeInfo, state: MeshSettings) -> tuple[Message, Message, list[Message]]:
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
        {"name": INGRESS, "virtual_hosts": [{"name": "local", "domains": ["*"], "routes": routes}]},
    )
    hcm = _hcm(INGRESS, _rds(INGRESS), _tracing(state, node, "ingress"))
    return _listener(INGRESS, state.listener_address, node.ingress_port, hcm), route_config, clusters


def _scoped_routes() -> dict[str, Any]:
    return {
        "scoped_routes": {
            "name": EGRESS,
            "scope_key_builder": {"fragments": [{"header_value_extractor": {"name": PIPELINE_HEADER, "index": 0}}]},
            "rds_config_source": {"ads": {}, "resource_api_version": "V3"},
            "scoped_rds": {"scoped_rds_config_source": {"ads": {}, "resource_api_version": "V3"}},
        }
    }


#: a call that met no route reached no runtime: say so in the body, for the gateway's retry
_NO_ROUTE_REPLY = {
    "local_reply_config": {
        "mappers": [
            {
                "filter": {"response_flag_filter": {"flags": ["NR"]}},
                "status_code": 404,
                "body": {"inline_string": UNROUTED},
            }
        ]
    }
}


def node_resources(node: NodeInfo, state: MeshSettings) -> dict[str, list[Message]]:
    """What one sidecar needs for itself: its listeners, local clusters, ingress routes
    (and the Zipkin cluster). The mesh-wide resources are layered beside these."""
    listener, ingress_routes, clusters = _ingress(node, state)
    listeners = [listener]
    if node.role == "gateway" and node.egress_port:
        hcm = _hcm(EGRESS, _scoped_routes(), _tracing(state, node, "egress"), **_NO_ROUTE_REPLY)
        listeners.append(_listener(EGRESS, "127.0.0.1", node.egress_port, hcm))
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
    return {CLUSTER: clusters, LISTENER: listeners, ROUTE: [ingress_routes]}


def runtime_cluster_resource(runtime: str) -> Message:
    return _runtime_cluster(runtime_cluster(runtime))


def endpoints_resource(runtime: str, endpoints: tuple[tuple[str, int], ...]) -> Message:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=runtime_cluster(runtime))
    if endpoints:
        locality = assignment.endpoints.add()
        for host, port in endpoints:
            address = locality.lb_endpoints.add().endpoint.address.socket_address
            address.address, address.port_value = _ip(host), port
    return assignment


def retry_policy(retries: int) -> route_components_pb2.RetryPolicy:
    policy = route_components_pb2.RetryPolicy(retry_on="connect-failure,refused-stream,reset,unavailable")
    policy.num_retries.value = retries
    policy.retry_back_off.base_interval.FromMilliseconds(5)
    policy.retry_back_off.max_interval.FromMilliseconds(50)
    return policy


def pipeline_scope_resource(name: str, revisions: list[PipelinePlan], retries: route_components_pb2.RetryPolicy) -> Message:
    """One pipeline's route scope: the routes of each of its live revisions, inline.
    Built proto by proto (no dict parsing): a bulk apply builds thousands."""
    scope = scoped_route_pb2.ScopedRouteConfiguration(name=pipeline_scope(name))
    scope.key.fragments.add().string_key = name
    config = scope.route_configuration
    config.name = pipeline_scope(name)
    host = config.virtual_hosts.add(name=name, domains=["*"])
    for plan in revisions:
        for index, stage in enumerate(plan.stages):
            route = host.routes.add(name=stage.route)
            route.match.prefix = "/"
            header = route.match.headers.add(name=ROUTE_HEADER)
            header.string_match.exact = stage.route
            route.route.cluster = runtime_cluster(stage.runtime)
            route.route.timeout.CopyFrom(duration_pb2.Duration(seconds=stage.timeout_ms // 1000, nanos=stage.timeout_ms % 1000 * 1_000_000))
            route.route.retry_policy.CopyFrom(retries)
            route.decorator.operation = f"{plan.name}/{index} {stage.model}"
    fallback = host.routes.add(name="unknown-stage")
    fallback.match.prefix = "/"
    fallback.direct_response.status = 404
    fallback.direct_response.body.inline_string = UNROUTED
    return scope
