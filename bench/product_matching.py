"""Benchmark: the seed's product-matching pipeline and the three-framework pipeline,
end to end through a real mesh (``POST /serve``, JSON records).

  endpointML  serving-customscikit/pm_scikit -> serving-localml-spark/pm_spark (native path)
  risk        ... -> triton/risk_mlp (the Triton runtime's CPU fallback, dynamic batching)

1 and 8 concurrent clients, 1 record and a batch of 50 records per request (risk_mlp takes at most 64).
Run by hand: ``.venv/bin/python bench/product_matching.py [--requests 1000]``.
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

from bench.mesh_latency import measure  # noqa: E402
from models.listings import DEMO_RECORDS, listing_pairs  # noqa: E402
from runtimes.scikit.transformers import COLUMNS  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

PM = ["serving-customscikit/pm_scikit", "serving-localml-spark/pm_spark"]


async def run(requests: int) -> None:
    pairs, _ = listing_pairs(n=50, seed=3)  # risk_mlp allows 64 rows a request
    batch = [dict(zip(COLUMNS, map(str, row))) for row in pairs]
    bodies = {1: json.dumps(DEMO_RECORDS[:1]).encode(), 50: json.dumps(batch).encode()}
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        runtimes = [
            RuntimeSpec("serving-customscikit", "scikit", ("pm_scikit",)),
            RuntimeSpec("serving-localml-spark", "spark", ("pm_spark",)),
            RuntimeSpec("triton", "triton", ("risk_mlp",)),
        ]
        with LocalMesh(Path(workdir), runtimes, MeshPorts.ephemeral()) as mesh:
            for name, chain in (("endpointML", PM), ("risk", [*PM, "triton/risk_mlp"])):
                httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "chain": chain}, timeout=10).raise_for_status()
            async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=30) as client:
                for name in ("endpointML", "risk"):
                    for rows, body in bodies.items():

                        async def call(name=name, body=body):
                            r = await client.post(f"/serve/{name}", content=body, headers={"content-type": "application/json"})
                            assert r.status_code == 200, r.text

                        for clients in (1, 8):
                            count = requests if rows == 1 else max(requests // 10, 80)
                            results.append((name, rows, clients, *await measure(call, clients, count)))
    table = Table(title="product matching through the mesh (POST /serve)")
    for column in ("pipeline", "rows/request", "clients", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for name, rows, clients, p50, p99, rps in results:
        table.add_row(name, str(rows), str(clients), f"{p50:.2f}", f"{p99:.2f}", f"{rps:,.0f}")
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    asyncio.run(run(parser.parse_args().requests))


if __name__ == "__main__":
    main()
