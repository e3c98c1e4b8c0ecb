"""Benchmark: the gateway's front-door Python per request, in one process, stage calls faked.

The real gateway app (``gateway.app.create``: FastAPI, every middleware, the records
codec, metrics, served_by) serves ``POST /serve/bc`` called straight through ASGI with the
headers a request through the sidecar carries, and the OIP gRPC servicer's ``ModelInfer``
is called with a stand-in context; the executor answers at once with the last stage's
output (bench/three_stage.py's pipeline: 30 FP64 features in, 2 probabilities out). No
sockets, no Envoy, no gRPC C core: what is left is exactly the Python a request costs
at the front door, so it is stable on a busy machine (the minimum of several rounds).

Run by hand: ``.venv/bin/python bench/front_door_cost.py [--requests 3000] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.app import create  # noqa: E402
from gateway.codec import decode_outputs, encode_inputs, parse_records  # noqa: E402
from gateway.oip import PipelineInferenceService  # noqa: E402
from gateway.settings import GatewaySettings  # noqa: E402
from sluice.plan import PipelinePlan, StagePlan  # noqa: E402
from sluice.plan_proto import to_proto  # noqa: E402
from sluice.serving import install_uvloop  # noqa: E402
from sluice.tensors import TensorSpec  # noqa: E402
from sluice.v1 import pipeline_pb2  # noqa: E402

#: what a request through the gateway's sidecar carries (Envoy adds the x-* ones)
HEADERS = (
    (b"host", b"127.0.0.1:8083"), (b"content-type", b"application/json"), (b"user-agent", b"python-httpx/0.28"),
    (b"accept", b"*/*"), (b"x-forwarded-proto", b"http"), (b"x-request-id", b"5b0c0c36-6c3e-4d5e-9d43-3b0f3f1c8a11"),
    (b"x-envoy-expected-rq-timeout-ms", b"30000"), (b"x-b3-traceid", b"80f198ee56343ba8"),
    (b"x-b3-spanid", b"e457b5a2e4d86bd1"), (b"x-b3-sampled", b"1"),
)


class Context:
    """The part of a grpc.aio servicer context ``ModelInfer`` uses."""

    def invocation_metadata(self):
        return (("user-agent", "grpc-python/1.85"), ("x-b3-traceid", "80f198ee56343ba8"))

    async def send_initial_metadata(self, metadata) -> None:
        pass

    async def abort(self, code, message):
        raise RuntimeError(f"{code}: {message}")


async def timed(call, requests: int, rounds: int) -> tuple[float, float]:
    """(min, median) µs per call over ``rounds`` rounds of ``requests`` calls."""
    per_round = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(requests):
            await call()
        per_round.append((time.perf_counter() - started) / requests * 1e6)
    return min(per_round), statistics.median(per_round)


async def run(requests: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as workdir:
        ca = Path(workdir) / "ca.pem"
        ca.write_bytes(b"unused: the pipeline watch is never started here")
        app, _ = create(GatewaySettings(grpc_port=0, xds_token="t", xds_ca_file=str(ca)))
    stage = StagePlan("rt/bc", "rt", "bc", "", "", 100, inputs=(TensorSpec("features", "FP64", (-1, 30)),),
                      outputs=(TensorSpec("probabilities", "FP64", (-1, 2)),))
    table, executor = app.state.table, app.state.executor
    table.apply(pipeline_pb2.PipelineSet(version="1", full=True, pipelines=[to_proto(PipelinePlan("bc", 0, "http", (stage,)).at_revision(1))]), 0)
    answer = np.array([[0.25, 0.75]]).tobytes()

    async def stages(pipeline, inputs):
        table.enter(pipeline)
        try:
            return {"probabilities": ("FP64", [1, 2], answer)}
        finally:
            table.leave(pipeline)

    executor.run = stages
    body = json.dumps([{"features": list(np.linspace(0.5, 30, 30))}]).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/serve/bc", "raw_path": b"/serve/bc", "query_string": b"", "root_path": "",
             "headers": [*HEADERS, (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8083)}
    statuses: list[int] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def http():
        await app(dict(scope, state={}), receive, send)

    service = PipelineInferenceService(table, executor, app.state.oip)
    request = pb.ModelInferRequest(model_name="bc")
    request.inputs.add(name="features", datatype="FP64", shape=[1, 30])
    request.raw_input_contents.append(np.linspace(0.5, 30, 30).astype("<f8").tobytes())
    context = Context()

    async def grpc():
        await service.ModelInfer(request, context)

    await http()
    assert statuses == [200], statuses
    pipeline = table.get("bc")
    outputs = {"probabilities": ("FP64", [1, 2], answer)}

    async def codec_in():
        encode_inputs(pipeline, parse_records(body)[0])

    async def codec_out():
        decode_outputs(outputs, False)

    print(f"front-door Python per request, stage calls faked ({requests} requests x {rounds} rounds): min / median µs")
    for label, call in (("HTTP POST /serve (whole ASGI app)", http), ("OIP gRPC ModelInfer (servicer)", grpc),
                        ("  records in: parse + encode", codec_in), ("  records out: decode + JSON", codec_out)):
        low, mid = await timed(call, requests, rounds)
        print(f"  {label:36} {low:7.1f} / {mid:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(run(args.requests, args.rounds))


if __name__ == "__main__":
    main()
