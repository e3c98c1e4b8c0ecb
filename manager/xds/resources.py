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
  ``x-sluice-route``, with the stage's timeout and retry policy, and its traffic: splits,
  pins, mirror, local rate limit, see ``manager.xds.traffic``) to an EDS cluster per
  runtime (``runtime_cluster_resource``, ``endpoints_resource``). A change to one
  pipeline is then one scope resource, whatever the number of pipelines.

A call that matches no route (no scope for its pipeline, or no route for its stage)
gets a 404 whose body is ``sluice.wire.UNROUTED``: it reached no runtime, and the
gateway may retry it. Tracing (Zipkin) is added to every HTTP connection manager when
the mesh names a collector.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, replace
from typing import Any

# The _pb2 modules must be imported for json_format to resolve their "@type"s.
import envoy.config.cluster.v3.cluster_pb2 as cluster_pb2
import envoy.config.endpoint.v3.endpoint_pb2 as endpoint_pb2
import envoy.config.listener.v3.listener_pb2 as listener_pb2
import envoy.config.route.v3.route_components_pb2 as route_components_pb2
import envoy.config.route.v3.route_pb2 as route_pb2
import envoy.config.route.v3.scoped_route_pb2 as scoped_route_pb2
import envoy.config.trace.v3.zipkin_pb2  # noqa: F401
import envoy.extensions.filters.listener.tls_inspector.v3.tls_inspector_pb2  # noqa: F401
import envoy.extensions.transport_sockets.tls.v3.secret_pb2 as secret_pb2
import envoy.extensions.transport_sockets.tls.v3.tls_pb2  # noqa: F401
import envoy.extensions.filters.http.router.v3.router_pb2  # noqa: F401
import envoy.extensions.filters.network.http_connection_manager.v3.http_connection_manager_pb2  # noqa: F401
import envoy.extensions.upstreams.http.v3.http_protocol_options_pb2  # noqa: F401
import envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2 as previous_hosts_pb2
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from manager.ca import GATEWAY_ID, MANAGER_ID, Issued, dns_name, runtime_id
from manager.xds.ingress_auth import IngressAuth, public_ingress
from manager.xds.limits import ClusterLimits, MeshLimits, overload_reply
from manager.xds import traffic
from sluice.fusion import fused_runs
from sluice.plan import PipelinePlan
from sluice.wire import (
    EGRESS, INGRESS, MODEL_HEADER, PIPELINE_HEADER, STAGE_HEADER, UNROUTED, ZIPKIN_CLUSTER,
    pipeline_scope, runtime_cluster,
)

log = logging.getLogger(__name__)

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
SCOPED_ROUTE = "type.googleapis.com/envoy.config.route.v3.ScopedRouteConfiguration"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
#: the order in which types are pushed: secrets before the clusters and listeners that
#: use them, clusters warm before anything points at them
PUSH_ORDER = (SECRET, CLUSTER, ENDPOINT, LISTENER, SCOPED_ROUTE, ROUTE)

#: SDS secret names, per node: its own certificate and key, and the mesh CA
CERT_SECRET = "sluice_cert"
CA_SECRET = "sluice_ca"
#: who may call a runtime's sidecar: the gateway (stage calls through its egress) and the
#: manager (ModelMetadata when a runtime registers, model loads)
RUNTIME_CALLERS = (GATEWAY_ID, MANAGER_ID)

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = {"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}
_H2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
#: runtime clusters cross the network: HTTP/2 PINGs find a connection to a host that went
#: silent (cut off, frozen) within interval + timeout and reset it, so the calls on it are
#: retried on another replica (``reset`` in STAGE_RETRY_ON) instead of waiting out the
#: stage timeout
H2_KEEPALIVE = {"interval": "1s", "timeout": "1s"}
_H2_KEEPALIVE_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {"connection_keepalive": H2_KEEPALIVE}},
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
    #: replicas: the local ports of every instance behind this sidecar (``service_port``
    #: and ``grpc_port`` are the first's); empty: one instance
    service_ports: tuple[int, ...] = ()
    grpc_ports: tuple[int, ...] = ()

    @classmethod
    def from_node(cls, node_id: str, cluster: str, metadata: struct_pb2.Struct) -> "NodeInfo":
        meta = json_format.MessageToDict(metadata)

        def num(key: str) -> int:
            return int(float(meta.get(f"sluice.{key}", 0) or 0))

        def nums(key: str) -> tuple[int, ...]:  # "18083,18093"
            return tuple(int(p) for p in str(meta.get(f"sluice.{key}", "") or "").split(",") if p.strip())

        return cls(
            id=node_id,
            service=str(meta.get("sluice.service", cluster or node_id)),
            role=str(meta.get("sluice.role", "service")),
            ingress_port=num("ingress_port"),
            service_port=num("service_port"),
            protocol=str(meta.get("sluice.protocol", "http")),
            egress_port=num("egress_port"),
            grpc_port=num("grpc_port"),
            service_ports=nums("service_ports"),
            grpc_ports=nums("grpc_ports"),
        )


@dataclass(frozen=True)
class MeshSettings:
    """What sidecar configuration depends on besides the node, the runtimes and the pipelines."""

    listener_address: str = "127.0.0.1"
    stage_retries: int = 2
    zipkin: tuple[str, int] | None = None
    trace_sample_percent: float = 100.0
    #: secure mode: what the manager's and the gateway's ingress check (tokens); None: dev mode
    auth: IngressAuth | None = None
    #: where the manager's and the gateway's ingress listen when set (dev mode: 127.0.0.1)
    public_address: str = ""
    #: a runtime sidecar also answers gRPC health checks in plaintext (and nothing else):
    #: Consul's checks of runtime instances, which hold no mesh certificate
    plaintext_health: bool = False
    #: circuit breakers and the overflow answer (``manager.xds.limits``)
    limits: MeshLimits = MeshLimits()


def _parse(message: type[Message], d: dict[str, Any]) -> Message:
    return json_format.ParseDict(d, message())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _static_cluster(name: str, port: int | tuple[int, ...], h2: bool) -> Message:
    """A local cluster: one port, or several (replicas: then dead ones are ejected)."""
    ports = port if isinstance(port, tuple) else (port,)
    d: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address("127.0.0.1", p)}} for p in ports]}],
        },
    }
    if h2:
        d["typed_extension_protocol_options"] = _H2_OPTIONS
    if len(ports) > 1:
        d["outlier_detection"] = OUTLIER_DETECTION
        d["common_lb_config"] = {"healthy_panic_threshold": {"value": 0}}
    return _parse(cluster_pb2.Cluster, d)


_TLS = "envoy.transport_sockets.tls"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"


def _sds(name: str) -> dict[str, Any]:
    return {"name": name, "sds_config": {"ads": {}, "resource_api_version": "V3"}}


def _common_tls(peers: tuple[str, ...], alpn: list[str]) -> dict[str, Any]:
    """The node's certificate and the mesh CA, both over SDS; the peer must present one of
    ``peers`` (URI SANs) signed by that CA."""
    return {
        "alpn_protocols": alpn,
        "tls_certificate_sds_secret_configs": [_sds(CERT_SECRET)],
        "combined_validation_context": {
            "default_validation_context": {
                "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": uri}} for uri in peers],
            },
            "validation_context_sds_secret_config": _sds(CA_SECRET),
        },
    }


def upstream_mtls(runtime: str) -> dict[str, Any]:
    """How the gateway's sidecar calls runtime ``runtime``: its own certificate, and the
    runtime's sidecar must prove it is that runtime."""
    return {
        "name": _TLS,
        "typed_config": {
            "@type": _UPSTREAM_TLS,
            "sni": dns_name("runtime", runtime),
            "common_tls_context": _common_tls((runtime_id(runtime),), ["h2"]),
        },
    }


def downstream_mtls(callers: tuple[str, ...]) -> dict[str, Any]:
    """A listener that only ``callers`` (URI SANs, certificates from the mesh CA) may call."""
    return {
        "name": _TLS,
        "typed_config": {
            "@type": _DOWNSTREAM_TLS,
            "require_client_certificate": True,
            "common_tls_context": _common_tls(callers, ["h2", "http/1.1"]),
        },
    }


def uses_mtls(node: NodeInfo) -> bool:
    """Whether a node's resources name the SDS secrets (a runtime's ingress, a gateway's
    runtime clusters): only those nodes get (and ask for) a certificate."""
    return node.role == "runtime" or (node.role == "gateway" and node.egress_port > 0)


def secret_resources(issued: Issued) -> list[Message]:
    """A node's SDS secrets: its certificate and key, and the mesh CA to validate peers."""
    cert = secret_pb2.Secret(name=CERT_SECRET)
    cert.tls_certificate.certificate_chain.inline_bytes = issued.cert_pem
    cert.tls_certificate.private_key.inline_bytes = issued.key_pem
    ca = secret_pb2.Secret(name=CA_SECRET)
    ca.validation_context.trusted_ca.inline_bytes = issued.ca_pem
    return [cert, ca]


def _runtime_cluster(name: str, runtime: str, limits: ClusterLimits = ClusterLimits(), policy=None) -> Message:
    """A runtime's EDS cluster; with ``policy`` (a stage's ``sluice.traffic.StageTraffic``),
    that stage's own cluster on the runtime, with the stage's outlier detection and circuit
    breakers, and an endpoint assignment of its own name holding the runtime's endpoints
    (``stage_endpoints_resource``: a new cluster whose assignment Envoy already holds
    under another cluster's name would stay warming until that assignment changes)."""
    eds: dict[str, Any] = {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
    breakers, outliers = limits.circuit_breakers(), OUTLIER_DETECTION
    if policy is not None:
        breakers = traffic.circuit_breakers(policy.circuit_breaker, breakers)
        outliers = traffic.outlier_detection(policy.outlier, outliers)
    return _parse(
        cluster_pb2.Cluster,
        {
            "name": name,
            "type": "EDS",
            "transport_socket": upstream_mtls(runtime),
            "eds_cluster_config": eds,
            "connect_timeout": "1s",
            "typed_extension_protocol_options": _H2_KEEPALIVE_OPTIONS,
            "circuit_breakers": breakers,
            "outlier_detection": outliers,
            "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        },
    )


def stage_cluster_resources(plan: PipelinePlan, limits: MeshLimits) -> list[tuple[Message, str]]:
    """The clusters of a plan's stages that set their own outlier detection or circuit
    breakers, each with its runtime."""
    return traffic.stage_clusters(plan, lambda name, runtime, policy: _runtime_cluster(name, runtime, limits.for_runtime(runtime), policy))


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


def _hcm(stat_prefix: str, route_spec: dict[str, Any], tracing: dict[str, Any] | None, filters: tuple = (), **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": _HCM,
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",
        "http_filters": [*filters, _ROUTER],
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
    clusters = [_static_cluster(local, node.service_ports or node.service_port, h2=node.protocol == "grpc")]
    routes: list[dict[str, Any]] = []
    if node.role == "gateway" and node.grpc_port:
        local_grpc = f"{local}_grpc"
        clusters.append(_static_cluster(local_grpc, node.grpc_ports or node.grpc_port, h2=True))
        routes.append(
            {
                "match": {"prefix": "/", "grpc": {}},
                "route": {"cluster": local_grpc, "timeout": "0s", **_local_retries(node.grpc_ports, grpc=True)},
            }
        )
    routes.append({"match": {"prefix": "/"}, "route": {"cluster": local, "timeout": "0s", **_local_retries(node.service_ports)}})
    vhost: dict[str, Any] = {"name": "local", "domains": ["*"], "routes": routes}
    guard = state.auth if state.auth is not None and state.auth.protects(node) else None
    if guard is not None:  # secure mode: tokens checked on the mesh's public ingresses (ingress_auth)
        vhost = guard.virtual_host(node, vhost)
    route_config = _parse(route_pb2.RouteConfiguration, {"name": INGRESS, "virtual_hosts": [vhost]})
    hcm = _hcm(INGRESS, _rds(INGRESS), _tracing(state, node, "ingress"))
    if guard is not None:
        guard.protect_hcm(node, hcm["typed_config"])
    _limit_local(node, state, clusters, hcm["typed_config"])
    if node.role == "runtime":
        return _runtime_ingress(node, state, hcm, local), route_config, clusters
    address = state.public_address if state.public_address and public_ingress(node) else state.listener_address
    return _listener(INGRESS, address, node.ingress_port, hcm), route_config, clusters


def _limit_local(node: NodeInfo, state: MeshSettings, clusters: list[Message], hcm: dict[str, Any]) -> None:
    """Circuit breakers on the local cluster(s) of a gateway's or a runtime's sidecar; on the
    gateway's, an overflow is answered 503 with ``Retry-After`` in the JSON error shape."""
    if node.role not in ("gateway", "runtime"):
        return
    limits = state.limits.gateway if node.role == "gateway" else state.limits.runtime
    for cluster in clusters:
        json_format.ParseDict(limits.circuit_breakers(), cluster.circuit_breakers)
    if node.role == "gateway":
        hcm.setdefault("local_reply_config", {}).setdefault("mappers", []).append(overload_reply(state.limits.retry_after_s))


#: the one call a runtime's sidecar answers in plaintext, when asked to (Consul's checks)
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"


def _runtime_ingress(node: NodeInfo, state: MeshSettings, hcm: dict[str, Any], local: str) -> Message:
    """A runtime's ingress: mTLS, and only the gateway and the manager may call it. With
    ``plaintext_health`` a second filter chain (chosen by the TLS inspector) answers a
    plaintext gRPC health check and refuses everything else with a 403."""
    mtls = {"name": "mtls", "filters": [hcm], "transport_socket": downstream_mtls(RUNTIME_CALLERS)}
    listener: dict[str, Any] = {
        "name": INGRESS,
        "address": _address(state.listener_address, node.ingress_port),
        "filter_chains": [mtls],
    }
    if state.plaintext_health:
        mtls["filter_chain_match"] = {"transport_protocol": "tls"}
        health_routes = {
            "name": "plaintext-health",
            "virtual_hosts": [{
                "name": "health",
                "domains": ["*"],
                "routes": [
                    {"match": {"path": HEALTH_CHECK_PATH}, "route": {"cluster": local, "timeout": "5s"}},
                    {"match": {"prefix": "/"}, "direct_response": {"status": 403, "body": {"inline_string": "mTLS required"}}},
                ],
            }],
        }
        listener["listener_filters"] = [{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
        }]
        listener["filter_chains"].append({
            "name": "plaintext-health",
            "filter_chain_match": {"transport_protocol": "raw_buffer"},
            "filters": [_hcm("ingress_plaintext", {"route_config": health_routes}, None)],
        })
    return _parse(listener_pb2.Listener, listener)


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
        # stage rate limits: Envoy's local rate limit, enabled per route (manager.xds.traffic)
        hcm = _hcm(EGRESS, _scoped_routes(), _tracing(state, node, "egress"), filters=(traffic.rate_limit_filter(),), **_NO_ROUTE_REPLY)
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


def runtime_cluster_resource(runtime: str, limits: ClusterLimits = ClusterLimits()) -> Message:
    return _runtime_cluster(runtime_cluster(runtime), runtime, limits)


def endpoints_resource(runtime: str, endpoints: tuple[tuple[str, int], ...]) -> Message:
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=runtime_cluster(runtime))
    if endpoints:
        locality = assignment.endpoints.add()
        for host, port in endpoints:
            if not _is_ip(host):  # registries store resolved addresses (manager.auth.networks)
                log.warning("runtime %s: endpoint %s is not an IP address; left out", runtime, host)
                continue
            address = locality.lb_endpoints.add().endpoint.address.socket_address
            address.address, address.port_value = host, port
    return assignment


def stage_endpoints_resource(cluster: str, runtime: str, endpoints: tuple[tuple[str, int], ...]) -> Message:
    """A stage cluster's endpoint assignment: its runtime's endpoints under its own name."""
    assignment = endpoints_resource(runtime, endpoints)
    assignment.cluster_name = cluster
    return assignment


def retry_policy(retries: int) -> route_components_pb2.RetryPolicy:
    """A stage call's retries: on a reset, a failed connection, a refused stream or a gRPC
    UNAVAILABLE (what a runtime's sidecar answers when the runtime behind it is dead),
    each retry on another endpoint than those already tried (``previous_hosts``) when
    the runtime has one, so one dead replica costs no request."""
    policy = route_components_pb2.RetryPolicy(retry_on=STAGE_RETRY_ON)
    policy.num_retries.value = retries
    policy.retry_back_off.base_interval.FromMilliseconds(5)
    policy.retry_back_off.max_interval.FromMilliseconds(50)
    _retry_elsewhere(policy)
    return policy


def _local_retries(ports: tuple[int, ...], grpc: bool = False) -> dict[str, Any]:
    """Replicas behind one sidecar (``sluice up --replicas``): a call that meets a dead one
    (refused, or reset mid-request by a crash) is retried on another; one instance: none."""
    if len(ports) < 2:
        return {}
    return {"retry_policy": {
        "retry_on": STAGE_RETRY_ON if grpc else LOCAL_RETRY_ON,
        "num_retries": len(ports),
        "retry_back_off": {"base_interval": "0.005s", "max_interval": "0.05s"},
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"},
        }],
        "host_selection_retry_max_attempts": 3,
    }}


#: what a stage call (gRPC) and a call to a replicated local service are retried on
STAGE_RETRY_ON = "connect-failure,refused-stream,reset,unavailable"
LOCAL_RETRY_ON = "connect-failure,refused-stream,reset"


#: ejects an endpoint that failed twice in a row (a refused connection, a reset, a 502/503/504
#: or gRPC UNAVAILABLE from a runtime's sidecar whose runtime is dead) for 2 s, doubling at each
#: new ejection; never more than half of a cluster, so the only endpoint is never ejected
#: (its callers get the error at once, and its first answer after a restart is served)
OUTLIER_DETECTION: dict[str, Any] = {
    "consecutive_5xx": 5,
    "consecutive_gateway_failure": 2,
    "enforcing_consecutive_gateway_failure": 100,  # Envoy's default is 0: detected, never ejected
    "interval": "1s",
    "base_ejection_time": "2s",
    "max_ejection_time": "30s",
    "max_ejection_percent": 50,
}


def _retry_elsewhere(policy: route_components_pb2.RetryPolicy) -> None:
    """Make a retry pick a host not tried yet (Envoy tries up to 3 picks, then takes any)."""
    predicate = policy.retry_host_predicate.add(name="envoy.retry_host_predicates.previous_hosts")
    predicate.typed_config.Pack(previous_hosts_pb2.PreviousHostsPredicate())
    policy.host_selection_retry_max_attempts = 3


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
            traffic.add_stage_routes(host, plan, index, stage, retries, f"{plan.name}/{index} {stage.model}")
        for run in fused_runs(plan):  # sluice.fusion: the run's first stage's route, its summed timeout
            first = replace(plan.stages[run.first], route=run.route, timeout_ms=run.timeout_ms)
            traffic.add_stage_routes(host, plan, run.first, first, retries, f"{plan.name}/{run.first}-{run.last} fused")
    fallback = host.routes.add(name="unknown-stage")
    fallback.match.prefix = "/"
    fallback.direct_response.status = 404
    fallback.direct_response.body.inline_string = UNROUTED
    return scope
