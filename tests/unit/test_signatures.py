"""What the manager reads of a runtime's models (``manager.signatures``), over a real
gRPC server in this process (the runtime SDK's ``InferenceService``): a model's
unpinned signature and, when it has several versions loaded, each version's."""

from __future__ import annotations

import json

import pytest

from manager.served_models import models_from_json, models_to_json
from manager.signatures import read_from
from runtimes.sdk.model import Model, ModelArtifact
from runtimes.sdk.models import ModelSet
from sluice.tensors import TensorSpec
from tests.runtime_server import served, stub_of


class Fixed(Model):
    """A model known by its signature alone (nothing here calls ``predict``)."""

    def __init__(self, name: str, version: str, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        super().__init__(ModelArtifact(name, version, None), inputs, outputs)

    async def predict(self, inputs):
        raise NotImplementedError


FEATURES = [TensorSpec("features", "FP64", [-1, 4])]
LABEL = [TensorSpec("label", "BYTES", [-1])]
PROBABILITIES = [TensorSpec("probabilities", "FP64", [-1, 3])]


@pytest.fixture
async def stub():
    models = ModelSet([
        Fixed("classifier", "1", FEATURES, LABEL),
        Fixed("classifier", "2", FEATURES, PROBABILITIES),
        Fixed("scaler", "1", [TensorSpec("x", "FP64", [-1])], FEATURES),
    ])
    async with served(models) as address, stub_of(address) as stub:
        yield stub


def names(tensors) -> list[str]:
    return [t.name for t in tensors]


async def test_each_loaded_version_of_a_model_has_its_signature_read(stub) -> None:
    read = await read_from(stub, [], timeout_s=5)
    assert sorted(read) == ["classifier", "scaler"]
    classifier = read["classifier"]
    assert classifier.versions == ("1", "2")
    assert names(classifier.signature.outputs) == ["probabilities"]  # unpinned: the highest loaded answers
    assert {v: names(s.outputs) for v, s in classifier.by_version.items()} == {"1": ["label"], "2": ["probabilities"]}
    assert names(classifier.signature_of("1").outputs) == ["label"]
    assert classifier.signature_of("") == classifier.signature
    # one version only: nothing more to read
    assert read["scaler"].by_version == {} and read["scaler"].signature_of("1") == read["scaler"].signature


async def test_what_a_runtime_serves_survives_its_json_form(stub) -> None:
    """As the stores keep it (``ServedModel.to_json``, one JSON column in both backends)."""
    read = await read_from(stub, [], timeout_s=5)
    assert models_from_json(json.loads(json.dumps(models_to_json(read)))) == read
