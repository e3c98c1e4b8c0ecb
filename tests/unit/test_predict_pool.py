"""Where the runtime's ``PredictPool`` runs a model: a model's first call on a predict
thread (its cost is measured there), a cheap model's later calls on the event loop
itself, and a model that turns slow back on a thread from its next call."""

from __future__ import annotations

import threading
import time

import numpy as np

from runtimes.sdk.model import Model, ModelArtifact
from runtimes.sdk.server import PredictPool
from sluice.tensors import TensorSpec


class Timed(Model):
    """Records the thread each call ran on; computes for ``delay_s`` (busy, as a CPU-bound model)."""

    def __init__(self):
        spec = TensorSpec("x", "FP64", [-1])
        super().__init__(ModelArtifact("timed", "1", None), [spec], [spec])
        self.delay_s = 0.0
        self.threads: list[str] = []

    async def predict(self, inputs):
        self.threads.append(threading.current_thread().name)
        until = time.perf_counter() + self.delay_s
        while time.perf_counter() < until:
            pass
        return inputs


async def test_a_cheap_model_runs_inline_after_its_first_call_and_a_slow_one_goes_back_to_a_thread() -> None:
    pool = PredictPool(1, inline_below_s=0.002)
    model = Timed()
    loop_thread = threading.current_thread().name
    try:
        for _ in range(3):
            await pool.predict(model, {"x": np.zeros(1)})
        assert model.threads[0].startswith("predict") and model.threads[1:] == [loop_thread, loop_thread]
        model.delay_s = 0.05  # now far over the bound: this call still inline, its cost is measured
        await pool.predict(model, {"x": np.zeros(1)})
        model.delay_s = 0.0
        await pool.predict(model, {"x": np.zeros(1)})
        assert model.threads[3] == loop_thread and model.threads[4].startswith("predict")
    finally:
        pool.close()


async def test_without_a_bound_every_call_runs_on_a_thread() -> None:
    pool = PredictPool(1)
    model = Timed()
    try:
        for _ in range(3):
            await pool.predict(model, {"x": np.zeros(1)})
        assert all(name.startswith("predict") for name in model.threads)
    finally:
        pool.close()
