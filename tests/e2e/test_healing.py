"""The local mesh heals: a process killed with SIGKILL is restarted (logged with its exit
status), ready-checked as at start-up, and serving resumes. Real processes throughout;
every wait is bounded; the mesh fixture stops every process by PID."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from typer.testing import CliRunner

from sluice.cli import app as cli
from sluice.local.healer import Healer
from tests.conftest import eventually

pytestmark = pytest.mark.e2e
RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]


@pytest.fixture
def healer(mesh):
    messages: list[str] = []
    healer = Healer(mesh, report=messages.append, initial_s=0.2, poll_s=0.05)
    healer.messages = messages
    with healer:
        yield healer


def serves(gateway: httpx.Client) -> bool:
    try:
        response = gateway.post("/serve/iris", json=RECORD, timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()[0]["label"] == "virginica"


def kill_and_await_restart(mesh, healer: Healer, key: str, timeout_s: float = 90) -> dict:
    old_pid = mesh.procs[key].pid
    os.kill(old_pid, signal.SIGKILL)
    try:
        eventually(lambda: any(r["key"] == key and r["pid"] == old_pid and r["new_pid"] for r in healer.restarts),
                   timeout_s=timeout_s, interval_s=0.05)
    except AssertionError as exc:
        raise AssertionError(f"{key} was not restarted: {healer.messages}\n{mesh.procs[key].log_tail()}") from exc
    record = next(r for r in healer.restarts if r["key"] == key and r["pid"] == old_pid)
    assert record["returncode"] == -signal.SIGKILL and record["new_pid"] != old_pid
    assert mesh.procs[key].pid == record["new_pid"] and mesh.procs[key].alive()
    assert any(m.startswith(f"{key} (pid {old_pid}) exited: killed by SIGKILL (-9)") for m in healer.messages), healer.messages
    assert f"{key} restarted (pid {record['new_pid']})" in healer.messages
    return record


def test_killed_runtime_is_restarted_registers_and_serves(mesh, manager, gateway, iris, healer):
    assert serves(gateway)
    before = {i["id"] for i in manager.get("/api/v1/runtimes/scikit").json()["instances"]}
    kill_and_await_restart(mesh, healer, "runtime-scikit")
    # the restart waited for a new registration: the new instance is listed and healthy
    instances = manager.get("/api/v1/runtimes/scikit").json()["instances"]
    new = [i for i in instances if i["id"] not in before]
    assert new and all(i["healthy"] for i in new)
    eventually(lambda: serves(gateway), timeout_s=10)


def test_killed_gateway_sidecar_is_restarted_and_serving_resumes(mesh, gateway, iris, healer):
    eventually(lambda: serves(gateway), timeout_s=10)
    kill_and_await_restart(mesh, healer, "gateway-sidecar")
    eventually(lambda: serves(gateway), timeout_s=10)
    # the other processes were left alone
    assert [r["key"] for r in healer.restarts] == ["gateway-sidecar"]
    assert all(p.alive() for p in mesh.procs.values())


def test_status_shows_a_dead_instance_unhealthy(mesh, manager, gateway, iris):
    """No healer here: the killed instance stays registered until its heartbeats lapse,
    and meanwhile the manager's live health check, and ``sluice status``, call it unhealthy."""
    pid = mesh.procs["runtime-scikit"].pid
    os.kill(pid, signal.SIGKILL)
    try:
        def unhealthy_listed() -> bool:
            instances = manager.get("/api/v1/runtimes/scikit").json()["instances"]
            return bool(instances) and not any(i["healthy"] for i in instances)

        eventually(unhealthy_listed, timeout_s=3)
        result = CliRunner().invoke(cli, ["status", "--manager", mesh.manager_url, "--gateway", mesh.gateway_url],
                                    env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        # the instance may expire between the two calls: then none is registered
        assert "1 unhealthy" in result.output or "none registered" in result.output, result.output
        # every sidecar's xDS connection (the runtime's stays up: only its process died) and the gateway
        assert "sidecars" in result.output and "runtime-scikit" in result.output, result.output
        assert "disconnected" not in result.output, result.output
        assert "gateway processes following the pipeline feed: 1" in result.output, result.output
    finally:
        new = mesh.restart("runtime-scikit")  # the same start-up path and ready-checks
    assert new.pid != pid
    eventually(lambda: serves(gateway), timeout_s=10)
    instances = manager.get("/api/v1/runtimes/scikit").json()["instances"]
    assert any(i["healthy"] for i in instances)
