"""Last-minute latency and error figures per pipeline and per stage, for the console,
read from the Prometheus metrics the gateway already keeps (``gateway.metrics``).

The gateway's series are cumulative (counters and histograms since it started), so a
window needs two readings: ``GatewayStats`` scrapes the gateway's ``/metrics`` (its
public address, ``SLUICE_MANAGER_GATEWAY_URL``) when a console asks and the last
reading is older than ``scrape_interval_s``, keeps the readings of the last window,
and answers the difference between now and the reading about ``window_s`` ago;
quantiles are interpolated inside buckets as Prometheus' ``histogram_quantile`` does.
Stage calls are also counted per variant that served them (runtime and model version,
``sluice_gateway_stage_served_total``), so a traffic split can be seen in the console.
Nothing is scraped while no console looks; the first look (or the first after more than
two windows without one) has one reading only, and then the figures are those since the
gateway started (``window_s`` is None). A gateway
restart (counters going down) restarts the window.

In secure mode the gateway's ``/metrics`` needs an ``admin`` token: the manager signs
one for itself (one hour, renewed ten minutes before it expires), kept in memory only.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from manager.auth.scopes import ADMIN
from sluice.metrics import bucket_quantile
from manager.ui.schemas import Figures, PipelineStats, ServedStats, StageStats, StatsOut

log = logging.getLogger(__name__)

#: the scraping token's lifetime, and how long before its expiry a new one is signed
SCRAPE_TOKEN_TTL_S = 3600.0
SCRAPE_TOKEN_RENEW_S = 600.0

StageKey = tuple[str, str, str]  # pipeline, stage index, model
ServedKey = tuple[str, str, str, str]  # pipeline, stage (id, or index in a chain), runtime, version


@dataclass
class Histogram:
    """One cumulative histogram: (upper bound, cumulative count) per bucket, ``+Inf`` last."""

    buckets: dict[float, float] = field(default_factory=dict)

    def minus(self, base: "Histogram | None") -> "Histogram":
        if base is None:
            return self
        return Histogram({le: n - base.buckets.get(le, 0.0) for le, n in self.buckets.items()})

    @property
    def count(self) -> float:
        return self.buckets.get(math.inf, 0.0)

    def quantile(self, q: float) -> float | None:
        """Seconds; None without observations."""
        points = sorted(self.buckets.items())
        total = self.count
        if total <= 0:
            return None
        return bucket_quantile(points, q * total)


@dataclass
class Reading:
    """One scrape of the gateway's ``/metrics``, reduced to what the console shows."""

    at: float
    requests: dict[str, float] = field(default_factory=dict)  # pipeline -> all answers
    request_errors: dict[str, float] = field(default_factory=dict)  # pipeline -> answers not 2xx
    request_seconds: dict[str, Histogram] = field(default_factory=dict)
    stage_seconds: dict[StageKey, Histogram] = field(default_factory=dict)
    stage_errors: dict[tuple[str, str], float] = field(default_factory=dict)  # (pipeline, stage index)
    served: dict[ServedKey, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float) -> "Reading":
        reading = cls(at)
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = s.labels
                if s.name == "sluice_gateway_requests_total":
                    p = labels["pipeline"]
                    reading.requests[p] = reading.requests.get(p, 0.0) + s.value
                    if not labels.get("status", "").startswith("2"):
                        reading.request_errors[p] = reading.request_errors.get(p, 0.0) + s.value
                elif s.name == "sluice_gateway_request_seconds_bucket":
                    reading.request_seconds.setdefault(labels["pipeline"], Histogram()).buckets[float(labels["le"])] = s.value
                elif s.name == "sluice_gateway_stage_seconds_bucket":
                    key = (labels["pipeline"], labels["stage"], labels["model"])
                    reading.stage_seconds.setdefault(key, Histogram()).buckets[float(labels["le"])] = s.value
                elif s.name == "sluice_gateway_stage_errors_total":
                    key2 = (labels["pipeline"], labels["stage"])
                    reading.stage_errors[key2] = reading.stage_errors.get(key2, 0.0) + s.value
                elif s.name == "sluice_gateway_stage_served_total":
                    key3 = (labels["pipeline"], labels["stage"], labels["runtime"], labels["version"])
                    reading.served[key3] = reading.served.get(key3, 0.0) + s.value
        return reading

    def went_back(self, base: "Reading") -> bool:
        """True when a counter is lower than in ``base``: the gateway restarted between them."""
        return any(n < base.requests.get(p, 0.0) for p, n in self.requests.items()) or any(
            h.count < base.stage_seconds[k].count for k, h in self.stage_seconds.items() if k in base.stage_seconds
        )


def _figures(count: float, errors: float, histogram: Histogram, window_s: float | None) -> Figures:
    p50, p99 = histogram.quantile(0.5), histogram.quantile(0.99)
    return Figures(
        requests=int(count),
        rate_per_s=round(count / window_s, 3) if window_s else None,
        p50_ms=round(p50 * 1000, 3) if p50 is not None else None,
        p99_ms=round(p99 * 1000, 3) if p99 is not None else None,
        error_rate=round(errors / count, 4) if count else None,
    )


def window_stats(now: Reading, base: Reading | None) -> StatsOut:
    """The figures between two readings (``base`` None: since the gateway started)."""
    if base is not None and now.went_back(base):
        base = None
    window_s = round(now.at - base.at, 3) if base is not None else None
    pipelines: dict[str, PipelineStats] = {}
    for name, total in now.requests.items():
        count = total - (base.requests.get(name, 0.0) if base else 0.0)
        errors = now.request_errors.get(name, 0.0) - (base.request_errors.get(name, 0.0) if base else 0.0)
        histogram = now.request_seconds.get(name, Histogram()).minus(base.request_seconds.get(name) if base else None)
        pipelines[name] = PipelineStats(**_figures(count, errors, histogram, window_s).model_dump(), stages=[])
    for (name, stage, model), cumulative in sorted(now.stage_seconds.items(), key=lambda kv: (kv[0][0], int(kv[0][1]), kv[0][2])):
        histogram = cumulative.minus(base.stage_seconds.get((name, stage, model)) if base else None)
        errors = now.stage_errors.get((name, stage), 0.0) - (base.stage_errors.get((name, stage), 0.0) if base else 0.0)
        entry = pipelines.setdefault(name, PipelineStats(**_figures(0, 0, Histogram(), window_s).model_dump(), stages=[]))
        entry.stages.append(StageStats(index=int(stage), model=model, **_figures(histogram.count, errors, histogram, window_s).model_dump()))
    for (name, stage, runtime, version), total in sorted(now.served.items()):
        count = total - (base.served.get((name, stage, runtime, version), 0.0) if base else 0.0)
        entry = pipelines.setdefault(name, PipelineStats(**_figures(0, 0, Histogram(), window_s).model_dump(), stages=[]))
        entry.served.append(ServedStats(stage=stage, runtime=runtime, version=version, requests=int(count)))
    return StatsOut(window_s=window_s, pipelines=pipelines)


class GatewayStats:
    """Readings of the gateway's ``/metrics``, taken when asked for, kept for a window."""

    def __init__(self, gateway_url: str, window_s: float, scrape_interval_s: float, timeout_s: float,
                 token: Callable[[], str] | None = None, clock: Callable[[], float] = time.monotonic):
        self.gateway_url = gateway_url.rstrip("/")
        self.window_s = window_s
        self.scrape_interval_s = scrape_interval_s
        self._token = token
        self._clock = clock
        self.timeout_s = timeout_s
        self._readings: deque[Reading] = deque()
        self._lock = asyncio.Lock()

    async def stats(self) -> StatsOut:
        """The last window's figures; ``StatsOut.error`` says why when the gateway did not answer."""
        async with self._lock:
            error = None
            if not self._readings or self._clock() - self._readings[-1].at >= self.scrape_interval_s:
                try:
                    self._add(await self._scrape())
                except (httpx.HTTPError, ValueError) as exc:
                    error = f"the gateway's metrics at {self.gateway_url}/metrics did not answer: {exc}"
                    log.warning("console: %s", error)
            if not self._readings:
                return StatsOut(window_s=None, pipelines={}, error=error)
            now = self._readings[-1]
            base = self._base(now)
            out = window_stats(now, base)
            out.error = error
            return out

    def _base(self, now: Reading) -> Reading | None:
        """The newest reading at least a window old, else the oldest one (None: only ``now``)."""
        older = [r for r in self._readings if r is not now]
        if not older:
            return None
        due = [r for r in older if now.at - r.at >= self.window_s]
        return due[-1] if due else older[0]

    def _add(self, reading: Reading) -> None:
        self._readings.append(reading)
        # keep one reading older than the window (the base), drop the rest of the past
        while len(self._readings) > 2 and reading.at - self._readings[1].at >= self.window_s:
            self._readings.popleft()
        # nobody looked for a while: a base that old would make "the last minute" an hour
        if len(self._readings) == 2 and reading.at - self._readings[0].at > 2 * self.window_s:
            self._readings.popleft()

    async def _scrape(self) -> Reading:
        headers = {"authorization": f"Bearer {self._token()}"} if self._token else {}
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            response = await client.get(f"{self.gateway_url}/metrics", headers=headers)
        if response.status_code in (401, 403) and isinstance(self._token, ScrapeToken):
            self._token.drop()  # revoked or expired: sign a new one for the next scrape
        if response.status_code != 200:
            raise ValueError(f"{response.status_code} {response.text[:200]}")
        return Reading.parse(response.text, self._clock())


class ScrapeToken:
    """Secure mode: an ``admin`` token the manager signs for its own scrapes of the
    gateway's ``/metrics`` (the only scope that route takes), renewed before it expires."""

    def __init__(self, tokens, clock: Callable[[], float] = time.time):
        self._tokens = tokens
        self._clock = clock
        self._token = ""
        self._expires_at = 0.0

    def __call__(self) -> str:
        if self._expires_at - self._clock() < SCRAPE_TOKEN_RENEW_S:
            issued = self._tokens.issue([ADMIN], SCRAPE_TOKEN_TTL_S)
            self._token, self._expires_at = issued.token, issued.row.expires_at
            log.info("console: signed token %s for scraping the gateway's metrics", issued.row.id)
        return self._token

    def drop(self) -> None:
        """Forget the token (the gateway's sidecar refused it): the next call signs a new one."""
        self._token, self._expires_at = "", 0.0
