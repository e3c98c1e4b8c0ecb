"""Shared test helpers: the repository root, the example model store, bounded polling."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STORE = ROOT / "models" / "store"


def eventually(check: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.02) -> float:
    """Poll until ``check()`` is true; return the seconds it took, fail after ``timeout_s``."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def model_store() -> Path:
    if not (STORE / "iris_classifier").is_dir():
        from models.build import build

        build(STORE)
    return STORE
