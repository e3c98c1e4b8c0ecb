"""A stage's egress routes on the gateway's sidecar, with its traffic and policy
(``sluice.traffic.StageTraffic``) as Envoy configuration, so Envoy enforces all of it:

* one variant: a route to the runtime's cluster;
* a split (``variants``): ``weighted_clusters``, one entry per variant; an entry for a
  version of the model adds the request header ``x-sluice-model-version`` (the runtime
  SDK serves that version whatever the body says);
* A/B pinning: before the split, one route per variant matching the client's
  ``x-sluice-variant`` (forwarded by the gateway) on the variant's runtime or version;
* ``sticky``: a hash policy on that header and ``use_hash_policy`` on the split, so one
  key keeps one variant;
* ``mirror``: a request mirror policy (fire and forget: Envoy never waits for the shadow,
  and its answer or error never reaches the caller) with ``runtime_fraction`` = percent;
* every route and split entry adds the response header ``x-sluice-served-runtime``
  (the gateway builds ``x-sluice-served-by`` from it and the answer's model version);
* ``retries``, ``timeout_ms``: the route's retry policy and timeout;
* ``rate_limit`` (the stage's; the pipeline's on its first stage's routes): a local rate
  limit per route (``envoy.filters.http.local_ratelimit``, token bucket of ``burst``
  tokens refilled at ``rps``); a refused call is gRPC RESOURCE_EXHAUSTED with the
  header ``x-sluice-rate-limited`` (the gateway answers 429 with ``Retry-After``);
* ``outlier_detection``, ``circuit_breaker``: Envoy has these per cluster, so such a
  stage gets clusters of its own per runtime (``stage_cluster_name``), EDS clusters
  with its thresholds, each with an endpoint assignment of its own holding the
  runtime's endpoints (kept current by ``manager.xds.layers``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import envoy.config.route.v3.route_components_pb2 as route_components_pb2
import envoy.extensions.filters.http.local_ratelimit.v3.local_rate_limit_pb2 as local_rate_limit_pb2
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from sluice.plan import PipelinePlan, StagePlan
from sluice.traffic import (
    RATE_LIMITED_HEADER, SERVED_RUNTIME_HEADER, VARIANT_HEADER, VERSION_HEADER, RateLimit, RetryPolicy, Variant,
)
from sluice.wire import ROUTE_HEADER, runtime_cluster

RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
_LOCAL_RATE_LIMIT = "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
#: Envoy refuses a token bucket refilled more often than this
MIN_FILL_INTERVAL_MS = 50


def rate_limit_filter() -> dict[str, Any]:
    """The egress HCM's local rate limit filter: off unless a route enables it."""
    return {"name": RATE_LIMIT_FILTER, "typed_config": {"@type": _LOCAL_RATE_LIMIT, "stat_prefix": "sluice_stage_rate_limit"}}


def token_bucket(limit: RateLimit) -> tuple[int, int, int]:
    """(max_tokens, tokens_per_fill, fill_interval_ms) for ``rps`` with ``burst``: the
    finest refill Envoy allows, so a steady rate just under ``rps`` is never refused."""
    interval_ms = max(MIN_FILL_INTERVAL_MS, math.ceil(1000 / limit.rps))
    per_fill = max(1, round(limit.rps * interval_ms / 1000))
    return limit.burst, per_fill, interval_ms


def rate_limit_config(limit: RateLimit, scope: str) -> local_rate_limit_pb2.LocalRateLimit:
    """A route's local rate limit (``scope``: "pipeline" or "stage", said in the refusal's header)."""
    max_tokens, per_fill, interval_ms = token_bucket(limit)
    config = local_rate_limit_pb2.LocalRateLimit(stat_prefix=f"sluice_{scope}_rate_limit", rate_limited_as_resource_exhausted=True)
    config.token_bucket.max_tokens = max_tokens
    config.token_bucket.tokens_per_fill.value = per_fill
    config.token_bucket.fill_interval.FromMilliseconds(interval_ms)
    for field in (config.filter_enabled, config.filter_enforced):
        field.default_value.numerator = 100
        field.runtime_key = f"sluice_{scope}_rate_limit_on"
    header = config.response_headers_to_add.add()
    header.header.key, header.header.value = RATE_LIMITED_HEADER, scope
    header.append_action = header.OVERWRITE_IF_EXISTS_OR_ADD
    return config


def stage_cluster_name(plan: PipelinePlan, index: int, runtime: str) -> str:
    """A stage's own cluster on ``runtime`` (its outlier detection / circuit breakers):
    per revision, so a replace never changes the thresholds under a draining revision.
    The pipeline name is length-prefixed, so names stay apart whatever they contain."""
    return f"stage_{len(plan.name)}_{plan.name}_r{plan.revision}_s{index}_{runtime_cluster(runtime)}"


def stage_runtimes(stage: StagePlan) -> list[str]:
    """Every runtime a stage's calls may reach (its variants' or its own; its mirror's)."""
    names = [v.runtime for v in stage.traffic.variants] or [stage.runtime]
    if stage.traffic.mirror is not None:
        names.append(stage.traffic.mirror.runtime)
    return list(dict.fromkeys(names))


def _cluster(plan: PipelinePlan, index: int, stage: StagePlan, runtime: str) -> str:
    return stage_cluster_name(plan, index, runtime) if stage.traffic.own_cluster else runtime_cluster(runtime)


def _variants(stage: StagePlan) -> tuple[Variant, ...]:
    return stage.traffic.variants or (Variant(stage.runtime, "", 100),)


def _add_header(options, key: str, value: str) -> None:
    option = options.add()
    option.header.key, option.header.value = key, value
    option.append_action = option.OVERWRITE_IF_EXISTS_OR_ADD


def _pin_regex(variant: Variant) -> str:
    names = [variant.runtime] + ([variant.version] if variant.version else [])
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def retry_policy_of(retry: RetryPolicy, default: route_components_pb2.RetryPolicy) -> route_components_pb2.RetryPolicy:
    """A stage's own retry policy (attempts, per-try timeout, conditions), still retrying
    on another endpoint than those tried (the mesh default's host predicate)."""
    policy = route_components_pb2.RetryPolicy()
    policy.CopyFrom(default)
    policy.retry_on = ",".join(retry.on)
    policy.num_retries.value = retry.attempts
    if retry.per_try_timeout_ms:
        policy.per_try_timeout.FromMilliseconds(retry.per_try_timeout_ms)
    return policy


def is_entry(plan: PipelinePlan, index: int, stage: StagePlan) -> bool:
    """Whether every request calls this stage first (the pipeline's rate limit is counted
    there): a chain's first stage, a graph's stages that wait for nothing."""
    return not any(stage.after) if plan.graph else index == 0


def add_stage_routes(
    host: route_components_pb2.VirtualHost,
    plan: PipelinePlan,
    index: int,
    stage: StagePlan,
    retries: route_components_pb2.RetryPolicy,
    operation: str,
) -> None:
    """Add a stage's routes to its pipeline's virtual host: the pinned ones (a split
    only), then the stage's route."""
    traffic = stage.traffic
    variants = _variants(stage)
    limit, scope = traffic.rate_limit, "stage"
    if is_entry(plan, index, stage) and plan.rate_limit is not None and (limit is None or plan.rate_limit.rps <= limit.rps):
        limit, scope = plan.rate_limit, "pipeline"
    limit_config = rate_limit_config(limit, scope) if limit is not None else None
    retry = retry_policy_of(traffic.retry, retries) if traffic.retry is not None else retries
    timeout = duration_pb2.Duration(seconds=stage.timeout_ms // 1000, nanos=stage.timeout_ms % 1000 * 1_000_000)

    def common(route: route_components_pb2.Route) -> route_components_pb2.RouteAction:
        route.match.prefix = "/"
        route.match.headers.add(name=ROUTE_HEADER).string_match.exact = stage.route
        action = route.route
        action.timeout.CopyFrom(timeout)
        action.retry_policy.CopyFrom(retry)
        if traffic.mirror is not None:
            _mirror(action.request_mirror_policies.add(), plan, index, stage)
        if limit_config is not None:
            route.typed_per_filter_config[RATE_LIMIT_FILTER].Pack(limit_config)
        route.decorator.operation = operation
        return action

    if len(variants) > 1:
        for n, variant in enumerate(variants):
            route = host.routes.add(name=f"{stage.route}.pin{n}")
            action = common(route)
            route.match.headers.add(name=VARIANT_HEADER).string_match.safe_regex.regex = _pin_regex(variant)
            action.cluster = _cluster(plan, index, stage, variant.runtime)
            if variant.version:
                _add_header(route.request_headers_to_add, VERSION_HEADER, variant.version)
            _add_header(route.response_headers_to_add, SERVED_RUNTIME_HEADER, variant.runtime)
    route = host.routes.add(name=stage.route)
    action = common(route)
    if len(variants) == 1:
        variant = variants[0]
        action.cluster = _cluster(plan, index, stage, variant.runtime)
        if variant.version:
            _add_header(route.request_headers_to_add, VERSION_HEADER, variant.version)
        _add_header(route.response_headers_to_add, SERVED_RUNTIME_HEADER, variant.runtime)
        return
    split = action.weighted_clusters
    for variant in variants:
        entry = split.clusters.add(name=_cluster(plan, index, stage, variant.runtime))
        entry.weight.value = variant.weight
        if variant.version:
            _add_header(entry.request_headers_to_add, VERSION_HEADER, variant.version)
        _add_header(entry.response_headers_to_add, SERVED_RUNTIME_HEADER, variant.runtime)
    if traffic.sticky:
        action.hash_policy.add().header.header_name = traffic.sticky
        split.use_hash_policy.value = True


def _mirror(policy: route_components_pb2.RouteAction.RequestMirrorPolicy, plan: PipelinePlan, index: int, stage: StagePlan) -> None:
    mirror = stage.traffic.mirror
    assert mirror is not None
    policy.cluster = _cluster(plan, index, stage, mirror.runtime)
    fraction = policy.runtime_fraction.default_value
    fraction.numerator = round(mirror.percent * 10_000)
    fraction.denominator = fraction.MILLION
    if mirror.version:
        header = policy.request_headers_mutations.add().append
        header.header.key, header.header.value = VERSION_HEADER, mirror.version
        header.append_action = header.OVERWRITE_IF_EXISTS_OR_ADD


def stage_clusters(plan: PipelinePlan, build) -> list[tuple[Message, str]]:
    """The clusters of the plan's stages that have their own outlier detection or circuit
    breakers, each with its runtime; ``build(name, runtime, stage_traffic)`` makes one
    (``resources``)."""
    clusters = []
    for index, stage in enumerate(plan.stages):
        if stage.traffic.own_cluster:
            clusters.extend((build(stage_cluster_name(plan, index, r), r, stage.traffic), r) for r in stage_runtimes(stage))
    return clusters


def outlier_detection(outlier, default: dict[str, Any]) -> dict[str, Any]:
    """A stage's ``outlier_detection`` (``sluice.traffic.OutlierPolicy``), or the mesh's default."""
    if outlier is None:
        return default
    return {
        **default,
        "consecutive_5xx": outlier.consecutive_errors,
        "consecutive_gateway_failure": outlier.consecutive_errors,
        "interval": f"{outlier.interval_ms / 1000}s",
        "base_ejection_time": f"{outlier.base_ejection_ms / 1000}s",
        "max_ejection_percent": outlier.max_ejection_percent,
    }


def circuit_breakers(breaker, default: dict[str, Any]) -> dict[str, Any]:
    """A stage's circuit breakers (``sluice.traffic.CircuitBreaker``), or the runtime's."""
    if breaker is None:
        return default
    return {"thresholds": [{
        "max_requests": breaker.max_requests,
        "max_pending_requests": breaker.max_pending_requests,
        "max_connections": breaker.max_connections,
        "max_retries": breaker.max_retries,
    }]}

