"""Benchmark: where a request's time goes, hop by hop, from the traces of real requests.

Starts a real traced mesh (the real Zipkin server, every request sampled), the iris
pipeline (2 stages, 1 record), sends requests with 1 and with 8 concurrent clients,
waits until every request's trace is whole in Zipkin, and prints per hop the p50 of
its own time (``sluice.attribution``), the p50 of the request's time at the front door,
and the p50 of the mesh's share (everything that is not model compute).

Run by hand: ``.venv/bin/python bench/attribution.py [--requests 200]``
(needs Java and the Zipkin jar that ./build.sh fetches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sluice.attribution import Attribution, Hop, attribute  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402
from sluice.local.procs import free_port  # noqa: E402
from sluice.trace_query import fetch_trace  # noqa: E402

CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]
RECORD = [{"sepal_length": 5.9, "sepal_width": 3.0, "petal_length": 5.1, "petal_width": 1.8}]


def send(mesh: LocalMesh, requests: int, clients: int) -> list[str]:
    """``requests`` requests over ``clients`` threads; their trace ids."""
    ids: list[str] = []
    lock = threading.Lock()

    def loop(count: int) -> None:
        with httpx.Client(timeout=10) as client:
            for _ in range(count):
                response = client.post(f"{mesh.gateway_url}/serve/iris", json=RECORD)
                response.raise_for_status()
                with lock:
                    ids.append(response.headers["x-trace-id"])

    threads = [threading.Thread(target=loop, args=(requests // clients,)) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    results: dict[int, list[Attribution]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        mesh = LocalMesh(Path(workdir), [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
                         MeshPorts.ephemeral(), zipkin_port=free_port())
        with mesh:
            httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": CHAIN}, timeout=10).raise_for_status()
            send(mesh, 20, 1)  # warm-up
            for clients in (1, 8):
                ids = send(mesh, args.requests, clients)
                results[clients] = [attribute(fetch_trace(mesh.zipkin_url, i, wait_s=20)) for i in ids]

    table = Table(title=f"POST /serve/iris (2 stages, 1 record): p50 of each hop's own time, ms ({args.requests} requests per column)")
    table.add_column("hop")
    for clients in results:
        table.add_column(f"{clients} client{'s' if clients > 1 else ''}", justify="right")

    def p50(values) -> str:
        return f"{statistics.median(values):.3f}"

    for hop in Hop:
        if any(hop in a.hops() for runs in results.values() for a in runs):
            table.add_row(hop.value, *(p50([a.hops().get(hop, 0) / 1000 for a in runs]) for runs in results.values()))
    table.add_section()
    table.add_row("the way back (part of the above)", *(p50([a.back_us / 1000 for a in runs]) for runs in results.values()))
    table.add_row("request at the front door", *(p50([a.total_us / 1000 for a in runs]) for runs in results.values()))
    table.add_row("model", *(p50([a.model_us / 1000 for a in runs]) for runs in results.values()))
    table.add_row("mesh share", *(f"{statistics.median(a.mesh_share for a in runs):.1%}" for runs in results.values()))
    table.add_row("  of which Envoy", *(f"{statistics.median(a.envoy_us / a.total_us for a in runs):.1%}" for runs in results.values()))
    Console().print(table)


if __name__ == "__main__":
    main()
