"""A runtime's Prometheus metrics: inference requests, errors and latency per model.

The ``model`` label is the requested name only when that model is loaded (``model_label``);
a request for any other name counts under ``unknown``, so a client sending made-up
names cannot grow the number of series without bound.
"""

from __future__ import annotations

from collections.abc import Container
from functools import lru_cache

from prometheus_client import Counter, Histogram

from sluice.metrics import LATENCY_BUCKETS

INFERENCES = Counter("sluice_runtime_inferences_total", "ModelInfer calls by gRPC status", ["model", "status"])
INFERENCE_SECONDS = Histogram(
    "sluice_runtime_inference_seconds", "ModelInfer latency in the runtime", ["model"], buckets=LATENCY_BUCKETS
)
ROWS = Counter("sluice_runtime_rows_total", "Rows (batch entries) inferred", ["model"])

#: the label of requests for a model that is not loaded
UNKNOWN_MODEL = "unknown"


def model_label(name: str, loaded: Container[str]) -> str:
    """``name`` if it is a loaded model's, else ``UNKNOWN_MODEL``."""
    return name if name in loaded else UNKNOWN_MODEL


@lru_cache(maxsize=4096)
def inference_seconds(model: str):
    return INFERENCE_SECONDS.labels(model)


@lru_cache(maxsize=4096)
def inferences(model: str, status: str):
    return INFERENCES.labels(model, status)
