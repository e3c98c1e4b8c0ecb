"""The gateway's Prometheus metrics: requests, errors and latency per pipeline and per stage, and
stage calls per (pipeline, stage, runtime, version) that served them."""

from __future__ import annotations

import contextvars
import time
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
#: answered stage calls by the variant that served them (``gateway.served_by``): a split is observable here
STAGE_SERVED = Counter(
    "sluice_gateway_stage_served_total", "Stage calls answered, by the runtime and model version that served them",
    ["pipeline", "stage", "runtime", "version"],
)

#: adaptive batching (``gateway.batching``): per folded run, the requests and the rows it ran
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_REQUESTS = Histogram(
    "sluice_gateway_batch_requests", "Requests folded into one pipeline run", ["pipeline"], buckets=BATCH_BUCKETS
)
BATCH_ROWS = Histogram("sluice_gateway_batch_rows", "Rows of one folded pipeline run", ["pipeline"], buckets=BATCH_BUCKETS)


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


@lru_cache(maxsize=4096)
def batch_requests(pipeline: str):
    return BATCH_REQUESTS.labels(pipeline)


@lru_cache(maxsize=4096)
def batch_rows(pipeline: str):
    return BATCH_ROWS.labels(pipeline)


@lru_cache(maxsize=4096)
def stage_served(pipeline: str, stage: str, runtime: str, version: str):
    return STAGE_SERVED.labels(pipeline, stage, runtime, version)


class PipelineStats:
    """OIP statistics of one pipeline revision (``ModelStatistics``), kept as plain
    counters beside the Prometheus series above, by the same code paths (``/serve``,
    OIP REST, OIP gRPC). One object per held revision, created with its compiled
    plan and gone with it, so their number is bounded by the pipelines served.

    ``queue`` is the time a request waited for a folded run of concurrent requests
    (``gateway.batching``; 0 for one that ran at once; a stage's own queueing, e.g.
    Triton's dynamic batching, is inside its call); ``compute_input`` is reading and
    checking the request's tensors, ``compute_infer`` the stage calls (less the wait),
    ``compute_output`` writing the answer.
    """

    __slots__ = (
        "inference_count", "execution_count", "last_inference_ms",
        "success_count", "success_ns", "fail_count", "fail_ns",
        "queue_ns", "input_ns", "infer_ns", "output_ns",
    )

    def __init__(self) -> None:
        self.inference_count = self.execution_count = self.last_inference_ms = 0
        self.success_count = self.success_ns = self.fail_count = self.fail_ns = 0
        self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0

    def success(self, rows: int, started_ns: int, input_done_ns: int, infer_done_ns: int, done_ns: int, queued_ns: int = 0) -> None:
        """A request answered; the four ``time.perf_counter_ns()`` marks of its phases, and
        how much of its stage calls' time it waited for a folded run."""
        self.inference_count += rows
        self.execution_count += 1
        self.success_count += 1
        self.success_ns += done_ns - started_ns
        self.queue_ns += queued_ns
        self.input_ns += input_done_ns - started_ns
        self.infer_ns += infer_done_ns - input_done_ns - queued_ns
        self.output_ns += done_ns - infer_done_ns
        self.last_inference_ms = time.time_ns() // 1_000_000

    def failure(self, started_ns: int, done_ns: int) -> None:
        self.fail_count += 1
        self.fail_ns += done_ns - started_ns
        self.last_inference_ms = time.time_ns() // 1_000_000


#: how long the current request waited for a folded run (``gateway.batching``), in ns
_WAITED_NS: contextvars.ContextVar[int] = contextvars.ContextVar("sluice_batch_waited_ns", default=0)


def waited(ns: int) -> None:
    """The current request waited ``ns`` for a folded run (its ``queue`` statistic)."""
    _WAITED_NS.set(ns)


def take_waited() -> int:
    """The wait ``waited`` noted for the request this task answers, cleared for the task's
    next request (a stream's)."""
    ns = _WAITED_NS.get()
    if ns:
        _WAITED_NS.set(0)
    return ns


def answered(pipeline, status: int, started_ns: int, marks: tuple[int, int] | None = None, rows: int = 0) -> None:
    """Count one answered request of ``pipeline`` (a ``CompiledPipeline``) with HTTP
    ``status``, in Prometheus and in its revision's statistics. ``marks``: when the
    inputs were read and when the stages were done (``time.perf_counter_ns()``), for
    a success."""
    done = time.perf_counter_ns()
    requests(pipeline.name, status).inc()
    request_seconds(pipeline.name).observe((done - started_ns) / 1e9)
    queued = take_waited()  # cleared whatever the answer, for the task's next request
    if status == 200 and marks is not None:
        pipeline.stats.success(rows, started_ns, marks[0], marks[1], done, queued)
    else:
        pipeline.stats.failure(started_ns, done)
