"""Benchmark: what the mesh costs per stage, for the iris pipeline (2 stages).

Starts a real local mesh (manager, repository, scikit runtime, gateway, 4 Envoys) on
free ports and runs the same two stages, one record per request, six ways:

  in-process        the two models called in this process (no network)
  direct gRPC       two OIP ModelInfer calls straight to the runtime process
  runtime sidecar   the same calls through the runtime's Envoy (1 hop per stage)
  gateway egress    the same calls through the gateway's egress Envoy with the route
                    header, then the runtime's Envoy: exactly a stage's path (2 hops)
  pipeline gRPC     one OIP call to the gateway (through its sidecar), which runs both
  pipeline HTTP     POST /serve/iris with JSON records

at 1 and 8 concurrent clients (asyncio), and prints p50/p99 latency and throughput.
Run by hand: ``.venv/bin/python bench/mesh_latency.py [--requests 2000]``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runtimes.sdk.model import ModelArtifact  # noqa: E402
from runtimes.scikit.model import SklearnModel  # noqa: E402
from bench.runner import run_benchmark  # noqa: E402
from sluice.wire import PIPELINE_HEADER, ROUTE_HEADER, route_key  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402
from sluice.tensors import to_raw  # noqa: E402

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
RECORD = dict(zip(FEATURES, (5.1, 3.5, 1.4, 0.2)))


def stage0_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris_scaler")
    for name in FEATURES:
        request.inputs.add(name=name, datatype="FP64", shape=[1])
        request.raw_input_contents.append(to_raw(np.array([RECORD[name]]))[1])
    return request


def stage1_request(response: pb.ModelInferResponse) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris_classifier")
    out = response.outputs[0]
    request.inputs.add(name="features", datatype=out.datatype, shape=out.shape)
    request.raw_input_contents.append(response.raw_output_contents[0])
    return request


async def measure(call, clients: int, requests: int) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) of ``call`` run ``requests`` times by ``clients`` tasks."""
    for _ in range(min(200, requests // 5)):
        await call()
    latencies: list[float] = []
    per_client = requests // clients

    async def client() -> None:
        for _ in range(per_client):
            start = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - started
    q = statistics.quantiles(latencies, n=100)
    return q[49] * 1000, q[98] * 1000, len(latencies) / elapsed


def two_stage_grpc(stub, metadata=((), ())):
    async def call():
        first = await stub.ModelInfer(stage0_request(), metadata=metadata[0])
        await stub.ModelInfer(stage1_request(first), metadata=metadata[1])

    return call


async def run(requests: int) -> None:
    console = Console()
    store = ROOT / "models" / "store"
    models = [
        SklearnModel(ModelArtifact(name, "1", store / name / "1", __import__("json").loads((store / name / "1" / "model.json").read_text())))
        for name in ("iris_scaler", "iris_classifier")
    ]

    async def in_process():
        features = await models[0].predict({n: np.array([RECORD[n]]) for n in FEATURES})
        await models[1].predict(features)

    with tempfile.TemporaryDirectory() as workdir:
        mesh = LocalMesh(Path(workdir), [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))], MeshPorts.ephemeral())
        with mesh:
            httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": ["scikit/iris_scaler", "scikit/iris_classifier"]}).raise_for_status()
            runtime = mesh.runtime("scikit")
            channels = {
                "direct": grpc.aio.insecure_channel(f"127.0.0.1:{runtime.local_port}"),
                # the runtime's sidecar takes mTLS only (the manager's or the gateway's identity)
                "sidecar": grpc.aio.secure_channel(f"127.0.0.1:{runtime.public_port}", *mesh.runtime_grpc_credentials("scikit", "gateway")),
                "egress": grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.egress}"),
                "gateway": grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}"),
            }
            stubs = {k: pb_grpc.GRPCInferenceServiceStub(c) for k, c in channels.items()}
            # the egress's scoped routes are keyed on the pipeline header, then matched on the route key
            routes = tuple(((PIPELINE_HEADER, "iris"), (ROUTE_HEADER, route_key("iris", 1, i))) for i in range(2))
            pipeline_request = stage0_request()
            pipeline_request.model_name = "iris"

            async def pipeline_grpc():
                await stubs["gateway"].ModelInfer(pipeline_request)

            http = httpx.AsyncClient(base_url=mesh.gateway_url, limits=httpx.Limits(max_keepalive_connections=16))
            body = f"[{__import__('json').dumps(RECORD)}]".encode()

            async def pipeline_http():
                response = await http.post("/serve/iris", content=body, headers={"content-type": "application/json"})
                assert response.status_code == 200, response.text

            scenarios = [
                ("in-process", in_process),
                ("direct gRPC", two_stage_grpc(stubs["direct"])),
                ("runtime sidecar", two_stage_grpc(stubs["sidecar"])),
                ("gateway egress (stage path)", two_stage_grpc(stubs["egress"], routes)),
                ("pipeline gRPC via gateway", pipeline_grpc),
                ("pipeline HTTP via gateway", pipeline_http),
            ]
            results: dict[tuple[str, int], tuple[float, float, float]] = {}
            for clients in (1, 8):
                for name, call in scenarios:
                    results[(name, clients)] = await measure(call, clients, requests)
            await http.aclose()
            for channel in channels.values():
                await channel.close()

    table = Table(title=f"iris pipeline, 2 stages, 1 record/request, {requests} requests per cell")
    for column in ("path", "clients", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for clients in (1, 8):
        for name, _ in scenarios:
            p50, p99, rps = results[(name, clients)]
            table.add_row(name, str(clients), f"{p50:.3f}", f"{p99:.3f}", f"{rps:,.0f}")
    console.print(table)
    direct = results[("direct gRPC", 1)][0]
    console.print(
        f"per-stage mesh cost at p50, 1 client, over direct gRPC:\n"
        f"  stage path only (egress + runtime sidecar):      {(results[('gateway egress (stage path)', 1)][0] - direct) / 2:.3f} ms\n"
        f"  whole pipeline via the gateway (gRPC), per stage: {(results[('pipeline gRPC via gateway', 1)][0] - direct) / 2:.3f} ms\n"
        f"  whole pipeline via the gateway (HTTP), per stage: {(results[('pipeline HTTP via gateway', 1)][0] - direct) / 2:.3f} ms"
    )


def main() -> None:
    run_benchmark(run, __doc__)


if __name__ == "__main__":
    main()
