"""mTLS between sidecars and the authenticated xDS/PipelineDiscovery channel, on a real
mesh (manager, repository, scikit runtime, gateway, each with its Envoy) whose
certificates live 9 seconds (renewed every 6): the pipeline works through the
gateway; Envoy's config_dump shows TLS on every runtime cluster and runtime ingress;
a runtime's sidecar refuses plaintext, a foreign CA's certificate and any mesh
identity but the gateway's and the manager's; certificates rotate under load with no
failed request and the new ones are in use; a client that is not a known node reads
no pipeline and no configuration.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time

import grpc
import httpx
import pytest
from cryptography import x509
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from manager.ca import CertificateAuthority, Issued, dns_name
from manager.xds.auth import NodeAuth
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.v1 import pipeline_pb2, pipeline_pb2_grpc
from sluice.wire import MANAGER_TLS_NAME, XDS_TOKEN_HEADER
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e
CERT_TTL_S = 9  # renewed at 6 s
RECORD = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("mtls"),
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        env={"SLUICE_MANAGER_CERT_TTL_S": str(CERT_TTL_S)},
    )
    with mesh:
        yield mesh


@pytest.fixture(scope="module")
def iris(mesh, manager):
    response = manager.post("/api/v1/pipelines", json={"name": "iris", "chain": IRIS_CHAIN})
    assert response.status_code == 201, response.text


def config_dump(mesh: LocalMesh, node_id: str, resource: str) -> list[dict]:
    return httpx.get(f"{mesh.admin_url(node_id)}/config_dump?resource={resource}", timeout=5).json().get("configs", [])


def cert_serials(mesh: LocalMesh, node_id: str) -> set[int]:
    """The serials of the certificates a sidecar holds now (its /certs page, CAs left out)."""
    certs = httpx.get(f"{mesh.admin_url(node_id)}/certs", timeout=5).json().get("certificates", [])
    return {int(c["serial_number"], 16) for entry in certs for c in entry.get("cert_chain", [])}


def stat(mesh: LocalMesh, node_id: str, suffix: str) -> int:
    text = httpx.get(f"{mesh.admin_url(node_id)}/stats", params={"filter": suffix}, timeout=5).text
    return sum(int(line.rsplit(": ", 1)[1]) for line in text.splitlines() if line.split(":")[0].endswith(suffix))


def metadata_call(mesh: LocalMesh, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """ModelMetadata on the scikit runtime through its sidecar: OK, or the failure's code."""
    address = f"127.0.0.1:{mesh.runtime('scikit').public_port}"
    options = [("grpc.ssl_target_name_override", dns_name("runtime", "scikit"))]
    channel = grpc.secure_channel(address, credentials, options=options) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name="iris_scaler"), timeout=5)
            assert reply.name == "iris_scaler"
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()


def client_credentials(issued: Issued, trust: bytes) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=trust, private_key=issued.key_pem, certificate_chain=issued.cert_pem)


def peer_certificate(port: int, issued: Issued, server_name: str, tmp_path) -> x509.Certificate:
    """A fresh TLS handshake with ``issued`` as the client certificate; the server's certificate."""
    cert, key = tmp_path / f"client-{issued.serial}.crt", tmp_path / f"client-{issued.serial}.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    context = ssl.create_default_context(cadata=issued.ca_pem.decode())
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw, server_hostname=server_name) as tls:
        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))


# --- the pipeline, and what Envoy holds
def test_iris_is_served_through_the_mtls_mesh(iris, gateway):
    response = gateway.post("/serve/iris", json=[RECORD])
    assert response.status_code == 200, response.text
    assert response.json()[0]["label"] == "setosa"


def test_config_dump_shows_tls_on_every_runtime_cluster_and_runtime_ingress(mesh, iris):
    clusters = [c["cluster"] for c in config_dump(mesh, "gateway", "dynamic_active_clusters")]
    runtime_clusters = [c for c in clusters if c["name"].startswith("runtime_")]
    assert [c["name"] for c in runtime_clusters] == ["runtime_scikit"]
    for cluster in runtime_clusters:
        socket_config = cluster["transport_socket"]
        assert socket_config["name"] == "envoy.transport_sockets.tls"
        context = socket_config["typed_config"]
        assert context["@type"].endswith("UpstreamTlsContext")
        common = context["common_tls_context"]
        assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["sluice_cert"]
        validation = common["combined_validation_context"]
        assert validation["validation_context_sds_secret_config"]["name"] == "sluice_ca"
        assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "URI", "matcher": {"exact": "spiffe://sluice/runtime/scikit"}}
        ]
    assert not config_dump(mesh, "gateway", "dynamic_warming_clusters")

    (ingress,) = [l for l in config_dump(mesh, "runtime-scikit", "dynamic_listeners") if l["name"] == "ingress"]
    chains = ingress["active_state"]["listener"]["filter_chains"]
    assert len(chains) == 1  # no plaintext chain (that one is for Consul's health checks only)
    context = chains[0]["transport_socket"]["typed_config"]
    assert context["@type"].endswith("DownstreamTlsContext") and context["require_client_certificate"] is True
    sans = context["common_tls_context"]["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"]
    assert [m["matcher"]["exact"] for m in sans] == ["spiffe://sluice/gateway", "spiffe://sluice/manager"]

    # the secrets themselves: each node holds its own identity (private keys are redacted in the dump)
    secrets = {s["name"]: s for s in config_dump(mesh, "runtime-scikit", "dynamic_active_secrets")}
    assert set(secrets) == {"sluice_cert", "sluice_ca"}
    for node_id, uri in (("runtime-scikit", "spiffe://sluice/runtime/scikit"), ("gateway", "spiffe://sluice/gateway")):
        certs = httpx.get(f"{mesh.admin_url(node_id)}/certs", timeout=5).json()["certificates"]
        uris = {san.get("uri") for entry in certs for c in entry.get("cert_chain", []) for san in c["subject_alt_names"]}
        assert uri in uris, node_id


# --- who may call a runtime's sidecar
def test_a_runtimes_sidecar_takes_only_the_gateway_and_the_manager(mesh, iris):
    ca = CertificateAuthority.load(mesh.workdir)
    mesh_ca = ca.cert_pem
    before = {s: stat(mesh, "runtime-scikit", s) for s in ("ssl.fail_verify_no_cert", "ssl.fail_verify_san", "ssl.fail_verify_error")}

    assert metadata_call(mesh, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    foreign = CertificateAuthority.ephemeral("Someone else's CA")
    assert metadata_call(mesh, client_credentials(foreign.issue_for("gateway", "gateway"), mesh_ca)) == grpc.StatusCode.UNAVAILABLE
    for role, name in (("runtime", "other"), ("runtime", "scikit"), ("service", "repository")):  # mesh identities, not callers
        assert metadata_call(mesh, client_credentials(ca.issue_for(role, name), mesh_ca)) == grpc.StatusCode.UNAVAILABLE, (role, name)
    # a client that does not trust the mesh CA does not talk to the runtime either (server authentication)
    assert metadata_call(mesh, client_credentials(ca.issue_for("manager", "manager"), foreign.cert_pem)) == grpc.StatusCode.UNAVAILABLE

    assert metadata_call(mesh, client_credentials(ca.issue_for("gateway", "gateway"), mesh_ca)) == grpc.StatusCode.OK
    assert metadata_call(mesh, client_credentials(ca.issue_for("manager", "manager"), mesh_ca)) == grpc.StatusCode.OK

    # Envoy counted why it refused: no client certificate, an untrusted one, a SAN it does not take
    after = {s: stat(mesh, "runtime-scikit", s) for s in before}
    assert after["ssl.fail_verify_error"] > before["ssl.fail_verify_error"]  # the foreign CA
    assert after["ssl.fail_verify_san"] >= before["ssl.fail_verify_san"] + 3
    assert after["ssl.fail_verify_no_cert"] > before["ssl.fail_verify_no_cert"] or after["ssl.fail_verify_error"] > before["ssl.fail_verify_error"]


# --- rotation under load
async def test_certificates_rotate_under_steady_load_with_no_failed_request(mesh, iris, tmp_path):
    runtime_port = mesh.runtime("scikit").public_port
    manager_cert = mesh.certificate("manager")
    runtime_name = dns_name("runtime", "scikit")
    first_runtime = peer_certificate(runtime_port, manager_cert, runtime_name, tmp_path)
    first = {node: cert_serials(mesh, node) for node in ("gateway", "runtime-scikit")}
    assert first_runtime.serial_number in first["runtime-scikit"]

    statuses: dict[int, int] = {}
    stop = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10) as http:
            while not stop.is_set():
                response = await http.post("/serve/iris", json=[RECORD])
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                if response.status_code != 200:
                    print("non-200:", response.status_code, response.text[:200])

    def rotated_twice(node: str) -> bool:
        """Two renewals seen: the certificate held now is neither the first one nor the one after."""
        held = cert_serials(mesh, node)
        seen.setdefault(node, []).extend(s for s in held if s not in seen.get(node, []))
        return len(seen[node]) >= 3 and not held & first[node]

    seen: dict[str, list[int]] = {node: list(serials) for node, serials in first.items()}
    clients = [asyncio.create_task(client()) for _ in range(6)]
    try:
        deadline = time.monotonic() + 4 * CERT_TTL_S
        while not (rotated_twice("gateway") and rotated_twice("runtime-scikit")):
            assert time.monotonic() < deadline, f"certificates not renewed twice in {4 * CERT_TTL_S}s: {seen}"
            assert all(not c.done() for c in clients), [c.exception() for c in clients if c.done()]
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    print(f"rotation under load: {statuses}; certificates held in turn: {seen}")
    assert set(statuses) == {200}, statuses
    assert statuses[200] >= 100, statuses  # steady load, throughout

    # a new connection meets the runtime's new certificate, signed by the same CA, which the sidecar holds now
    now = peer_certificate(runtime_port, mesh.certificate("manager"), runtime_name, tmp_path)
    assert now.serial_number != first_runtime.serial_number
    assert now.serial_number in cert_serials(mesh, "runtime-scikit")
    now.verify_directly_issued_by(CertificateAuthority.load(mesh.workdir).cert)
    assert now.not_valid_after_utc > first_runtime.not_valid_after_utc
    # and the pipeline still works on new connections
    assert httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], timeout=10).status_code == 200


# --- the xDS and PipelineDiscovery channel
def watch(mesh: LocalMesh, token: str | None, *, tls: bool = True, node_id: str = "gateway") -> tuple[str, int]:
    """Open PipelineDiscovery.Watch and read one message: ("ok", pipelines) or (code, 0)."""
    address = f"127.0.0.1:{mesh.ports.xds}"
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=mesh.ca_file.read_bytes())
        channel = grpc.secure_channel(address, credentials, options=[("grpc.ssl_target_name_override", MANAGER_TLS_NAME)])
    else:
        channel = grpc.insecure_channel(address)
    metadata = ((XDS_TOKEN_HEADER, token),) if token is not None else None
    done = False

    def requests():
        yield pipeline_pb2.WatchRequest(node_id=node_id)
        while not done:  # the stream stays open, as the gateway's does
            time.sleep(0.05)

    with channel:
        call = pipeline_pb2_grpc.PipelineDiscoveryStub(channel).Watch(requests(), metadata=metadata, timeout=5)
        try:
            message = next(call)
            return "ok", len(message.pipelines)
        except grpc.RpcError as exc:
            return exc.code().name, 0
        finally:
            done = True
            call.cancel()


def test_only_a_gateways_token_reads_the_pipelines(mesh, iris):
    gateway_token = mesh.node_token("gateway", "gateway", "gateway")
    assert watch(mesh, gateway_token) == ("ok", 1)  # the gateway's own credentials: the iris pipeline
    assert watch(mesh, gateway_token, tls=False) == ("UNAVAILABLE", 0)  # plaintext: no TLS handshake, nothing read
    assert watch(mesh, None) == ("UNAUTHENTICATED", 0)
    assert watch(mesh, "v1.e30.e30") == ("UNAUTHENTICATED", 0)
    assert watch(mesh, NodeAuth(b"not this mesh's secret").mint("gateway", "gateway", "gateway")) == ("UNAUTHENTICATED", 0)
    # a real token of another node (a runtime's sidecar) does not open the gateway feed
    assert watch(mesh, mesh.node_token("runtime-scikit", "runtime", "scikit")) == ("PERMISSION_DENIED", 0)


def ads_first_response(mesh: LocalMesh, token: str | None, node_id: str, role: str, service: str) -> str:
    """Open a delta ADS stream as ``node_id`` and wait for the first response: "served" or the refusal's code."""
    node = base_pb2.Node(id=node_id, cluster=f"{service}-sidecar")
    node.metadata.update({"sluice.role": role, "sluice.service": service, "sluice.ingress_port": 1, "sluice.egress_port": 2})
    credentials = grpc.ssl_channel_credentials(root_certificates=mesh.ca_file.read_bytes())
    metadata = ((XDS_TOKEN_HEADER, token),) if token is not None else None
    done = False

    def requests():
        yield discovery_pb2.DeltaDiscoveryRequest(node=node, type_url="type.googleapis.com/envoy.config.listener.v3.Listener")
        while not done:  # keep the stream open, as Envoy does
            time.sleep(0.05)

    options = [("grpc.ssl_target_name_override", MANAGER_TLS_NAME)]
    with grpc.secure_channel(f"127.0.0.1:{mesh.ports.xds}", credentials, options=options) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).DeltaAggregatedResources(requests(), metadata=metadata, timeout=5)
        try:
            response = next(call)
            return "served" if response.resources else "empty"
        except grpc.RpcError as exc:
            return exc.code().name
        finally:
            done = True
            call.cancel()


def test_only_a_known_node_gets_xds_configuration(mesh, iris):
    runtime_token = mesh.node_token("runtime-scikit", "runtime", "scikit")
    assert ads_first_response(mesh, None, "intruder", "gateway", "gateway") == "UNAUTHENTICATED"
    assert ads_first_response(mesh, "garbage", "intruder", "gateway", "gateway") == "UNAUTHENTICATED"
    # a runtime's token presented as the gateway (for its certificate and every pipeline's routes)
    assert ads_first_response(mesh, runtime_token, "gateway", "gateway", "gateway") == "PERMISSION_DENIED"
    assert ads_first_response(mesh, runtime_token, "runtime-scikit", "gateway", "scikit") == "PERMISSION_DENIED"
    assert ads_first_response(mesh, runtime_token, "runtime-scikit", "runtime", "other") == "PERMISSION_DENIED"
    # a token minted for an extra node of this mesh is served (what a new sidecar does)
    assert ads_first_response(mesh, mesh.node_token("extra", "service", "extra"), "extra", "service", "extra") == "served"
    # the real gateway still holds its configuration, and serves
    assert httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], timeout=10).status_code == 200


def test_the_xds_server_presents_the_managers_identity(mesh):
    issued = mesh.certificate("manager")  # any client cert: the server does not ask for one
    context = ssl.create_default_context(cadata=issued.ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", mesh.ports.xds), timeout=5) as raw, context.wrap_socket(raw, server_hostname=MANAGER_TLS_NAME) as tls:
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        assert tls.selected_alpn_protocol() == "h2"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://sluice/manager"]
    assert cert.not_valid_after_utc.timestamp() - time.time() <= CERT_TTL_S + 1
