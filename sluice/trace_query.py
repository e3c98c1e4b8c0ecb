"""Reads traces back from Zipkin's query API (``/api/v2/trace/<id>``, ``/api/v2/traces``)
as ``sluice.attribution.Span`` lists, for ``sluice trace`` and ``sluice status``.

Each Envoy sends its spans on its own schedule (every 5 s by default), so a trace read
right after its request may lack hops: ``fetch_trace`` can wait, bounded, until the
trace is whole (``sluice.attribution.complete``).
"""

from __future__ import annotations

import time

import httpx

from sluice.attribution import Span, complete

#: the service name of the gateway's spans (``sluice.tracing.setup_tracing("gateway")``)
GATEWAY_SERVICE = "gateway"
#: how far back ``recent_traces`` looks
LOOKBACK_MS = 3_600_000


class ZipkinError(Exception):
    """Zipkin could not be reached, or did not have the trace."""


def fetch_trace(zipkin_url: str, trace_id: str, wait_s: float = 0.0, interval_s: float = 0.25) -> list[Span]:
    """The trace's spans; with ``wait_s``, polls until it is whole or that time passed (then
    returns what there is; ``ZipkinError`` if there is nothing)."""
    url = f"{zipkin_url.rstrip('/')}/api/v2/trace/{trace_id}"
    deadline = time.monotonic() + wait_s
    spans: list[Span] = []
    with httpx.Client(timeout=5) as client:
        while True:
            try:
                response = client.get(url)
            except httpx.HTTPError as exc:
                raise ZipkinError(f"Zipkin at {zipkin_url} did not answer: {exc}") from None
            if response.status_code == 200:
                spans = [Span.from_zipkin(s) for s in response.json()]
            elif response.status_code != 404:
                raise ZipkinError(f"Zipkin at {zipkin_url} answered {response.status_code}: {response.text[:200]}")
            if complete(spans) or time.monotonic() >= deadline:
                break
            time.sleep(interval_s)
    if not spans:
        raise ZipkinError(f"Zipkin at {zipkin_url} has no trace {trace_id}")
    return spans


def recent_traces_query(pipeline: str, limit: int) -> dict[str, str]:
    """Zipkin's ``/api/v2/traces`` parameters for a pipeline's last ``limit`` traces (the
    gateway tags its spans with the pipeline); also the console's query."""
    return {
        "serviceName": GATEWAY_SERVICE,
        "annotationQuery": f"sluice.pipeline={pipeline}",
        "limit": str(limit),
        "lookback": str(LOOKBACK_MS),
    }


def recent_traces(zipkin_url: str, pipeline: str, limit: int) -> list[list[Span]]:
    """The pipeline's last ``limit`` traces."""
    params = recent_traces_query(pipeline, limit)
    try:
        response = httpx.get(f"{zipkin_url.rstrip('/')}/api/v2/traces", params=params, timeout=10)
    except httpx.HTTPError as exc:
        raise ZipkinError(f"Zipkin at {zipkin_url} did not answer: {exc}") from None
    if response.status_code != 200:
        raise ZipkinError(f"Zipkin at {zipkin_url} answered {response.status_code}: {response.text[:200]}")
    return [[Span.from_zipkin(s) for s in trace] for trace in response.json() if trace]
