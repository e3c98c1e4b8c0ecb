"""Benchmark: what mTLS between sidecars costs the iris pipeline (2 stages, 1 record).

mTLS has no off switch in the mesh (it is on in every mode), so the comparison is
made on the one hop it changes, in the same run and against the same runtime process:

  pipeline HTTP / gRPC   the mesh as shipped: ``POST /serve/iris`` (JSON) and one OIP
                         call to the gateway; its stage calls cross gateway egress ->
                         runtime sidecar over mTLS (SDS certificates, URI SAN checked)
  stage path plaintext   two static Envoys, egress-like -> sidecar-like -> the runtime
                         process, HTTP/2 in clear between them (the mesh before mTLS)
  stage path mTLS        the same two Envoys with the mesh's TLS settings: the front one
                         presents the gateway's certificate and checks the runtime's URI
                         SAN, the back one requires a client certificate from the mesh CA
                         and takes only the gateway's and the manager's identities

Each row makes the two stage calls (or one pipeline call) per request, at 1 and 8
concurrent clients. The difference between the two stage-path rows is mTLS's cost
for the two stage hops of a request; FIELD-NOTES measured +0.01 ms (1 connection) /
+0.02 ms (8) per hop for the same settings between two Envoys.
Run by hand: ``.venv/bin/python bench/mtls_overhead.py [--requests 2000]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import RECORD, measure, stage0_request, two_stage_grpc  # noqa: E402
from manager.ca import GATEWAY_ID, MANAGER_ID, Issued, dns_name, runtime_id  # noqa: E402
from bench.runner import run_benchmark  # noqa: E402
from sluice.local.envoy import envoy_binary  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402
from sluice.local.procs import free_port, http_ok, wait_until  # noqa: E402

CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]
_H2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def _files(folder: Path, name: str, issued: Issued) -> dict[str, str]:
    paths = {"cert": folder / f"{name}.crt", "key": folder / f"{name}.key", "ca": folder / "ca.crt"}
    paths["cert"].write_bytes(issued.cert_pem)
    paths["key"].write_bytes(issued.key_pem)
    paths["ca"].write_bytes(issued.ca_pem)
    return {k: str(v) for k, v in paths.items()}


def _tls(files: dict[str, str], peers: list[str], downstream: bool) -> dict:
    common = {
        "alpn_protocols": ["h2"],
        "tls_certificates": [{"certificate_chain": {"filename": files["cert"]}, "private_key": {"filename": files["key"]}}],
        "validation_context": {
            "trusted_ca": {"filename": files["ca"]},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": p}} for p in peers],
        },
    }
    if downstream:
        typed = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                 "require_client_certificate": True, "common_tls_context": common}
    else:
        typed = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                 "sni": dns_name("runtime", "scikit"), "common_tls_context": common}
    return {"name": "envoy.transport_sockets.tls", "typed_config": typed}


def _proxy(listen: int, admin: int, upstream: int, downstream_tls: dict | None, upstream_tls: dict | None) -> dict:
    """A static Envoy: HTTP/2 (gRPC) on ``listen`` to 127.0.0.1:``upstream``, what the mesh's
    egress and runtime ingress do for a stage call, without xDS."""
    chain: dict = {"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "bench", "codec_type": "AUTO",
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                {"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": "5s"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
        },
    }]}
    if downstream_tls:
        chain["transport_socket"] = downstream_tls
    cluster: dict = {
        "name": "upstream", "type": "STATIC", "connect_timeout": "1s", "typed_extension_protocol_options": _H2,
        "load_assignment": {"cluster_name": "upstream", "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
    }
    if upstream_tls:
        cluster["transport_socket"] = upstream_tls
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [{"name": "in", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}}, "filter_chains": [chain]}],
            "clusters": [cluster],
        },
    }


def start_pair(mesh: LocalMesh, folder: Path, name: str, mtls: bool) -> int:
    """Two Envoys in front of the scikit runtime's process; the front one's port."""
    front, back = free_port(), free_port()
    if mtls:
        gateway = _files(folder, f"{name}-gateway", mesh.certificate("gateway"))
        runtime = _files(folder, f"{name}-runtime", mesh.certificate("runtime", "scikit"))
        front_cfg = _proxy(front, free_port(), back, None, _tls(gateway, [runtime_id("scikit")], downstream=False))
        back_cfg = _proxy(back, free_port(), mesh.runtime("scikit").local_port, _tls(runtime, [GATEWAY_ID, MANAGER_ID], downstream=True), None)
    else:
        front_cfg = _proxy(front, free_port(), back, None, None)
        back_cfg = _proxy(back, free_port(), mesh.runtime("scikit").local_port, None, None)
    for role, config in (("back", back_cfg), ("front", front_cfg)):
        path = folder / f"{name}-{role}.json"
        path.write_text(json.dumps(config))
        proc = mesh.supervisor.start(f"bench-{name}-{role}", [envoy_binary(), "-c", str(path), "--concurrency", "1",
                                                              "--disable-hot-restart", "--log-level", "warning"])
        admin = config["admin"]["address"]["socket_address"]["port_value"]
        wait_until(http_ok(f"http://127.0.0.1:{admin}/ready"), 30, f"bench Envoy {name}-{role}", proc)
    return front


async def run(requests: int) -> None:
    results: dict[tuple[str, int], tuple[float, float, float]] = {}
    rows = ("stage path plaintext (2 Envoys)", "stage path mTLS (2 Envoys)", "pipeline gRPC via gateway (mTLS mesh)", "pipeline HTTP via gateway (mTLS mesh)")
    with tempfile.TemporaryDirectory() as workdir:
        mesh = LocalMesh(Path(workdir) / "mesh", [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))], MeshPorts.ephemeral())
        with mesh:
            httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": CHAIN}, timeout=10).raise_for_status()
            folder = Path(workdir)
            plain, secured = start_pair(mesh, folder, "plain", mtls=False), start_pair(mesh, folder, "mtls", mtls=True)
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in (plain, secured, mesh.ports.gateway)]
            stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
            pipeline_request = stage0_request()
            pipeline_request.model_name = "iris"

            async def pipeline_grpc():
                await stubs[2].ModelInfer(pipeline_request)

            http = httpx.AsyncClient(base_url=mesh.gateway_url, limits=httpx.Limits(max_keepalive_connections=16))
            body = f"[{json.dumps(RECORD)}]".encode()

            async def pipeline_http():
                response = await http.post("/serve/iris", content=body, headers={"content-type": "application/json"})
                assert response.status_code == 200, response.text

            calls = dict(zip(rows, (two_stage_grpc(stubs[0]), two_stage_grpc(stubs[1]), pipeline_grpc, pipeline_http)))
            for clients in (1, 8):
                # the A/B pair alternates, twice, so drift on a shared machine hits both alike
                for _ in range(2):
                    for name in rows[:2]:
                        p50, p99, rps = await measure(calls[name], clients, requests // 2)
                        old = results.get((name, clients))
                        results[(name, clients)] = (p50, p99, rps) if old is None else tuple((a + b) / 2 for a, b in zip(old, (p50, p99, rps)))
                for name in rows[2:]:
                    results[(name, clients)] = await measure(calls[name], clients, requests)
            await http.aclose()
            for channel in channels:
                await channel.close()

    console = Console()
    table = Table(title=f"iris, 2 stages, 1 record/request, {requests} requests per cell")
    for column in ("path", "clients", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for clients in (1, 8):
        for name in rows:
            p50, p99, rps = results[(name, clients)]
            table.add_row(name, str(clients), f"{p50:.3f}", f"{p99:.3f}", f"{rps:,.0f}")
    console.print(table)
    for clients in (1, 8):
        plain_p50, secure_p50 = results[(rows[0], clients)][0], results[(rows[1], clients)][0]
        console.print(f"mTLS on the stage hop, {clients} client(s): {secure_p50 - plain_p50:+.3f} ms p50 per request (2 stage hops), "
                      f"{(secure_p50 - plain_p50) / 2:+.3f} ms per hop")


def main() -> None:
    run_benchmark(run, __doc__)


if __name__ == "__main__":
    main()
