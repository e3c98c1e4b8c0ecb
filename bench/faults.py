"""Real crashes under load: SIGKILL of a runtime replica, of the only replica of a stage,
of the manager and of the gateway (alone, and one of two), each while 8 client threads
send requests through the gateway; prints one row per fault: requests sent, failed,
p99 latency during the fault, and how long the mesh took to heal.

    .venv/bin/python -m bench.faults

Two local meshes (``sluice.local.mesh.LocalMesh``, real processes and Envoys): one with
one instance of everything, in dev mode; one with ``replicas=2`` (two scikit runtime
processes, each with its sidecar, behind one cluster; two gateway processes behind the
gateway's sidecar), in secure mode (tokens). The scenario functions here are also what
the end-to-end tests (tests/e2e/test_faults.py) run and assert on.

"During the fault" is from the SIGKILL until the killed process is ready again
(restarted, ready-checked as at start-up).
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.load import Load, p99
from sluice.local.healer import Healer
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.local.procs import wait_until
from sluice.wire import runtime_cluster

RECORDS = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]
IRIS_CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]
#: heartbeats lapse after this long: a dead instance leaves the registry (and Envoy) quickly
HEARTBEAT_TTL_S = "3"


def iris_ok(response: httpx.Response) -> bool:
    return response.json()[0]["label"] == "virginica"


def fault_mesh(workdir: Path, replicas: int, secure: bool) -> LocalMesh:
    """The mesh the fault runs use: the scikit runtime (iris models) and a gateway."""
    return LocalMesh(
        workdir,
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        env={"SLUICE_MANAGER_HEARTBEAT_TTL_S": HEARTBEAT_TTL_S},
        secure=secure,
        replicas=replicas,
    )


def create_iris(mesh: LocalMesh, name: str = "iris") -> None:
    response = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "chain": IRIS_CHAIN},
                          headers=mesh.admin_headers, timeout=30)
    if response.status_code != 201:
        raise RuntimeError(f"pipeline {name} not created: {response.status_code} {response.text[:300]}")


def serve_headers(mesh: LocalMesh) -> dict[str, str]:
    """What a client sends to the gateway: a ``serve:*`` token in secure mode, nothing in dev mode."""
    if not mesh.secure:
        return {}
    return {"authorization": f"Bearer {mesh.mint_token(['serve:*'])['token']}"}


def new_load(mesh: LocalMesh, pipeline: str = "iris", headers: dict[str, str] | None = None) -> Load:
    return Load(mesh.gateway_url, pipeline, RECORDS, iris_ok, clients=8, headers=headers)


# --- observing Envoy and the manager -----------------------------------------------------------


def envoy_stat(admin_url: str, name: str) -> int:
    """One counter or gauge of an Envoy's admin ``/stats`` (0 when it does not exist yet)."""
    text = httpx.get(f"{admin_url}/stats", params={"filter": f"^{re.escape(name)}$"}, timeout=5).text
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def host_stat(admin_url: str, cluster: str, port: int, stat: str) -> int:
    """A per-endpoint stat of ``/clusters`` (e.g. ``rq_success``) for 127.0.0.1:``port``."""
    prefix = f"{cluster}::127.0.0.1:{port}::{stat}::"
    for line in httpx.get(f"{admin_url}/clusters", timeout=5).text.splitlines():
        if line.startswith(prefix):
            return int(line[len(prefix):])
    return 0


def instance_ids(mesh: LocalMesh, runtime: str) -> dict[int, str]:
    """The manager's registered instances of ``runtime``: public port -> instance id."""
    response = httpx.get(f"{mesh.manager_url}/api/v1/runtimes/{runtime}", headers=mesh.admin_headers, timeout=5)
    return {i["port"]: i["id"] for i in response.json()["instances"]} if response.status_code == 200 else {}


def runtime_inferences(metrics_port: int) -> float:
    """ModelInfer calls a runtime process answered (its own /metrics: a new process starts at 0)."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sluice_runtime_inferences_total{"))


def mesh_converged(mesh: LocalMesh, sidecars: int, gateways: int) -> bool:
    """Whether the manager sees ``sidecars`` Envoys connected, each having acknowledged the
    current version of every type it subscribed to, and ``gateways`` gateway processes on
    its pipeline feed."""
    state = httpx.get(f"{mesh.manager_url}/api/v1/mesh", headers=mesh.admin_headers, timeout=2).json()
    nodes = [n for n in state["nodes"].values() if n["connected"]]
    return (len(nodes) == sidecars and state["gateways"] == gateways
            and all(n["acked"] and all(n["versions"].get(t) == v for t, v in n["acked"].items()) for n in nodes))


# --- one fault run --------------------------------------------------------------------------


@dataclass
class FaultRun:
    """What one fault did to the load: the SIGKILL at ``fault_at``, the killed process ready
    again at ``recovered_at`` (monotonic), and what was observed in between (``notes``)."""

    fault: str
    load: Load
    fault_at: float
    recovered_at: float
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        return len(self.load.answers)

    @property
    def failed(self) -> list:
        return self.load.failures()

    @property
    def during(self) -> list:
        """Answers to requests sent between the SIGKILL and the restart."""
        return self.load.window(self.fault_at, self.recovered_at)

    @property
    def p99_during_ms(self) -> float:
        return p99([a.latency_s for a in self.during]) * 1000

    def resumed_s(self) -> float:
        """From the restart to the first good answer to a request sent after it."""
        first = self.load.first_success_after(self.recovered_at)
        if first is None:
            return float("inf")
        return first.sent_at + first.latency_s - self.recovered_at


def kill(mesh: LocalMesh, key: str) -> tuple[int, float]:
    """SIGKILL process ``key``: (its PID, when)."""
    pid = mesh.procs[key].pid
    os.kill(pid, signal.SIGKILL)
    return pid, time.monotonic()


def kill_in_flight(mesh: LocalMesh, key: str, local_cluster: str, timeout_s: float = 5.0) -> tuple[int, float, int]:
    """SIGKILL process ``key`` at a moment its sidecar has requests open to it (its local
    cluster's ``upstream_rq_active`` gauge above 0); (PID, when, requests open then)."""
    admin = mesh.admin_url(key)
    gauge = f"cluster.{local_cluster}.upstream_rq_active"
    deadline = time.monotonic() + timeout_s
    active = envoy_stat(admin, gauge)
    while active == 0 and time.monotonic() < deadline:
        active = envoy_stat(admin, gauge)
    pid, at = kill(mesh, key)
    return pid, at, active


def restart(mesh: LocalMesh, key: str, old_pid: int, healer: Healer | None, timeout_s: float = 60.0) -> float:
    """The killed process ready again: by ``healer`` (awaited) or by ``mesh.restart``; when."""
    if healer is None:
        mesh.restart(key)
    else:
        wait_until(lambda: any(r["key"] == key and r["pid"] == old_pid and r["new_pid"] for r in healer.restarts),
                   timeout_s, f"the healer to restart {key}")
    return time.monotonic()


def replica_killed(mesh: LocalMesh, headers: dict[str, str], runtime: str = "scikit") -> FaultRun:
    """One of two replicas of ``runtime`` gets SIGKILL while requests are open to it; then
    it leaves the registry when its heartbeats lapse, and is restarted (``mesh.restart``).
    Notes: requests open at the kill, Envoy retries and ejections, when it left the
    registry, when its new process first answered."""
    key = mesh.instances(runtime)[0]
    spec = mesh.runtime_instances[key]
    gateway_admin = mesh.admin_url("gateway")
    cluster = f"cluster.{runtime_cluster(runtime)}"
    old_id = instance_ids(mesh, runtime)[spec.public_port]
    ejections = envoy_stat(gateway_admin, f"{cluster}.outlier_detection.ejections_enforced_total")
    retries = envoy_stat(gateway_admin, f"{cluster}.upstream_rq_retry")
    with new_load(mesh, headers=headers) as load:
        load.wait_successes(100)
        pid, fault_at, active = kill_in_flight(mesh, key, "local_" + runtime)
        wait_until(lambda: old_id not in instance_ids(mesh, runtime).values(), 20, f"{key} to leave the registry")
        dropped_s = time.monotonic() - fault_at
        recovered_at = restart(mesh, key, pid, None)
        # it takes traffic again: its new process answers ModelInfer calls
        wait_until(lambda: runtime_inferences(spec.metrics_port) > 0, 15, f"{key} to take traffic again")
        serving_s = time.monotonic() - recovered_at
        load.wait_successes(50, since=time.monotonic())
    reset = envoy_stat(mesh.admin_url(key), f"cluster.local_{runtime}.upstream_rq_rx_reset") + envoy_stat(
        mesh.admin_url(key), f"cluster.local_{runtime}.upstream_cx_destroy_remote_with_active_rq")
    return FaultRun(f"1 of 2 runtime replicas ({key})", load, fault_at, recovered_at, {
        "requests_open_at_kill": active,
        "requests_reset_by_kill": reset,
        "envoy_retries": envoy_stat(gateway_admin, f"{cluster}.upstream_rq_retry") - retries,
        "ejections": envoy_stat(gateway_admin, f"{cluster}.outlier_detection.ejections_enforced_total") - ejections,
        "left_registry_s": dropped_s,
        "serving_again_s": serving_s,
    })


def only_replica_killed(mesh: LocalMesh, headers: dict[str, str], key: str, healer: Healer | None,
                        outage_failures: int = 50) -> FaultRun:
    """The only replica of a stage gets SIGKILL; ``outage_failures`` failed answers are
    awaited (without a healer), then it is restarted."""
    with new_load(mesh, headers=headers) as load:
        load.wait_successes(100)
        pid, fault_at = kill(mesh, key)
        if healer is None:
            wait_until(lambda: len(load.failures(fault_at)) >= outage_failures, 20, "requests to fail")
        recovered_at = restart(mesh, key, pid, healer)
        load.wait_successes(100, since=recovered_at)
    return FaultRun(f"only replica ({key})", load, fault_at, recovered_at)


def manager_killed(mesh: LocalMesh, headers: dict[str, str], down_s: float = 2.0) -> FaultRun:
    """The manager gets SIGKILL; stays down ``down_s`` (under load), then is restarted and
    every Envoy and gateway reconnects (awaited on the manager's ``/api/v1/mesh``)."""
    sidecars = sum(1 for key in mesh.procs if key.endswith("-sidecar"))
    gateways = len(mesh.gateway_instances)
    wait_until(lambda: mesh_converged(mesh, sidecars, gateways), 15, "the mesh to be in step before the fault")
    with new_load(mesh, headers=headers) as load:
        load.wait_successes(100)
        pid, fault_at = kill(mesh, "manager")
        load.wait_successes(50, since=fault_at)
        time.sleep(max(0.0, fault_at + down_s - time.monotonic()))  # the outage itself: load keeps running
        recovered_at = restart(mesh, "manager", pid, None)
        wait_until(lambda: mesh_converged(mesh, sidecars, gateways), 20, "every Envoy and gateway to reconnect")
        reconnected_s = time.monotonic() - recovered_at
        load.wait_successes(100, since=time.monotonic())
    return FaultRun("manager", load, fault_at, recovered_at, {"reconnected_s": reconnected_s})


def gateway_killed(mesh: LocalMesh, headers: dict[str, str], key: str, healer: Healer | None) -> FaultRun:
    """Gateway process ``key`` gets SIGKILL under load and is restarted (by ``healer``, else
    ``mesh.restart``). Notes: when its sidecar sent it requests again."""
    ports = mesh.gateway_instances[key]
    admin = mesh.admin_url("gateway")
    with new_load(mesh, headers=headers) as load:
        load.wait_successes(100)
        pid, fault_at = kill(mesh, key)
        if healer is None:
            load.wait_successes(20, since=fault_at) if len(mesh.gateway_instances) > 1 else \
                wait_until(lambda: len(load.failures(fault_at)) >= 20, 20, "requests to fail")
        recovered_at = restart(mesh, key, pid, healer)
        served = host_stat(admin, "local_gateway", ports.http, "rq_success")
        wait_until(lambda: host_stat(admin, "local_gateway", ports.http, "rq_success") > served, 15, f"{key} to take traffic again")
        serving_s = time.monotonic() - recovered_at
        load.wait_successes(100, since=time.monotonic())
    return FaultRun(f"gateway ({key}, {len(mesh.gateway_instances)} running)", load, fault_at, recovered_at,
                    {"serving_again_s": serving_s})


# --- the benchmark --------------------------------------------------------------------------


def _row(mesh: str, run: FaultRun) -> str:
    notes = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in run.notes.items())
    slowest = max((a.latency_s for a in run.failed), default=0.0) * 1000
    return (f"| {run.fault} | {mesh} | {run.sent} | {len(run.failed)} | {slowest:.0f} | {run.p99_during_ms:.1f} | "
            f"{run.recovered_at - run.fault_at:.2f} | {run.resumed_s():.3f} | {notes} |")


def main() -> None:
    runs: list[tuple[str, FaultRun]] = []
    with tempfile.TemporaryDirectory(prefix="sluice-faults-") as tmp:
        with fault_mesh(Path(tmp) / "one", replicas=1, secure=False) as one:
            create_iris(one)
            runs.append(("replicas=1", only_replica_killed(one, {}, "runtime-scikit", None)))
            runs.append(("replicas=1", gateway_killed(one, {}, "gateway", None)))
            runs.append(("replicas=1", manager_killed(one, {})))
        with fault_mesh(Path(tmp) / "two", replicas=2, secure=True) as two:
            create_iris(two)
            headers = serve_headers(two)
            runs.append(("replicas=2, secure", replica_killed(two, headers)))
            runs.append(("replicas=2, secure", manager_killed(two, headers)))
            healer = Healer(two, report=lambda message: None, initial_s=0.2, poll_s=0.05)
            with healer:
                runs.append(("replicas=2, secure", gateway_killed(two, headers, "gateway-1", healer)))
    print("8 client threads, iris pipeline (2 stages); 'during' = from the SIGKILL until the process is ready again\n")
    print("| fault (SIGKILL) | mesh | requests sent | failed | slowest failure (ms) | p99 during fault (ms) | down (s) "
          "| first answer after restart (s) | notes |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for mesh, run in runs:
        print(_row(mesh, run))
    for _, run in runs:
        if run.failed:
            kinds: dict[str, int] = {}
            for answer in run.failed:
                kinds[f"{answer.status} {answer.failure[:120]}"] = kinds.get(f"{answer.status} {answer.failure[:120]}", 0) + 1
            print(f"\n{run.fault}: failures by kind:")
            for kind, count in sorted(kinds.items(), key=lambda kv: -kv[1])[:5]:
                print(f"  {count} x {kind}")


if __name__ == "__main__":
    main()
