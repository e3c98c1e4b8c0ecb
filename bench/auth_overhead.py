"""Benchmark: what secure mode costs in serving latency, against dev mode, in one run.

Starts two real meshes side by side (the iris pipeline, 2 stages, on the scikit
runtime): one in dev mode (no tokens: no jwt_authn or rbac filter anywhere) and one
in secure mode (``LocalMesh(secure=True)``: the gateway's sidecar verifies an ES256
JWT with ``jwt_authn`` (JWT cache on) and checks its scope with ``rbac``, including
the CEL condition for ``serve:<pipeline>`` tokens). mTLS between sidecars is on in
both modes, so the difference is the token check. Each cell is measured in several
interleaved rounds (dev, secure, dev, secure, ...) so that drift of a noisy machine
falls on both modes alike (which mode goes first alternates); the latencies of all
rounds make up a cell's quantiles, and "paired rounds" is the median over rounds of
the two modes' p50 difference, measured back to back.

Cells: ``POST /serve/iris`` (HTTP JSON, 1 record) with a ``serve:iris`` token, OIP gRPC
``ModelInfer`` on the gateway with a ``serve:*`` token (gRPC carries the pipeline in the
body), and ``GET /v2/models/iris/ready`` with ``serve:iris`` (the same checks in front
of a cheap handler, where the token check is a larger share), each with 1 and 8
concurrent clients.

Run by hand: ``.venv/bin/python bench/auth_overhead.py [--requests 2000] [--rounds 4]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import FEATURES, RECORD  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]
CLIENTS = (1, 8)
DOORS = {
    "http": "POST /serve/iris (serve:iris)",
    "grpc": "OIP gRPC ModelInfer (serve:*)",
    # the same checks (CEL condition included) in front of a cheap handler: less noise
    "ready": "GET /v2/models/iris/ready (serve:iris)",
}


def start(workdir: Path, secure: bool) -> tuple[LocalMesh, dict[str, str]]:
    """A mesh serving iris, and the tokens to call it with (none in dev mode)."""
    mesh = LocalMesh(workdir, [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))], MeshPorts.ephemeral(), secure=secure)
    mesh.start()
    httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": CHAIN},
               headers=mesh.admin_headers, timeout=10).raise_for_status()
    tokens = {"http": "", "grpc": ""}
    if secure:
        tokens = {"http": mesh.mint_token(["serve:iris"])["token"], "grpc": mesh.mint_token(["serve:*"])["token"]}
    return mesh, tokens


def grpc_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris")
    for name in FEATURES:
        tensor = request.inputs.add(name=name, datatype="FP64", shape=[1])
        tensor.contents.fp64_contents.append(RECORD[name])
    return request


class Target:
    """One mesh's two front doors, with their clients open for the whole run."""

    def __init__(self, mesh: LocalMesh, tokens: dict[str, str]):
        self.mesh = mesh
        headers = {"content-type": "application/json"}
        if tokens["http"]:
            headers["authorization"] = f"Bearer {tokens['http']}"
        self.http = httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10, headers=headers,
                                      limits=httpx.Limits(max_connections=16, max_keepalive_connections=16))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}")
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {tokens['grpc']}"),) if tokens["grpc"] else ()
        self.body = json.dumps([RECORD]).encode()
        self.request = grpc_request()

    async def http_call(self) -> None:
        response = await self.http.post("/serve/iris", content=self.body)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

    async def ready_call(self) -> None:
        response = await self.http.get("/v2/models/iris/ready")
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

    async def grpc_call(self) -> None:
        await self.stub.ModelInfer(self.request, metadata=self.metadata, timeout=10)

    async def close(self) -> None:
        await self.http.aclose()
        await self.channel.close()


async def timed(call, clients: int, requests: int) -> tuple[list[float], float]:
    """Latencies (s) of ``requests`` calls by ``clients`` tasks, and the elapsed time."""
    latencies: list[float] = []
    per_client = requests // clients

    async def client() -> None:
        for _ in range(per_client):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, time.perf_counter() - started


async def run(requests: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        meshes: dict[str, LocalMesh] = {}
        targets: dict[str, Target] = {}
        try:
            for mode in ("dev", "secure"):
                mesh, tokens = start(Path(workdir) / mode, secure=mode == "secure")
                meshes[mode] = mesh
                targets[mode] = Target(mesh, tokens)
            cells: dict[tuple[str, str, int], tuple[list[float], float]] = {}
            deltas: dict[tuple[str, int], list[float]] = {}
            per_round = max(requests // rounds, 8)
            for target in targets.values():  # warm up: connections, JWT caches, Python paths
                for _ in range(200):
                    await target.http_call()
                    await target.grpc_call()
            for round_ in range(rounds):
                order = ["dev", "secure"] if round_ % 2 == 0 else ["secure", "dev"]  # no order bias
                for door in DOORS:
                    for clients in CLIENTS:
                        round_p50 = {}
                        for mode in order:
                            target = targets[mode]
                            call = getattr(target, f"{door}_call")
                            latencies, elapsed = await timed(call, clients, per_round)
                            held = cells.setdefault((door, mode, clients), ([], 0.0))
                            cells[(door, mode, clients)] = (held[0] + latencies, held[1] + elapsed)
                            round_p50[mode] = statistics.median(latencies) * 1000
                        deltas.setdefault((door, clients), []).append(round_p50["secure"] - round_p50["dev"])
        finally:
            for target in targets.values():
                await target.close()
            for mesh in meshes.values():
                mesh.stop()

    def quantiles(latencies: list[float]) -> tuple[float, float]:
        q = statistics.quantiles(latencies, n=100)
        return q[49] * 1000, q[98] * 1000

    table = Table(title=f"iris pipeline (2 stages, 1 record), {requests} requests per cell in {rounds} interleaved rounds")
    for column in ("front door", "clients", "mode", "p50 ms", "p99 ms", "req/s", "secure - dev p50", "paired rounds"):
        table.add_column(column, justify="left" if column in ("front door", "mode") else "right")
    for door, label in DOORS.items():
        for clients in CLIENTS:
            p50s = {}
            for mode in ("dev", "secure"):
                latencies, elapsed = cells[(door, mode, clients)]
                p50, p99 = quantiles(latencies)
                p50s[mode] = p50
                delta = f"{p50 - p50s['dev']:+.3f} ms" if mode == "secure" else ""
                paired = f"{statistics.median(deltas[(door, clients)]):+.3f} ms" if mode == "secure" else ""
                table.add_row(label, str(clients), mode, f"{p50:.3f}", f"{p99:.3f}", f"{len(latencies) / elapsed:,.0f}", delta, paired)
    Console(width=160).print(table)
    print("paired rounds: the median over rounds of (secure p50 - dev p50) measured back to back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per cell, over all rounds")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds")
    args = parser.parse_args()
    asyncio.run(run(args.requests, args.rounds))


if __name__ == "__main__":
    main()
