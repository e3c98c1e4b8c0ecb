"""Starts, ready-checks and stops the processes of a local mesh.

Every process is started by PID, logs to its own file, and is stopped by that PID
(SIGTERM, then SIGKILL after a grace period), also when start-up fails half-way.
Readiness is awaited on real signals (HTTP health endpoints, Envoy's ``/ready``,
gRPC health), each with a bounded timeout; a process that exits while awaited fails
fast with the tail of its log.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class StartError(RuntimeError):
    pass


#: where free ports are picked: below Linux's ephemeral range (32768-60999 by default),
#: which outgoing connections take their source ports from, so a port picked here is not
#: taken by some connection in the time between picking it and a process binding it
PORT_RANGE = (20000, 32000)
#: ports handed out lately by ``free_port`` in any process on this machine: one empty file
#: per port, its mtime when. A port is bound only later (a mesh starts its processes one by
#: one, and a restarted process binds its port again after a crash), so without this a
#: test run in parallel could pick a port that is free *now* but already promised
RESERVATIONS = Path(tempfile.gettempdir()) / "sluice-ports"
RESERVED_S = 900.0


def _reserve(port: int) -> bool:
    """Claim ``port`` among the processes of this machine; False if another claimed it lately."""
    path = RESERVATIONS / str(port)
    try:
        RESERVATIONS.mkdir(mode=0o777, exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
        return True
    except FileExistsError:
        try:
            if time.time() - path.stat().st_mtime < RESERVED_S:
                return False
            os.utime(path)  # an old claim: take it over
            return True
        except OSError:
            return False
    except OSError:  # no shared temp directory: the bind check alone
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now and no process here was handed lately (``RESERVATIONS``),
    at random in ``PORT_RANGE``, checked by binding it."""
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        if _reserve(port):
            return port
    with socket.socket() as s:  # a crowded range: let the kernel choose
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Supervisor:
    """Owns a set of child processes; ``stop_all`` ends them in reverse start order."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Proc:
        log_path = self.log_dir / f"{name}.log"
        log_file = open(log_path, "ab")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        popen = subprocess.Popen(
            argv, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, stdin=subprocess.DEVNULL
        )
        log_file.close()
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def start_python(self, name: str, module: str, env: dict[str, str], cwd: Path) -> Proc:
        return self.start(name, [sys.executable, "-m", module], env=env, cwd=cwd)

    def stop(self, proc: Proc, grace_s: float = 5.0) -> None:
        if proc.alive():
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_until(check: Callable[[], bool], timeout_s: float, what: str, proc: Proc | None = None, interval_s: float = 0.05,
               abort: threading.Event | None = None) -> None:
    """Poll ``check`` until true; fail after ``timeout_s``, as soon as ``proc`` exits, or
    as soon as ``abort`` is set (the mesh is stopping)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if abort is not None and abort.is_set():
            raise StartError(f"stopped while waiting for {what}")
        if proc is not None and not proc.alive():
            raise StartError(f"{proc.name} exited (code {proc.popen.returncode}) while waiting for {what}:\n{proc.log_tail()}")
        try:
            if check():
                return
        except Exception:  # not up yet: connection refused, bad status...
            pass
        time.sleep(interval_s)
    tail = f"\n{proc.log_tail()}" if proc is not None else ""
    raise StartError(f"timed out after {timeout_s:.0f}s waiting for {what}{tail}")


def http_ok(url: str, timeout_s: float = 1.0) -> Callable[[], bool]:
    def check() -> bool:
        return httpx.get(url, timeout=timeout_s).status_code == 200

    return check


def grpc_serving(address: str) -> Callable[[], bool]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def check() -> bool:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    return check
