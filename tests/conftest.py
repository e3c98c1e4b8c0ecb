"""Shared test helpers: the repository root, the example model store, bounded polling,
and HTTP clients for the ``mesh`` fixture a test directory or module defines."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "models" / "store"
TRITON_REPOSITORY = ROOT / "models" / "triton"


def eventually(check: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.02) -> float:
    """Poll until ``check()`` is true; return the seconds it took, fail after ``timeout_s``."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


@pytest.fixture(scope="module")
def pg_server():
    """A real PostgreSQL server for the module (``sluice.local.postgres``), stopped by PID at the end."""
    from sluice.local import postgres

    if not postgres.available():
        pytest.skip("PostgreSQL's server binaries (initdb, postgres) are not on PATH")
    with postgres.PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def model_store() -> Path:
    built = [STORE / "iris_classifier" / "versions.json", *(TRITON_REPOSITORY / m / "1" / "model.onnx" for m in ("iris_onnx", "mlp", "mlp_scaled", "risk_mlp"))]
    if not all(p.exists() for p in built):
        from models.build import build

        build(STORE)
    return STORE


@pytest.fixture(scope="module")
def manager(mesh):
    with httpx.Client(base_url=mesh.manager_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def gateway(mesh):
    with httpx.Client(base_url=mesh.gateway_url, timeout=10) as client:
        yield client
