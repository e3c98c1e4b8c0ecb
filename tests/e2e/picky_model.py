"""A model that refuses some inputs, for tests of a bad request among good ones: an
estimator the scikit runtime loads like any other (``write_picky_double``), whose
``predict`` sleeps ``delay_s`` (blocking its thread, as a heavy model would), refuses a
batch holding a negative value with ``ValueError`` (as scikit-learn refuses input: the
runtime answers INVALID_ARGUMENT) and otherwise answers twice its single input column."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tests.e2e.slow_model import write_echo_shaped


class PickyDouble:
    """``predict(X)``: sleep ``delay_s``; ValueError if any value is negative; else ``2 X[:, 0]``."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def predict(self, X: np.ndarray) -> np.ndarray:
        time.sleep(self.delay_s)
        X = np.asarray(X, dtype=np.float64)
        if (X < 0).any():
            raise ValueError(f"negative values refused: {X[X < 0].tolist()}")
        return 2 * X[:, 0]


def write_picky_double(root: Path, name: str = "picky_double", delay_s: float = 0.05) -> Path:
    """Write model ``name`` version 1 (input ``x``, output ``y``, FP64 ``[-1]``) under ``root``."""
    return write_echo_shaped(root, name, PickyDouble(delay_s))
