"""Per-request traffic in the gateway: which request headers its stage calls forward to
Envoy (the client's ``x-sluice-variant`` pin and a stage's ``sticky`` header), and which
variant served each stage (``x-sluice-served-by`` on the answer, and the metric
``sluice_gateway_stage_served_total{pipeline,stage,runtime,version}``).

Envoy does the routing (``manager.xds.traffic``); this module only carries headers:

* ``ServedByMiddleware`` (ASGI) holds a request's ``RequestTraffic`` in a context
  variable for the stage calls it makes, and adds ``x-sluice-served-by``
  (``<stage-id>=<runtime>/<model>:<version>``, one per stage that ran, comma-separated)
  to its answer, and ``Retry-After`` to a 429 (a stage's or the pipeline's rate limit);
* the OIP gRPC front door (``gateway.oip``) does the same per inference with
  ``collecting``: the request's metadata is what is forwarded; every answer carries it as
  the response parameter ``sluice.served_by`` (``on_unary_answer``, ``on_stream_answer``),
  and a unary ``ModelInfer`` also as trailing metadata ``x-sluice-served-by`` (not
  initial metadata: headers sent ahead of the answer would make it unretryable by Envoy);
* the executor calls ``forwarded`` for a stage call's metadata, ``record`` with its
  answer (the runtime from Envoy's ``x-sluice-served-runtime`` response header, the
  version from the answer's ``model_version``), and ``rate_limited`` on a failure.

A request's list is bounded: it stops collecting once its answer has started
(``RequestTraffic.close``). So an NDJSON stream (``POST /serve/<p>``, whose answer starts
before its first line runs) answers no ``x-sluice-served-by`` at all, however many
lines it runs; its lines still forward the pin and sticky headers and are counted in
the metric.

Only the two named headers are forwarded: nothing else a client sends reaches a route.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import grpc

from gateway import metrics
from sluice.traffic import RATE_LIMITED_HEADER, SERVED_BY_HEADER, SERVED_RUNTIME_HEADER, VARIANT_HEADER
from sluice.wire import MODEL_HEADER, PIPELINE_HEADER, STAGE_HEADER

#: a compiled stage's metadata names its sticky header with this key; ``forwarded``
#: replaces it with that header's value from the request (it never reaches Envoy)
STICKY_MARKER = "x-sluice-sticky-header"
#: and its stage id (what ``x-sluice-served-by`` names the stage by); never forwarded either
STAGE_ID_MARKER = "x-sluice-stage-id"
_MARKERS = (STICKY_MARKER, STAGE_ID_MARKER)
#: seconds a client is told to wait after a rate-limited answer
RETRY_AFTER_S = 1

Metadata = tuple[tuple[str, str], ...]


@dataclass(slots=True)
class RequestTraffic:
    """One request's headers (lower-case names) and the variants that served its stages."""

    headers: dict[str, str]
    served: list[str] = field(default_factory=list)
    #: False once the answer has started: what ran after it can no longer be told
    collecting: bool = True

    def add(self, entry: str) -> None:
        if self.collecting:
            self.served.append(entry)

    def close(self) -> str:
        """The ``x-sluice-served-by`` value ("" when no stage ran); collects nothing more."""
        self.collecting = False
        return ", ".join(self.served)


_CURRENT: ContextVar[RequestTraffic | None] = ContextVar("sluice_request_traffic", default=None)


def current() -> RequestTraffic | None:
    """The traffic of the request being served here (None outside one): ``gateway.batching``
    reads its pin and copies a folded run's entries to it."""
    return _CURRENT.get()


def stage_metadata(sticky: str, stage_id: str = "") -> Metadata:
    """What a compiled stage's metadata adds: its ``sticky`` header's name and its id
    (markers for ``forwarded`` and ``record``, never sent)."""
    return ((STICKY_MARKER, sticky),) * bool(sticky) + ((STAGE_ID_MARKER, stage_id),) * bool(stage_id)


def forwarded(metadata: Metadata) -> Metadata:
    """A stage call's metadata with the request's pin and sticky key (and no marker)."""
    request = _CURRENT.get()
    sticky = ""
    out = []
    for key, value in metadata:
        if key == STICKY_MARKER:
            sticky = value
        elif key not in _MARKERS:
            out.append((key, value))
    if request is not None:
        variant = request.headers.get(VARIANT_HEADER)
        if variant:
            out.append((VARIANT_HEADER, variant))
        if sticky and request.headers.get(sticky):
            out.append((sticky, request.headers[sticky]))
    return tuple(out)


def _header(metadata: Iterable | None, name: str) -> str:
    return next((v for k, v in (metadata or ()) if k == name and isinstance(v, str)), "")


def record(metadata: Metadata, version: str, answer_metadata: Iterable | None) -> str:
    """Count a stage call's answer by the variant that served it and add it to the
    request's ``x-sluice-served-by``; ``version`` is the answer's ``model_version``. The
    entry, ``<stage-id>=<runtime>/<model>:<version>``."""
    pipeline, model = _header(metadata, PIPELINE_HEADER), _header(metadata, MODEL_HEADER)
    stage = _header(metadata, STAGE_ID_MARKER) or _header(metadata, STAGE_HEADER)
    runtime = _header(answer_metadata, SERVED_RUNTIME_HEADER) or "?"
    metrics.stage_served(pipeline, stage, runtime, version).inc()
    entry = f"{stage}={runtime}/{model}:{version}"
    request = _CURRENT.get()
    if request is not None:
        request.add(entry)
    return entry


@contextlib.contextmanager
def collecting(headers: dict[str, str]) -> Iterator[RequestTraffic]:
    """One request's traffic (``headers``: its lower-case header names) for the stage
    calls made under it, in this task and the tasks it starts."""
    traffic = RequestTraffic(headers)
    token = _CURRENT.set(traffic)
    try:
        yield traffic
    finally:
        _CURRENT.reset(token)


def grpc_headers(context) -> dict[str, str]:
    """A gRPC call's text metadata (gRPC keys are lower-case; ``-bin`` values are skipped)."""
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def grpc_trailing_metadata(traffic: RequestTraffic) -> Metadata:
    """A unary gRPC call's trailing metadata: ``x-sluice-served-by`` if a stage ran."""
    value = traffic.close()
    return ((SERVED_BY_HEADER, value),) if value else ()


#: the ModelInferResponse parameter of an answer (unary or streamed) naming what served it
ANSWER_PARAMETER = "sluice.served_by"


def on_unary_answer(response, traffic: RequestTraffic, context) -> None:
    """A unary ``ModelInferResponse`` names what served it, in its ``sluice.served_by``
    parameter and in the call's trailing metadata ``x-sluice-served-by``, if a stage ran."""
    metadata = grpc_trailing_metadata(traffic)
    if metadata:
        response.parameters[ANSWER_PARAMETER].string_param = metadata[0][1]
        context.set_trailing_metadata(metadata)


def on_stream_answer(response, traffic: RequestTraffic) -> None:
    """Add ``sluice.served_by`` to one streamed ``ModelInferResponse`` if a stage ran."""
    value = traffic.close()
    if value:
        response.parameters[ANSWER_PARAMETER].string_param = value


def rate_limited(exc: grpc.aio.AioRpcError) -> str:
    """"pipeline" or "stage" when Envoy refused the call for a rate limit, else ""."""
    for metadata in (exc.trailing_metadata(), exc.initial_metadata()):
        scope = _header(metadata, RATE_LIMITED_HEADER)
        if scope:
            return scope
    return ""


class ServedByMiddleware:
    """Pure ASGI (no task switch: the endpoint sees the context variable it sets)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traffic = RequestTraffic({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())})

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                served = traffic.close()  # a streamed answer's later work is not listed (nor held)
                if served:
                    headers.append((SERVED_BY_HEADER.encode(), served.encode("latin-1")))
                if message["status"] == 429 and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
                message = {**message, "headers": headers}
            await send(message)

        token = _CURRENT.set(traffic)
        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _CURRENT.reset(token)
