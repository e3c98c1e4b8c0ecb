"""A model that takes a fixed time to answer: for tests and benchmarks of what happens
to slow requests (make-before-break under requests that outlive the manager's ACK
timeout). Not an example of serving anything.

Its ``model.json``: ``"framework": "sleeper"``, ``"sleep_ms"``, and a signature of one
FP64 input and one FP64 output (shape ``[-1]``, any names); the output is the input
back, after ``sleep_ms``. It waits with ``asyncio.sleep`` on the event loop, so any number
of requests wait at once and nothing blocks health checks or heartbeats.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np

from runtimes.sdk.model import Model, ModelArtifact, ModelLoadError

FRAMEWORK = "sleeper"


class SleeperModel(Model):
    platform = FRAMEWORK
    runs_on_loop = True  # it only awaits: no thread needed

    def __init__(self, artifact: ModelArtifact):
        super().__init__(artifact, artifact.specs("inputs"), artifact.specs("outputs"))
        sleep_ms = artifact.manifest.get("sleep_ms")
        if not isinstance(sleep_ms, int) or sleep_ms < 0:
            raise ModelLoadError(f"{artifact.name}: model.json needs 'sleep_ms', a non-negative integer")
        if len(self.inputs) != 1 or len(self.outputs) != 1:
            raise ModelLoadError(f"{artifact.name}: a sleeper model has one input and one output")
        self.sleep_s = sleep_ms / 1000

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        await asyncio.sleep(self.sleep_s)
        return {self.outputs[0].name: np.asarray(inputs[self.inputs[0].name], dtype=np.float64)}


def load(artifact: ModelArtifact) -> Model:
    return SleeperModel(artifact)


def write_model(root: Path, name: str, sleep_ms: int, input: str = "x", output: str = "y", version: str = "1") -> Path:
    """Write a sleeper model version into a repository root (``<root>/<name>/<version>``)."""
    path = Path(root) / name / version
    path.mkdir(parents=True, exist_ok=True)
    spec = {"datatype": "FP64", "shape": [-1]}
    manifest = {"framework": FRAMEWORK, "sleep_ms": sleep_ms, "inputs": [{"name": input, **spec}], "outputs": [{"name": output, **spec}]}
    (path / "model.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path
