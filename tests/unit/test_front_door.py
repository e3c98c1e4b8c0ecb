"""The gateway's front door after its cost cuts (issue #13), in one process: ``POST
/serve/<p>`` as a plain ASGI endpoint answers and fails exactly as a FastAPI route did
(the real app, stage calls faked); the body limit skips counting only a body the HTTP
server already bounds by its Content-Length; a disabled tracing middleware is not in the
chain; the records codec's fast type check refuses what the slow one refused."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from gateway.app import create
from gateway.settings import GatewaySettings
from sluice.limits import BodyLimitMiddleware
from sluice.plan import PipelinePlan, StagePlan
from sluice.plan_proto import to_proto
from sluice.tensors import TensorError, TensorSpec, records_to_arrays
from sluice.tracing import Tracing, TracingMiddleware
from sluice.v1 import pipeline_pb2

FEATURES = TensorSpec("features", "FP64", (-1, 3))


@pytest.fixture
async def client(tmp_path):
    (tmp_path / "ca.pem").write_bytes(b"unused: the watch is never started here")
    settings = GatewaySettings(grpc_port=0, max_body_bytes=4096, xds_token="t", xds_ca_file=str(tmp_path / "ca.pem"))
    app, _ = create(settings)
    stage = StagePlan("rt/m", "rt", "m", "", "", 100, inputs=(FEATURES,), outputs=(TensorSpec("total", "FP64", (-1,)),))
    app.state.table.apply(pipeline_pb2.PipelineSet(
        version="1", full=True, pipelines=[to_proto(PipelinePlan("p", 0, "http", (stage,)).at_revision(3))]), 0)
    table, executor = app.state.table, app.state.executor

    async def run(pipeline, inputs):  # the stage: the sum of each row
        table.enter(pipeline)
        try:
            _, shape, raw = inputs["features"]
            return {"total": ("FP64", [shape[0]], np.frombuffer(raw, "<f8").reshape(shape).sum(axis=1).tobytes())}
        finally:
            table.leave(pipeline)

    executor.run = run
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c
    await executor.close()


async def test_serve_answers_records_and_the_revision_on_both_paths(client):
    one = await client.post("/serve/p", json={"features": [1, 2, 3.5]})
    assert one.status_code == 200, one.text
    assert one.json() == {"total": 6.5} and one.headers["x-sluice-revision"] == "3"
    assert one.headers["content-type"] == "application/json"
    many = await client.post("/api/v1/serve/p", json=[{"features": [1, 1, 1]}, {"features": [0, 0, 2]}])
    assert many.status_code == 200 and many.json() == [{"total": 3.0}, {"total": 2.0}]


async def test_serve_errors_keep_the_project_shape_and_status(client):
    def error(response: httpx.Response) -> dict:
        body = response.json()["error"]
        assert set(body) == {"code", "message", "details"}, body
        return body

    missing = await client.post("/serve/nope", json={"features": [1, 2, 3]})
    assert missing.status_code == 404 and error(missing)["code"] == "not_found"
    assert error(missing)["details"] == {"pipeline": "nope"}
    bad = await client.post("/serve/p", json={"features": [1, "2", 3]})
    assert bad.status_code == 422 and error(bad)["code"] == "invalid_input" and "got strings" in error(bad)["message"]
    not_json = await client.post("/serve/p", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and "not valid JSON" in error(not_json)["message"]
    wrong_method = await client.get("/serve/p")
    assert wrong_method.status_code == 405 and error(wrong_method)["code"] == "method_not_allowed"
    assert wrong_method.headers["allow"] == "POST"  # RFC 9110: what the path takes
    too_big = await client.post("/serve/p", content=b"[" + b" " * 5000 + b"]", headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and error(too_big)["code"] == "payload_too_large"


async def _call(middleware, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a POST with ``chunks`` as its body through ``middleware``: (status, what the app read)."""
    pending = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []

    async def receive():
        return pending.pop(0)

    async def send(message):
        sent.append(message)

    await middleware({"type": "http", "method": "POST", "path": "/serve/p", "headers": headers}, receive, send)
    return sent[0]["status"], sent[-1].get("body", b"")


async def _echo(scope, receive, send) -> None:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


async def test_body_limit_counts_unsized_bodies_and_refuses_oversized_lengths():
    limited = BodyLimitMiddleware(_echo, max_bytes=10, streamed=("application/x-ndjson",))
    # a Content-Length within the limit: the server reads exactly that much, passed through
    assert await _call(limited, [(b"content-length", b"8")], [b"abcd", b"efgh"]) == (200, b"abcdefgh")
    # a Content-Length over the limit: refused before the body is read
    status, body = await _call(limited, [(b"content-length", b"11")], [b"x" * 11])
    assert status == 413 and json.loads(body)["error"]["code"] == "payload_too_large"
    # no Content-Length (chunked): counted as it arrives, refused once past the limit
    status, _ = await _call(limited, [], [b"x" * 6, b"x" * 6])
    assert status == 413
    assert await _call(limited, [], [b"x" * 5, b"x" * 5]) == (200, b"x" * 10)
    # two Content-Lengths: not trusted, counted
    status, _ = await _call(limited, [(b"content-length", b"4"), (b"content-length", b"4")], [b"x" * 12])
    assert status == 413
    # a streamed type passes unlimited (its handler limits each line)
    ndjson = [(b"content-type", b"application/x-ndjson; charset=utf-8")]
    assert await _call(limited, ndjson, [b"x" * 30]) == (200, b"x" * 30)


def test_tracing_middleware_is_left_out_of_the_chain_when_tracing_is_off():
    assert TracingMiddleware(_echo, tracing=Tracing("gateway", None)) is _echo
    from opentelemetry.sdk.trace import TracerProvider

    traced = TracingMiddleware(_echo, tracing=Tracing("gateway", TracerProvider().get_tracer("gateway")))
    assert isinstance(traced, TracingMiddleware) and traced.app is _echo


@pytest.mark.parametrize(
    "spec, column, message",
    [
        (FEATURES, [[1.0, True, 2.0]], "got null or a boolean"),
        (FEATURES, [[1.0, None, 2.0]], "got null or a boolean"),
        (FEATURES, [[1.0, "2", 2.0]], "got strings"),
        (TensorSpec("features", "INT64", (-1, 3)), [[1, 2.5, 3]], "got null, a boolean or a fraction"),
        (TensorSpec("features", "BOOL", (-1,)), [True, 1], "got a non-boolean"),
    ],
)
def test_records_codec_still_refuses_values_numpy_would_coerce(spec, column, message):
    with pytest.raises(TensorError, match=message):
        records_to_arrays([{"features": value} for value in column], [spec])


def test_records_codec_takes_plain_and_integral_values():
    arrays = records_to_arrays([{"features": [1, 2.0, 3]}], [TensorSpec("features", "INT64", (-1, 3))])
    assert arrays["features"].tolist() == [[1, 2, 3]]
    arrays = records_to_arrays([{"features": [1, 2.5, 3]}, {"features": [0, 0, 0]}], [FEATURES])
    assert arrays["features"].dtype == np.float64 and arrays["features"].shape == (2, 3)
