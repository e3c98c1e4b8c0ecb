"""mTLS in the xDS resources: SDS secrets per node, transport sockets on a runtime's
ingress and on a gateway's runtime clusters, the plaintext health chain for Consul,
and certificate rotation in the layers and the node tracker."""

from __future__ import annotations

from cryptography import x509
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from envoy.config.listener.v3.listener_pb2 import Listener
from envoy.extensions.transport_sockets.tls.v3.secret_pb2 import Secret
from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import DownstreamTlsContext, UpstreamTlsContext
from google.protobuf.json_format import MessageToDict

from manager.ca import CertificateAuthority
from manager.xds.layers import MeshLayers
from manager.xds.resources import (
    CA_SECRET, CERT_SECRET, CLUSTER, LISTENER, PUSH_ORDER, SECRET, MeshSettings, NodeInfo,
)
from manager.xds.snapshot import SnapshotCache
from manager.xds.status import NodeTracker

GATEWAY = NodeInfo(id="gateway", service="gateway", role="gateway", ingress_port=8083, service_port=18083, egress_port=15001)
RUNTIME = NodeInfo(id="runtime-scikit", service="scikit", role="runtime", ingress_port=9000, service_port=19000, protocol="grpc")
SERVICE = NodeInfo(id="repository", service="repository", role="service", ingress_port=8087, service_port=18087)


def body(snapshot, type_url: str, name: str, message):
    out = message()
    snapshot.get(type_url, name).body.Unpack(out)
    return out


def san_matchers(common) -> list[str]:
    return [m.matcher.exact for m in common.combined_validation_context.default_validation_context.match_typed_subject_alt_names]


def test_runtime_ingress_requires_a_mesh_certificate_from_the_gateway_or_the_manager() -> None:
    layers = MeshLayers(MeshSettings())
    snap = layers.snapshot_for(RUNTIME)
    listener = body(snap, LISTENER, "ingress", Listener)
    (chain,) = listener.filter_chains
    assert not listener.listener_filters  # no TLS inspector: one chain, TLS only
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"
    tls = DownstreamTlsContext()
    chain.transport_socket.typed_config.Unpack(tls)
    assert tls.require_client_certificate.value is True
    common = tls.common_tls_context
    assert [s.name for s in common.tls_certificate_sds_secret_configs] == [CERT_SECRET]
    assert common.tls_certificate_sds_secret_configs[0].sds_config.HasField("ads")
    assert common.combined_validation_context.validation_context_sds_secret_config.name == CA_SECRET
    assert san_matchers(common) == ["spiffe://sluice/gateway", "spiffe://sluice/manager"]
    assert list(common.alpn_protocols) == ["h2", "http/1.1"]


def test_gateway_runtime_clusters_call_over_mtls_checking_the_runtimes_identity() -> None:
    layers = MeshLayers(MeshSettings())
    layers.add_runtimes({"scikit", "serving-localml-spark"})
    snap = layers.snapshot_for(GATEWAY)
    for runtime, cluster_name in (("scikit", "runtime_scikit"), ("serving-localml-spark", "runtime_serving-localml-spark")):
        cluster = body(snap, CLUSTER, cluster_name, Cluster)
        tls = UpstreamTlsContext()
        cluster.transport_socket.typed_config.Unpack(tls)
        assert tls.sni == f"{runtime}.runtime.sluice"
        assert san_matchers(tls.common_tls_context) == [f"spiffe://sluice/runtime/{runtime}"]
        assert [s.name for s in tls.common_tls_context.tls_certificate_sds_secret_configs] == [CERT_SECRET]
        assert list(tls.common_tls_context.alpn_protocols) == ["h2"]
    # the gateway's own listeners stay plaintext: its public ingress and its loopback egress
    for name in ("ingress", "egress"):
        assert not any(c.HasField("transport_socket") for c in body(snap, LISTENER, name, Listener).filter_chains)


def test_secrets_go_to_the_nodes_that_use_them_first_in_push_order() -> None:
    ca = CertificateAuthority.ephemeral()
    layers = MeshLayers(MeshSettings(), ca, cert_ttl_s=60)
    assert PUSH_ORDER[0] == SECRET
    for node, uri in ((RUNTIME, "spiffe://sluice/runtime/scikit"), (GATEWAY, "spiffe://sluice/gateway")):
        snap = layers.snapshot_for(node)
        assert list(snap.layers) == list(PUSH_ORDER)
        assert {r.name for r in snap.resources(SECRET)} == {CERT_SECRET, CA_SECRET}
        cert = body(snap, SECRET, CERT_SECRET, Secret)
        leaf = x509.load_pem_x509_certificate(cert.tls_certificate.certificate_chain.inline_bytes)
        leaf.verify_directly_issued_by(ca.cert)
        assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier) == [uri]
        assert cert.tls_certificate.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY-----")
        assert body(snap, SECRET, CA_SECRET, Secret).validation_context.trusted_ca.inline_bytes == ca.cert_pem
        assert layers.certificate(node).serial == leaf.serial_number
    # a service (the manager's or the repository's sidecar) has no mTLS listener or cluster: no secrets
    assert layers.snapshot_for(SERVICE).count(SECRET) == 0 and layers.certificate(SERVICE) is None


def test_rotation_reissues_only_what_is_due_and_changes_only_the_certificate() -> None:
    layers = MeshLayers(MeshSettings(), cert_ttl_s=60)
    before = {n: layers.snapshot_for(n) for n in (RUNTIME, GATEWAY)}
    first = {n: layers.certificate(n) for n in before}
    assert layers.rotate_due(now=min(c.renew_at for c in first.values()) - 1) == []
    assert layers.next_renewal() == min(c.renew_at for c in first.values())
    rotated = layers.rotate_due(now=max(c.renew_at for c in first.values()))
    assert set(rotated) == {RUNTIME, GATEWAY}
    for node, old in before.items():
        new = layers.snapshot_for(node)
        assert layers.certificate(node).serial != first[node].serial
        assert [t for t in PUSH_ORDER if new.version(t) != old.version(t)] == [SECRET]
        (layer,) = new.layers[SECRET]
        (old_layer,) = old.layers[SECRET]
        assert layer.lineage == old_layer.lineage and layer.changed_since(old_layer.generation) == {CERT_SECRET}
    layers.forget(RUNTIME)
    assert layers.certificate(RUNTIME) is None


def test_plaintext_health_chain_answers_only_health_checks() -> None:
    layers = MeshLayers(MeshSettings(plaintext_health=True))
    listener = body(layers.snapshot_for(RUNTIME), LISTENER, "ingress", Listener)
    assert [f.name for f in listener.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    mtls, plain = listener.filter_chains
    assert (mtls.name, mtls.filter_chain_match.transport_protocol) == ("mtls", "tls")
    assert mtls.HasField("transport_socket")
    assert (plain.name, plain.filter_chain_match.transport_protocol) == ("plaintext-health", "raw_buffer")
    assert not plain.HasField("transport_socket")
    hcm = MessageToDict(plain.filters[0].typed_config)
    (vhost,) = hcm["routeConfig"]["virtualHosts"]
    health, rest = vhost["routes"]
    assert health["match"] == {"path": "/grpc.health.v1.Health/Check"} and health["route"]["cluster"] == "local_scikit"
    assert rest["match"] == {"prefix": "/"} and rest["directResponse"]["status"] == 403


async def test_a_node_is_not_waited_on_for_secrets_it_never_asked_for() -> None:
    layers = MeshLayers(MeshSettings())
    cache = SnapshotCache()
    tracker = NodeTracker(cache, lambda n: cache.set_snapshot(n.id, layers.snapshot_for(n)))
    tracker.on_node(GATEWAY)  # a gateway with no runtime cluster: Envoy asks for no secret
    snap = cache.snapshot(GATEWAY.id)
    for t in PUSH_ORDER:
        if t != SECRET:
            tracker.on_ack(GATEWAY.id, t, snap.version(t))
    assert tracker.converged("gateway", PUSH_ORDER)
    tracker.on_ack(GATEWAY.id, SECRET, snap.version(SECRET))  # once it did, a new secret is waited for
    layers.rotate_due(now=layers.next_renewal())
    cache.set_snapshot(GATEWAY.id, layers.snapshot_for(GATEWAY))
    assert not tracker.converged("gateway", PUSH_ORDER)
    tracker.on_ack(GATEWAY.id, SECRET, cache.snapshot(GATEWAY.id).version(SECRET))
    assert tracker.converged("gateway", PUSH_ORDER)
