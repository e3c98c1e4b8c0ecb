"""Streaming at the gateway, in one process: ``gateway.streaming`` (the bounded in-order
window, NDJSON line cutting) and the two streaming front doors on the real app with the
executor's stage calls faked (each record's delay and failure set by its value):
``POST /serve/<p>`` with an NDJSON body driven over raw ASGI (so lines are sent while
answers are read), and OIP gRPC ``ModelStreamInfer`` on a real in-process grpc.aio
server. What runs over real Envoys is ``tests/e2e/test_streaming.py``."""

from __future__ import annotations

import asyncio
import random

import grpc
import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.app import create
from gateway.executor import StageFailed
from gateway.settings import GatewaySettings
from gateway.streaming import Line, LineTooLong, ndjson_lines, ordered
from sluice.plan import PipelinePlan, StagePlan
from sluice.plan_proto import to_proto
from sluice.tensors import TensorSpec
from sluice.v1 import pipeline_pb2
from tests.gateway_oip_server import oip_stub

WINDOW = 4


# --- ordered: the bounded in-order window


class Source:
    """An async stream of 0..n-1 that counts how many items were taken from it."""

    def __init__(self, n: int):
        self.n = n
        self.taken = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        if self.taken == self.n:
            raise StopAsyncIteration
        self.taken += 1
        await asyncio.sleep(0)
        return self.taken - 1


async def test_ordered_yields_in_source_order_when_work_finishes_out_of_order():
    rng = random.Random(7)
    delays = [rng.uniform(0, 0.01) for _ in range(60)]
    running = peak = 0

    async def work(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(delays[i])
        running -= 1
        return i * 10

    out = [r async for r in ordered(Source(60), work, WINDOW)]
    assert out == [i * 10 for i in range(60)]
    assert 1 < peak <= WINDOW  # concurrent, never more than the window


async def test_ordered_reads_no_further_than_the_window_while_the_oldest_is_pending():
    source = Source(100)
    release = asyncio.Event()

    async def work(i: int) -> int:
        if i == 0:
            await release.wait()  # the oldest item blocks; later ones finish at once
        return i

    stream = ordered(source, work, WINDOW)
    first = asyncio.ensure_future(anext(stream))
    for _ in range(50):
        await asyncio.sleep(0)
    assert not first.done()
    assert source.taken == WINDOW  # backpressure: nothing more is read from the sender
    release.set()
    assert await first == 0
    assert [r async for r in stream] == list(range(1, 100))


async def test_ordered_reads_no_further_than_the_window_while_the_reader_is_slow():
    source = Source(100)

    async def work(i: int) -> int:
        return i

    stream = ordered(source, work, WINDOW)
    assert await anext(stream) == 0
    for _ in range(50):
        await asyncio.sleep(0)  # the reader takes nothing more: answers wait, reading stops
    assert source.taken <= WINDOW + 1
    await stream.aclose()


async def test_ordered_closing_cancels_the_work_still_running():
    cancelled = []

    async def work(i: int) -> int:
        try:
            await asyncio.sleep(0.02 if i == 0 else 10)
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    stream = ordered(Source(10), work, WINDOW)
    assert await anext(stream) == 0  # by then items 1..3 run (the window is full until 0 is taken)
    await stream.aclose()
    assert sorted(cancelled) == [1, 2, 3]


async def test_ordered_work_that_raises_ends_the_stream_with_its_error():
    async def work(i: int) -> int:
        if i == 2:
            raise RuntimeError("boom")
        return i

    got = []
    with pytest.raises(RuntimeError, match="boom"):
        async for r in ordered(Source(10), work, WINDOW):
            got.append(r)
    assert got == [0, 1]


# --- ndjson_lines


async def chunked(body: bytes, cuts: list[int]):
    points = [0, *cuts, len(body)]
    for a, b in zip(points, points[1:]):
        yield body[a:b]


async def lines_of(body: bytes, cuts: list[int], limit: int = 32) -> list:
    return [x async for x in ndjson_lines(chunked(body, cuts), limit)]


async def test_ndjson_lines_cut_anywhere_give_the_same_lines():
    body = b'{"a": 1}\n\n  \r\n{"b": 2}\r\n{"c": 3}'
    want = [Line(1, b'{"a": 1}'), Line(4, b'{"b": 2}\r'), Line(5, b'{"c": 3}')]
    for cut in range(len(body) + 1):
        assert await lines_of(body, [cut]) == want, cut
    assert await lines_of(body, list(range(1, len(body)))) == want  # one byte per chunk


async def test_ndjson_a_line_over_the_limit_is_reported_in_its_place_and_the_next_line_is_read():
    long = b"x" * 100
    body = b'{"a": 1}\n' + long + b'\n{"b": 2}\n' + long
    want = [Line(1, b'{"a": 1}'), LineTooLong(2, 32), Line(3, b'{"b": 2}'), LineTooLong(4, 32)]
    for cuts in ([], [20], [9, 50, 115], list(range(1, len(body), 7))):
        assert await lines_of(body, cuts) == want, cuts


# --- the front doors on the real app, stage calls faked


def plan(name: str = "p", revision: int = 1) -> PipelinePlan:
    stage = StagePlan("rt/double", "rt", "double", "", "", 1000,
                      inputs=(TensorSpec("x", "FP64", (-1,)),), outputs=(TensorSpec("y", "FP64", (-1,)),))
    return PipelinePlan(name, 0, "http", (stage,)).at_revision(revision)


class Stages:
    """The executor's ``run``, faked: y = 2x; a record's delay is its ``x`` in ms, a
    negative ``x`` is refused by the stage (422); counts runs at once."""

    def __init__(self, table):
        self.table = table
        self.running = self.peak = 0

    async def run(self, pipeline, inputs):
        self.table.enter(pipeline)
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            _, shape, raw = inputs["x"]
            x = np.frombuffer(raw, "<f8")
            if (x < 0).any():
                raise StageFailed(pipeline.stages[0], 422, "stage_rejected_input", "x must not be negative")
            await asyncio.sleep(float(x.max()) / 1000)
            return {"y": ("FP64", shape, (x * 2).astype("<f8").tobytes())}
        finally:
            self.running -= 1
            self.table.leave(pipeline)


@pytest.fixture
async def app(tmp_path):
    (tmp_path / "ca.pem").write_bytes(b"unused: the watch is never started here")
    settings = GatewaySettings(grpc_port=0, max_body_bytes=256, stream_max_in_flight=WINDOW, xds_token="t",
                               xds_ca_file=str(tmp_path / "ca.pem"))
    app, _ = create(settings)
    table = app.state.table
    table.apply(pipeline_pb2.PipelineSet(version="1", full=True, pipelines=[to_proto(plan())]), 0)
    stages = Stages(table)
    app.state.executor.run = stages.run
    app.state.stages = stages
    yield app
    await app.state.executor.close()


class AsgiStream:
    """One HTTP request driven over raw ASGI: the body sent chunk by chunk while the
    answer's chunks are read (what a client and Envoy do on a real connection)."""

    def __init__(self, app, path: str, content_type: bytes = b"application/x-ndjson"):
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.outgoing: asyncio.Queue = asyncio.Queue()
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", content_type), (b"transfer-encoding", b"chunked")],
            "client": ("127.0.0.1", 1), "server": ("gw", 80),
        }
        self.task = asyncio.ensure_future(app(scope, self.incoming.get, self.outgoing.put))

    def send(self, data: bytes, more: bool = True) -> None:
        self.incoming.put_nowait({"type": "http.request", "body": data, "more_body": more})

    async def start(self) -> dict:
        message = await asyncio.wait_for(self.outgoing.get(), 5)
        assert message["type"] == "http.response.start"
        return message

    async def line(self) -> dict | None:
        """The next answer line (None at the end of the answer)."""
        message = await asyncio.wait_for(self.outgoing.get(), 5)
        assert message["type"] == "http.response.body"
        if not message.get("more_body"):
            assert message["body"] == b""
            return None
        assert message["body"].endswith(b"\n") and message["body"].count(b"\n") == 1
        return orjson.loads(message["body"])


def record_line(x: float) -> bytes:
    return orjson.dumps({"x": x}) + b"\n"


async def test_ndjson_answers_in_order_each_as_soon_as_it_and_those_before_are_done(app):
    stream = AsgiStream(app, "/serve/p")
    stream.send(record_line(1))
    start = await stream.start()
    assert start["status"] == 200 and (b"content-type", b"application/x-ndjson") in start["headers"]
    assert await stream.line() == {"y": 2.0}  # answered before the second line is even sent
    xs = [30, 1, 20, 2, 10, 3]  # later lines finish first
    stream.send(b"".join(record_line(x) for x in xs) + b'[{"x": 4}, {"x": 5}]\n', more=False)
    assert [await stream.line() for _ in xs] == [{"y": 2.0 * x} for x in xs]
    assert await stream.line() == [{"y": 8.0}, {"y": 10.0}]  # a list line is answered with a list
    assert await stream.line() is None
    await stream.task
    assert 1 < app.state.stages.peak <= WINDOW


async def test_ndjson_bad_lines_get_an_error_line_in_their_place_and_the_stream_goes_on(app):
    stream = AsgiStream(app, "/serve/p")
    stream.send(record_line(1) + b"{not json\n" + record_line(-1) + b'{"z": 1}\n' + b"9" * 300 + b"\n" + record_line(2),
                more=False)
    assert (await stream.start())["status"] == 200
    answers = []
    while (answer := await stream.line()) is not None:
        answers.append(answer)
    assert answers[0] == {"y": 2.0} and answers[-1] == {"y": 4.0}
    errors = [a["error"] for a in answers[1:-1]]
    assert [(e["code"], e["details"]["status"], e["details"]["line"]) for e in errors] == [
        ("invalid_input", 422, 2), ("stage_rejected_input", 422, 3), ("invalid_input", 422, 4), ("payload_too_large", 413, 5)]
    assert "not valid JSON" in errors[0]["message"]
    assert errors[1]["details"]["stage"] == 0 and "x must not be negative" in errors[1]["message"]
    assert "'x'" in errors[2]["message"]


async def test_ndjson_reads_no_further_than_the_window_while_the_oldest_line_is_pending(app):
    stream = AsgiStream(app, "/serve/p")
    stream.send(record_line(300))  # the oldest line takes 300 ms
    for x in range(1, 20):
        stream.send(record_line(0))
    assert (await stream.start())["status"] == 200
    await asyncio.sleep(0.1)
    # WINDOW lines run or wait to be answered; the rest are not read (nor parsed)
    assert stream.incoming.qsize() == 20 - WINDOW
    stream.send(b"", more=False)
    answers = []
    while (answer := await stream.line()) is not None:
        answers.append(answer)
    assert answers == [{"y": 600.0}] + [{"y": 0.0}] * 19


async def test_ndjson_unknown_pipeline_is_a_404_before_streaming(app):
    stream = AsgiStream(app, "/serve/nope")
    stream.send(record_line(1), more=False)
    start = await stream.start()
    assert start["status"] == 404
    body = await asyncio.wait_for(stream.outgoing.get(), 5)
    assert orjson.loads(body["body"])["error"]["code"] == "not_found"


async def test_ndjson_body_may_exceed_the_body_limit_but_a_json_body_may_not(app):
    stream = AsgiStream(app, "/serve/p")
    for _ in range(40):  # 40 lines of ~11 bytes: over the 256-byte limit in all
        stream.send(record_line(0))
    stream.send(b"", more=False)
    assert (await stream.start())["status"] == 200
    assert [await stream.line() for _ in range(40)] == [{"y": 0.0}] * 40
    plain = AsgiStream(app, "/serve/p", b"application/json")
    plain.send(orjson.dumps([{"x": 0}] * 40), more=False)
    assert (await plain.start())["status"] == 413


# --- OIP gRPC ModelStreamInfer


@pytest.fixture
async def stub(app):
    async with oip_stub(app, WINDOW) as stub:
        yield stub


def infer_request(x: float, model: str = "p", request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id or f"r{x}")
    request.inputs.add(name="x", datatype="FP64", shape=[1])
    request.raw_input_contents.append(np.array([x], "<f8").tobytes())
    return request


def y_of(response: pb.ModelStreamInferResponse) -> float:
    assert not response.error_message, response.error_message
    return float(np.frombuffer(response.infer_response.raw_output_contents[0], "<f8")[0])


async def test_grpc_stream_answers_in_order_and_errors_in_place_without_ending_it(stub, app):
    requests: asyncio.Queue = asyncio.Queue()

    async def sent():
        while (request := await requests.get()) is not None:
            yield request

    call = stub.ModelStreamInfer(sent())
    requests.put_nowait(infer_request(1))
    first = await asyncio.wait_for(call.read(), 5)  # answered before the next request is sent
    assert y_of(first) == 2.0 and first.infer_response.id == "r1"
    xs = [30, 1, 20, 2, 10, 3]
    for x in xs:
        requests.put_nowait(infer_request(x))
    requests.put_nowait(infer_request(-1, request_id="bad"))
    requests.put_nowait(infer_request(1, model="nope", request_id="unknown"))
    requests.put_nowait(infer_request(4))
    requests.put_nowait(None)
    answers = [await asyncio.wait_for(call.read(), 5) for _ in range(len(xs) + 3)]
    assert [y_of(a) for a in answers[: len(xs)]] == [2.0 * x for x in xs]
    assert [a.infer_response.id for a in answers[: len(xs)]] == [f"r{x}" for x in xs]
    bad, unknown, last = answers[len(xs):]
    assert "stage 0 (rt/double) failed: x must not be negative" in bad.error_message
    assert bad.infer_response.id == "bad"
    assert bad.infer_response.parameters["sluice.error_code"].string_param == "INVALID_ARGUMENT"
    assert bad.infer_response.parameters["sluice.status"].int64_param == 400
    assert "no pipeline 'nope'" in unknown.error_message
    assert unknown.infer_response.parameters["sluice.error_code"].string_param == "NOT_FOUND"
    assert y_of(last) == 8.0
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert 1 < app.state.stages.peak <= WINDOW


async def test_grpc_stream_cancelled_by_the_client_stops_the_requests_still_running(stub, app):
    stages = app.state.stages

    async def sent():
        for x in (5000, 5000, 5000):  # 5 s each
            yield infer_request(x)
        await asyncio.sleep(30)  # the client keeps the stream open, then goes away

    call = stub.ModelStreamInfer(sent())
    for _ in range(200):
        if stages.running == 3:
            break
        await asyncio.sleep(0.01)
    assert stages.running == 3
    call.cancel()
    for _ in range(200):
        if stages.running == 0:
            break
        await asyncio.sleep(0.01)
    assert stages.running == 0  # no stage call outlives its stream
