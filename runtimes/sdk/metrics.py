"""A runtime's Prometheus metrics: inference requests, errors and latency per model."""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Histogram

from sluice.metrics import LATENCY_BUCKETS

INFERENCES = Counter("sluice_runtime_inferences_total", "ModelInfer calls by gRPC status", ["model", "status"])
INFERENCE_SECONDS = Histogram(
    "sluice_runtime_inference_seconds", "ModelInfer latency in the runtime", ["model"], buckets=LATENCY_BUCKETS
)
ROWS = Counter("sluice_runtime_rows_total", "Rows (batch entries) inferred", ["model"])


@lru_cache(maxsize=4096)
def inference_seconds(model: str):
    return INFERENCE_SECONDS.labels(model)


@lru_cache(maxsize=4096)
def inferences(model: str, status: str):
    return INFERENCES.labels(model, status)
