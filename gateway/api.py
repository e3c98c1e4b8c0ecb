"""The gateway's records API: ``POST /serve/<pipeline>`` (and ``/api/v1/serve/<pipeline>``).

A JSON body is one record (answered with one record) or a list of records (answered
with a list). A body of ``Content-Type: application/x-ndjson`` is a stream of such
bodies, one per line: each line is run as it arrives (at most
``SLUICE_GATEWAY_STREAM_MAX_IN_FLIGHT`` lines of one stream at once, the next not read
until the oldest is answered: ``gateway.streaming``) and answered by one NDJSON line,
in the lines' order, as soon as it and every line before it are done. A bad line
(not JSON, not records of the pipeline's inputs, refused by a stage, longer than the
body limit) is answered in its place by an error line,
``{"error": {"code", "message", "details": {"status", "line", ...}}}``, and the
stream goes on: the lines of one stream are independent requests, as in OIP's
``ModelStreamInfer``. Blank lines are skipped. Each line resolves the pipeline anew,
so a stream outlives a replace (later lines run on the new revision) and a delete
(later lines answer ``not_found``). An NDJSON answer carries no ``x-sluice-served-by``:
its headers go out before the first line runs (``gateway.served_by``); each line still
forwards the request's ``x-sluice-variant`` and sticky header, and is counted in
``sluice_gateway_stage_served_total``.

(OIP REST v2 is ``gateway.v2``; all count into the same metrics and statistics, a
streamed line as one request.)"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from opentelemetry import trace
from pydantic import BaseModel
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from gateway import metrics
from gateway.codec import decode_outputs, encode_inputs, parse_records
from gateway.executor import Executor, StageFailed
from gateway.pipelines import CompiledPipeline
from gateway.streaming import NDJSON, Line, LineTooLong, ndjson_lines, ordered
from sluice.errors import ApiError, error_body
from sluice.tensors import TensorError
from sluice.wire import REVISION_HEADER

router = APIRouter()


async def _serve(pipeline_name: str, request: Request) -> Response:
    if is_ndjson(request.headers.get("content-type", "")):
        return _serve_stream(pipeline_name, request)
    started = time.perf_counter_ns()
    state = request.app.state
    # the body first: between looking a pipeline up and the executor holding its revision
    # there must be no await, or the revision could be drained and withdrawn in between
    body = await request.body()
    pipeline = _lookup(state, pipeline_name)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("sluice.revision", pipeline.revision)
    try:
        answer, marks, rows = await run_records(state.executor, pipeline, body)
    except ApiError as exc:
        metrics.answered(pipeline, exc.status, started)
        raise
    metrics.answered(pipeline, 200, started, marks, rows)
    return Response(answer, media_type="application/json", headers={REVISION_HEADER: str(pipeline.revision)})


def is_ndjson(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == NDJSON


async def run_records(executor: Executor, pipeline: CompiledPipeline, body: bytes) -> tuple[bytes, tuple[int, int], int]:
    """Run ``pipeline`` on one records body: (the answer's JSON, when its inputs were read
    and its stages done in ``perf_counter_ns``, its rows); ApiError otherwise. Nothing
    awaits before the executor holds the revision."""
    pipeline_name = pipeline.name
    try:
        records, single = parse_records(body)
        inputs = encode_inputs(pipeline, records)
    except TensorError as exc:
        raise ApiError(422, str(exc), "invalid_input", pipeline=pipeline_name) from None
    read = time.perf_counter_ns()
    try:
        outputs = await executor.run(pipeline, inputs)
    except StageFailed as exc:
        raise ApiError(
            exc.status,
            f"stage {exc.stage.index} ({exc.stage.name}) failed: {exc.message}",
            exc.code,
            pipeline=pipeline_name,
            stage=exc.stage.index,
            stage_name=exc.stage.name,
            model=exc.stage.model,
        ) from None
    ran = time.perf_counter_ns()
    try:
        answer = decode_outputs(outputs, single)
    except TensorError as exc:
        last = pipeline.stages[-1]
        raise ApiError(502, f"stage {last.index} ({last.name}) answered unreadable tensors: {exc}", "stage_bad_output",
                       pipeline=pipeline_name, stage=last.index) from None
    return answer, (read, ran), len(records)


def _lookup(state, pipeline_name: str):
    """The served pipeline (404 ``not_found`` otherwise), named on the request's span."""
    pipeline = state.table.get(pipeline_name)
    if pipeline is None:
        metrics.requests("(unknown)", 404).inc()
        raise ApiError(404, f"no pipeline {pipeline_name!r}", "not_found", pipeline=pipeline_name)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("sluice.pipeline", pipeline.name)
    return pipeline


# --- NDJSON streams


def _serve_stream(pipeline_name: str, request: Request) -> Response:
    state = request.app.state
    pipeline = _lookup(state, pipeline_name)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("sluice.stream", True)
    limit: int = state.max_body_bytes

    async def answer(item: Line | LineTooLong) -> bytes:
        started = time.perf_counter_ns()
        if isinstance(item, LineTooLong):
            metrics.requests(pipeline_name, 413).inc()
            return error_line(ApiError(413, f"line {item.number} is longer than {limit} bytes", "payload_too_large",
                                       pipeline=pipeline_name, limit=limit), item.number)
        # the revision served now, looked up with no await before the executor holds it
        current = state.table.get(pipeline_name)
        if current is None:
            metrics.requests("(unknown)", 404).inc()
            return error_line(ApiError(404, f"no pipeline {pipeline_name!r}", "not_found", pipeline=pipeline_name), item.number)
        try:
            body, marks, rows = await run_records(state.executor, current, item.data)
        except ApiError as exc:
            metrics.answered(current, exc.status, started)
            return error_line(exc, item.number)
        metrics.answered(current, 200, started, marks, rows)
        return body + b"\n"

    body = _Body(request)
    return NdjsonStream(body, ordered(ndjson_lines(body.chunks(), limit), answer, state.stream_max_in_flight),
                        {REVISION_HEADER: str(pipeline.revision)})


def error_line(exc: ApiError, line: int) -> bytes:
    """A streamed line's error, in the project's error shape, with its HTTP status and line number."""
    return error_body(exc.code, exc.message, {"status": exc.status, "line": line, **exc.details}) + b"\n"


class _Body:
    """A request's body as it arrives, and whether it has all arrived (or the client left)."""

    def __init__(self, request: Request):
        self.request = request
        self.read = False

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.request.stream():
                if chunk:
                    yield chunk
        except ClientDisconnect:
            pass
        self.read = True

    async def client_gone(self) -> bool:
        """Whether the client went away; asked only once the body is read (before, asking
        would take a chunk of it)."""
        return self.read and await self.request.is_disconnected()


class NdjsonStream(Response):
    """An NDJSON answer sent line by line as ``lines`` yields them (chunked), while the
    request's body is still being read. Starlette's ``StreamingResponse`` is not used:
    under ASGI spec < 2.4 it watches for a disconnect by calling ``receive`` itself,
    which would take the request body's chunks from the handler. Here the disconnect is
    watched only once the body is read; then the stream stops at the next line."""

    media_type = NDJSON

    def __init__(self, body: _Body, lines: AsyncIterator[bytes], headers: dict[str, str]):
        super().__init__(None, 200, headers, self.media_type)
        self.body_in = body
        self.lines = lines
        del self.headers["content-length"]

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for line in self.lines:
                if await self.body_in.client_gone():
                    return
                await send({"type": "http.response.body", "body": line, "more_body": True})
        finally:
            await self.lines.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class ServeEndpoint:
    """``POST /serve/{pipeline}`` as a plain ASGI endpoint (a Starlette route), not a FastAPI
    one: FastAPI's per-request machinery for an endpoint (dependency solving, parameter
    binding, its own exception wrapper) cost about 30 µs of the ~115 µs of Python the
    gateway spent on a request's HTTP side (bench/profile_request.py). Its errors
    (``ApiError``, a client gone while sending the body) propagate as a FastAPI endpoint's
    do, to the app's exception handlers: the same statuses and JSON bodies."""

    async def __call__(self, scope, receive, send) -> None:
        response = await _serve(scope["path_params"]["pipeline"], Request(scope, receive))
        await response(scope, receive, send)


# the records routes are documented per pipeline, with the records each takes (gateway.openapi)
router.add_route("/serve/{pipeline}", ServeEndpoint(), methods=["POST"], name="serve", include_in_schema=False)
router.add_route("/api/v1/serve/{pipeline}", ServeEndpoint(), methods=["POST"], name="serve_v1", include_in_schema=False)


class ServedPipeline(BaseModel):
    revision: int
    stages: list[str]


class ServedSet(BaseModel):
    """The pipelines this gateway serves now, and the version of the set."""

    version: str
    pipelines: dict[str, ServedPipeline]


@router.get("/api/v1/pipelines", tags=["pipelines"], response_model=ServedSet)
async def served(request: Request) -> dict:
    """The pipelines this gateway serves now, and the version of the set."""
    table = request.app.state.table
    return {
        "version": table.version,
        "pipelines": {
            p.name: {"revision": p.revision, "stages": [s.name for s in p.stages]} for p in table.pipelines.values()
        },
    }
