"""Tracing for every Sluice service: OpenTelemetry SDK, Zipkin exporter, B3 headers.

Envoy's Zipkin tracer and these spans share one trace because both speak B3
multi-header propagation (``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-sampled``...): a
service continues the trace its sidecar started and hands its context to the next
hop. The sampler follows the parent's decision, so Envoy's sampling rules all.

Tracing never sits on the request path: spans are exported by a background batch
processor with a short timeout, and an unreachable Zipkin only costs dropped spans.
With no ``SLUICE_ZIPKIN_URL``, ``Tracing.enabled`` is false and callers skip all work.

Spans carry the times a process knows about its own part of a request, as tags in
milliseconds, so Zipkin shows them and ``sluice.attribution`` splits each hop's own
time with them: a server span's ``sluice.parse_ms`` (from the span's start until its
first stage call: reading and parsing the body into tensors) and ``sluice.encode_ms``
(from its last stage call's answer until the response starts: tensors back to JSON),
marked by ``stage_work()`` around the gateway's executor; a runtime's
``sluice.queue_ms`` (waiting for a predict thread) and ``sluice.compute_ms`` (the
model's ``predict``), set by ``tag_model_time``. A runtime that recorded a span says so in
its answer (``sluice.traced``), and the gateway marks its call's span with ``sluice.runtime_traced``:
the trace is whole only once that runtime's spans are in.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.b3 import B3MultiFormat

from sluice.settings import CommonSettings

_propagator = B3MultiFormat()

#: tags (milliseconds) a process puts on its own span; ``sluice.attribution`` reads them
PARSE_MS_TAG = "sluice.parse_ms"
ENCODE_MS_TAG = "sluice.encode_ms"
QUEUE_MS_TAG = "sluice.queue_ms"
COMPUTE_MS_TAG = "sluice.compute_ms"
#: a runtime's answer (ModelInferResponse) carries this bool parameter when it recorded a
#: span for the call (its spans reach Zipkin on their own schedule); the gateway then tags
#: its call's span ``RUNTIME_TRACED_TAG``, so ``sluice.attribution.complete`` knows to wait
#: for them. In the answer itself, not in metadata: response headers sent ahead of the
#: answer would keep Envoy from retrying the call on another replica if the runtime died
TRACED_PARAMETER = "sluice.traced"
RUNTIME_TRACED_TAG = "sluice.runtime_traced"


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


class RequestPhases:
    """When a server span's stage work began and ended (``time.perf_counter_ns``); what
    came before is parsing, what comes after until the response starts is encoding.
    Work marked several times (a stream) counts from its first start to its last end."""

    __slots__ = ("span", "started_ns", "work_started_ns", "work_ended_ns", "encoded")

    def __init__(self, span: trace.Span):
        self.span = span
        self.started_ns = time.perf_counter_ns()
        self.work_started_ns: int | None = None
        self.work_ended_ns: int | None = None
        self.encoded = False

    def begin_work(self) -> None:
        if self.work_started_ns is None:
            self.work_started_ns = time.perf_counter_ns()
            self.span.set_attribute(PARSE_MS_TAG, _ms(self.work_started_ns - self.started_ns))

    def end_work(self) -> None:
        self.work_ended_ns = time.perf_counter_ns()

    def response_started(self) -> None:
        """Tag the encoding time once, when the answer starts to leave (or the span ends)."""
        if self.work_ended_ns is not None and not self.encoded:
            self.encoded = True
            self.span.set_attribute(ENCODE_MS_TAG, _ms(time.perf_counter_ns() - self.work_ended_ns))


_PHASES: contextvars.ContextVar[RequestPhases | None] = contextvars.ContextVar("sluice_request_phases", default=None)


@contextlib.contextmanager
def stage_work() -> Iterator[None]:
    """Mark the current server span's stage work (the gateway wraps its executor's run in
    it); nothing when the request is not traced."""
    phases = _PHASES.get()
    if phases is None:
        yield
        return
    phases.begin_work()
    try:
        yield
    finally:
        phases.end_work()


def tag_model_time(queue_s: float, compute_s: float) -> None:
    """Tag the current span (a runtime's inference span) with the time the call waited for
    a predict thread and the time the model computed; nothing when it is not recording."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute(QUEUE_MS_TAG, round(queue_s * 1e3, 3))
        span.set_attribute(COMPUTE_MS_TAG, round(compute_s * 1e3, 3))


class Tracing:
    def __init__(self, service: str, tracer: trace.Tracer | None):
        self.service = service
        self.tracer = tracer

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @staticmethod
    def extract(carrier: Mapping[str, str]) -> otel_context.Context:
        """The trace context a request carries (B3 headers or gRPC metadata)."""
        return _propagator.extract(carrier)

    @staticmethod
    def grpc_metadata(context) -> dict[str, str]:
        """A gRPC call's text metadata (its B3 headers and x-sluice-* tags among them)."""
        return {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}

    @contextlib.contextmanager
    def server_span(self, name: str, carrier: Mapping[str, str], attributes: dict | None = None) -> Iterator[trace.Span]:
        """A SERVER span continuing the trace ``carrier`` (HTTP headers or gRPC metadata) holds;
        the stage work done under it (``stage_work``) is tagged on it as parse and encode time."""
        with self.tracer.start_as_current_span(
            name, context=self.extract(carrier), kind=trace.SpanKind.SERVER, attributes=attributes
        ) as span:
            phases = RequestPhases(span)
            token = _PHASES.set(phases)
            try:
                yield span
            finally:
                phases.response_started()
                _PHASES.reset(token)

    @staticmethod
    def response_started() -> None:
        """The current request's answer starts to leave: tag its encoding time."""
        phases = _PHASES.get()
        if phases is not None:
            phases.response_started()

    @staticmethod
    def inject(carrier: dict[str, str]) -> dict[str, str]:
        """Add the current span's B3 headers to ``carrier``."""
        _propagator.inject(carrier)
        return carrier


def trace_id_hex(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def setup_tracing(service: str, settings: CommonSettings | None = None) -> Tracing:
    settings = settings or CommonSettings()
    if not settings.zipkin_url:
        return Tracing(service, None)
    from opentelemetry.exporter.zipkin.json import ZipkinExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_rate)),
    )
    exporter = ZipkinExporter(endpoint=f"{settings.zipkin_url.rstrip('/')}/api/v2/spans", timeout=2)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500, max_queue_size=8192))
    # a down collector is reported on every batch; once per minute is enough
    for name in ("opentelemetry.sdk.trace.export", "opentelemetry.exporter.zipkin.json"):
        logging.getLogger(name).addFilter(_Once(60))
    return Tracing(service, provider.get_tracer(service))


class _Once(logging.Filter):
    """Let a logger's record through at most once per ``period_s``."""

    def __init__(self, period_s: float):
        super().__init__()
        self.period_s = period_s
        self._last = 0.0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.created - self._last >= self.period_s:
            self._last = record.created
            return True
        return False


class TracingMiddleware:
    """ASGI middleware: one SERVER span per HTTP request, continuing the caller's B3
    context (the sidecar's span), and the trace id in the ``x-trace-id`` response header.

    With tracing off it is not in the chain at all: constructing it returns the app it
    wraps, so a request pays nothing for it (Starlette builds its middleware stack by
    calling ``TracingMiddleware(app, tracing=...)``)."""

    _UNTRACED = ("/metrics", "/healthz", "/healthz/ready")

    def __new__(cls, app, tracing: Tracing):
        if not tracing.enabled:
            return app
        return super().__new__(cls)

    def __init__(self, app, tracing: Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self._UNTRACED:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.tracing.server_span(f"{scope['method']} {scope['path']}", headers) as span:
            trace_id = trace_id_hex(span).encode()

            async def send_with_trace_id(message):
                if message["type"] == "http.response.start":
                    self.tracing.response_started()
                    message["headers"] = [*message.get("headers", []), (b"x-trace-id", trace_id)]
                    span.set_attribute("http.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                await send(message)

            await self.app(scope, receive, send_with_trace_id)
