"""The ADS server against a real Envoy, in both xDS variants (state of the world and
delta): ACKs, a NACK that keeps the last good config and recovery; pipeline route
scopes arriving in Envoy's config_dump; and a delta client that, with 500 pipelines
present, gets one resource for one pipeline's change; SDS secrets warming a gateway's
mTLS runtime clusters, and a certificate rotation that sends only the secret. The
control plane's layers, cache and node tracker are driven directly; the xDS server is
TLS with node tokens, as the manager's.
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

from manager import tls
from manager.ca import CertificateAuthority
from manager.xds.ads import AdsServicer
from manager.xds.auth import NodeAuth
from manager.xds.layers import MeshLayers
from manager.xds.resources import CLUSTER, LISTENER, PUSH_ORDER, SCOPED_ROUTE, SECRET, MeshSettings, NodeInfo
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

    def __init__(self, tmp_path) -> None:
        self.ca = CertificateAuthority.ephemeral()
        self.ca_file = tmp_path / "ca.crt"
        self.ca_file.write_bytes(self.ca.cert_pem)
        self.auth = NodeAuth(b"x" * 32)
        self.layers = MeshLayers(MeshSettings(), self.ca)
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
async def xds(tmp_path):
    harness = Harness(tmp_path)
    server = grpc.aio.server()
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(harness.cache, harness.tracker, harness.auth), server)
    port = server.add_secure_port("127.0.0.1:0", tls.ManagerTls(harness.ca).server_credentials())
    await server.start()
    XDS[port] = harness
    yield harness, port
    del XDS[port]
    await server.stop(0)


#: the harness serving each xDS port (start_envoy mints the node's token with its secret)
XDS: dict[int, Harness] = {}


@pytest.fixture
def envoys(tmp_path):
    supervisor = Supervisor(tmp_path / "logs")
    yield supervisor
    supervisor.stop_all()


async def start_envoy(envoys, tmp_path, xds_port: int, api: str, role: str = "service", harness: Harness | None = None,
                      service_port: int = 0, ingress_port: int = 0, protocol: str = "http") -> tuple[str, str]:
    node_id = f"{role}-{api.lower()}"
    harness = harness or XDS[xds_port]
    sidecar = Sidecar(
        node_id, "svc", role, ingress_port=ingress_port or free_port(), service_port=service_port or free_port(), admin_port=free_port(),
        protocol=protocol,
        xds_host="127.0.0.1", xds_port=xds_port, xds_token=harness.auth.mint(node_id, role, "svc"),
        xds_ca_file=str(harness.ca_file), egress_port=free_port() if role == "gateway" else 0, xds_api=api,
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


def cert_serials(admin: str) -> set[int]:
    """Serial numbers of the certificates (not CAs) Envoy holds, from its /certs page."""
    certs = httpx.get(f"{admin}/certs", timeout=5).json().get("certificates", [])
    return {int(c["serial_number"], 16) for entry in certs for c in entry.get("cert_chain", [])}


@pytest.mark.parametrize("api", VARIANTS)
async def test_sds_secrets_warm_the_mtls_clusters_and_a_rotation_sends_only_the_secret(xds, envoys, tmp_path, api):
    harness, port = xds
    harness.layers.set_pipelines({"iris": [plan("iris")]})
    node_id, admin = await start_envoy(envoys, tmp_path, port, api, role="gateway")
    assert await harness.tracker.wait_converged("gateway", PUSH_ORDER, timeout=10)
    status = harness.status(node_id)
    assert status.acked[SECRET] == harness.cache.snapshot(node_id).version(SECRET)
    first = harness.layers.certificate(status.info)
    assert first.uri == "spiffe://sluice/gateway"
    await until(lambda: first.serial in cert_serials(admin))
    # the runtime cluster is active (warmed with its secrets) and calls over mTLS
    (cluster,) = [c["cluster"] for c in dump(admin, "dynamic_active_clusters") if c["cluster"]["name"] == "runtime_scikit"]
    tls_context = cluster["transport_socket"]["typed_config"]
    assert tls_context["@type"].endswith("UpstreamTlsContext")
    common = tls_context["common_tls_context"]
    assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["sluice_cert"]
    assert common["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://sluice/runtime/scikit"}}
    ]

    sent: list[str] = []
    from manager.xds import ads

    stream_class = ads.DeltaStream if api == "DELTA_GRPC" else ads.SotwStream
    original = stream_class._send

    async def recording(self, type_url, *args):
        sent.append(type_url)
        await original(self, type_url, *args)

    stream_class._send = recording
    try:
        assert harness.layers.rotate_due(now=first.renew_at) == [status.info]
        harness.push()
        second = harness.layers.certificate(status.info)
        assert second.serial != first.serial
        await until(lambda: second.serial in cert_serials(admin) and first.serial not in cert_serials(admin))
        assert await harness.tracker.wait_converged("gateway", PUSH_ORDER, timeout=10)
    finally:
        stream_class._send = original
    assert sent == [SECRET]  # nothing else changed: no cluster or listener was re-sent
    assert {c["cluster"]["name"] for c in dump(admin, "dynamic_active_clusters")} >= {"runtime_scikit"}
    assert not dump(admin, "dynamic_warming_clusters")


async def test_a_stream_without_a_valid_token_for_its_node_gets_nothing(xds, tmp_path):
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    harness, port = xds
    node = base_pb2.Node(id="gateway-x", cluster="svc-sidecar")
    node.metadata.update({"sluice.role": "gateway", "sluice.service": "svc", "sluice.egress_port": 15001})
    credentials = grpc.ssl_channel_credentials(harness.ca.cert_pem)
    options = [("grpc.ssl_target_name_override", "manager.sluice")]

    async def requests():
        yield discovery_pb2.DeltaDiscoveryRequest(node=node, type_url=CLUSTER)
        await asyncio.Event().wait()  # the stream stays open, as Envoy's does

    async def first_response(metadata) -> grpc.StatusCode | str:
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(requests(), metadata=metadata, timeout=5)
            try:
                async for response in call:
                    assert response.type_url == CLUSTER and response.resources
                    return "served"
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return "ended"

    token = harness.auth.mint("gateway-x", "gateway", "svc")
    assert await first_response(None) == grpc.StatusCode.UNAUTHENTICATED
    assert await first_response((("x-sluice-xds-token", token + "x"),)) == grpc.StatusCode.UNAUTHENTICATED
    assert await first_response((("x-sluice-xds-token", NodeAuth(b"y" * 32).mint("gateway-x", "gateway", "svc")),)) == grpc.StatusCode.UNAUTHENTICATED
    assert await first_response((("x-sluice-xds-token", harness.auth.mint("runtime-x", "runtime", "svc")),)) == grpc.StatusCode.PERMISSION_DENIED
    assert await first_response((("x-sluice-xds-token", harness.auth.mint("gateway-x", "runtime", "svc")),)) == grpc.StatusCode.PERMISSION_DENIED
    assert not harness.tracker.nodes()  # no refused stream became a node
    assert await first_response((("x-sluice-xds-token", token),)) == "served"  # the right token


async def test_a_runtime_sidecar_with_plaintext_health_answers_only_health_checks_in_clear(xds, envoys, tmp_path):
    """What Consul's gRPC checks of a runtime instance need (MeshSettings.plaintext_health):
    a plaintext Health/Check passes; any other plaintext call gets PERMISSION_DENIED;
    mTLS callers are served as before."""
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    harness, port = xds
    harness.layers.settings = MeshSettings(plaintext_health=True)
    runtime = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), runtime)
    service_port = runtime.add_insecure_port("127.0.0.1:0")
    await runtime.start()
    try:
        ingress = free_port()
        await start_envoy(envoys, tmp_path, port, "DELTA_GRPC", role="runtime", service_port=service_port, ingress_port=ingress, protocol="grpc")
        address = f"127.0.0.1:{ingress}"

        async def listening() -> bool:
            try:
                async with grpc.aio.insecure_channel(address) as channel:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    return reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                return False

        deadline = time.monotonic() + 10
        while not await listening():
            assert time.monotonic() < deadline, "no plaintext health through the runtime's sidecar"
            await asyncio.sleep(0.1)
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name="m"), timeout=2)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # with the manager's certificate the same port speaks mTLS: the health check passes there too
        issued = harness.ca.issue_for("manager", "manager")
        credentials = grpc.ssl_channel_credentials(issued.ca_pem, issued.key_pem, issued.cert_pem)
        options = [("grpc.ssl_target_name_override", "svc.runtime.sluice")]
        async with grpc.aio.secure_channel(address, credentials, options=options) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await runtime.stop(0)
