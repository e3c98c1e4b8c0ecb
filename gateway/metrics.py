"""The gateway's Prometheus metrics: requests, errors and latency per pipeline and per stage."""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Histogram

from sluice.metrics import LATENCY_BUCKETS

REQUESTS = Counter("sluice_gateway_requests_total", "Pipeline requests by answer status", ["pipeline", "status"])
REQUEST_SECONDS = Histogram(
    "sluice_gateway_request_seconds", "Pipeline latency in the gateway", ["pipeline"], buckets=LATENCY_BUCKETS
)
STAGE_SECONDS = Histogram(
    "sluice_gateway_stage_seconds", "Stage call latency (Envoy hops + runtime)", ["pipeline", "stage", "model"],
    buckets=LATENCY_BUCKETS,
)
STAGE_ERRORS = Counter("sluice_gateway_stage_errors_total", "Failed stage calls", ["pipeline", "stage", "code"])


# Label lookups cost more than observations; pipelines and stages are few, so cache the children.
@lru_cache(maxsize=4096)
def request_seconds(pipeline: str):
    return REQUEST_SECONDS.labels(pipeline)


@lru_cache(maxsize=4096)
def requests(pipeline: str, status: int):
    return REQUESTS.labels(pipeline, str(status))


@lru_cache(maxsize=4096)
def stage_seconds(pipeline: str, stage: int, model: str):
    return STAGE_SECONDS.labels(pipeline, str(stage), model)
