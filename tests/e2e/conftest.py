"""A real mesh for end-to-end tests: manager, repository, scikit runtime and gateway,
each with its real Envoy sidecar, on free ports; stopped by PID at the end.
"""

from __future__ import annotations

import httpx
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


def routes(mesh) -> dict[str, dict]:
    """The gateway sidecar's egress routes by name, from Envoy's config_dump."""
    dump = httpx.get(f"{mesh.admin_url('gateway')}/config_dump?resource=dynamic_scoped_route_configs", timeout=5).json()
    scopes = [s for c in dump["configs"] for s in c.get("scoped_route_configs", [])]
    return {r["name"]: r for s in scopes for h in s["route_configuration"]["virtual_hosts"] for r in h["routes"] if "name" in r}
