"""Benchmark: what tracing costs in serving latency, and that a dead Zipkin costs nothing more.

Starts a real mesh (iris pipeline, 2 stages) three ways and times ``POST /serve/iris``
(1 record) with 1 and 8 concurrent clients:

  off          no Zipkin configured: no Envoy tracer, no OpenTelemetry spans
  on (100%)    the real Zipkin server, every request sampled: 10 spans per request
  zipkin down  the same mesh after its Zipkin process was stopped

Run by hand: ``.venv/bin/python bench/tracing_overhead.py [--requests 2000]``
(needs Java and the Zipkin jar that ./build.sh fetches).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import RECORD, measure  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402
from sluice.local.procs import free_port  # noqa: E402

CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]


async def serve_timings(mesh: LocalMesh, requests: int) -> dict[int, tuple[float, float, float]]:
    body = f"[{__import__('json').dumps(RECORD)}]".encode()
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10) as client:

        async def call():
            response = await client.post("/serve/iris", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text

        return {clients: await measure(call, clients, requests) for clients in (1, 8)}


def start(workdir: Path, traced: bool) -> LocalMesh:
    mesh = LocalMesh(
        workdir,
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        zipkin_port=free_port() if traced else None,
    )
    mesh.start()
    httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": CHAIN}, timeout=10).raise_for_status()
    return mesh


async def run(requests: int) -> None:
    results: dict[str, dict[int, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        mesh = start(Path(workdir) / "off", traced=False)
        try:
            results["off"] = await serve_timings(mesh, requests)
        finally:
            mesh.stop()
        mesh = start(Path(workdir) / "on", traced=True)
        try:
            results["on (100%)"] = await serve_timings(mesh, requests)
            mesh.stop_zipkin()
            results["zipkin down"] = await serve_timings(mesh, requests)
        finally:
            mesh.stop()

    table = Table(title=f"POST /serve/iris (2 stages, 1 record), {requests} requests per cell")
    for column in ("tracing", "clients", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="left" if column == "tracing" else "right")
    for name, by_clients in results.items():
        for clients, (p50, p99, rps) in by_clients.items():
            table.add_row(name, str(clients), f"{p50:.3f}", f"{p99:.3f}", f"{rps:,.0f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(run(parser.parse_args().requests))


if __name__ == "__main__":
    main()
