"""A model that takes a fixed time per call, for overload tests and benchmarks: an
estimator the scikit runtime loads like any other (``write_slow_echo``), whose
``predict`` sleeps ``delay_s`` (blocking its thread, as a heavy model would) and
answers its single input column unchanged."""

from __future__ import annotations

import time
from pathlib import Path

import joblib
import numpy as np


class SlowEcho:
    """``predict(X)``: sleep ``delay_s``, then return ``X``'s first column."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def predict(self, X: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        return np.asarray(X, dtype=np.float64)[:, 0]


def write_slow_echo(root: Path, name: str = "slow_echo", delay_s: float = 0.05) -> Path:
    """Write model ``name`` version 1 (input ``x``, output ``y``, FP64 ``[-1]``) under ``root``."""
    return write_echo_shaped(root, name, SlowEcho(delay_s))


def write_echo_shaped(root: Path, name: str, estimator) -> Path:
    """Write ``estimator`` (its ``predict``) as model ``name`` version 1 (input ``x``,
    output ``y``, FP64 ``[-1]``) under ``root``."""
    from models.manifest import tensor, version_dir, write_manifest

    path = version_dir(root, name)
    joblib.dump(estimator, path / "model.joblib")
    write_manifest(
        path, "sklearn",
        [tensor("x", "FP64", [-1])],
        [tensor("y", "FP64", [-1], method="predict")],
        artifact="model.joblib",
    )
    return path
