"""Heals a local mesh as compose and Kubernetes do: a process that exits is restarted.

``Healer`` watches every process a ``LocalMesh`` started (Zipkin, manager, repository,
runtimes, gateway, every replica of them, and every Envoy sidecar). One that exits is logged with its name,
PID and exit status (or the signal that killed it) and restarted after a back-off
(``initial_s`` doubling up to ``max_s``; back to ``initial_s`` once a process has stayed
up for ``stable_s``), through ``LocalMesh.restart``: the same start function and
ready-checks as start-up. A restart that fails its ready-check is retried with the next
back-off. When several processes are down, they come back in start-up order (the
manager before what needs it).

It runs in a thread of its own (``start``/``stop``) or in the caller's (``run``).
``stop`` aborts a ready-check in progress and joins the thread, so that the caller can
then stop every process by PID with nothing starting behind its back.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


def exit_status(returncode: int | None) -> str:
    """``exit status 1`` or ``killed by SIGKILL (-9)``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name} ({returncode})"
    return f"exit status {returncode}"


def start_rank(key: str) -> tuple[int, str]:
    """Start-up order of a process key of ``LocalMesh.procs`` (restarts go in this order);
    replicas (``runtime-<name>-<i>``, ``gateway-<i>``) rank with their service."""
    service = key[: -len("-sidecar")] if key.endswith("-sidecar") else key
    order = {"zipkin": 0, "manager": 1, "repository": 2, "gateway": 4}
    if service.startswith("runtime-"):
        rank = 3
    elif service.startswith("gateway-"):
        rank = 4
    else:
        rank = order.get(service, 5)
    return rank * 2 + key.endswith("-sidecar"), key


@dataclass
class _State:
    delay_s: float
    started_at: float
    due_at: float | None = None  # a restart is pending for then


class Healer:
    def __init__(self, mesh, report: Callable[[str], None] | None = None, initial_s: float = 0.5,
                 max_s: float = 30.0, stable_s: float = 60.0, poll_s: float = 0.1,
                 clock: Callable[[], float] = time.monotonic):
        self.mesh = mesh
        self.report = report or log.warning
        self.initial_s, self.max_s, self.stable_s, self.poll_s = initial_s, max_s, stable_s, poll_s
        self.clock = clock
        self._states: dict[str, _State] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: one record per exit seen: {"key", "pid", "returncode", "status", "new_pid" (None until restarted)}
        self.restarts: list[dict] = []

    # --- the loop
    def run(self) -> None:
        """Heal until ``stop``."""
        while not self._stop.is_set():
            self.step()
            self._stop.wait(self.poll_s)

    def step(self) -> None:
        """One round: note the processes that exited, restart those whose back-off is over."""
        now = self.clock()
        for key, proc in list(self.mesh.procs.items()):
            state = self._states.setdefault(key, _State(self.initial_s, now))
            if state.due_at is not None or proc.alive():
                continue
            if now - state.started_at >= self.stable_s:
                state.delay_s = self.initial_s  # it had stayed up: a fresh back-off
            state.due_at = now + state.delay_s
            status = exit_status(proc.popen.returncode)
            self.restarts.append({"key": key, "pid": proc.pid, "returncode": proc.popen.returncode,
                                  "status": status, "new_pid": None})
            self.report(f"{key} (pid {proc.pid}) exited: {status}; restarting in {state.delay_s:g}s "
                        f"(log {proc.log_path})")
        due = sorted((k for k, s in self._states.items() if s.due_at is not None and s.due_at <= now), key=start_rank)
        for key in due:
            if self._stop.is_set():
                return
            self._restart(key)

    def _restart(self, key: str) -> None:
        state = self._states[key]
        state.delay_s = min(state.delay_s * 2, self.max_s)
        try:
            proc = self.mesh.restart(key)
        except Exception as exc:  # StartError (not ready in time), or it could not even be spawned
            if self._stop.is_set():
                return
            state.due_at = self.clock() + state.delay_s
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.report(f"{key}: restart failed ({first_line}); next try in {state.delay_s:g}s")
            return
        state.due_at = None
        state.started_at = self.clock()
        for record in reversed(self.restarts):
            if record["key"] == key:
                record["new_pid"] = proc.pid
                break
        self.report(f"{key} restarted (pid {proc.pid})")

    # --- in a thread
    def start(self) -> "Healer":
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="sluice-healer", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop healing: abort a restart's ready-check in progress and wait for the thread.
        The mesh's processes keep running (``LocalMesh.stop`` ends them, by PID)."""
        self._stop.set()
        self.mesh.abort()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return  # still in a restart: the mesh stays aborted
            self._thread = None
        self.mesh.stopping.clear()  # nothing of ours runs now: ready-checks work again

    def __enter__(self) -> "Healer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
