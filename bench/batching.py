"""Benchmark: the gateway's adaptive batching (``gateway.batching``) on and off, side by side.

Two meshes run at once, identical but for ``SLUICE_GATEWAY_BATCH_MAX_ROWS`` (0: off;
the default: on), each serving bench/three_stage.py's pipeline (StandardScaler ->
PCA(10) -> LogisticRegression.predict_proba on breast_cancer, one row per request,
the three stages on one scikit runtime). Cells are measured in turns, off then on,
``--rounds`` times, so both see the same load on a shared machine; each cell prints
the median of its rounds: p50/p99 at 1 client, req/s at 8 and 32 clients, for Sluice
over OIP gRPC and over HTTP JSON. Then the mean requests per folded run (from the
gateway's ``sluice_gateway_batch_requests`` histogram).

Run by hand: ``.venv/bin/python bench/batching.py [--requests 600] [--rounds 3] [--env KEY=VALUE ...]``
(``--env``: a setting of the batching-on mesh, e.g. ``SLUICE_GATEWAY_BATCH_MAX_RUNS=1``).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import measure  # noqa: E402
from bench.three_stage import PIPELINE, define_pipeline, gateway_calls, sluice_mesh, trained  # noqa: E402
from sluice.local.mesh import LocalMesh  # noqa: E402
from sluice.serving import install_uvloop  # noqa: E402

CLIENTS = (1, 8, 32)
MODES = {"off": {"SLUICE_GATEWAY_BATCH_MAX_ROWS": "0"}, "on": {}}


def _calls(mesh: LocalMesh, row: np.ndarray):
    grpc_call, http_call, close = gateway_calls(mesh, row)
    return {"Sluice gRPC": grpc_call, "Sluice HTTP": http_call}, close


def _folded(mesh: LocalMesh) -> str:
    from prometheus_client.parser import text_string_to_metric_families

    values = {s.name: s.value for f in text_string_to_metric_families(httpx.get(f"{mesh.gateway_url}/metrics", timeout=5).text)
              for s in f.samples if s.labels.get("pipeline") == PIPELINE and s.name.startswith("sluice_gateway_batch_requests")}
    runs = values.get("sluice_gateway_batch_requests_count", 0)
    return f"{runs:.0f} folded runs, {values.get('sluice_gateway_batch_requests_sum', 0) / runs:.1f} requests each" if runs else "no folded run"


async def run(requests: int, rounds: int, on_env: dict[str, str]) -> None:
    console = Console(width=140)
    with trained() as (work, row, _):
        meshes = {
            mode: sluice_mesh(work, f"mesh-{mode}", {**env, **(on_env if mode == "on" else {})})
            for mode, env in MODES.items()
        }
        results: dict[tuple[str, str, int], list[tuple[float, float, float]]] = {}
        with meshes["off"], meshes["on"]:
            calls, closers = {}, []
            for mode, mesh in meshes.items():
                define_pipeline(mesh)
                calls[mode], close = _calls(mesh, row)
                closers.append(close)
            for clients in CLIENTS:
                for way in ("Sluice gRPC", "Sluice HTTP"):
                    for _ in range(rounds):
                        for mode in MODES:
                            results.setdefault((way, mode, clients), []).append(await measure(calls[mode][way], clients, requests))
            folded = _folded(meshes["on"])
            for close in closers:
                await close()

    table = Table(title=f"3-stage pipeline, 1 row a request, batching off/on side by side, median of {rounds} rounds of {requests} requests")
    for column in ("way", "batching", "1 client p50 ms", "1 client p99 ms", "8 clients req/s", "32 clients req/s"):
        table.add_column(column, justify="left" if column in ("way", "batching") else "right")
    for way in ("Sluice gRPC", "Sluice HTTP"):
        for mode in MODES:
            one = results[(way, mode, 1)]
            cells = [f"{statistics.median(r[0] for r in one):.2f}", f"{statistics.median(r[1] for r in one):.2f}"]
            cells += [f"{statistics.median(r[2] for r in results[(way, mode, c)]):,.0f}" for c in CLIENTS[1:]]
            table.add_row(way, mode, *cells)
    console.print(table)
    console.print(f"batching on{''.join(f', {k}={v}' for k, v in on_env.items())}: {folded}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="a setting of the batching-on mesh")
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(run(args.requests, args.rounds, dict(item.split("=", 1) for item in args.env)))


if __name__ == "__main__":
    main()
