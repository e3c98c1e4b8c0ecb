"""Benchmark: a Triton-role stage through the whole mesh, end to end.

Starts a real local mesh (manager, repository, scikit runtime, triton runtime with the
CPU fallback, gateway, 5 Envoys) on free ports and sends ``POST /serve/<pipeline>``
with one JSON record per request through the gateway's sidecar (httpx.AsyncClient),
for two pipelines:

  triton            triton/mlp (one Triton stage, dynamic batching per config.pbtxt)
  scikit -> triton  scikit/iris_scaler then triton/mlp_scaled

at 1, 8 and 32 concurrent clients, and prints p50/p99 latency and throughput.
Run by hand: ``.venv/bin/python bench/triton_pipeline.py [--requests 2000] [--intra-op-threads 1]``
(the triton runtime's ``SLUICE_TRITON_INTRA_OP_THREADS``; default: onnxruntime's choice).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import FEATURES, RECORD, measure  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

CLIENTS = (1, 8, 32)
PIPELINES = {
    "triton": (["triton/mlp"], {"input": [RECORD[f] for f in FEATURES]}),
    "scikit -> triton": (["scikit/iris_scaler", "triton/mlp_scaled"], RECORD),
}


async def run(requests: int, triton_env: dict[str, str]) -> dict[tuple[str, int], tuple[float, float, float]]:
    runtimes = [
        RuntimeSpec("scikit", "scikit", ("iris_scaler",)),
        RuntimeSpec("triton", "triton", ("mlp", "mlp_scaled"), env=tuple(triton_env.items())),
    ]
    results: dict[tuple[str, int], tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as workdir, LocalMesh(Path(workdir), runtimes, MeshPorts.ephemeral()) as mesh:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=mesh.gateway_url, limits=limits, timeout=30) as http:
            for index, (label, (chain, record)) in enumerate(PIPELINES.items()):
                name = f"p{index}"
                created = await http.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "chain": chain})
                created.raise_for_status()
                body = json.dumps([record]).encode()

                async def call(name: str = name, body: bytes = body) -> None:
                    response = await http.post(f"/serve/{name}", content=body, headers={"content-type": "application/json"})
                    assert response.status_code == 200, response.text

                for clients in CLIENTS:
                    results[(label, clients)] = await measure(call, clients, requests)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per cell (default %(default)s)")
    parser.add_argument("--intra-op-threads", type=int, help="onnxruntime threads per Triton model")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    triton_env = {} if args.intra_op_threads is None else {"SLUICE_TRITON_INTRA_OP_THREADS": str(args.intra_op_threads)}
    results = asyncio.run(run(args.requests, triton_env))
    threads = args.intra_op_threads if args.intra_op_threads is not None else "default"
    table = Table(title=f"Triton-role stage through the mesh: POST /serve, 1 record/request, "
                        f"{args.requests} requests per cell, onnxruntime intra-op threads: {threads}")
    for column in ("pipeline", "clients", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for (label, clients), (p50, p99, rps) in results.items():
        table.add_row(label, str(clients), f"{p50:.2f}", f"{p99:.2f}", f"{rps:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
