"""A real mesh for end-to-end tests: manager, repository, scikit runtime and gateway,
each with its real Envoy sidecar, on free ports; stopped by PID at the end.
"""

from __future__ import annotations

import pytest

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec

IRIS_CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("mesh"),
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        env={"SLUICE_GATEWAY_MAX_BODY_BYTES": "65536", "SLUICE_MANAGER_HEARTBEAT_TTL_S": "3"},
    )
    with mesh:
        yield mesh


@pytest.fixture(scope="module")
def iris(manager):
    response = manager.post("/api/v1/pipelines", json={"name": "iris", "transportType": "http", "chain": IRIS_CHAIN})
    assert response.status_code == 201, response.text
    return response.json()
