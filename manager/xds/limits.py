"""Explicit concurrency limits on the mesh's Envoy clusters (circuit breakers), and the
answer Envoy gives when one overflows.

Envoy's circuit breakers belong to a cluster, not to a route, so the limits are set
per runtime (its one cluster on the gateway's sidecar, all its instances together)
with a default for every runtime and overrides by runtime name
(``SLUICE_MANAGER_RUNTIME_LIMITS``), and per local service on every sidecar (the
gateway's sidecar in front of the gateway process, a runtime's sidecar in front of
its process). Beyond ``max_requests`` active requests (HTTP/2: streams) Envoy answers
at once with a 503 and ``x-envoy-overloaded``; a request waiting for a connection
waits in a queue of at most ``max_pending_requests``, beyond which it is answered the
same way. Nothing queues without bound.

On the gateway's public ingress that overflow is answered in the project's JSON
error shape with ``Retry-After`` (``overload_reply``); on the egress (stage calls) the
gateway reads ``x-envoy-overloaded`` and answers a 503 naming the stage.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

#: the code of the JSON error Envoy answers when the gateway's own cluster overflows
OVERLOADED = "overloaded"


@dataclass(frozen=True, slots=True)
class ClusterLimits:
    """One cluster's circuit-breaker thresholds (Envoy's default priority)."""

    max_connections: int = 128
    max_pending_requests: int = 128
    max_requests: int = 512
    max_retries: int = 64

    def circuit_breakers(self) -> dict[str, Any]:
        """The cluster's ``circuit_breakers`` field."""
        return {
            "thresholds": [{
                "max_connections": self.max_connections,
                "max_pending_requests": self.max_pending_requests,
                "max_requests": self.max_requests,
                "max_retries": self.max_retries,
            }]
        }


@dataclass(frozen=True, slots=True)
class MeshLimits:
    """Every limit the manager pushes: each runtime's cluster (``runtime``, or a
    ``max_requests`` override by runtime name), and the local cluster of each gateway's
    and each runtime instance's sidecar; ``retry_after_s`` goes with an overflow's 503."""

    runtime: ClusterLimits = ClusterLimits()
    overrides: tuple[tuple[str, int], ...] = ()
    gateway: ClusterLimits = ClusterLimits(max_connections=512, max_pending_requests=128, max_requests=512)
    retry_after_s: int = 1

    def for_runtime(self, runtime: str) -> ClusterLimits:
        """The circuit breakers of ``runtime``'s cluster."""
        override = dict(self.overrides).get(runtime)
        return self.runtime if override is None else replace(self.runtime, max_requests=override)

    @classmethod
    def from_settings(cls, settings: Any) -> "MeshLimits":
        """From the manager's settings (``SLUICE_MANAGER_RUNTIME_MAX_*``, ``..._GATEWAY_MAX_*``,
        ``..._RUNTIME_LIMITS``, ``..._RETRY_AFTER_S``)."""
        return cls(
            runtime=ClusterLimits(
                settings.runtime_max_connections, settings.runtime_max_pending,
                settings.runtime_max_requests, settings.runtime_max_retries,
            ),
            overrides=parse_overrides(settings.runtime_limits),
            gateway=ClusterLimits(
                settings.gateway_max_requests, settings.gateway_max_pending,
                settings.gateway_max_requests, settings.runtime_max_retries,
            ),
            retry_after_s=settings.retry_after_s,
        )


def parse_overrides(text: str) -> tuple[tuple[str, int], ...]:
    """``"runtime=max_requests,..."`` (``SLUICE_MANAGER_RUNTIME_LIMITS``) as sorted pairs;
    ``ValueError`` naming the bad entry."""
    pairs: dict[str, int] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, value = entry.rpartition("=")
        if not sep or not name.strip() or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"runtime limit {entry!r}: write <runtime>=<max concurrent requests, at least 1>")
        pairs[name.strip()] = int(value)
    return tuple(sorted(pairs.items()))


def overload_reply(retry_after_s: int) -> dict[str, Any]:
    """A local-reply mapper: an overflowed cluster's 503 (response flag ``UO``) gets
    ``Retry-After`` and the project's JSON error body."""
    return {
        "filter": {"response_flag_filter": {"flags": ["UO"]}},
        "status_code": 503,
        "headers_to_add": [{"header": {"key": "retry-after", "value": str(retry_after_s)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}],
        "body_format_override": {
            "json_format": {
                "error": {
                    "code": OVERLOADED,
                    "message": "the gateway is at its concurrency limit; retry later",
                    "details": {"retry_after_s": retry_after_s},
                }
            },
            "content_type": "application/json",
        },
    }
