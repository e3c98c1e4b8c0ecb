"""The gateway's records API: ``POST /serve/<pipeline>`` (and ``/api/v1/serve/<pipeline>``).

(OIP REST v2 is ``gateway.v2``; both count into the same metrics and statistics.)"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from opentelemetry import trace
from pydantic import BaseModel
from starlette.responses import Response

from gateway import metrics
from gateway.codec import decode_outputs, encode_inputs, parse_records
from gateway.executor import StageFailed
from sluice.errors import ApiError, error_response
from sluice.tensors import TensorError
from sluice.wire import REVISION_HEADER

router = APIRouter()


async def _serve(pipeline_name: str, request: Request) -> Response:
    started = time.perf_counter_ns()
    state = request.app.state
    # the body first: between looking a pipeline up and the executor holding its revision
    # there must be no await, or the revision could be drained and withdrawn in between
    body = await request.body()
    pipeline = state.table.get(pipeline_name)
    if pipeline is None:
        metrics.requests("(unknown)", 404).inc()
        raise ApiError(404, f"no pipeline {pipeline_name!r}", "not_found", pipeline=pipeline_name)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("sluice.pipeline", pipeline.name)
        span.set_attribute("sluice.revision", pipeline.revision)
    try:
        response, marks, rows = await _run(pipeline, request, body)
    except ApiError as exc:
        metrics.answered(pipeline, exc.status, started)
        raise
    metrics.answered(pipeline, response.status_code, started, marks, rows)
    return response


async def _run(pipeline, request: Request, body: bytes) -> tuple[Response, tuple[int, int] | None, int]:
    """The answer, and for a success when its inputs were read and its stages done, and its rows."""
    state = request.app.state
    pipeline_name = pipeline.name
    try:
        records, single = parse_records(body)
        inputs = encode_inputs(pipeline, records)
    except TensorError as exc:
        raise ApiError(422, str(exc), "invalid_input", pipeline=pipeline_name) from None
    read = time.perf_counter_ns()
    try:
        outputs = await state.executor.run(pipeline, inputs)
    except StageFailed as exc:
        failed = error_response(
            exc.status,
            f"stage {exc.stage.index} ({exc.stage.name}) failed: {exc.message}",
            exc.code,
            pipeline=pipeline_name,
            stage=exc.stage.index,
            stage_name=exc.stage.name,
            model=exc.stage.model,
        )
        return failed, None, 0
    ran = time.perf_counter_ns()
    try:
        body = decode_outputs(outputs, single)
    except TensorError as exc:
        last = pipeline.stages[-1]
        raise ApiError(502, f"stage {last.index} ({last.name}) answered unreadable tensors: {exc}", "stage_bad_output",
                       pipeline=pipeline_name, stage=last.index) from None
    response = Response(
        body,
        media_type="application/json",
        headers={REVISION_HEADER: str(pipeline.revision)},
    )
    return response, (read, ran), len(records)


# the records routes are documented per pipeline, with the records each takes (gateway.openapi)
@router.post("/serve/{pipeline}", tags=["serve"], include_in_schema=False)
async def serve(pipeline: str, request: Request) -> Response:
    """Run the pipeline on JSON records; answers the last stage's outputs as records."""
    return await _serve(pipeline, request)


@router.post("/api/v1/serve/{pipeline}", tags=["serve"], include_in_schema=False)
async def serve_v1(pipeline: str, request: Request) -> Response:
    """Same as ``/serve/<pipeline>``."""
    return await _serve(pipeline, request)


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
