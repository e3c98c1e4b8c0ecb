"""Each stage's own ``timeout_ms`` on a real mesh (manager, gateway, Envoys, one scikit
runtime serving ``slow_echo``, which blocks its thread ``DELAY_S`` per call): a stage
that takes longer than its timeout answers 504 ``stage_timeout`` naming that stage,
whether its call stands alone (Envoy's route timeout) or is fused with its neighbour
(``sluice.fusion``: the run's route has the summed timeout, and the runtime ends the run
when one stage has overrun its own); a chain whose stages each finish in time answers.
"""

from __future__ import annotations

import httpx
import pytest

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.e2e.conftest import routes
from tests.e2e.slow_model import write_slow_echo

pytestmark = pytest.mark.e2e
#: each slow_echo call's time
DELAY_S = 0.3
#: a stage timeout far below it, and one far above it
SHORT_MS, LONG_MS = 100, 10_000


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    workdir = tmp_path_factory.mktemp("stage-timeouts")
    write_slow_echo(workdir / "models", delay_s=DELAY_S)  # the repository's first root
    mesh = LocalMesh(workdir, [RuntimeSpec("scikit", "scikit", ("slow_echo",))], MeshPorts.ephemeral())
    with mesh:
        yield mesh


def create(mesh: LocalMesh, name: str, timeouts: list[int], **extra) -> dict:
    """A chain of ``slow_echo`` stages, stage ``i`` with ``timeouts[i]``, each after the
    first reading the one before's ``y`` as its ``x``."""
    stages = [{"runtime": "scikit", "model": "slow_echo", "timeout_ms": t, **({"inputs": {"x": "y"}} if i else {}), **extra}
              for i, t in enumerate(timeouts)]
    created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "stages": stages}, timeout=30)
    assert created.status_code == 201, created.text
    return created.json()


def serve(mesh: LocalMesh, name: str) -> httpx.Response:
    return httpx.post(f"{mesh.gateway_url}/serve/{name}", json=[{"x": 1.5}], timeout=30)


def assert_timed_out_at(answer: httpx.Response, stage: int) -> None:
    assert answer.status_code == 504, answer.text
    error = answer.json()["error"]
    assert error["code"] == "stage_timeout" and error["details"]["stage"] == stage, error


def test_stages_within_their_timeouts_answer_fused(mesh):
    first = create(mesh, "in-time", [LONG_MS, LONG_MS])["stages"][0]
    assert f"{first['route']}+2" in routes(mesh)  # one fused call
    answer = serve(mesh, "in-time")
    assert answer.status_code == 200 and answer.json() == [{"y": 1.5}], answer.text


@pytest.mark.parametrize("slow_stage", [0, 1])
def test_a_fused_stage_past_its_own_timeout_is_a_504_naming_it(mesh, slow_stage):
    """The run's summed timeout (10.1 s) is far from reached: the runtime ends the run
    when the stage with 100 ms of its own has run longer than that."""
    timeouts = [LONG_MS, LONG_MS]
    timeouts[slow_stage] = SHORT_MS
    name = f"fused-late-{slow_stage}"
    first = create(mesh, name, timeouts)["stages"][0]
    assert f"{first['route']}+2" in routes(mesh)
    assert_timed_out_at(serve(mesh, name), slow_stage)


def test_a_lone_stage_past_its_timeout_is_a_504_naming_it(mesh):
    """With a policy of its own (retries) the second stage is not fused: Envoy's route
    timeout ends its call."""
    create(mesh, "apart-late", [LONG_MS, SHORT_MS], retries={"attempts": 1, "on": ["unavailable"]})
    first = create(mesh, "apart-check", [LONG_MS, LONG_MS], retries={"attempts": 1, "on": ["unavailable"]})["stages"][0]
    assert f"{first['route']}+2" not in routes(mesh)
    assert_timed_out_at(serve(mesh, "apart-late"), 1)
