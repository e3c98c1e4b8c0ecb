"""A steady load for fault runs: N client threads (httpx, one connection each) POSTing the
same records to one pipeline as fast as answers come, recording every answer (when it
was sent, how long it took, its status, and the body of any failure).

Used by the end-to-end fault tests (tests/e2e/test_faults.py) and by bench/faults.py.
A failure is anything but a 200 whose body ``ok`` accepts: another status, or a
transport error (status 0: refused, reset, timed out).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import httpx


@dataclass(frozen=True, slots=True)
class Answer:
    sent_at: float  # time.monotonic() when the request was sent
    latency_s: float
    status: int  # 0: no HTTP answer (a transport error)
    failure: str = ""  # "" for a good answer; else the body (or the error) in short

    @property
    def ok(self) -> bool:
        return not self.failure


def p99(latencies: list[float]) -> float:
    """The 99th percentile (nearest rank); 0 for none."""
    if not latencies:
        return 0.0
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


class Load:
    """``clients`` threads sending ``records`` to ``<url>/serve/<pipeline>`` until ``stop``."""

    def __init__(self, url: str, pipeline: str, records: list[dict], ok: Callable[[httpx.Response], bool],
                 clients: int = 8, headers: dict[str, str] | None = None, timeout_s: float = 10.0):
        self.url, self.pipeline, self.records, self.ok = url, pipeline, records, ok
        self.clients, self.headers, self.timeout_s = clients, headers or {}, timeout_s
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, name=f"load-{i}", daemon=True) for i in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s, headers=self.headers) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                try:
                    response = client.post(f"/serve/{self.pipeline}", json=self.records)
                    failure = "" if response.status_code == 200 and self._accepts(response) else response.text[:300] or "(empty)"
                    answer = Answer(sent, time.monotonic() - sent, response.status_code, failure)
                except httpx.HTTPError as exc:
                    answer = Answer(sent, time.monotonic() - sent, 0, f"{type(exc).__name__}: {exc}"[:300])
                with self._lock:
                    self.answers.append(answer)

    def _accepts(self, response: httpx.Response) -> bool:
        try:
            return bool(self.ok(response))
        except Exception:  # a body the check cannot read is a wrong answer
            return False

    # --- control
    def start(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)

    def __enter__(self) -> "Load":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- what was answered
    def window(self, since: float = 0.0, until: float = math.inf) -> list[Answer]:
        """Answers to requests sent in [since, until)."""
        with self._lock:
            return [a for a in self.answers if since <= a.sent_at < until]

    def failures(self, since: float = 0.0, until: float = math.inf) -> list[Answer]:
        return [a for a in self.window(since, until) if not a.ok]

    def statuses(self, since: float = 0.0, until: float = math.inf) -> Counter[int]:
        return Counter(a.status for a in self.window(since, until))

    def successes(self, since: float = 0.0) -> int:
        return sum(1 for a in self.window(since) if a.ok)

    def wait_successes(self, count: int, since: float = 0.0, timeout_s: float = 10.0) -> None:
        """Wait until ``count`` good answers to requests sent since ``since`` came back."""
        deadline = time.monotonic() + timeout_s
        while self.successes(since) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} good answers within {timeout_s}s; "
                                   f"statuses {dict(self.statuses(since))}, failures e.g. {[a.failure for a in self.failures(since)[:3]]}")
            time.sleep(0.01)

    def first_success_after(self, since: float) -> Answer | None:
        """The earliest-sent good answer among requests sent at or after ``since``."""
        good = [a for a in self.window(since) if a.ok]
        return min(good, key=lambda a: a.sent_at) if good else None
