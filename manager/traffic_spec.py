"""The traffic and policy fields of a stage definition as users POST them (weighted
``traffic``, ``mirror``, ``sticky``, ``retries``, ``rate_limit``, ``outlier_detection``,
``circuit_breaker``; ``rate_limit`` on the pipeline too), and their resolution into the
plan's ``sluice.traffic.StageTraffic``, checked against what the runtimes serve: a
variant or mirror naming an unknown runtime, a runtime without the model, or a version
it does not have is a 422 naming the stage and the variant; so is a variant whose
version takes or gives other tensors than the stage's, or a mirror taking others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from manager.json_types import json_int
from manager.served_models import Signature
from sluice.errors import ApiError
from sluice.tensors import TensorSpec
from sluice.traffic import CircuitBreaker, Mirror, OutlierPolicy, RateLimit, RetryPolicy, StageTraffic, Variant

if TYPE_CHECKING:
    from manager.store import RuntimeRow

_RUNTIME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_VERSION = r"^[A-Za-z0-9_.-]+$"
#: Envoy retry_on conditions a stage may name (gRPC calls: the gRPC ones, and the HTTP ones Envoy also applies)
RETRY_ON = Literal[
    "unavailable", "resource-exhausted", "deadline-exceeded", "cancelled", "internal",
    "reset", "connect-failure", "refused-stream", "5xx", "gateway-error", "retriable-4xx",
]
_DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "reset", "unavailable")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


#: a variant or a mirror names a runtime, a version, or both: said in the schema too
_NAMES_SOMETHING = ConfigDict(strict=True, extra="forbid", json_schema_extra={"anyOf": [{"required": ["runtime"], "properties": {"runtime": {"type": "string"}}}, {"required": ["version"], "properties": {"version": {"type": "string"}}}]})


class VariantSpec(_Strict):
    """One side of a split: ``runtime`` (default: the stage's) and/or ``version`` (default: the stage's)."""

    runtime: str | None = Field(None, pattern=_RUNTIME)
    version: str | None = Field(None, pattern=_VERSION)
    weight: json_int(ge=0, le=10_000)

    model_config = _NAMES_SOMETHING

    @model_validator(mode="after")
    def _names_something(self) -> "VariantSpec":
        if self.runtime is None and self.version is None:
            raise ValueError("a traffic entry names a 'runtime', a 'version', or both")
        return self


class MirrorSpec(_Strict):
    runtime: str | None = Field(None, pattern=_RUNTIME)
    version: str | None = Field(None, pattern=_VERSION)
    percent: float = Field(100.0, gt=0, le=100)

    model_config = _NAMES_SOMETHING

    @model_validator(mode="after")
    def _names_something(self) -> "MirrorSpec":
        if self.runtime is None and self.version is None:
            raise ValueError("a mirror names a 'runtime', a 'version', or both")
        return self


class RetrySpec(_Strict):
    attempts: json_int(ge=0, le=10)
    per_try_timeout_ms: json_int(gt=0, le=600_000) | None = None
    on: list[RETRY_ON] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON), min_length=1)


class RateLimitSpec(_Strict):
    rps: json_int(gt=0, le=1_000_000)
    #: tokens the bucket holds (requests let through at once after a quiet spell); default: rps
    burst: json_int(gt=0, le=1_000_000) | None = None

    def plan(self) -> RateLimit:
        return RateLimit(self.rps, self.burst or self.rps)


class OutlierSpec(_Strict):
    consecutive_errors: json_int(ge=1, le=1000) = 5
    interval_ms: json_int(ge=10, le=600_000) = 1000
    base_ejection_ms: json_int(ge=10, le=600_000) = 2000
    max_ejection_percent: json_int(ge=0, le=100) = 50


class CircuitBreakerSpec(_Strict):
    max_requests: json_int(ge=1, le=1_000_000) = 512
    max_pending_requests: json_int(ge=1, le=1_000_000) = 128
    max_connections: json_int(ge=1, le=1_000_000) = 128
    max_retries: json_int(ge=0, le=1_000_000) = 64


#: request headers a ``sticky`` may not name: the mesh's own, Envoy's, and pseudo-headers
_RESERVED_PREFIXES = ("x-sluice-", "x-envoy-", ":", "grpc-")
#: what a ``sticky`` header name is, and the reserved prefixes as the schema says them
#: (JSON Schema's regexes have no case-insensitive flag)
STICKY_PATTERN = r"^[A-Za-z0-9-]{1,128}$"
_RESERVED_PATTERN = "^([Xx]-([Ss][Ll][Uu][Ii][Cc][Ee]|[Ee][Nn][Vv][Oo][Yy])-|[Gg][Rr][Pp][Cc]-)"


def check_sticky(value: str | None) -> str | None:
    if value is None:
        return None
    name = value.strip().lower()
    if not name or any(name.startswith(p) for p in _RESERVED_PREFIXES) or not all(c.isascii() and (c.isalnum() or c == "-") for c in name):
        raise ValueError(f"sticky {value!r} must name a request header (letters, digits, '-'; not x-sluice-*, x-envoy-*)")
    return name


class StageTrafficFields(BaseModel):
    """The traffic and policy fields a stage definition may carry (a mixin of ``StageSpec``)."""

    traffic: list[VariantSpec] | None = Field(None, min_length=1, max_length=16)
    mirror: MirrorSpec | None = None
    sticky: str | None = Field(None, pattern=STICKY_PATTERN, json_schema_extra={"not": {"pattern": _RESERVED_PATTERN}})
    retries: RetrySpec | None = None
    rate_limit: RateLimitSpec | None = None
    outlier_detection: OutlierSpec | None = None
    circuit_breaker: CircuitBreakerSpec | None = None

    @field_validator("sticky")
    @classmethod
    def _sticky_header(cls, value: str | None) -> str | None:
        return check_sticky(value)


def resolve_traffic(index: int, stage: Any, runtimes: dict[str, "RuntimeRow"]) -> StageTraffic:
    """A stage definition's traffic fields (``StageTrafficFields``) as the plan's value;
    ``stage`` also has ``runtime``, ``model``, ``version`` and ``label``."""
    base_version = stage.version or ""
    base = runtimes[stage.runtime].models[stage.model].signature_of(base_version)  # resolve checked both
    variants: tuple[Variant, ...] = ()
    if stage.traffic:
        variants = tuple(Variant(v.runtime or stage.runtime, v.version or base_version, v.weight) for v in stage.traffic)
        for n, variant in enumerate(variants):
            served = _check_serves(index, stage, f"traffic[{n}]", variant.runtime, variant.version, runtimes)
            # a variant answers in the stage's place: the same tensors
            _check_same(index, stage, f"traffic[{n}]", variant, "inputs", served.inputs, base.inputs)
            _check_same(index, stage, f"traffic[{n}]", variant, "outputs", served.outputs, base.outputs)
        if sum(v.weight for v in variants) <= 0:
            raise _refused(index, stage, "traffic", "the traffic weights add up to 0")
        if len({(v.runtime, v.version) for v in variants}) != len(variants):
            raise _refused(index, stage, "traffic", "two traffic entries name the same runtime and version")
    mirror = None
    if stage.mirror is not None:
        m = stage.mirror
        mirror = Mirror(m.runtime or stage.runtime, m.version or base_version, m.percent)
        served = _check_serves(index, stage, "mirror", mirror.runtime, mirror.version, runtimes)
        # a mirror gets the stage's request; its answer goes nowhere, so it may give other outputs
        _check_same(index, stage, "mirror", mirror, "inputs", served.inputs, base.inputs)
    if stage.sticky and len(variants) < 2:
        raise _refused(index, stage, "sticky", "'sticky' keeps a key on one variant of a split: give 'traffic' two entries or more")
    retry = None
    if stage.retries is not None:
        r = stage.retries
        retry = RetryPolicy(r.attempts, r.per_try_timeout_ms or 0, tuple(dict.fromkeys(r.on)))
    o, c = stage.outlier_detection, stage.circuit_breaker
    return StageTraffic(
        variants=variants,
        mirror=mirror,
        sticky=stage.sticky or "",
        retry=retry,
        rate_limit=stage.rate_limit.plan() if stage.rate_limit is not None else None,
        outlier=OutlierPolicy(o.consecutive_errors, o.interval_ms, o.base_ejection_ms, o.max_ejection_percent) if o else None,
        circuit_breaker=CircuitBreaker(c.max_requests, c.max_pending_requests, c.max_connections, c.max_retries) if c else None,
    )


def _check_serves(index: int, stage: Any, field: str, runtime: str, version: str, runtimes: dict[str, "RuntimeRow"]) -> Signature:
    """The signature of the version of the stage's model that ``runtime`` serves."""
    row = runtimes.get(runtime)
    if row is None:
        raise _refused(index, stage, field, f"unknown runtime {runtime!r}", runtime=runtime, known=sorted(runtimes))
    model = row.models.get(stage.model)
    if model is None:
        raise _refused(index, stage, field, f"runtime {runtime!r} serves no model {stage.model!r}", runtime=runtime)
    if version and model.versions and version not in model.versions:
        raise _refused(index, stage, field, f"runtime {runtime!r} has no version {version!r} of {stage.model!r}",
                       runtime=runtime, versions=list(model.versions))
    return model.signature_of(version)


def _check_same(index: int, stage: Any, field: str, variant: Variant | Mirror, side: str,
                got: tuple[TensorSpec, ...], want: tuple[TensorSpec, ...]) -> None:
    if got != want:
        where = f"runtime {variant.runtime!r}" + (f" version {variant.version!r}" if variant.version else "")
        raise _refused(index, stage, field, f"{where} of {stage.model!r} has other {side} than the stage: {_names(got)} against {_names(want)}",
                       runtime=variant.runtime, version=variant.version,
                       **{side: [t.as_dict() for t in got], "stage_" + side: [t.as_dict() for t in want]})


def _names(tensors: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{t.name} {t.datatype}{list(t.shape)}" for t in tensors) or "none"


def _refused(index: int, stage: Any, field: str, why: str, **details: Any) -> ApiError:
    return ApiError(422, f"stage {index} ({stage.label}): {field}: {why}", "bad_traffic", stage=index, field=field, **details)
