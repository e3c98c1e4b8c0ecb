"""schemathesis against the gateway's and the manager's OpenAPI, on a real mesh.

A real mesh (manager, repository, scikit runtime, gateway, each with its Envoy sidecar)
serves the ``iris`` pipeline; the ``st`` CLI fuzzes each service's OpenAPI with every
check it has (``--checks all``: no server error, status codes / content types / headers
/ bodies as documented, schema-valid requests accepted and invalid ones refused, 405s
with ``Allow``...) plus two of ours (tests/integration/openapi_fuzz_checks.py): every
error in the project's JSON error shape, and no schema-valid request refused by the
service's own validation. A bounded number of examples per operation, a fixed seed
(``SLUICE_FUZZ_SEED`` changes it, ``SLUICE_FUZZ_EXAMPLES`` the count).

The fuzzer talks to each process on its local port, behind its sidecar: the OpenAPI
documents the process (Envoy answers an unknown method such as ``QUERY`` with its own
400 before any service sees it). The gateway's document lists ``POST /serve/iris`` with
the records the pipeline's first stage takes, so the fuzzer's valid records really run
through both stages over Envoy (the test checks the pipeline's success count grew).

The repository serves a copy of the iris models in the test's directory: the manager's
fuzz deletes models and pipelines, uploads junk, unloads models and deregisters
instances, so it runs after the gateway's and never on the repository's own files.

Where the schema cannot say everything, the expected statuses of a check are widened
for one operation only, and the reason is below (``_MANAGER_CONFIG``, ``_GATEWAY_CONFIG``):
- a schema-valid pipeline definition can name a runtime that does not exist, or a stage
  the previous one cannot feed: 422 (the manager's semantic check, never its validator);
- a runtime registered at an address where nothing answers: 503 (the SDK retries it);
- records the schema allows can make a stage refuse them (a scaled value overflows to
  infinity): 422 naming the stage;
- OIP REST tensors: that ``data`` holds product(``shape``) elements, and that ``inputs``
  are the pipeline's, is beyond JSON Schema: 400 in OIP's shape;
- a model upload's bytes are an archive only the repository can judge: 400/422;
- a version policy may name versions the model does not have: 422 (the repository's check).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

ST = Path(sys.executable).with_name("st")
SEED = os.environ.get("SLUICE_FUZZ_SEED", "20261130")
EXAMPLES = os.environ.get("SLUICE_FUZZ_EXAMPLES", "25")

_POSITIVE = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
_MANAGER_CONFIG = f"""
[[operations]]
# a definition naming an unknown runtime or model, or a stage the previous one cannot feed
include-path-regex = "^/api/v1/pipelines(:apply|/\\\\{{name\\\\}})?$"
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["422"]}

[[operations]]
# registration reads the runtime's models at host:port: nothing there is a 503 (retried by the SDK);
# a host outside SLUICE_MANAGER_RUNTIME_NETWORKS is a 422
include-name = "POST /api/v1/runtimes"
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["422"]}
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503"]

[[operations]]
# the runtime refuses to load a model it does not have; aimed at the mesh's runtime
include-name = "POST /api/v1/runtimes/{{name}}/models"
parameters = {{ "path.name" = "scikit" }}
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["422"]}

[[operations]]
# bytes that are not a model archive
include-name = "POST /api/v1/models/{{name}}"
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["400", "422"]}
[[operations]]
# a version policy naming a version the model does not have (the repository's check)
include-name = "PUT /api/v1/models/{{name}}/version-policy"
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["422"]}
"""
_GATEWAY_CONFIG = f"""
[[operations]]
# a stage may refuse values the records schema allows (details name the stage)
include-path-regex = "^/(api/v1/)?serve/"
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["422"]}

[[operations]]
# OIP tensors: data must hold product(shape) elements, inputs must be the pipeline's
include-path-regex = "^/v2/models/.*/infer$"
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["400"]}

[[operations]]
# the version held: iris's first revision
include-name = "POST /v2/models/{{name}}/versions/{{version}}/infer"
parameters = {{ "path.name" = "iris", "path.version" = "1" }}
checks.positive_data_acceptance.expected-statuses = {_POSITIVE + ["400"]}
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    workdir = tmp_path_factory.mktemp("fuzz-mesh")
    repository = workdir / "repository"
    for model in ("iris_scaler", "iris_classifier"):
        shutil.copytree(model_store / model, repository / model)
    mesh = LocalMesh(
        workdir,
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        env={"SLUICE_REPOSITORY_ROOTS": str(repository), "SLUICE_GATEWAY_MAX_BODY_BYTES": "65536"},
    )
    with mesh:
        created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", timeout=30,
                             json={"name": "iris", "chain": ["scikit/iris_scaler", "scikit/iris_classifier"]})
        assert created.status_code == 201, created.text
        yield mesh


def fuzz(base_url: str, workdir: Path, config_text: str) -> subprocess.CompletedProcess:
    """``st run`` on ``base_url``'s OpenAPI with every check, ours included; in ``workdir``."""
    config = workdir / "schemathesis.toml"
    config.write_text(config_text)
    command = [
        str(ST), "--config-file", str(config), "--no-color", "run", f"{base_url}/openapi.json",
        "--checks", "all", "--max-examples", EXAMPLES, "--seed", SEED, "--workers", "1",
        "--generation-database", "none", "--request-timeout", "10", "--output-truncate", "true",
        # Hypothesis's own guard against slow data generation, not a check of the API: a loaded box trips it
        "--suppress-health-check", "too_slow",
    ]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.openapi_fuzz_checks", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=240)


def _report(run: subprocess.CompletedProcess) -> str:
    return f"st exited {run.returncode}:\n{run.stdout[-12000:]}\n{run.stderr[-3000:]}"


def _summary(run: subprocess.CompletedProcess) -> str:
    """The run's warnings and summary (phases, operations, cases generated), printed with ``-s``."""
    for heading in ("WARNINGS", "SUMMARY"):
        if heading in run.stdout:
            return run.stdout[run.stdout.find(heading):]
    return run.stdout[-2000:]


def _successes(gateway_local: str) -> int:
    stats = httpx.get(f"{gateway_local}/v2/models/iris/stats", timeout=5).json()
    return sum(s["inference_stats"]["success"]["count"] for s in stats["model_stats"])


def test_gateway_openapi_describes_each_pipelines_records(mesh) -> None:
    """``/serve/iris`` is documented with the scaler's four FP64 inputs as required number fields."""
    document = httpx.get(f"http://127.0.0.1:{mesh.ports.gateway_local}/openapi.json", timeout=5).json()
    assert "/serve/{pipeline}" not in document["paths"]
    for path in ("/serve/iris", "/api/v1/serve/iris"):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        record = body["anyOf"][0]
        assert record["required"] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]
        assert all(field == {"type": "number"} for field in record["properties"].values())
        assert body["anyOf"][1] == {"type": "array", "minItems": 1, "items": record}


def test_fuzz_gateway_openapi_reaches_the_serving_path(mesh, tmp_path) -> None:
    """Every check green on the gateway; valid records ran through both stages."""
    gateway_local = f"http://127.0.0.1:{mesh.ports.gateway_local}"
    before = _successes(gateway_local)
    run = fuzz(gateway_local, tmp_path, _GATEWAY_CONFIG)
    print(_summary(run))
    assert run.returncode == 0, _report(run)
    served = _successes(gateway_local) - before
    assert served >= 10, f"the fuzzer's records were served {served} times: the serving path was not reached\n{_report(run)}"


def test_fuzz_manager_openapi(mesh, tmp_path) -> None:
    """Every check green on the manager; it is still healthy afterwards."""
    manager_local = f"http://127.0.0.1:{mesh.ports.manager_local}"
    run = fuzz(manager_local, tmp_path, _MANAGER_CONFIG)
    print(_summary(run))
    assert run.returncode == 0, _report(run)
    assert httpx.get(f"{manager_local}/healthz", timeout=5).status_code == 200
