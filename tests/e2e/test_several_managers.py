"""Two managers on one real PostgreSQL database (``SLUICE_MANAGER_DB_URL``), real Envoys,
with each phase of a change confirmed by both managers (``ControlPlane._everywhere``):

- manager 1 is the mesh's own: the gateway *process* (its pipeline feed), the manager's
  and the repository's sidecars connect to it; manager 2 (``sluice.local.managers``,
  started first) serves the gateway's *sidecar* and the scikit runtime's sidecar. So a
  gateway and its own sidecar follow different managers (as a Kubernetes Service in
  front of several managers may arrange);
- a pipeline created through manager 2 is served through the gateway within one second;
- 10 replaces, alternately through manager 1 and manager 2, while 8 clients keep
  requests running lose no request: no gateway switches before its sidecar (on the
  other manager) confirmed the new routes, and no route goes before the gateway
  confirmed the switch;
- a replace through manager 1 that the gateway's sidecar NACKs on manager 2 (the
  test-only ``SLUICE_MANAGER_FAULT_NACK_REVISIONS``, set on manager 2 only) answers 502
  ``change_rejected`` naming manager 2 and the node, and is rolled back on both
  managers, under load, without a failed request;
- manager 2 SIGKILLed under load: no request fails; a change through manager 1 waits
  for manager 2 no longer than its heartbeat TTL; manager 2 restarted on its ports gets
  its sidecars back, and the change made meanwhile serves.

The PostgreSQL server runs as the unprivileged ``nobody`` user in a temporary directory
(``sluice.local.postgres``) and every process is stopped by PID at the end.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from bench.load import Load
from sluice.local import postgres
from sluice.local.managers import manager_id, start_manager, two_manager_mesh
from sluice.local.mesh import RuntimeSpec
from tests.conftest import eventually
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e

IRIS_RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]
PEER_TTL_S = 2.0
#: manager 2 makes revision 2 of pipeline "nacked" invalid, so the gateway's sidecar NACKs it
NACKED = "nacked"


def virginica(response: httpx.Response) -> bool:
    return response.json()[0]["label"] == "virginica"


@pytest.fixture(scope="module")
def two_managers(tmp_path_factory, model_store):
    if not postgres.available():
        pytest.skip("PostgreSQL's server binaries (initdb, postgres) are not on PATH")
    runtimes = [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))]
    workdir = tmp_path_factory.mktemp("several-managers")
    env = {"SLUICE_MANAGER_ACK_TIMEOUT_S": "2", "SLUICE_MANAGER_PEER_TTL_S": str(PEER_TTL_S)}
    with two_manager_mesh(workdir, runtimes, ("runtime-scikit", "gateway"), env,
                          second_env={"SLUICE_MANAGER_FAULT_NACK_REVISIONS": f"{NACKED}@2"}) as (mesh, second, url):
        yield mesh, second, workdir, url, env


def xds_nodes(url: str) -> int:
    return httpx.get(f"{url}/healthz", timeout=5).json()["xds"]["nodes"]


def revision(url: str, name: str) -> int:
    return httpx.get(f"{url}/api/v1/pipelines/{name}", timeout=5).json()["revision"]


def create_and_serve(mesh, through: str, name: str) -> None:
    created = httpx.post(f"{through}/api/v1/pipelines", json={"name": name, "chain": IRIS_CHAIN}, timeout=30)
    assert created.status_code == 201, created.text
    with httpx.Client(base_url=mesh.gateway_url, timeout=5) as gateway:
        eventually(lambda: gateway.post(f"/serve/{name}", json=IRIS_RECORD).status_code == 200, timeout_s=2.0)


def test_the_gateway_follows_manager_1_and_its_sidecar_manager_2(two_managers):
    mesh, second, *_ = two_managers
    # manager 2: the runtime's and the gateway's sidecars; manager 1: the manager's and repository's
    assert xds_nodes(second.url) == 2
    assert xds_nodes(f"http://127.0.0.1:{mesh.ports.manager_local}") == 2
    # the runtime registered through manager 1; manager 2 lists it from the shared store
    eventually(lambda: httpx.get(f"{second.url}/api/v1/runtimes/scikit", timeout=5).status_code == 200, timeout_s=5)


def test_a_pipeline_created_through_manager_2_serves_through_the_gateway_within_one_second(two_managers):
    mesh, second, *_ = two_managers
    created = httpx.post(f"{second.url}/api/v1/pipelines", json={"name": "iris2", "chain": IRIS_CHAIN}, timeout=30)
    assert created.status_code == 201, created.text
    with httpx.Client(base_url=mesh.gateway_url, timeout=5) as gateway:
        took = eventually(lambda: gateway.post("/serve/iris2", json=IRIS_RECORD).status_code == 200, timeout_s=1.0)
        assert virginica(gateway.post("/serve/iris2", json=IRIS_RECORD))
    print(f"created through manager 2, served through the gateway {took * 1000:.0f} ms after the answer")
    assert revision(mesh.manager_url, "iris2") == 1  # manager 1 lists it at the same revision


def test_replaces_through_either_manager_under_8_clients_lose_no_request_with_gateway_and_sidecar_apart(two_managers):
    mesh, second, *_ = two_managers
    create_and_serve(mesh, second.url, "busy")
    with Load(mesh.gateway_url, "busy", IRIS_RECORD, virginica, clients=8) as load:
        load.wait_successes(16, timeout_s=15)
        for i in range(10):
            through = mesh.manager_url if i % 2 == 0 else second.url
            replaced = httpx.put(f"{through}/api/v1/pipelines/busy", json={"name": "busy", "chain": IRIS_CHAIN}, timeout=30)
            # answered only once both managers confirmed every phase: both list the new revision
            assert replaced.status_code == 200 and replaced.json()["revision"] == i + 2, replaced.text
            assert revision(mesh.manager_url, "busy") == revision(second.url, "busy") == i + 2
        load.wait_successes(16, since=time.monotonic(), timeout_s=15)
    assert load.failures() == [], load.failures()[:3]
    assert load.successes() >= 32


def test_a_nack_on_manager_2s_node_rolls_back_a_change_made_through_manager_1_everywhere(two_managers):
    mesh, second, *_ = two_managers
    create_and_serve(mesh, mesh.manager_url, NACKED)
    with Load(mesh.gateway_url, NACKED, IRIS_RECORD, virginica, clients=8) as load:
        load.wait_successes(16, timeout_s=15)
        refused = httpx.put(f"{mesh.manager_url}/api/v1/pipelines/{NACKED}", json={"name": NACKED, "chain": IRIS_CHAIN}, timeout=30)
        assert refused.status_code == 502, refused.text
        error = refused.json()["error"]
        assert error["code"] == "change_rejected", error
        assert error["details"]["manager"] == second.manager_id and error["details"]["node"] == "gateway", error
        assert error["details"]["phase"] == "routes_added"
        load.wait_successes(16, since=time.monotonic(), timeout_s=15)
    assert load.failures() == [], load.failures()[:3]
    # rolled back on both managers: revision 1 everywhere, and revision 2 is free for the next change
    assert revision(mesh.manager_url, NACKED) == revision(second.url, NACKED) == 1
    with httpx.Client(base_url=mesh.gateway_url, timeout=5) as gateway:
        assert virginica(gateway.post(f"/serve/{NACKED}", json=IRIS_RECORD))


def test_manager_2_killed_under_load_blocks_changes_at_most_its_heartbeat_ttl_then_comes_back(two_managers):
    mesh, second, workdir, url, env = two_managers
    with Load(mesh.gateway_url, "busy", IRIS_RECORD, virginica, clients=8) as load:
        load.wait_successes(16, timeout_s=15)
        killed_at = time.monotonic()
        os.kill(second.proc.pid, signal.SIGKILL)
        second.proc.popen.wait(10)
        # a new pipeline through manager 1: it waits for manager 2 until its heartbeat expires, no longer
        created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "after-kill", "chain": IRIS_CHAIN}, timeout=30)
        took = time.monotonic() - killed_at
        assert created.status_code == 201, created.text
        print(f"change through manager 1 answered {took:.2f}s after manager 2 was killed (heartbeat TTL {PEER_TTL_S}s)")
        assert took < PEER_TTL_S + 2.0 + 1.0  # within the TTL (plus the ACK timeout), not the 504 bound
        load.wait_successes(16, since=time.monotonic(), timeout_s=15)
        # manager 2 back on its ports: its sidecars reconnect and get the store's state
        again = start_manager(mesh.supervisor, "manager-2", workdir, url, env, ports=(second.rest_port, second.xds_port))
        eventually(lambda: xds_nodes(again.url) == 2, timeout_s=15)
        with httpx.Client(base_url=mesh.gateway_url, timeout=5) as gateway:
            eventually(lambda: gateway.post("/serve/after-kill", json=IRIS_RECORD).status_code == 200, timeout_s=5.0)
        load.wait_successes(16, since=time.monotonic(), timeout_s=15)
    assert load.failures() == [], load.failures()[:3]
    assert manager_id(again.rest_port) == second.manager_id
