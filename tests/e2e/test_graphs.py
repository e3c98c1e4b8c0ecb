"""Graph pipelines through the real mesh (manager, scikit runtime, gateway, each with
its Envoy sidecar): the iris ensemble (a fan-out and a join), a per-record switch on a
mixed batch, and the 422s for graphs that cannot run."""

from __future__ import annotations

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_iris

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.conftest import STORE

pytestmark = pytest.mark.e2e
FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
MODELS = ("iris_scaler", "iris_classifier", "iris_tree", "iris_vote")

ENSEMBLE = {
    "name": "iris-ensemble",
    "stages": [
        {"id": "scale", "runtime": "scikit", "model": "iris_scaler"},
        {"id": "lr", "runtime": "scikit", "model": "iris_classifier", "after": ["scale"]},
        {"id": "tree", "runtime": "scikit", "model": "iris_tree", "after": ["scale"]},
        {"id": "vote", "runtime": "scikit", "model": "iris_vote", "after": ["lr", "tree"],
         "inputs": {"p1": "lr.probabilities", "p2": "tree.probabilities"}},
    ],
}
#: records whose scaled petal length is below 0 go to the logistic regression, the rest to the tree
SWITCH = {
    "name": "iris-switch",
    "stages": [
        {"id": "scale", "runtime": "scikit", "model": "iris_scaler"},
        {"id": "lr", "runtime": "scikit", "model": "iris_classifier", "after": ["scale"], "when": "scale.features[2] < 0"},
        {"id": "tree", "runtime": "scikit", "model": "iris_tree", "after": ["scale"], "default": True},
    ],
}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    if not all((STORE / m / "1" / "model.joblib").exists() for m in MODELS):  # a store built before the ensemble's models
        from models import train_iris

        train_iris.train(STORE)
    mesh = LocalMesh(tmp_path_factory.mktemp("mesh"), [RuntimeSpec("scikit", "scikit", MODELS)], MeshPorts.ephemeral())
    with mesh:
        yield mesh


def _load(model: str):
    return joblib.load(STORE / model / "1" / "model.joblib")


def iris_batch() -> tuple[list[dict], np.ndarray]:
    """All 150 iris records, shuffled (deterministically) so the classes are mixed."""
    X = load_iris().data[np.random.default_rng(7).permutation(150)]
    return [dict(zip(FEATURES, map(float, row))) for row in X], X


def test_iris_ensemble_equals_the_same_models_run_in_process(manager, gateway):
    created = manager.post("/api/v1/pipelines", json=ENSEMBLE)
    assert created.status_code == 201, created.text
    stages = {s["id"]: s for s in created.json()["stages"]}
    assert stages["vote"]["after"] == ["lr", "tree"] and stages["lr"]["after"] == ["scale"]
    assert stages["vote"]["bindings"] == {"p1": "lr.probabilities", "p2": "tree.probabilities"}

    records, X = iris_batch()
    response = gateway.post("/serve/iris-ensemble", json=records)
    assert response.status_code == 200, response.text
    answer = response.json()

    scaled = _load("iris_scaler").transform(X)
    mean = (_load("iris_classifier").predict_proba(scaled) + _load("iris_tree").predict_proba(scaled)) / 2
    vote = _load("iris_vote")
    assert [sorted(r) for r in answer] == [["label", "probabilities"]] * 150
    np.testing.assert_allclose([r["probabilities"] for r in answer], mean, rtol=0, atol=1e-12)
    assert [r["label"] for r in answer] == list(vote.classes_[mean.argmax(axis=1)])
    # the two branches disagree somewhere, so the vote is not just one of them
    assert not np.allclose(_load("iris_classifier").predict_proba(scaled), mean)


def test_switch_sends_each_record_of_a_mixed_batch_to_its_branch_and_keeps_order(manager, gateway):
    created = manager.post("/api/v1/pipelines", json=SWITCH)
    assert created.status_code == 201, created.text
    records, X = iris_batch()
    response = gateway.post("/serve/iris-switch", json=records)
    assert response.status_code == 200, response.text
    answer = response.json()

    scaled = _load("iris_scaler").transform(X)
    to_lr = scaled[:, 2] < 0
    assert 20 < to_lr.sum() < 130  # a mixed batch: both branches get records
    lr, tree = _load("iris_classifier"), _load("iris_tree")
    expected = np.where(to_lr[:, None], lr.predict_proba(scaled), tree.predict_proba(scaled))
    labels = np.where(to_lr, lr.predict(scaled), tree.predict(scaled))
    assert len(answer) == 150
    np.testing.assert_allclose([r["probabilities"] for r in answer], expected, rtol=0, atol=1e-12)
    assert [r["label"] for r in answer] == list(labels)
    # the branches answer differently for the records of each: a record sent to the wrong one would show
    assert not np.allclose(lr.predict_proba(scaled)[~to_lr], tree.predict_proba(scaled)[~to_lr])

    # without a default, the records no condition took get no answer fields from the skipped stage
    no_default = {"name": "iris-switch-only", "stages": [dict(SWITCH["stages"][0]), dict(SWITCH["stages"][1])]}
    assert manager.post("/api/v1/pipelines", json=no_default).status_code == 201
    answer = gateway.post("/serve/iris-switch-only", json=records).json()
    assert [("label" in r) for r in answer] == list(to_lr)
    assert [r["label"] for r in answer if "label" in r] == list(lr.predict(scaled[to_lr]))


@pytest.mark.parametrize(
    ("change", "code", "named"),
    [
        # scale waits for vote, which waits (through lr and tree) for scale
        (lambda s: s[0].update(after=["vote"]), "cycle", ["scale", "lr", "vote"]),
        (lambda s: s[1].update(after=["scaler"]), "unknown_stage", ["lr", "'scaler'"]),
        # a label (BYTES) into a probability vector (FP64 [-1, 3])
        (lambda s: s[3].update(inputs={"p1": "lr.label", "p2": "tree.probabilities"}), "signature_mismatch",
         ["vote", "lr.label", "p1", "BYTES", "FP64"]),
        (lambda s: s[3].update(inputs={"p1": "lr.probs", "p2": "tree.probabilities"}), "signature_mismatch",
         ["vote", "'probs'", "p1"]),
        (lambda s: s[1].update(when="scale.features > 0"), "bad_condition", ["lr", "scale.features", "index"]),
        (lambda s: s[1].update(when="scale.label == 'setosa'"), "bad_condition", ["lr", "'label'"]),
        (lambda s: s[3].update(when="lr.label > 2"), "bad_condition", ["vote", "string", "number"]),
        (lambda s: s[3].update(when="lr.label == 'setosa' and"), "bad_condition", ["vote", "ends"]),
        (lambda s: s[3].update(when="__import__('os').system('true')"), "bad_condition", ["vote", "unexpected"]),
    ],
    ids=["cycle", "unknown-after", "bad-edge-type", "bad-edge-output", "condition-shape", "condition-tensor",
         "condition-types", "condition-syntax", "condition-no-python"],
)
def test_graphs_that_cannot_run_are_422s_naming_what_is_wrong(manager, change, code, named):
    definition = {"name": "iris-bad", "stages": [dict(s) for s in ENSEMBLE["stages"]]}
    change(definition["stages"])
    response = manager.post("/api/v1/pipelines", json=definition)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in named:
        assert word in error["message"], (word, error["message"])
    assert manager.get("/api/v1/pipelines/iris-bad").status_code == 404
