"""Tracing for every Sluice service: OpenTelemetry SDK, Zipkin exporter, B3 headers.

Envoy's Zipkin tracer and these spans share one trace because both speak B3
multi-header propagation (``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-sampled``...): a
service continues the trace its sidecar started and hands its context to the next
hop. The sampler follows the parent's decision, so Envoy's sampling rules all.

Tracing never sits on the request path: spans are exported by a background batch
processor with a short timeout, and an unreachable Zipkin only costs dropped spans.
With no ``SLUICE_ZIPKIN_URL``, ``Tracing.enabled`` is false and callers skip all work.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.b3 import B3MultiFormat

from sluice.settings import CommonSettings

_propagator = B3MultiFormat()


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

    def server_span(self, name: str, carrier: Mapping[str, str], attributes: dict | None = None):
        """A SERVER span continuing the trace ``carrier`` (HTTP headers or gRPC metadata) holds."""
        return self.tracer.start_as_current_span(
            name, context=self.extract(carrier), kind=trace.SpanKind.SERVER, attributes=attributes
        )

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
    context (the sidecar's span), and the trace id in the ``x-trace-id`` response header."""

    _UNTRACED = ("/metrics", "/healthz", "/healthz/ready")

    def __init__(self, app, tracing: Tracing):
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.tracing.enabled or scope["path"] in self._UNTRACED:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        with self.tracing.server_span(f"{scope['method']} {scope['path']}", headers) as span:
            trace_id = trace_id_hex(span).encode()

            async def send_with_trace_id(message):
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-trace-id", trace_id)]
                    span.set_attribute("http.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                await send(message)

            await self.app(scope, receive, send_with_trace_id)
