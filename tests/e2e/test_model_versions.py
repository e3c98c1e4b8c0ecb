"""The example store's two versions of ``iris_classifier`` on a real mesh (manager,
repository, gateway and the scikit runtime, each with its real Envoy sidecar), the
runtime started as ``sluice up`` starts it (``iris_classifier`` named without a version).

The store ships versions 1 (logistic regression) and 2 (k-nearest neighbours) with a
version policy (``versions.json``: load both, version 1 the default), so the runtime
loads both; an unpinned stage answers as version 1, a stage pinned to
``iris_classifier:2`` as version 2, and a 50/50 ``traffic`` split between the versions
lands on each (read from ``x-sluice-served-by``), every answer the one its version
computes in process.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import joblib
import numpy as np
import pytest

from models.train_iris import FEATURES, iris_data
from tests.conftest import STORE

pytestmark = pytest.mark.e2e

X = iris_data()[0][::10]  # 15 records, all three classes
RECORDS = [dict(zip(FEATURES, map(float, row))) for row in X]
SCALER_AND_CLASSIFIER = ["scikit/iris_scaler", "scikit/iris_classifier"]
CLIENTS = 4


def in_process(version: str) -> tuple[list[str], np.ndarray]:
    """The example store's iris_classifier ``version`` on the scaled RECORDS: (labels, probabilities)."""
    scaled = joblib.load(STORE / "iris_scaler" / "1" / "model.joblib").transform(X)
    classifier = joblib.load(STORE / "iris_classifier" / version / "model.joblib")
    return list(classifier.predict(scaled)), classifier.predict_proba(scaled)


def served_version(response: httpx.Response, stage: str = "1") -> str:
    """The version of ``stage`` that answered, from ``x-sluice-served-by`` (``<stage>=<runtime>/<model>:<version>, ...``)."""
    entries = dict(entry.strip().partition("=")[::2] for entry in response.headers["x-sluice-served-by"].split(","))
    runtime_model, _, version = entries[stage].rpartition(":")
    assert runtime_model == "scikit/iris_classifier", entries
    return version


def assert_answers_as(response: httpx.Response, version: str) -> None:
    labels, probabilities = in_process(version)
    answer = response.json()
    assert [r["label"] for r in answer] == labels
    np.testing.assert_allclose([r["probabilities"] for r in answer], probabilities, rtol=0, atol=1e-12)


def define(manager: httpx.Client, body: dict) -> None:
    response = manager.post("/api/v1/pipelines", json=body)
    assert response.status_code == 201, response.text


def test_the_runtime_loads_both_shipped_versions_and_the_manager_shows_version_1_as_the_default(mesh, manager):
    model = manager.get("/api/v1/models/iris_classifier").json()
    assert (model["latest"], model["default_version"], model["load_versions"]) == ("2", "1", ["1", "2"])
    assert model["version_policy"] == {"load": {"specific": {"versions": ["1", "2"]}}, "default": "1"}
    assert {v["version"]: [s["runtime"] for s in v["served_by"]] for v in model["versions"]} == {"1": ["scikit"], "2": ["scikit"]}
    v1, v2 = in_process("1"), in_process("2")
    assert v1[0] != v2[0] and not np.allclose(v1[1], v2[1], atol=1e-3)  # the versions can be told apart by their answers


def test_unpinned_answers_version_1_and_pinned_answers_version_2(mesh, manager, gateway):
    define(manager, {"name": "unpinned", "chain": SCALER_AND_CLASSIFIER})
    define(manager, {"name": "pinned-2", "chain": ["scikit/iris_scaler", "scikit/iris_classifier:2"]})
    unpinned = gateway.post("/serve/unpinned", json=RECORDS)
    assert unpinned.status_code == 200, unpinned.text
    assert served_version(unpinned) == "1"
    assert_answers_as(unpinned, "1")
    pinned = gateway.post("/serve/pinned-2", json=RECORDS)
    assert pinned.status_code == 200, pinned.text
    assert served_version(pinned) == "2"
    assert_answers_as(pinned, "2")


def test_a_50_50_split_between_the_shipped_versions_lands_between_35_and_65_percent_on_each(mesh, manager):
    define(manager, {"name": "split", "stages": [
        {"runtime": "scikit", "model": "iris_scaler"},
        {"runtime": "scikit", "model": "iris_classifier", "traffic": [{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]},
    ]})
    local = threading.local()

    def one(_: int) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=mesh.gateway_url, timeout=20)
        return local.client.post("/serve/split", json=RECORDS)

    with ThreadPoolExecutor(CLIENTS) as pool:  # several concurrent clients, one connection each
        answers = list(pool.map(one, range(200)))
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers if a.status_code != 200][:3]
    versions = Counter(served_version(a) for a in answers)
    assert set(versions) == {"1", "2"} and all(70 <= n <= 130 for n in versions.values()), versions
    for answer in answers:  # each answer is what the version its header names computes
        assert_answers_as(answer, served_version(answer))


def test_a_policy_set_through_the_manager_picks_what_an_unpinned_load_loads_and_which_version_answers(mesh, manager, gateway):
    for version in ("1", "2"):  # a copy of both shipped versions, uploaded (the example store itself is read-only)
        files = [("files", (f, (STORE / "iris_classifier" / version / f).read_bytes())) for f in ("model.json", "model.joblib")]
        uploaded = manager.post("/api/v1/models/iris_copy", files=files)
        assert uploaded.status_code == 201 and uploaded.json()["version"] == version, uploaded.text
    refused = manager.put("/api/v1/models/iris_copy/version-policy", json={"load": {"all": {}}, "default": "9"})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "bad_version_policy", refused.text
    assert "default version '9'" in refused.json()["error"]["message"]
    read_only = manager.put("/api/v1/models/iris_classifier/version-policy", json={"default": "2"})
    assert read_only.status_code == 409 and read_only.json()["error"]["code"] == "read_only", read_only.text

    policy = manager.put("/api/v1/models/iris_copy/version-policy", json={"load": {"all": {}}, "default": "1"})
    assert policy.status_code == 200, policy.text
    assert (policy.json()["default_version"], policy.json()["load_versions"]) == ("1", ["1", "2"])
    loaded = manager.post("/api/v1/runtimes/scikit/models", json={"model": "iris_copy"}, timeout=60)  # no version
    assert loaded.status_code == 200, loaded.text
    assert (loaded.json()["version"], loaded.json()["versions"]) == ("1", ["1", "2"])

    define(manager, {"name": "copy", "chain": ["scikit/iris_scaler", "scikit/iris_copy"]})
    answer = gateway.post("/serve/copy", json=RECORDS)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-sluice-served-by"] == "0=scikit/iris_scaler:1, 1=scikit/iris_copy:1"
    assert_answers_as(answer, "1")
