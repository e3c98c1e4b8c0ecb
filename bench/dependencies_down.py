"""Zipkin down and Consul down, under load: serving must not notice. Prints one row per
fault (requests sent, failed, p50/p99 before and during, how long the manager took to
say so on ``/healthz`` and to recover):

    .venv/bin/python -m bench.dependencies_down

One local mesh (``sluice.local.mesh.LocalMesh``: real processes, real Envoys) with the
real Zipkin server (java; ``./build.sh`` fetches the jar) and discovery through Consul:
the Consul imitation of tests/unit/fake_consul.py as a process of its own
(tests/e2e/consul_server.py), its catalog kept in a data file as a Consul server keeps
its Raft data. (A ``consul agent -dev`` would not do: a dev agent forgets its catalog
when killed, which a production Consul does not.)

* Zipkin: SIGKILL of the collector while 8 clients send requests; Envoy's tracer and
  the services' exporters then fail to send their spans, and nothing else may change.
* Consul: SIGKILL of Consul while 8 clients send requests; the manager keeps the last
  endpoints Consul gave it (so Envoy keeps them), ``/healthz`` answers 503 naming the
  failing registry, and once Consul is back (same port, same data) it is healthy again.

The scenario functions are what tests/e2e/test_dependencies_down.py runs and asserts on.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.faults import RECORDS, create_iris, envoy_stat, iris_ok
from bench.load import Load, p99
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.local.procs import Proc, Supervisor, free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[1]
#: good answers counted in each window compared (before the fault, during it)
WINDOW = 300


@dataclass
class DependencyRun:
    """One dependency killed under load: answers before ``fault_at`` are the baseline,
    from it to ``recovered_at`` the outage; ``notes`` what was observed."""

    fault: str
    load: Load
    fault_at: float
    recovered_at: float
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> list:
        return self.load.failures()

    def latencies_ms(self, since: float, until: float) -> list[float]:
        return [a.latency_s * 1000 for a in self.load.window(since, until)]

    def p(self, quantile: float, since: float, until: float) -> float:
        ordered = sorted(self.latencies_ms(since, until))
        return ordered[min(len(ordered) - 1, int(quantile * len(ordered)))] if ordered else 0.0

    @property
    def before(self) -> tuple[float, float]:
        """(p50, p99) in ms of the requests sent before the fault."""
        return self.p(0.5, 0, self.fault_at), p99([a.latency_s for a in self.load.window(0, self.fault_at)]) * 1000

    @property
    def during(self) -> tuple[float, float]:
        """(p50, p99) in ms of the requests sent during the outage."""
        return (self.p(0.5, self.fault_at, self.recovered_at),
                p99([a.latency_s for a in self.load.window(self.fault_at, self.recovered_at)]) * 1000)

    @property
    def slowest_ms(self) -> float:
        return max((a.latency_s for a in self.load.answers), default=0.0) * 1000


# --- Consul as a process -----------------------------------------------------------------------


@dataclass
class ConsulProcess:
    """The Consul imitation on a fixed port, its catalog in ``data`` (survives a SIGKILL)."""

    supervisor: Supervisor
    port: int
    data: Path
    proc: Proc | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "ConsulProcess":
        argv = [sys.executable, "-m", "tests.e2e.consul_server", "--port", str(self.port), "--data", str(self.data)]
        self.proc = self.supervisor.start("consul", argv, env={"PYTHONPATH": str(ROOT)}, cwd=ROOT)
        wait_until(http_ok(f"http://{self.address}/v1/catalog/services"), 30, "Consul", self.proc)
        return self

    def kill(self) -> float:
        """SIGKILL; when."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(5)
        return time.monotonic()


@contextmanager
def dependency_mesh(workdir: Path):
    """(mesh, consul): the iris pipeline on a mesh with the real Zipkin and Consul discovery."""
    supervisor = Supervisor(workdir / "consul-logs")
    consul = ConsulProcess(supervisor, free_port(), workdir / "consul-data.json").start()
    try:
        mesh = LocalMesh(
            workdir / "mesh",
            [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
            MeshPorts.ephemeral(),
            env={"SLUICE_CONSUL_ADDR": consul.address},
            zipkin_port=free_port(),
        )
        with mesh:
            create_iris(mesh)
            yield mesh, consul
    finally:
        supervisor.stop_all()


def new_load(mesh: LocalMesh) -> Load:
    return Load(mesh.gateway_url, "iris", RECORDS, iris_ok, clients=8)


def healthz(mesh: LocalMesh) -> httpx.Response:
    return httpx.get(f"{mesh.manager_url}/healthz", timeout=5)


def instances(mesh: LocalMesh, runtime: str = "scikit") -> list[dict]:
    response = httpx.get(f"{mesh.manager_url}/api/v1/runtimes/{runtime}", timeout=5)
    return response.json()["instances"] if response.status_code == 200 else []


# --- the scenarios -------------------------------------------------------------------------------


def zipkin_killed(mesh: LocalMesh) -> DependencyRun:
    """SIGKILL Zipkin under load; the outage window lasts until Envoy has failed to reach the
    collector (its span flush, every 5 s) and ``WINDOW`` more good answers came back."""
    gateway_admin = mesh.admin_url("gateway")
    fails = "cluster.zipkin.upstream_cx_connect_fail"
    with new_load(mesh) as load:
        load.wait_successes(WINDOW, timeout_s=60)
        # Zipkin works before the fault: it holds the gateway's spans, Envoy never failed to reach it
        wait_until(lambda: "gateway" in httpx.get(f"{mesh.zipkin_url}/api/v2/services", timeout=5).json(), 20,
                   "Zipkin to hold the gateway's spans")
        failures_before = envoy_stat(gateway_admin, fails)
        proc = mesh.procs.pop("zipkin")
        os.kill(proc.pid, signal.SIGKILL)
        proc.popen.wait(5)
        fault_at = time.monotonic()
        connect_fails = envoy_stat(gateway_admin, fails)
        wait_until(lambda: envoy_stat(gateway_admin, fails) > connect_fails, 20, "Envoy to fail to reach Zipkin")
        flushed_s = time.monotonic() - fault_at
        load.wait_successes(WINDOW, since=time.monotonic(), timeout_s=60)
        recovered_at = time.monotonic()
    return DependencyRun("Zipkin (SIGKILL)", load, fault_at, recovered_at, {
        "envoy_collector_connect_failures_before": float(failures_before),
        "envoy_span_flush_failed_after_s": flushed_s,
        "envoy_collector_connect_failures": float(envoy_stat(gateway_admin, fails)),
    })


def consul_killed(mesh: LocalMesh, consul: ConsulProcess) -> DependencyRun:
    """SIGKILL Consul under load, wait for the manager to report it, keep serving
    ``WINDOW`` good answers, start Consul again and wait for the manager to be healthy."""
    endpoints_before = sorted((i["host"], i["port"]) for i in instances(mesh))
    with new_load(mesh) as load:
        load.wait_successes(WINDOW, timeout_s=60)
        fault_at = consul.kill()
        wait_until(lambda: healthz(mesh).status_code == 503, 20, "the manager's /healthz to report Consul failing")
        reported_s = time.monotonic() - fault_at
        report = healthz(mesh).json()
        endpoints_during = sorted((i["host"], i["port"]) for i in instances(mesh))
        load.wait_successes(WINDOW, since=time.monotonic(), timeout_s=60)
        consul.start()
        recovered_at = time.monotonic()
        wait_until(lambda: healthz(mesh).status_code == 200, 30, "the manager's /healthz to recover")
        healthy_s = time.monotonic() - recovered_at
        load.wait_successes(WINDOW // 3, since=time.monotonic(), timeout_s=60)
    run = DependencyRun("Consul (SIGKILL, then back)", load, fault_at, recovered_at, {
        "healthz_503_after_s": reported_s,
        "healthz_200_after_restart_s": healthy_s,
    })
    run.report = report
    run.endpoints = (endpoints_before, endpoints_during)
    return run


def _row(run: DependencyRun) -> str:
    (b50, b99), (d50, d99) = run.before, run.during
    notes = ", ".join(f"{k} {v:.2f}" for k, v in run.notes.items())
    return (f"| {run.fault} | {len(run.load.answers)} | {len(run.failed)} | {b50:.1f} / {b99:.1f} | "
            f"{d50:.1f} / {d99:.1f} | {run.slowest_ms:.0f} | {notes} |")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="sluice-deps-") as tmp, dependency_mesh(Path(tmp)) as (mesh, consul):
        runs = [zipkin_killed(mesh), consul_killed(mesh, consul)]
    print("8 client threads, iris pipeline (2 stages); 'during' = from the SIGKILL until the outage window ends\n")
    print("| dependency | requests sent | failed | p50 / p99 before (ms) | p50 / p99 during (ms) | slowest (ms) | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for run in runs:
        print(_row(run))


if __name__ == "__main__":
    main()
