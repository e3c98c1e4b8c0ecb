"""Benchmark: what a graph's parallel branches save, the iris ensemble vs the chain of
the same four stages.

Starts a real local mesh (manager, repository, scikit runtime, gateway, their Envoys)
on free ports and defines two pipelines over the same models:

  ensemble   scale, then ``iris_classifier`` and ``iris_tree`` side by side (both
             after scale), then ``iris_vote`` joining their probabilities
  chain      the same four stages, the tree after the classifier (one after another)

Both answer the same records (checked). Each is called with ``POST /serve/<p>``, one
record and 150 records per request, at 1 and 8 concurrent clients, and the p50/p99
latency and throughput are printed, with the ensemble's p50 saving over the chain.
Also the in-process floor (the four models called in this process, branches in turn).

The iris models compute in well under a millisecond, so on a small machine the mesh's
own CPU work dominates and there is little to overlap. The second pair shows what the
branches save when stages *wait* (a model on a GPU or another host): three sleeper
stages of ``--sleep-ms`` each (default 20), ``a`` then ``b`` and ``c`` side by side,
vs ``a``, ``b``, ``c`` one after another.
Run by hand: ``.venv/bin/python bench/ensemble.py [--requests 1000]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_iris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import measure  # noqa: E402
from bench.runner import run_benchmark  # noqa: E402
from runtimes.scikit.model import SklearnModel  # noqa: E402
from runtimes.sdk.model import ModelArtifact  # noqa: E402
from runtimes.sleeper.model import write_model  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

SLEEP_MS = 20

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
MODELS = ("iris_scaler", "iris_classifier", "iris_tree", "iris_vote")
STORE = ROOT / "models" / "store"


def definition(name: str, parallel: bool) -> dict:
    return {
        "name": name,
        "stages": [
            {"id": "scale", "runtime": "scikit", "model": "iris_scaler"},
            {"id": "lr", "runtime": "scikit", "model": "iris_classifier", "after": ["scale"]},
            {"id": "tree", "runtime": "scikit", "model": "iris_tree", "after": ["scale"] if parallel else ["lr"],
             "inputs": {"features": "scale.features"}},
            {"id": "vote", "runtime": "scikit", "model": "iris_vote", "after": ["lr", "tree"],
             "inputs": {"p1": "lr.probabilities", "p2": "tree.probabilities"}},
        ],
    }


def waiting(name: str, parallel: bool) -> dict:
    return {
        "name": name,
        "stages": [
            {"id": "a", "runtime": "sleeper", "model": "slow_a"},
            {"id": "b", "runtime": "sleeper", "model": "slow_b", "after": ["a"]},
            {"id": "c", "runtime": "sleeper", "model": "slow_c", "after": ["a"] if parallel else ["b"], "inputs": {"y": "a.y"}},
        ],
    }


async def run(requests: int) -> None:
    console = Console()
    if not all((STORE / m / "1" / "model.joblib").exists() for m in MODELS):
        from models import train_iris

        train_iris.train(STORE)
    models = {
        name: SklearnModel(ModelArtifact(name, "1", STORE / name / "1", json.loads((STORE / name / "1" / "model.json").read_text())))
        for name in MODELS
    }
    X = load_iris().data
    bodies = {
        size: json.dumps([dict(zip(FEATURES, map(float, row))) for row in X[:size]]).encode() for size in (1, 150)
    }

    def in_process(size: int):
        columns = {n: X[:size, i].copy() for i, n in enumerate(FEATURES)}

        async def call():
            features = await models["iris_scaler"].predict(columns)
            lr = await models["iris_classifier"].predict(features)
            tree = await models["iris_tree"].predict(features)
            await models["iris_vote"].predict({"p1": lr["probabilities"], "p2": tree["probabilities"]})

        return call

    results: dict[tuple[str, int, int], tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        sleepers = Path(workdir) / "sleepers"
        for model, (given, gives) in {"slow_a": ("x", "y"), "slow_b": ("y", "z"), "slow_c": ("y", "w")}.items():
            write_model(sleepers, model, SLEEP_MS, input=given, output=gives)
        mesh = LocalMesh(
            Path(workdir),
            [RuntimeSpec("scikit", "scikit", MODELS), RuntimeSpec("sleeper", "sleeper", ("slow_a", "slow_b", "slow_c"))],
            MeshPorts.ephemeral(),
            env={"SLUICE_REPOSITORY_ROOTS": f"{sleepers}:{STORE}"},
        )
        with mesh:
            for name, parallel in (("ensemble", True), ("chain", False)):
                for pipeline in (definition(name, parallel), waiting(f"waiting-{name}", parallel)):
                    created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json=pipeline, timeout=30)
                    assert created.status_code == 201, created.text
            async with httpx.AsyncClient(base_url=mesh.gateway_url, limits=httpx.Limits(max_keepalive_connections=16), timeout=30) as http:
                answers = [(await http.post(f"/serve/{p}", content=bodies[150], headers={"content-type": "application/json"})).json()
                           for p in ("ensemble", "chain")]
                assert answers[0] == answers[1], "the ensemble and the chain must answer alike"

                def serve(pipeline: str, size: int):
                    async def call():
                        response = await http.post(f"/serve/{pipeline}", content=bodies[size], headers={"content-type": "application/json"})
                        assert response.status_code == 200, response.text

                    return call

                for size in (1, 150):
                    for clients in (1, 8):
                        for path, call in (("in-process", in_process(size)), ("chain", serve("chain", size)),
                                           ("ensemble", serve("ensemble", size))):
                            if path == "in-process" and clients > 1:
                                continue
                            results[(path, size, clients)] = await measure(call, clients, requests)
                waiting_body = json.dumps([{"x": 1.0}]).encode()
                for clients in (1, 8):
                    for path in ("chain", "ensemble"):
                        async def call(path=path):
                            response = await http.post(f"/serve/waiting-{path}", content=waiting_body,
                                                       headers={"content-type": "application/json"})
                            assert response.status_code == 200, response.text

                        results[(f"sleepers {path}", 1, clients)] = await measure(call, clients, max(requests // 4, 50))

    table = Table(title=f"iris ensemble (4 stages, 2 in parallel) vs the chain of the same stages, {requests} requests per cell")
    for column in ("path", "records", "clients", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for (path, size, clients), (p50, p99, rps) in results.items():
        table.add_row(path, str(size), str(clients), f"{p50:.3f}", f"{p99:.3f}", f"{rps:,.0f}")
    console.print(table)
    for prefix, sizes in (("", (1, 150)), ("sleepers ", (1,))):
        for size in sizes:
            for clients in (1, 8):
                chain, ensemble = results[(f"{prefix}chain", size, clients)][0], results[(f"{prefix}ensemble", size, clients)][0]
                console.print(f"{prefix or 'iris '}{size:>3} record(s), {clients} client(s): the graph's p50 is "
                              f"{chain - ensemble:+.3f} ms ({(chain - ensemble) / chain:+.0%}) under the chain's")


def main() -> None:
    global SLEEP_MS
    if "--sleep-ms" in sys.argv:  # the runner parses --requests only
        at = sys.argv.index("--sleep-ms")
        SLEEP_MS = int(sys.argv[at + 1])
        del sys.argv[at:at + 2]
    run_benchmark(run, __doc__, default_requests=1000)


if __name__ == "__main__":
    main()
