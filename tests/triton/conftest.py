"""Fixtures for the Triton runtime tests: a freshly trained model repository.

The repository is generated into a temporary folder once per session by the
training script itself, so the tests never depend on build outputs in models/.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from runtimes.sdk.model import ModelArtifact
from runtimes.triton.fallback import TritonOnnxModel, load
from runtimes.triton.settings import FallbackSettings

REPO = Path(__file__).resolve().parents[2]


def _train_module():
    # models/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location("sluice_train_triton", REPO / "models" / "train_triton.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def train_triton():
    return _train_module()


@pytest.fixture(scope="session")
def trained(train_triton, tmp_path_factory):
    """The TrainedModels of a repository built under a temporary root."""
    return train_triton.build_repository(tmp_path_factory.mktemp("triton-repo"))


@pytest.fixture
async def load_model(trained):
    """Load a model of the repository with the fallback; closed after the test."""
    loaded: list[TritonOnnxModel] = []

    def _load(name: str, root: Path | None = None, **settings) -> TritonOnnxModel:
        model = load(ModelArtifact(name, "1", (root or trained.root) / name), FallbackSettings(**settings))
        loaded.append(model)
        return model

    yield _load
    for model in loaded:
        await model.close()
