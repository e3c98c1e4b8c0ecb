"""The model interface every runtime kind implements, and the artifact it loads from.

A ``Model`` knows its signature (input and output ``TensorSpec``s) and turns a dict
of input arrays into a dict of output arrays. ``predict`` is async so that a kind
can batch concurrent requests (Spark's micro-batches, Triton's dynamic batching);
a kind with nothing to batch simply computes and returns.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sluice.tensors import TensorSpec


class ModelLoadError(RuntimeError):
    """A model's files are missing or cannot be loaded by this runtime kind."""


@dataclass(frozen=True)
class ModelArtifact:
    """A model version's files on local disk, with its manifest (``model.json``)."""

    name: str
    version: str
    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    def specs(self, key: str) -> list[TensorSpec]:
        """Tensor specs listed under ``inputs`` or ``outputs`` in the manifest."""
        return [TensorSpec.from_dict(d) for d in self.manifest.get(key, [])]


class Model(abc.ABC):
    """One loaded model version, served by a runtime."""

    #: short description of how the model runs, reported as ModelMetadata.platform
    platform: str = "python"
    #: False (default): ``predict`` computes on the calling thread, so the server runs it in
    #: its predict pool, off the event loop. True: ``predict`` awaits work on the event
    #: loop itself (a batcher that hands batches to its own threads) and must run there.
    runs_on_loop: bool = False

    def __init__(self, artifact: ModelArtifact, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        self.name = artifact.name
        self.version = artifact.version
        self.inputs = inputs
        self.outputs = outputs
        self.input_specs = {s.name: s for s in inputs}
        self.output_specs = {s.name: s for s in outputs}

    @abc.abstractmethod
    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Compute the model's outputs for a batch of inputs (batch-major arrays)."""

    async def close(self) -> None:
        """Release what the model holds (sessions, threads); default: nothing."""
