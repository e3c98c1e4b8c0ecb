"""Benchmark: what a traffic split and a mirror cost over the plain pipeline.

Starts one real mesh (three scikit runtimes, each with its Envoy sidecar: ``scikit``
with ``iris_classifier`` versions 1 and 2, ``canary`` and ``shadow`` with version 1)
and times ``POST /serve/<p>`` (1 record, 2 stages) with 1 and 8 concurrent clients on:

  plain            iris_scaler -> iris_classifier:1 on scikit
  split runtimes   the classifier stage 90 % scikit / 10 % canary (Envoy weighted_clusters)
  split versions   the classifier stage 90 % version 1 / 10 % version 2 on scikit
  mirror 100 %     plain, and every classifier call mirrored to shadow (fire and forget)

The pipelines are measured in ``ROUNDS`` interleaved rounds (each round every pipeline,
``requests / ROUNDS`` requests, after a warm-up), and each cell is the median over the
rounds, so a noisy neighbour on the machine hits all of them alike. On one machine the mirror's cost
includes the shadow runtime's own CPU (it computes every mirrored call on the same
cores); on separate hosts only Envoy's copy of the call remains.

Run by hand: ``.venv/bin/python bench/traffic.py [--requests 2000]``.
"""

from __future__ import annotations

import json
import statistics
import shutil
import sys
import tempfile
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import RECORD, measure  # noqa: E402
from bench.runner import run_benchmark  # noqa: E402
from models import train_iris_v2  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

STORE = ROOT / "models" / "store"
ROUNDS = 5
SCALER = {"runtime": "scikit", "model": "iris_scaler"}
CLASSIFIER = {"runtime": "scikit", "model": "iris_classifier", "version": "1"}
PIPELINES = {
    "plain": [SCALER, CLASSIFIER],
    "split runtimes": [SCALER, {**CLASSIFIER, "traffic": [{"runtime": "scikit", "weight": 90}, {"runtime": "canary", "weight": 10}]}],
    "split versions": [SCALER, {**CLASSIFIER, "traffic": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]}],
    "mirror 100 %": [SCALER, {**CLASSIFIER, "mirror": {"runtime": "shadow", "percent": 100}}],
}


def _store(root: Path) -> Path:
    for name in ("iris_scaler", "iris_classifier"):
        shutil.copytree(STORE / name / "1", root / name / "1")
    train_iris_v2.train(root)
    return root


async def timings(mesh: LocalMesh, pipeline: str, requests: int) -> dict[int, tuple[float, float, float]]:
    body = json.dumps([RECORD]).encode()
    async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10) as client:

        async def call():
            response = await client.post(f"/serve/{pipeline}", content=body, headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text

        return {clients: await measure(call, clients, requests) for clients in (1, 8)}


async def run(requests: int) -> None:
    results: dict[str, dict[int, tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        store = _store(Path(workdir) / "store")
        mesh = LocalMesh(
            Path(workdir) / "mesh",
            [
                RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier:1", "iris_classifier:2")),
                RuntimeSpec("canary", "scikit", ("iris_classifier:1",)),
                RuntimeSpec("shadow", "scikit", ("iris_classifier:1",)),
            ],
            MeshPorts.ephemeral(),
            env={"SLUICE_REPOSITORY_ROOTS": str(store)},
        )
        with mesh:
            names = {}
            for n, (title, stages) in enumerate(PIPELINES.items()):
                names[title] = f"p{n}"
                httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": names[title], "stages": stages}, timeout=30).raise_for_status()
            rounds: dict[str, list[dict[int, tuple[float, float, float]]]] = {title: [] for title in PIPELINES}
            for _ in range(ROUNDS):
                for title, name in names.items():
                    rounds[title].append(await timings(mesh, name, max(ROUNDS * 8, requests // ROUNDS)))
            results = {
                title: {c: tuple(statistics.median(r[c][i] for r in runs) for i in range(3)) for c in runs[0]}
                for title, runs in rounds.items()
            }

    table = Table(title=f"POST /serve/<p> (2 stages, 1 record), {requests} requests per cell, median of {ROUNDS} interleaved rounds")
    for column in ("pipeline", "clients", "p50 ms", "p99 ms", "req/s", "p50 over plain"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    for title, by_clients in results.items():
        for clients, (p50, p99, rps) in by_clients.items():
            base = results["plain"][clients][0]
            table.add_row(title, str(clients), f"{p50:.3f}", f"{p99:.3f}", f"{rps:,.0f}", f"{p50 - base:+.3f} ms")
    Console().print(table)


if __name__ == "__main__":
    run_benchmark(run, __doc__, default_requests=2000)
