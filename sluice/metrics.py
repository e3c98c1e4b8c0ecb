"""Prometheus text metrics: the ``/metrics`` endpoint every service mounts, and reading
quantiles back out of a histogram (for ``sluice status``).

Latency histograms share one set of buckets, fine enough below a millisecond where
a mesh hop lives.
"""

from __future__ import annotations

import math
from collections import defaultdict

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import Response

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


def mount_metrics(app: FastAPI) -> None:
    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def histogram_quantiles(text: str, metric: str, label: str, quantiles=(0.5, 0.99)) -> dict[str, dict[float, float]]:
    """For each value of ``label``, the quantiles of histogram ``metric`` (seconds),
    interpolated linearly inside buckets as Prometheus' histogram_quantile does."""
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{metric}_bucket" and label in sample.labels:
                buckets[sample.labels[label]].append((float(sample.labels["le"]), sample.value))
    out: dict[str, dict[float, float]] = {}
    for key, points in buckets.items():
        points.sort()
        total = points[-1][1] if points else 0
        if not total:
            continue
        out[key] = {q: bucket_quantile(points, q * total) for q in quantiles}
    return out


def bucket_quantile(points: list[tuple[float, float]], rank: float) -> float:
    """The value at ``rank`` observations up a cumulative histogram ((upper bound, count)
    pairs, sorted, ``+Inf`` last), interpolated linearly inside its bucket."""
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in points:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            span = count - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / span if span else 1.0)
        lower_bound, lower_count = bound, count
    return lower_bound
