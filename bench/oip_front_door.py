"""Benchmark: the gateway's front doors side by side, on the iris pipeline (2 stages).

Starts a real local mesh (manager, repository, scikit runtime, gateway, Envoys) on
free ports and sends the same rows four ways, all through the gateway's sidecar:

  /serve JSON records     POST /serve/iris, a list of records
  OIP REST JSON           POST /v2/models/iris/infer, JSON tensors in and out
  OIP REST binary         the same with Triton's binary tensor extension both ways
                          (Inference-Header-Content-Length, binary_data_output)
  OIP gRPC                ModelInfer with raw_input_contents

at 1 and 8 concurrent clients (asyncio), 1 row and 100 rows a request, and prints
p50/p99 latency and throughput. The four answers are checked equal first.
Run by hand: ``.venv/bin/python bench/oip_front_door.py [--requests 2000]``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import grpc
import httpx
import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mesh_latency import measure  # noqa: E402
from bench.runner import run_benchmark  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
PATHS = ("/serve JSON records", "OIP REST JSON", "OIP REST binary", "OIP gRPC")


def bodies(X: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    n = len(X)
    records = json.dumps([dict(zip(FEATURES, map(float, row))) for row in X]).encode()
    tensors = {"inputs": [{"name": f, "shape": [n], "datatype": "FP64", "data": X[:, i].tolist()} for i, f in enumerate(FEATURES)]}
    header = json.dumps({
        "inputs": [{"name": f, "shape": [n], "datatype": "FP64", "parameters": {"binary_data_size": n * 8}} for f in FEATURES],
        "parameters": {"binary_data_output": True},
    }).encode()
    binary = header + b"".join(np.ascontiguousarray(X[:, i], "<f8").tobytes() for i in range(4))
    json_headers = {"content-type": "application/json"}
    return {
        "/serve JSON records": (records, json_headers),
        "OIP REST JSON": (json.dumps(tensors).encode(), json_headers),
        "OIP REST binary": (binary, {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}),
    }


def grpc_request(X: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris")
    for i, name in enumerate(FEATURES):
        request.inputs.add(name=name, datatype="FP64", shape=[len(X)])
        request.raw_input_contents.append(np.ascontiguousarray(X[:, i], "<f8").tobytes())
    return request


def probabilities(path: str, content: bytes, headers) -> np.ndarray:
    if path == "/serve JSON records":
        return np.array([r["probabilities"] for r in json.loads(content)])
    length = headers.get("inference-header-content-length")
    header = json.loads(content[: int(length)] if length else content)
    offset = int(length or 0)
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if output["name"] == "probabilities":
            if size is None:
                return np.array(output["data"]).reshape(output["shape"])
            return np.frombuffer(content[offset : offset + size], "<f8").reshape(output["shape"])
        offset += size or 0
    raise AssertionError("no probabilities")


async def run(requests: int) -> None:
    console = Console()
    X_all = load_iris().data
    results: dict[tuple[int, str, int], tuple[float, float, float]] = {}
    with tempfile.TemporaryDirectory() as workdir:
        mesh = LocalMesh(Path(workdir), [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))], MeshPorts.ephemeral())
        with mesh:
            httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": ["scikit/iris_scaler", "scikit/iris_classifier"]}, timeout=10).raise_for_status()
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}")
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            http = httpx.AsyncClient(base_url=mesh.gateway_url, timeout=30, limits=httpx.Limits(max_keepalive_connections=16))
            for rows in (1, 100):
                X = X_all[:rows]
                posts = bodies(X)
                request = grpc_request(X)
                urls = {"/serve JSON records": "/serve/iris", "OIP REST JSON": "/v2/models/iris/infer", "OIP REST binary": "/v2/models/iris/infer"}
                answers = []
                for path, (body, headers) in posts.items():
                    response = await http.post(urls[path], content=body, headers=headers)
                    assert response.status_code == 200, response.text
                    answers.append(probabilities(path, response.content, response.headers))
                reply = await stub.ModelInfer(request)
                answers.append(np.frombuffer(reply.raw_output_contents[1], "<f8").reshape(rows, 3))
                for other in answers[1:]:
                    np.testing.assert_array_equal(answers[0], other)

                def post(path: str):
                    body, headers = posts[path]
                    url = urls[path]

                    async def call():
                        response = await http.post(url, content=body, headers=headers)
                        assert response.status_code == 200, response.text

                    return call

                async def grpc_call():
                    await stub.ModelInfer(request)

                calls = {**{path: post(path) for path in posts}, "OIP gRPC": grpc_call}
                count = requests if rows == 1 else max(requests // 4, 200)
                for clients in (1, 8):
                    for path in PATHS:
                        results[(rows, path, clients)] = await measure(calls[path], clients, count)
            await http.aclose()
            await channel.close()

    table = Table(title=f"the gateway's front doors, iris pipeline (2 stages), {requests} requests a cell (1 row), {max(requests // 4, 200)} (100 rows)")
    for column in ("path", "rows/request", "clients", "p50 ms", "p99 ms", "req/s"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for rows in (1, 100):
        for clients in (1, 8):
            for path in PATHS:
                p50, p99, rps = results[(rows, path, clients)]
                table.add_row(path, str(rows), str(clients), f"{p50:.2f}", f"{p99:.2f}", f"{rps:,.0f}")
    console.print(table)


def main() -> None:
    run_benchmark(run, __doc__)


if __name__ == "__main__":
    main()
