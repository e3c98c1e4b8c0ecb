"""The last requests of a pipeline, from Zipkin's query API (``SLUICE_ZIPKIN_URL``).

The gateway tags its spans with ``sluice.pipeline`` (and ``sluice.revision``), so one
query (``/api/v2/traces?serviceName=gateway&annotationQuery=sluice.pipeline=<p>``)
finds a pipeline's traces; each comes whole (gateway, every Envoy hop, every stage),
reduced here to what the console draws: a row per trace with a link to Zipkin's own
trace view, and its spans as offsets and durations for a waterfall.
"""

from __future__ import annotations

from typing import Any

import httpx

from manager.ui.schemas import SpanOut, TraceOut, TracesOut
from sluice.errors import ApiError
from sluice.trace_query import GATEWAY_SERVICE, recent_traces_query


def summarize(trace_id: str, spans: list[dict[str, Any]], link: str) -> TraceOut:
    start = min(int(s.get("timestamp", 0)) for s in spans)
    end = max(int(s.get("timestamp", 0)) + int(s.get("duration", 0)) for s in spans)
    tagged = [s for s in spans if s.get("tags", {}).get("sluice.pipeline")]
    status = next((s["tags"]["http.status_code"] for s in spans if "http.status_code" in s.get("tags", {})
                   and s.get("localEndpoint", {}).get("serviceName") == GATEWAY_SERVICE), None)
    if status is None:
        status = next((s["tags"]["http.status_code"] for s in spans if "http.status_code" in s.get("tags", {})), None)
    out = [
        SpanOut(
            id=s["id"],
            parent_id=s.get("parentId"),
            service=s.get("localEndpoint", {}).get("serviceName", "?"),
            name=s.get("name", ""),
            offset_us=int(s.get("timestamp", start)) - start,
            duration_us=int(s.get("duration", 0)),
            kind=s.get("kind"),
            error=s.get("tags", {}).get("error"),
            tags={k: str(v) for k, v in s.get("tags", {}).items() if k.startswith(("sluice.", "http.", "grpc.", "upstream_cluster", "response_flags"))},
        )
        for s in sorted(spans, key=lambda s: (int(s.get("timestamp", 0)), -int(s.get("duration", 0))))
    ]
    return TraceOut(
        trace_id=trace_id,
        started_us=start,
        duration_us=end - start,
        status=status,
        revision=next((str(s["tags"]["sluice.revision"]) for s in tagged if "sluice.revision" in s["tags"]), None),
        link=link,
        spans=out,
    )


class ZipkinTraces:
    """Queries one Zipkin server; ``ui_url`` is where a browser reaches the same server."""

    def __init__(self, url: str, ui_url: str, timeout_s: float):
        self.url = url.rstrip("/")
        self.ui_url = (ui_url or url).rstrip("/")
        self.timeout_s = timeout_s

    def link(self, trace_id: str) -> str:
        return f"{self.ui_url}/zipkin/traces/{trace_id}"

    async def recent(self, pipeline: str, limit: int) -> TracesOut:
        params = recent_traces_query(pipeline, limit)
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s) as client:
                response = await client.get(f"{self.url}/api/v2/traces", params=params)
        except httpx.HTTPError as exc:
            raise ApiError(503, f"Zipkin at {self.url} did not answer: {exc}", "zipkin_unavailable", zipkin=self.url) from None
        if response.status_code != 200:
            raise ApiError(503, f"Zipkin at {self.url} answered {response.status_code}", "zipkin_unavailable",
                           zipkin=self.url, body=response.text[:300])
        traces = [summarize(t[0]["traceId"], t, self.link(t[0]["traceId"])) for t in response.json() if t]
        traces.sort(key=lambda t: t.started_us, reverse=True)
        return TracesOut(pipeline=pipeline, zipkin_url=self.ui_url, traces=traces[:limit])
