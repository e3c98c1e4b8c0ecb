"""Benchmark: streaming vs one call per record, through the gateway's sidecar.

A local mesh (manager, repository, scikit runtime, gateway, each with its Envoy
sidecar) serves ``iris`` (scikit/iris_scaler -> scikit/iris_classifier). N records,
one record per request, are sent:

  gRPC unary, 1 client      ModelInfer, one after another
  gRPC unary, 16 clients    ModelInfer, 16 at once
  gRPC stream               one ModelStreamInfer stream, all N requests sent at once
                            (the gateway runs SLUICE_GATEWAY_STREAM_MAX_IN_FLIGHT = 16)
  HTTP unary, 1 client      POST /serve/iris with one JSON record, one after another
  NDJSON stream             one POST /serve/iris, N lines, sent and read at once

Printed: records/s, and for the streams the time to the first answer.
Run by hand: ``.venv/bin/python bench/streaming.py [--requests 2000]``.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc
import httpx
import numpy as np
import orjson
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.runner import run_benchmark  # noqa: E402
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
X = load_iris().data


def grpc_request(i: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="iris", id=str(i))
    for j, name in enumerate(FEATURES):
        request.inputs.add(name=name, datatype="FP64", shape=[1])
        request.raw_input_contents.append(np.array([X[i % len(X), j]], "<f8").tobytes())
    return request


def record(i: int) -> bytes:
    return orjson.dumps(dict(zip(FEATURES, map(float, X[i % len(X)]))))


async def unary_grpc(stub, n: int, clients: int) -> float:
    per = n // clients

    async def client(c: int) -> None:
        for i in range(per):
            await stub.ModelInfer(grpc_request(c * per + i))

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return per * clients / (time.perf_counter() - started)


async def stream_grpc(stub, n: int) -> tuple[float, float]:
    async def requests():
        for i in range(n):
            yield grpc_request(i)

    started = time.perf_counter()
    first = None
    count = 0
    async for answer in stub.ModelStreamInfer(requests()):
        assert not answer.error_message, answer.error_message
        assert answer.infer_response.id == str(count)
        first = first or time.perf_counter() - started
        count += 1
    return count / (time.perf_counter() - started), first


async def unary_http(url: str, n: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        started = time.perf_counter()
        for i in range(n):
            response = await client.post("/serve/iris", content=record(i), headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text
        return n / (time.perf_counter() - started)


async def stream_ndjson(url: str, n: int) -> tuple[float, float]:
    async def body():
        for i in range(n):
            yield record(i) + b"\n"

    started = time.perf_counter()
    first = None
    count = 0
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/serve/iris", data=body(), headers={"content-type": "application/x-ndjson"}) as response:
            async for line in response.content:
                assert b"error" not in line, line
                first = first or time.perf_counter() - started
                count += 1
    return count / (time.perf_counter() - started), first


async def run(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mesh = LocalMesh(Path(tmp), [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))], MeshPorts.ephemeral())
        with mesh:
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines",
                                 json={"name": "iris", "chain": ["scikit/iris_scaler", "scikit/iris_classifier"]}, timeout=10)
            assert created.status_code == 201, created.text
            async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                await unary_grpc(stub, 200, 4)  # warm-up
                rows = [
                    ("gRPC unary, 1 client", await unary_grpc(stub, n, 1), None),
                    ("gRPC unary, 16 clients", await unary_grpc(stub, n, 16), None),
                    ("gRPC stream", *await stream_grpc(stub, n)),
                ]
            rows += [
                ("HTTP unary, 1 client", await unary_http(mesh.gateway_url, n), None),
                ("NDJSON stream", *await stream_ndjson(mesh.gateway_url, n)),
            ]
    print(f"{n} records, one per request, pipeline iris (2 stages), through the gateway's sidecar")
    print(f"{'':26} {'records/s':>10} {'first answer':>14}")
    for name, rate, first in rows:
        print(f"{name:26} {rate:10.0f} {'' if first is None else f'{first * 1000:11.1f} ms':>14}")


if __name__ == "__main__":
    run_benchmark(run, __doc__, default_requests=2000)
