"""The console's JSON views: typed response bodies (``manager.ui.router``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ConsoleConfig(BaseModel):
    """What the page needs to know about this manager."""

    secure: bool
    tracing: bool
    zipkin_url: str
    gateway_url: str
    #: stages may split traffic between variants (issue #12); the console shows sliders for them
    traffic_splits: bool = True
    poll_interval_ms: int = 2000


class Figures(BaseModel):
    #: requests (stage calls, for a stage) in the window
    requests: int
    rate_per_s: float | None = Field(description="requests per second over the window; None without a window yet")
    p50_ms: float | None
    p99_ms: float | None
    #: failed answers (not 2xx; failed calls, for a stage) over requests; None without requests
    error_rate: float | None


class StageStats(Figures):
    index: int
    model: str


class ServedStats(BaseModel):
    """Stage calls answered in the window by one variant (runtime and model version),
    from ``sluice_gateway_stage_served_total``."""

    stage: str  # the stage's id in a graph, its index in a chain (as the metric labels it)
    runtime: str
    version: str
    requests: int


class PipelineStats(Figures):
    stages: list[StageStats]
    served: list[ServedStats] = []


class StatsOut(BaseModel):
    """Figures of the last window, per pipeline and per stage, from the gateway's metrics."""

    #: seconds between the two readings compared; None: since the gateway started (first look)
    window_s: float | None
    pipelines: dict[str, PipelineStats]
    #: why the gateway's metrics could not be read now (the figures are then the last known)
    error: str | None = None


class SpanOut(BaseModel):
    id: str
    parent_id: str | None
    service: str
    name: str
    #: microseconds after the trace's first span started
    offset_us: int
    duration_us: int
    kind: str | None
    error: str | None
    tags: dict[str, str]


class TraceOut(BaseModel):
    trace_id: str
    #: epoch microseconds of the first span
    started_us: int
    duration_us: int
    status: str | None
    revision: str | None
    link: str
    spans: list[SpanOut]


class TracesOut(BaseModel):
    pipeline: str
    zipkin_url: str
    traces: list[TraceOut]


class YamlIn(BaseModel):
    text: str = Field(max_length=1 << 20)
