"""The traffic and policy part of a stage's plan (``sluice.plan.StagePlan.traffic``):
weighted variants (between runtimes or versions of the model), a mirror (shadow),
sticky hashing, retries, a rate limit, outlier detection and circuit-breaker limits.

Every field here is enforced by Envoy (``manager.xds.traffic`` turns it into route and
cluster configuration); the gateway only forwards the request headers the routes match
on (``gateway.served_by``). Also the converters to and from ``sluice.v1.StageTraffic``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.v1 import pipeline_pb2

#: a client's request header that pins a request to one variant (a runtime name or a version)
VARIANT_HEADER = "x-sluice-variant"
#: added by Envoy (per weighted cluster) to the call it routes: the model version that
#: variant serves; the runtime SDK reads it in place of the body's model_version
VERSION_HEADER = "x-sluice-model-version"
#: added by Envoy to each stage call's answer: the runtime that served it
SERVED_RUNTIME_HEADER = "x-sluice-served-runtime"
#: on every gateway answer: ``<stage-id>=<runtime>/<model>:<version>`` per stage that ran
SERVED_BY_HEADER = "x-sluice-served-by"
#: added by Envoy to a stage call it refused for its rate limit: "pipeline" or "stage"
RATE_LIMITED_HEADER = "x-sluice-rate-limited"


@dataclass(frozen=True, slots=True)
class Variant:
    """One side of a weighted split: a runtime (and/or a version) and its weight."""

    runtime: str
    version: str  # "": the stage's version (or the runtime's default)
    weight: int

    @property
    def key(self) -> str:
        """What ``x-sluice-variant`` names to pin this variant: its version if the split is
        between versions, else its runtime (``manager.xds.traffic.pin_keys``)."""
        return self.version or self.runtime


@dataclass(frozen=True, slots=True)
class Mirror:
    runtime: str
    version: str
    percent: float


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int
    per_try_timeout_ms: int  # 0: none (the stage's timeout bounds all tries)
    on: tuple[str, ...]  # Envoy retry_on conditions, e.g. "unavailable", "reset", "5xx"


@dataclass(frozen=True, slots=True)
class RateLimit:
    rps: int
    burst: int


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    consecutive_errors: int
    interval_ms: int
    base_ejection_ms: int
    max_ejection_percent: int


@dataclass(frozen=True, slots=True)
class CircuitBreaker:
    max_requests: int
    max_pending_requests: int
    max_connections: int
    max_retries: int


@dataclass(frozen=True, slots=True)
class StageTraffic:
    """A stage's traffic and policy; the default is the plain stage (no split, no mirror,
    the mesh's default retries and limits)."""

    variants: tuple[Variant, ...] = ()
    mirror: Mirror | None = None
    sticky: str = ""  # a request header name: one value of it keeps one variant
    retry: RetryPolicy | None = None
    rate_limit: RateLimit | None = None
    outlier: OutlierPolicy | None = None
    circuit_breaker: CircuitBreaker | None = None

    @property
    def own_cluster(self) -> bool:
        """Whether the stage needs clusters of its own (its outlier detection or circuit
        breakers differ from the runtime's shared cluster)."""
        return self.outlier is not None or self.circuit_breaker is not None


# --- wire form (sluice.v1.StageTraffic, RateLimit)
def rate_limit_to_proto(limit: RateLimit | None) -> pipeline_pb2.RateLimit | None:
    return None if limit is None else pipeline_pb2.RateLimit(rps=limit.rps, burst=limit.burst)


def rate_limit_from_proto(message: pipeline_pb2.RateLimit, present: bool) -> RateLimit | None:
    return RateLimit(message.rps, message.burst) if present else None


def to_proto(traffic: StageTraffic) -> pipeline_pb2.StageTraffic | None:
    """None for the plain stage: its wire form stays what it was before traffic existed."""
    if traffic == StageTraffic():
        return None
    message = pipeline_pb2.StageTraffic(
        variants=[pipeline_pb2.Variant(runtime=v.runtime, version=v.version, weight=v.weight) for v in traffic.variants],
        sticky=traffic.sticky,
    )
    if traffic.mirror is not None:
        m = traffic.mirror
        message.mirror.CopyFrom(pipeline_pb2.Mirror(runtime=m.runtime, version=m.version, percent=m.percent))
    if traffic.retry is not None:
        r = traffic.retry
        message.retry.CopyFrom(pipeline_pb2.Retry(attempts=r.attempts, per_try_timeout_ms=r.per_try_timeout_ms, on=list(r.on)))
    if traffic.rate_limit is not None:
        message.rate_limit.CopyFrom(rate_limit_to_proto(traffic.rate_limit))
    if traffic.outlier is not None:
        o = traffic.outlier
        message.outlier.CopyFrom(pipeline_pb2.Outlier(
            consecutive_errors=o.consecutive_errors, interval_ms=o.interval_ms,
            base_ejection_ms=o.base_ejection_ms, max_ejection_percent=o.max_ejection_percent,
        ))
    if traffic.circuit_breaker is not None:
        c = traffic.circuit_breaker
        message.circuit_breaker.CopyFrom(pipeline_pb2.CircuitBreaker(
            max_requests=c.max_requests, max_pending_requests=c.max_pending_requests,
            max_connections=c.max_connections, max_retries=c.max_retries,
        ))
    return message


def from_proto(message: pipeline_pb2.StageTraffic) -> StageTraffic:
    has = message.HasField
    o, c, r, m = message.outlier, message.circuit_breaker, message.retry, message.mirror
    return StageTraffic(
        variants=tuple(Variant(v.runtime, v.version, v.weight) for v in message.variants),
        mirror=Mirror(m.runtime, m.version, m.percent) if has("mirror") else None,
        sticky=message.sticky,
        retry=RetryPolicy(r.attempts, r.per_try_timeout_ms, tuple(r.on)) if has("retry") else None,
        rate_limit=rate_limit_from_proto(message.rate_limit, has("rate_limit")),
        outlier=OutlierPolicy(o.consecutive_errors, o.interval_ms, o.base_ejection_ms, o.max_ejection_percent) if has("outlier") else None,
        circuit_breaker=CircuitBreaker(c.max_requests, c.max_pending_requests, c.max_connections, c.max_retries) if has("circuit_breaker") else None,
    )
