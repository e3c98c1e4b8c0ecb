"""The healer's back-off, ordering and reporting, on fake processes and a fake clock."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from sluice.local.healer import Healer, exit_status, start_rank
from sluice.local.procs import StartError


class FakeProc:
    def __init__(self, name: str, pid: int):
        self.name, self.pid, self.log_path = name, pid, f"/logs/{name}.log"
        self.popen = SimpleNamespace(returncode=None)

    def alive(self) -> bool:
        return self.popen.returncode is None


class FakeMesh:
    def __init__(self, keys):
        self.pid = 100
        self.procs = {k: self._new(k) for k in keys}
        self.stopping = threading.Event()
        self.fail = 0
        self.order: list[str] = []

    def _new(self, key):
        self.pid += 1
        return FakeProc(key, self.pid)

    def restart(self, key):
        self.order.append(key)
        if self.fail:
            self.fail -= 1
            raise StartError("not ready")
        self.procs[key] = self._new(key)
        return self.procs[key]

    def abort(self):
        self.stopping.set()


def test_exit_status_names_the_signal():
    assert exit_status(-9) == "killed by SIGKILL (-9)"
    assert exit_status(3) == "exit status 3"


def test_restart_order_is_start_up_order():
    keys = ["gateway", "runtime-a-sidecar", "manager-sidecar", "runtime-a", "manager", "repository", "zipkin"]
    assert sorted(keys, key=start_rank) == ["zipkin", "manager", "manager-sidecar", "repository", "runtime-a",
                                            "runtime-a-sidecar", "gateway"]


def test_replicas_restart_in_start_up_order_with_their_service():
    keys = ["gateway-sidecar", "gateway-2", "runtime-a-2-sidecar", "gateway-1", "runtime-a-1", "manager", "runtime-a-2"]
    assert sorted(keys, key=start_rank) == ["manager", "runtime-a-1", "runtime-a-2", "runtime-a-2-sidecar",
                                            "gateway-1", "gateway-2", "gateway-sidecar"]


def test_back_off_doubles_on_failure_and_resets_after_a_stable_run():
    now = [0.0]
    mesh = FakeMesh(["manager", "runtime-a"])
    messages: list[str] = []
    healer = Healer(mesh, report=messages.append, initial_s=0.5, max_s=2.0, stable_s=10.0, clock=lambda: now[0])
    mesh.procs["runtime-a"].popen.returncode = -9
    mesh.procs["manager"].popen.returncode = 1
    healer.step()
    assert messages[0] == "manager (pid 101) exited: exit status 1; restarting in 0.5s (log /logs/manager.log)"
    assert messages[1].startswith("runtime-a (pid 102) exited: killed by SIGKILL (-9); restarting in 0.5s")
    healer.step()
    assert mesh.order == []  # the back-off is not over
    now[0] = 0.5
    mesh.fail = 1
    healer.step()
    assert mesh.order == ["manager", "runtime-a"]  # the manager first
    assert "manager: restart failed (not ready); next try in 1s" in messages
    assert healer.restarts[1]["new_pid"] == mesh.procs["runtime-a"].pid
    now[0] = 1.4
    healer.step()
    assert mesh.order == ["manager", "runtime-a"]
    now[0] = 1.5
    healer.step()
    assert mesh.order[-1] == "manager" and messages[-1] == f"manager restarted (pid {mesh.procs['manager'].pid})"
    # dies at once: the next back-off is longer (2s, capped)
    mesh.procs["manager"].popen.returncode = 1
    healer.step()
    assert messages[-1].startswith("manager (pid") and "restarting in 2s" in messages[-1]
    now[0] = 3.5
    healer.step()
    # stays up past stable_s, then dies: back to the initial back-off
    now[0] = 20.0
    mesh.procs["manager"].popen.returncode = -15
    healer.step()
    assert "killed by SIGTERM (-15); restarting in 0.5s" in messages[-1]


def test_stop_joins_the_thread_and_leaves_the_mesh_usable():
    mesh = FakeMesh(["manager"])
    healer = Healer(mesh, poll_s=0.01).start()
    healer.stop(timeout_s=5)
    assert healer._thread is None and not mesh.stopping.is_set()
