"""The mesh under change and failure: config churn under load, manager restart, a dead runtime."""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import eventually
from tests.e2e.conftest import IRIS_CHAIN

pytestmark = pytest.mark.e2e
RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]


class Load:
    """Steady sequential requests on one pipeline from a background thread."""

    def __init__(self, url: str, pipeline: str):
        self.url, self.pipeline = url, pipeline
        self.statuses: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"/serve/{self.pipeline}", json=RECORD)
                    self.statuses[response.status_code] += 1
                    if response.status_code != 200 or response.json()[0]["label"] != "virginica":
                        self.failures.append(response.text[:200])
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def test_churn_under_load_loses_no_request(mesh, manager, iris):
    stages_form = {"name": "churn", "stages": [{"runtime": "scikit", "model": "iris_scaler", "timeout_ms": 2000},
                                               {"runtime": "scikit", "model": "iris_classifier"}]}
    with Load(mesh.gateway_url, "iris") as load:
        eventually(lambda: load.statuses[200] > 0, timeout_s=5)
        for i in range(20):
            assert manager.post("/api/v1/pipelines", json={"name": "churn", "chain": IRIS_CHAIN}).status_code == 201
            assert manager.put("/api/v1/pipelines/churn", json=stages_form).status_code == 200
            assert manager.delete("/api/v1/pipelines/churn").status_code == 204
            # blue/green on the loaded pipeline itself: every replace makes a new revision
            replaced = manager.put("/api/v1/pipelines/iris", json={"name": "iris", "chain": IRIS_CHAIN})
            assert replaced.status_code == 200 and replaced.json()["revision"] == i + 2
    assert load.failures == []
    assert set(load.statuses) == {200} and load.statuses[200] > 50
    mesh_state = manager.get("/api/v1/mesh").json()
    assert mesh_state["nacks"] == 0
    # only the live revision's routes remain (each stage's and the fused run's, sluice.fusion),
    # in the pipeline's route scope; churn's scope is gone

    def routes() -> tuple[set[str], set[str]]:
        dump = httpx.get(f"{mesh.admin_url('gateway')}/config_dump?resource=dynamic_scoped_route_configs", timeout=5).json()
        scopes = [s for c in dump["configs"] for s in c.get("scoped_route_configs", [])]
        names = {r.get("name") for s in scopes for vh in s["route_configuration"]["virtual_hosts"] for r in vh["routes"]}
        return {n for n in names if n and n.startswith("iris.")}, {s["name"] for s in scopes}

    eventually(lambda: routes() == ({"iris.r21.s0", "iris.r21.s1", "iris.r21.s0+2"}, {"egress.iris"}), timeout_s=5)


def test_manager_down_keeps_serving_and_restart_keeps_pipelines(mesh, manager, gateway, iris):
    before = manager.get("/api/v1/pipelines").json()
    mesh.stop_manager()
    # Envoy keeps its last configuration and the gateway its last pipeline set
    for _ in range(20):
        assert gateway.post("/serve/iris", json=RECORD).status_code == 200
    mesh.restart_manager()
    after = manager.get("/api/v1/pipelines").json()
    assert [(p["name"], p["revision"], p["stages"]) for p in after] == [(p["name"], p["revision"], p["stages"]) for p in before]
    # the restarted manager drives the mesh again: a new pipeline goes live
    assert manager.post("/api/v1/pipelines", json={"name": "after-restart", "chain": IRIS_CHAIN}).status_code == 201
    eventually(lambda: gateway.post("/serve/after-restart", json=RECORD).status_code == 200, timeout_s=5)
    assert gateway.post("/serve/iris", json=RECORD).status_code == 200


def test_dead_runtime_gives_a_quick_clean_503(mesh, manager, gateway, iris):
    mesh.stop_runtime("scikit")
    started = time.monotonic()
    response = gateway.post("/serve/iris", json=RECORD)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["details"]["stage"] == 0 and error["details"]["stage_name"] == "scikit/iris_scaler"
    assert "stage 0" in error["message"]
    assert elapsed < 2.0
    # missed heartbeats take the endpoint out of Envoy; answers stay a clean 503
    eventually(lambda: not manager.get("/api/v1/runtimes/scikit").json()["instances"], timeout_s=10)
    assert gateway.post("/serve/iris", json=RECORD).status_code == 503
    # the runtime comes back: it registers again and serving resumes
    mesh.start_runtime("scikit")
    eventually(lambda: gateway.post("/serve/iris", json=RECORD).status_code == 200, timeout_s=10)
