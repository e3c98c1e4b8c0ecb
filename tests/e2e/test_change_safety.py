"""Pipeline changes are safe on a real mesh (real Envoys, manager, gateway, runtimes):

- replaces under 8 concurrent clients whose requests outlive the manager's ACK timeout
  lose no request: old routes go only after the gateway drained the old revision;
- an ACK timeout (the gateway's sidecar Envoy, or the gateway, SIGSTOPped) or a NACK (a
  real Envoy rejecting a route, through the manager's test-only fault hook) rolls the
  change back and answers a JSON error naming the node (and Envoy's reason);
- 50 SIGKILLs of the manager during create/replace/delete churn: after each restart the
  store, the gateway sidecar's routes and the gateway's pipelines agree, and no
  pipeline whose DELETE returned 204 comes back.

The helpers (``Load``, ``mesh_view``, ``kill_manager_during_churn``) are shared with
``bench/change_safety.py``.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from runtimes.sleeper.model import write_model
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from bench.load import Load
from tests.conftest import STORE, eventually
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e

ACK_TIMEOUT_S = 1.0
#: two stages of 800 ms: a request takes 1.6 s, longer than the ACK timeout, and its
#: second stage call starts 0.8 s in, so routes withdrawn early would fail it
SLOW_CHAIN = ["sleeper/slow_a", "sleeper/slow_b"]
STAGE_SLEEP_MS = 800
#: the manager's test-only fault hook makes revision 2 of this pipeline invalid for Envoy
NACKED = "nacked"
IRIS_RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]


def make_mesh(workdir: Path) -> LocalMesh:
    """The mesh of these tests (not started): the iris scikit runtime and the sleeper
    runtime's two slow models, a 1 s ACK timeout, and the NACK fault on ``nacked@2``."""
    sleepers = workdir / "sleepers"
    write_model(sleepers, "slow_a", STAGE_SLEEP_MS, input="x", output="y")
    write_model(sleepers, "slow_b", STAGE_SLEEP_MS, input="y", output="z")
    (workdir / "models").mkdir()
    return LocalMesh(
        workdir,
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier")), RuntimeSpec("sleeper", "sleeper", ("slow_a", "slow_b"))],
        MeshPorts.ephemeral(),
        env={
            "SLUICE_MANAGER_ACK_TIMEOUT_S": str(ACK_TIMEOUT_S),
            "SLUICE_MANAGER_FAULT_NACK_REVISIONS": f"{NACKED}@2",
            "SLUICE_REPOSITORY_ROOTS": f"{workdir / 'models'}:{sleepers}:{STORE}",
            # stage calls one by one (no sluice.fusion): the second stage's call must
            # still find its route 0.8 s into a request
            "SLUICE_GATEWAY_FUSE_STAGES": "false",
        },
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    with make_mesh(tmp_path_factory.mktemp("change-safety")) as mesh:
        yield mesh


# --- helpers (also used by bench/change_safety.py)
def is_virginica(body) -> bool:
    return body[0]["label"] == "virginica"


def scoped_routes(mesh: LocalMesh) -> dict[str, set[str]]:
    """What the gateway's sidecar Envoy holds: pipeline scope -> its route names."""
    dump = httpx.get(f"{mesh.admin_url('gateway')}/config_dump?resource=dynamic_scoped_route_configs", timeout=5).json()
    scopes = [s for c in dump["configs"] for s in c.get("scoped_route_configs", [])]
    return {
        s["name"]: {r["name"] for vh in s["route_configuration"]["virtual_hosts"] for r in vh["routes"] if r.get("name") != "unknown-stage"}
        for s in scopes
    }


def stored(mesh: LocalMesh) -> dict[str, int]:
    """The manager's pipelines (its store, as the restarted manager read it): name -> revision."""
    response = httpx.get(f"{mesh.manager_url}/api/v1/pipelines", timeout=5)
    response.raise_for_status()
    return {p["name"]: p["revision"] for p in response.json()}


def served(mesh: LocalMesh, names: set[str], bodies: dict[str, str] | None = None) -> dict[str, int]:
    """Which of ``names`` the gateway serves (status of one iris request each); the bodies
    of answers other than 200 and 404 go to ``bodies``."""
    statuses = {}
    with httpx.Client(base_url=mesh.gateway_url, timeout=5) as client:
        for name in sorted(names):
            response = client.post(f"/serve/{name}", json=IRIS_RECORD)
            statuses[name] = response.status_code
            if bodies is not None and response.status_code not in (200, 404):
                bodies[name] = response.text[:300]
    return statuses


def fused_and_stage_routes(name: str, revision: int) -> set[str]:
    """A two-stage pipeline's routes: one per stage, and its fused run's (``sluice.fusion``)."""
    return {f"{name}.r{revision}.s0", f"{name}.r{revision}.s1", f"{name}.r{revision}.s0+2"}


def disagreement(mesh: LocalMesh, known: set[str], half_made: list[str] | None = None) -> str | None:
    """None when store, Envoy and gateway agree on the pipelines (of ``known`` names):
    every stored pipeline has exactly its revision's routes and is served (200), and
    every other name has no routes and answers 404; else what differs. A gateway answer
    other than 200 or 404 (a pipeline served without its routes: a half-made one) is
    also noted in ``half_made``, however soon it is over."""
    pipelines = {name: rev for name, rev in stored(mesh).items() if name in known}
    expected = {f"egress.{name}": fused_and_stage_routes(name, rev) for name, rev in pipelines.items()}
    routes = {scope: names for scope, names in scoped_routes(mesh).items() if scope.removeprefix("egress.") in known}
    if routes != expected:
        return f"store {pipelines} but Envoy routes {routes}"
    bodies: dict[str, str] = {}
    statuses = served(mesh, known, bodies)
    if half_made is not None:
        half_made.extend(f"{n} answered {statuses[n]} ({body[:120]}) with store {pipelines.get(n)} and Envoy "
                         f"{sorted(scoped_routes(mesh).get(f'egress.{n}', ()))}" for n, body in bodies.items())
    wrong = {n: s for n, s in statuses.items() if s != (200 if n in pipelines else 404)}
    return f"store {pipelines} but the gateway answers {wrong}" if wrong else None


@dataclass
class KillStats:
    kills: int = 0
    restart_s: list[float] = field(default_factory=list)  # SIGKILL to serving again (mesh.restart's ready-checks)
    settle_s: list[float] = field(default_factory=list)  # restart to store, Envoy and gateway agreeing
    changes_confirmed: int = 0
    #: gateway answers other than 200 and 404 while waiting for agreement
    half_made: list[str] = field(default_factory=list)
    #: restarts that found a change cut short and finished it (the manager's log says so)
    recoveries: int = 0
    disagreements: list[str] = field(default_factory=list)


def kill_manager_during_churn(mesh: LocalMesh, kills: int, seed: int = 11, settle_s: float = 15.0) -> KillStats:
    """SIGKILL the manager ``kills`` times, each at a random moment of a random change
    (create a new name, replace, delete), restart it, and wait for the store, the
    gateway sidecar's routes and the gateway to agree (``settle_s`` at most each time).
    Names are never reused, so a pipeline whose DELETE returned 204 must stay gone."""
    rng = random.Random(seed)
    stats = KillStats()
    log = mesh.workdir / "logs" / "manager.log"
    recovered_before = _recoveries(log)
    known: set[str] = set()
    deleted: set[str] = set()  # DELETE answered 204
    counter = 0
    change_s = 0.3  # how long a change takes, learnt from those that finish before their kill
    with httpx.Client(base_url=mesh.manager_url, timeout=10) as client:
        for _ in range(kills):
            # a restarted manager takes changes once a gateway is back on its feed: wait for
            # that, so that the kill falls inside the change rather than before it
            eventually(lambda: client.get("/healthz").json()["xds"]["gateways"] >= 1, timeout_s=settle_s)
            live = sorted(n for n in stored(mesh) if n in known)
            op = "create" if len(live) < 2 else rng.choice(["create", "replace", "delete"] if len(live) < 5 else ["replace", "delete"])
            if op == "create":
                counter += 1
                name = f"k{counter}"
                known.add(name)
                call = lambda n=name: client.post("/api/v1/pipelines", json={"name": n, "chain": IRIS_CHAIN})
            elif op == "replace":
                name = rng.choice(live)
                call = lambda n=name: client.put(f"/api/v1/pipelines/{n}", json={"name": n, "chain": IRIS_CHAIN})
            else:
                name = rng.choice(live)
                call = lambda n=name: client.delete(f"/api/v1/pipelines/{n}")
            answer: list[int] = []

            def change(call=call) -> None:
                try:
                    answer.append(call().status_code)
                except httpx.HTTPError:
                    answer.append(0)

            worker = threading.Thread(target=change)
            started = time.monotonic()
            worker.start()
            time.sleep(rng.uniform(0.0, change_s))  # any moment of the change, any of its steps
            manager = mesh.procs["manager"]
            os.kill(manager.pid, signal.SIGKILL)
            manager.popen.wait(10)
            stats.kills += 1
            worker.join(15)
            if answer and answer[0]:  # it finished before the kill: the next kill comes sooner
                change_s = max(0.02, min(change_s, time.monotonic() - started))
            started = time.monotonic()
            mesh.restart("manager")
            stats.restart_s.append(time.monotonic() - started)
            if answer and answer[0] in (200, 201, 204):
                stats.changes_confirmed += 1
                if op == "delete":
                    deleted.add(name)
            half_made: list[str] = []
            try:
                stats.settle_s.append(eventually(lambda: disagreement(mesh, known, half_made) is None, timeout_s=settle_s, interval_s=0.1))
            except AssertionError:
                stats.disagreements.append(f"after killing a {op} of {name}: {disagreement(mesh, known)}")
            stats.half_made.extend(f"after killing a {op} of {name} ({answer}): {line}" for line in half_made[:2])
            back = deleted & set(stored(mesh))
            if back:
                stats.disagreements.append(f"deleted (204) pipelines came back: {sorted(back)}")
    stats.recoveries = _recoveries(log) - recovered_before
    return stats


def _recoveries(log: Path) -> int:
    return log.read_text(errors="replace").count("finishing the change a previous manager began") if log.exists() else 0


def replace_under_slow_load(mesh: LocalMesh, replaces: int, clients: int = 8) -> tuple[Load, list[float], list[str]]:
    """Create pipeline ``slow`` (two 0.8 s stages) and replace it ``replaces`` times while
    ``clients`` clients keep requests in flight; the load, each replace's duration, and
    the replaces that did not answer 200 at the next revision."""
    manager = httpx.Client(base_url=mesh.manager_url, timeout=60)
    created = manager.post("/api/v1/pipelines", json={"name": "slow", "chain": SLOW_CHAIN})
    assert created.status_code == 201, created.text
    took, wrong = [], []
    with Load(mesh.gateway_url, "slow", [{"x": 2.5}], lambda r: r.json() == [{"z": 2.5}], clients=clients, timeout_s=30) as load:
        eventually(lambda: len(load.answers) >= clients, timeout_s=15)
        for i in range(replaces):
            started = time.monotonic()
            replaced = manager.put("/api/v1/pipelines/slow", json={"name": "slow", "chain": SLOW_CHAIN})
            took.append(time.monotonic() - started)
            if replaced.status_code != 200 or replaced.json()["revision"] != i + 2:
                wrong.append(replaced.text[:300])
    return load, took, wrong


# --- the tests
def test_twenty_replaces_under_slow_requests_lose_no_request(mesh):
    """8 clients keep 1.6 s requests (over the 1 s ACK timeout) in flight on a two-stage
    pipeline while it is replaced 20 times: no request fails, because each replace waits
    for the gateway to drain the old revision before its routes go."""
    load, took, wrong = replace_under_slow_load(mesh, 20)
    assert wrong == []
    assert load.failures() == [], load.failures()[:3]
    assert set(load.statuses()) == {200} and len(load.answers) >= 40
    # replaces waited for drains longer than the ACK timeout, and went on (no rollback)
    assert max(took) > ACK_TIMEOUT_S
    eventually(lambda: scoped_routes(mesh).get("egress.slow") == fused_and_stage_routes("slow", 21), timeout_s=5)


def test_ack_timeout_rolls_the_change_back(mesh):
    """The gateway's sidecar Envoy is SIGSTOPped during a replace: the call answers 504
    change_timeout naming it, and once it runs again it holds only the old revision's
    routes, which keep serving; the next replace goes through."""
    manager = httpx.Client(base_url=mesh.manager_url, timeout=30)
    assert manager.post("/api/v1/pipelines", json={"name": "stalled", "chain": IRIS_CHAIN}).status_code == 201
    eventually(lambda: served(mesh, {"stalled"}) == {"stalled": 200}, timeout_s=5)
    sidecar = mesh.procs["gateway-sidecar"]
    os.kill(sidecar.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        response = manager.put("/api/v1/pipelines/stalled", json={"name": "stalled", "chain": IRIS_CHAIN})
        elapsed = time.monotonic() - started
    finally:
        os.kill(sidecar.pid, signal.SIGCONT)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "change_timeout" and error["details"]["step"] == "routes"
    assert error["details"]["nodes"] == ["gateway"] and "gateway" in error["message"]
    assert elapsed < ACK_TIMEOUT_S + 5
    assert stored(mesh)["stalled"] == 1
    eventually(lambda: scoped_routes(mesh).get("egress.stalled") == fused_and_stage_routes("stalled", 1), timeout_s=10)
    assert served(mesh, {"stalled"}) == {"stalled": 200}
    again = manager.put("/api/v1/pipelines/stalled", json={"name": "stalled", "chain": IRIS_CHAIN})
    assert again.status_code == 200 and again.json()["revision"] == 2, again.text
    assert scoped_routes(mesh)["egress.stalled"] == fused_and_stage_routes("stalled", 2)


def test_a_silent_gateway_rolls_the_change_back(mesh):
    """The gateway process is SIGSTOPped during a replace: its sidecar takes the new routes
    but the gateway never confirms, so the call answers 504 change_timeout (step gateways)
    naming it; the store keeps revision 1, which the gateway serves once it runs again, and
    the next replace goes through."""
    manager = httpx.Client(base_url=mesh.manager_url, timeout=30)
    assert manager.post("/api/v1/pipelines", json={"name": "unheard", "chain": IRIS_CHAIN}).status_code == 201
    gateway = mesh.procs["gateway"]
    os.kill(gateway.pid, signal.SIGSTOP)
    try:
        response = manager.put("/api/v1/pipelines/unheard", json={"name": "unheard", "chain": IRIS_CHAIN})
    finally:
        os.kill(gateway.pid, signal.SIGCONT)
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "change_timeout" and error["details"]["step"] == "gateways"
    assert error["details"]["nodes"] == ["gateway"]
    assert stored(mesh)["unheard"] == 1
    # the gateway catches up with the rollback; revision 2's routes stay until it confirmed
    eventually(lambda: served(mesh, {"unheard"}) == {"unheard": 200}, timeout_s=10)
    again = manager.put("/api/v1/pipelines/unheard", json={"name": "unheard", "chain": IRIS_CHAIN})
    assert again.status_code == 200 and again.json()["revision"] == 2, again.text
    assert scoped_routes(mesh)["egress.unheard"] == fused_and_stage_routes("unheard", 2)
    assert served(mesh, {"unheard"}) == {"unheard": 200}


def test_nack_rolls_the_change_back_with_envoys_reason(mesh):
    """Envoy rejects revision 2's routes (an invalid regex, from the test-only fault hook):
    the replace answers 502 change_rejected with the node and Envoy's reason, and revision
    1 stays stored, routed and served."""
    manager = httpx.Client(base_url=mesh.manager_url, timeout=30)
    assert manager.post("/api/v1/pipelines", json={"name": NACKED, "chain": IRIS_CHAIN}).status_code == 201
    with Load(mesh.gateway_url, NACKED, IRIS_RECORD, lambda r: is_virginica(r.json()), clients=2, timeout_s=30) as load:
        eventually(lambda: len(load.answers) >= 2, timeout_s=5)
        response = manager.put(f"/api/v1/pipelines/{NACKED}", json={"name": NACKED, "chain": IRIS_CHAIN})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert error["code"] == "change_rejected"
    details = error["details"]
    assert details["node"] == "gateway" and details["type"] == "ScopedRouteConfiguration"
    assert "fault-injected" in details["reason"] and details["reason"] in error["message"]
    assert stored(mesh)[NACKED] == 1
    eventually(lambda: scoped_routes(mesh).get(f"egress.{NACKED}") == fused_and_stage_routes(NACKED, 1), timeout_s=5)
    assert load.failures() == [] and len(load.answers) > 0
    assert served(mesh, {NACKED}) == {NACKED: 200}


#: 50 as issue #11 asks; each costs a manager start (about 2-3 s on 2 idle cores)
KILLS = int(os.environ.get("SLUICE_TEST_MANAGER_KILLS", "50"))


@pytest.mark.timeout(max(300, KILLS * 12))
def test_fifty_manager_kills_during_churn_leave_store_envoy_and_gateway_agreeing(mesh):
    """SIGKILL the manager at random moments of create/replace/delete calls, 50 times: after
    each restart the store, the gateway sidecar's routes and the gateway's pipelines agree
    (a change cut short is finished from its intent), and no pipeline deleted with a 204
    comes back."""
    stats = kill_manager_during_churn(mesh, kills=KILLS)
    assert stats.kills == KILLS
    assert stats.disagreements == []
    assert stats.half_made == []
    assert 0 < stats.changes_confirmed < KILLS  # some kills came before the answer, some after
    assert stats.recoveries > 0  # some came between a change's first step and its last
