"""OIP REST v2 (the KServe / Triton HTTP API) at the front door: every pipeline is a
model of its name, its revision its version.

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          200 (empty body), or 503
    GET  /v2/models/<p>[/versions/<v>]              model metadata
    GET  /v2/models/<p>[/versions/<v>]/ready        200 (empty body), or 404
    GET  /v2/models/<p>[/versions/<v>]/config       Triton's model configuration
    GET  /v2/models[/<p>[/versions/<v>]]/stats      Triton's statistics extension
    POST /v2/models/<p>[/versions/<v>]/infer        inference: JSON tensors, or Triton's
                                                    binary tensor extension
    POST /v2/repository/index                       every pipeline and its state

Inference takes ``inputs`` (``name``, ``shape``, ``datatype``, ``data`` flat or
nested, optional ``parameters``), optional ``outputs`` and ``parameters``. With an
``Inference-Header-Content-Length`` header the body is that many bytes of JSON then
the inputs' binary data (each input's ``parameters.binary_data_size`` bytes, in
order, ``BYTES`` in Triton's length-prefixed layout); outputs asked for with
``binary_data`` (or every output, with the request's ``binary_data_output``) come
back the same way. A request body may be gzip or deflate compressed
(``Content-Encoding``); the body limit (``SLUICE_GATEWAY_MAX_BODY_BYTES``) holds for
it before and after decompression.

Errors are OIP's ``{"error": "<message>"}`` with the status: 400 a request that does
not fit the pipeline (or lies about its lengths), 404 unknown pipeline or version
(naming the versions served), 413 body over the limit, 415 an unknown
Content-Encoding, and a failing stage's 429/502/503/504 naming the stage. What the
paths answer is ``gateway.oip_models``' (shared with OIP gRPC); tensors are
``gateway.codec``'s.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import orjson
from grpc import StatusCode
from fastapi import APIRouter, Request
from opentelemetry import trace
from pydantic import BaseModel
from starlette.responses import Response

from gateway import metrics
from gateway.codec import infer_response, message_json, parse_infer_request
from gateway.oip_models import EXTENSIONS, SERVER_NAME, SERVER_VERSION, OipError, PipelineModels
from sluice.tensors import DATATYPE_TO_DTYPE, TensorError
from sluice.wire import REVISION_HEADER

router = APIRouter(prefix="/v2", tags=["oip-v2"])

HEADER_LENGTH = "inference-header-content-length"
_JSON = "application/json"
_BINARY = "application/octet-stream"


# --- OpenAPI: the shapes of OIP's answers (documentation only; handlers write JSON)


class OipErrorBody(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[Any] | None = None
    parameters: dict[str, Any] | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[OutputTensor]


class StatDuration(BaseModel):
    count: int
    ns: int


class InferStatistics(BaseModel):
    success: StatDuration
    fail: StatDuration
    queue: StatDuration
    compute_input: StatDuration
    compute_infer: StatDuration
    compute_output: StatDuration


class ModelStatistics(BaseModel):
    name: str
    version: str
    last_inference: int
    inference_count: int
    execution_count: int
    inference_stats: InferStatistics


class StatisticsResponse(BaseModel):
    model_stats: list[ModelStatistics]


class RepositoryEntry(BaseModel):
    name: str
    version: str
    state: str
    reason: str


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "the request does not fit the pipeline, or is malformed",
        404: "no such pipeline, or no such version held",
        413: "request body over the limit",
        415: "unknown Content-Encoding",
        429: "a stage is overloaded",
        502: "a stage failed or answered unreadable tensors",
        503: "not ready, or a stage's runtime is unavailable",
        504: "a stage timed out",
    }
    return {s: {"model": OipErrorBody, "description": what[s]} for s in statuses}


_INFER_REQUEST_SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "datatype": {"type": "string", "enum": list(DATATYPE_TO_DTYPE)},
                    "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}},
                    "data": {"type": "array", "items": {}},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
                },
            },
        },
    },
}
_INFER_OPENAPI = {
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "description": "Triton's binary tensor extension: the length of the JSON header; the inputs' binary data follows it",
            "schema": {"type": "integer", "minimum": 0},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            _JSON: {"schema": _INFER_REQUEST_SCHEMA},
            _BINARY: {"schema": {"type": "string", "format": "binary"}},
        },
    },
}
_INFER_RESPONSES = {
    200: {"model": InferResponse, "content": {_BINARY: {"schema": {"type": "string", "format": "binary"}}},
          "description": "the outputs; binary outputs after the JSON header (Inference-Header-Content-Length)"},
    **_errors(400, 404, 413, 415, 429, 502, 503, 504),
}
_EMPTY_OK = {200: {"description": "true (empty body)", "content": {}}}


# --- helpers


def _models(request: Request) -> PipelineModels:
    return request.app.state.oip


def error(status: int, message: str) -> Response:
    """OIP's error answer: ``{"error": "<message>"}``."""
    return Response(orjson.dumps({"error": message}), status_code=status, media_type=_JSON)


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type=_JSON)


async def _read_body(request: Request) -> bytes:
    """The body, at most the limit before and after decompression (413), else OipError."""
    limit: int = request.app.state.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise OipError(413, StatusCode.RESOURCE_EXHAUSTED, f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise OipError(413, StatusCode.RESOURCE_EXHAUSTED, f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise OipError(415, StatusCode.INVALID_ARGUMENT, f"Content-Encoding {encoding!r} is not supported (gzip, deflate or identity)")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise OipError.invalid(f"the {encoding} body cannot be decompressed: {exc}") from None
    if len(out) > limit:
        raise OipError(413, StatusCode.RESOURCE_EXHAUSTED, f"request body is larger than {limit} bytes once decompressed")
    if not inflater.eof:
        raise OipError.invalid(f"the {encoding} body is truncated")
    return out


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii():
        raise OipError.invalid(f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}")
    return int(value)


# --- server


@router.get("", response_model=ServerMetadata, summary="Server metadata")
async def server_metadata() -> Response:
    return _json({"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)})


@router.get("/health/live", responses=_EMPTY_OK, summary="Server live", response_class=Response)
async def health_live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready", responses={**_EMPTY_OK, **_errors(503)}, summary="Server ready: the pipeline set is received",
            response_class=Response)
async def health_ready(request: Request) -> Response:
    if not _models(request).server_ready():
        return error(503, "no pipeline set received from the manager yet")
    return Response(status_code=200)


@router.post("/repository/index", response_model=list[RepositoryEntry], responses=_errors(400, 413, 415),
             summary="Every pipeline at its version, READY; a replaced version still draining, UNLOADING")
async def repository_index(request: Request) -> Response:
    try:
        body = await _read_body(request)
    except OipError as exc:
        return error(exc.status, exc.message)
    ready = False
    if body.strip():
        try:
            options = orjson.loads(body)
        except orjson.JSONDecodeError:
            return error(400, "the body must be JSON: {\"ready\": true|false}")
        ready = options.get("ready", False) if isinstance(options, dict) else None
        if not isinstance(ready, bool):
            return error(400, "the body must be JSON: {\"ready\": true|false}")
    return _json(message_json(_models(request).index(ready))["models"])


@router.get("/models/stats", response_model=StatisticsResponse, summary="Statistics of every pipeline")
async def all_statistics(request: Request) -> Response:
    return _json(message_json(_models(request).statistics()))


# --- one pipeline (each path also under /versions/<v>)


async def _metadata(request: Request, name: str, version: str) -> Response:
    models = _models(request)
    try:
        return _json(message_json(models.metadata(models.resolve(name, version))))
    except OipError as exc:
        return error(exc.status, exc.message)


async def _ready(request: Request, name: str, version: str) -> Response:
    try:
        _models(request).resolve(name, version)
    except OipError as exc:
        return error(exc.status, exc.message)
    return Response(status_code=200)


async def _config(request: Request, name: str, version: str) -> Response:
    models = _models(request)
    try:
        pipeline = models.resolve(name, version)
    except OipError as exc:
        return error(exc.status, exc.message)
    return _json(message_json(await models.config(pipeline)))


async def _statistics(request: Request, name: str, version: str) -> Response:
    try:
        return _json(message_json(_models(request).statistics(name, version)))
    except OipError as exc:
        return error(exc.status, exc.message)


async def _infer(request: Request, name: str, version: str) -> Response:
    started = time.perf_counter_ns()
    models = _models(request)
    try:
        # the body first: between looking a revision up and the executor holding it there
        # must be no await, or it could be drained and its routes withdrawn in between
        body = await _read_body(request)
        pipeline = models.resolve(name, version)
    except OipError as exc:
        metrics.requests("(unknown)", exc.status).inc()
        return error(exc.status, exc.message)
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("sluice.pipeline", pipeline.name)
        span.set_attribute("sluice.revision", pipeline.revision)
    try:
        try:
            parsed = parse_infer_request(body, _header_length(request))
        except TensorError as exc:
            raise OipError.invalid(str(exc)) from None
        outputs, rows, checked = await models.infer(pipeline, parsed.inputs, parsed.outputs)
        ran = time.perf_counter_ns()
        try:
            answer, header_length = infer_response(pipeline, parsed, outputs)
        except TensorError as exc:
            last = pipeline.stages[-1]
            raise OipError(502, StatusCode.INTERNAL, f"stage {last.index} ({last.name}) answered unreadable tensors: {exc}") from None
    except OipError as exc:
        metrics.answered(pipeline, exc.status, started)
        return error(exc.status, exc.message)
    headers = {REVISION_HEADER: pipeline.version}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    metrics.answered(pipeline, 200, started, (checked, ran), rows)
    return Response(answer, media_type=_BINARY if header_length is not None else _JSON, headers=headers)


def _route(path: str, method: str, handler, summary: str, **options) -> None:
    async def latest(name: str, request: Request) -> Response:
        return await handler(request, name, "")

    async def versioned(name: str, version: str, request: Request) -> Response:
        return await handler(request, name, version)

    suffix = handler.__name__.strip("_")
    router.add_api_route(f"/models/{{name}}{path}", latest, methods=[method], summary=summary,
                         name=f"oip_{suffix}", **options)
    router.add_api_route(f"/models/{{name}}/versions/{{version}}{path}", versioned, methods=[method],
                         summary=f"{summary} (a version held)", name=f"oip_{suffix}_version", **options)


_route("", "GET", _metadata, "Pipeline metadata: the first stage's inputs, the last stage's outputs",
       response_model=ModelMetadata, responses=_errors(404))
_route("/ready", "GET", _ready, "Pipeline ready", responses={**_EMPTY_OK, **_errors(404)}, response_class=Response)
_route("/config", "GET", _config, "Pipeline configuration (Triton's model configuration)", responses=_errors(404))
_route("/stats", "GET", _statistics, "Pipeline statistics", response_model=StatisticsResponse, responses=_errors(404))
_route("/infer", "POST", _infer, "Run the pipeline on OIP tensors", response_model=InferResponse,
       responses=_INFER_RESPONSES, openapi_extra=_INFER_OPENAPI)
