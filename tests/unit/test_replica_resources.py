"""Envoy configuration for replicas: stage retries go to another endpoint, runtime
clusters eject a dead endpoint, and a sidecar in front of several gateway processes
(``sluice up --replicas``) balances, retries and ejects across them; one instance keeps
the plain configuration."""

from __future__ import annotations

import dataclasses

from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.extensions.retry.host.previous_hosts.v3.previous_hosts_pb2 import PreviousHostsPredicate
from google.protobuf import struct_pb2
from google.protobuf.json_format import MessageToDict, ParseDict

from manager.xds.resources import CLUSTER, ROUTE, MeshSettings, NodeInfo, node_resources, retry_policy, runtime_cluster_resource
from sluice.local.envoy import Sidecar

GATEWAY = NodeInfo(id="gateway", service="gateway", role="gateway", ingress_port=8083, service_port=18083,
                   protocol="http", egress_port=15001, grpc_port=18084)
REPLICATED = dataclasses.replace(GATEWAY, service_ports=(18083, 18093), grpc_ports=(18084, 18094))
SETTINGS = MeshSettings(listener_address="127.0.0.1")


def test_a_stage_retry_goes_to_an_endpoint_not_tried_yet() -> None:
    policy = retry_policy(2)
    assert set(policy.retry_on.split(",")) == {"connect-failure", "refused-stream", "reset", "unavailable"}
    (predicate,) = policy.retry_host_predicate
    assert predicate.name == "envoy.retry_host_predicates.previous_hosts"
    assert predicate.typed_config.Unpack(PreviousHostsPredicate())
    assert policy.host_selection_retry_max_attempts == 3


def test_runtime_clusters_eject_a_failing_endpoint_but_never_the_only_one() -> None:
    outlier = runtime_cluster_resource("scikit").outlier_detection
    assert outlier.consecutive_gateway_failure.value == 2
    assert outlier.enforcing_consecutive_gateway_failure.value == 100  # Envoy's default 0 would never eject
    assert outlier.max_ejection_percent.value == 50  # of one endpoint: none


def _routes_and_clusters(node: NodeInfo) -> tuple[dict, dict[str, Cluster]]:
    built = node_resources(node, SETTINGS)
    (routes,) = built[ROUTE]
    (vhost,) = routes.virtual_hosts
    return ({r.route.cluster: r.route for r in vhost.routes}, {c.name: c for c in built[CLUSTER]})


def test_one_gateway_process_keeps_one_endpoint_and_no_retries() -> None:
    routes, clusters = _routes_and_clusters(GATEWAY)
    for name in ("local_gateway", "local_gateway_grpc"):
        (group,) = clusters[name].load_assignment.endpoints
        assert len(group.lb_endpoints) == 1
        assert not clusters[name].HasField("outlier_detection")
        assert not routes[name].HasField("retry_policy")


def test_gateway_replicas_are_endpoints_of_its_local_clusters_with_retries_elsewhere() -> None:
    routes, clusters = _routes_and_clusters(REPLICATED)
    for name, ports, retry_on in (("local_gateway", [18083, 18093], "connect-failure,refused-stream,reset"),
                                  ("local_gateway_grpc", [18084, 18094], "connect-failure,refused-stream,reset,unavailable")):
        (group,) = clusters[name].load_assignment.endpoints
        assert [e.endpoint.address.socket_address.port_value for e in group.lb_endpoints] == ports
        assert clusters[name].outlier_detection.consecutive_gateway_failure.value == 2
        assert clusters[name].common_lb_config.healthy_panic_threshold.value == 0
        policy = routes[name].retry_policy
        assert policy.retry_on == retry_on and policy.num_retries.value == 2
        assert [p.name for p in policy.retry_host_predicate] == ["envoy.retry_host_predicates.previous_hosts"]


def test_the_sidecar_bootstrap_names_every_replica_port_and_the_manager_reads_them() -> None:
    import yaml

    sidecar = Sidecar("gateway", "gateway", "gateway", 8083, 18083, 9901, "127.0.0.1", 18000, "token", "/ca.crt",
                      egress_port=15001, grpc_port=18084, service_ports=(18083, 18093), grpc_ports=(18084, 18094))
    node = yaml.safe_load(sidecar.bootstrap())["node"]
    metadata = ParseDict(node["metadata"], struct_pb2.Struct())
    info = NodeInfo.from_node(node["id"], node["cluster"], metadata)
    assert (info.service_ports, info.grpc_ports) == ((18083, 18093), (18084, 18094))
    # one instance: the template as it is, no replica metadata
    single = dataclasses.replace(sidecar, service_ports=(), grpc_ports=())
    assert "sluice.service_ports" not in single.bootstrap()
    assert NodeInfo.from_node("gateway", "", ParseDict(yaml.safe_load(single.bootstrap())["node"]["metadata"], struct_pb2.Struct())).service_ports == ()
    assert MessageToDict(metadata)["sluice.service_ports"] == "18083,18093"
