"""A model's version policy (``sluice.version_policy``, ``<model>/versions.json``): parsing
and refusing bad policies; which versions an unpinned load loads and which one answers
an unpinned request; the repository serving it (metadata, listings, setting it,
refusing a bad one, guarding deletes); and a runtime's ``ModelSet`` loading by it from
a real repository app (in process, over HTTP/ASGI) with real scikit-learn models: the
example store's ``iris_classifier`` (versions 1 and 2, default 1) as ``models.build``
ships it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models import train_iris, train_iris_v2
from repository.app import create
from repository.settings import RepositorySettings
from runtimes.scikit.model import load as sklearn_load
from runtimes.sdk.model import ModelLoadError
from runtimes.sdk.models import ModelSet
from runtimes.sdk.repository import ModelRepository
from sluice.version_policy import (
    DEFAULT_POLICY,
    ModelPolicy,
    PolicyError,
    VersionPolicy,
    default_among,
    parse_policy,
)

# --- parsing


@pytest.mark.parametrize("text, policy", [
    ('{}', DEFAULT_POLICY),
    ('{"load": {"latest": {"num_versions": 2}}}', VersionPolicy("latest", 2)),
    ('{"load": {"latest": {}}}', VersionPolicy("latest", 1)),
    ('{"load": {"all": {}}, "default": "3"}', VersionPolicy("all", default="3")),
    ('{"load": {"specific": {"versions": [2, "1"]}}, "default": 1}', VersionPolicy("specific", versions=("1", "2"), default="1")),
])
def test_a_policy_parses_in_tritons_shapes_with_versions_as_strings(text: str, policy: VersionPolicy) -> None:
    assert parse_policy(text) == policy
    assert parse_policy(json.dumps(policy.to_json())) == policy  # the normalised file reads back the same


@pytest.mark.parametrize("text, says", [
    ('{"load": ', "not valid JSON"),
    ('["1", "2"]', "a JSON object"),
    ('{"default": "1", "latest": 2}', "unknown key(s) 'latest'"),
    ('{"load": {"latest": {"num_versions": 1}, "all": {}}}', "exactly one of"),
    ('{"load": {"newest": {}}}', "exactly one of"),
    ('{"load": {"latest": {"num_versions": 0}}}', "num_versions' must be an integer >= 1"),
    ('{"load": {"latest": {"num_versions": true}}}', "num_versions' must be an integer >= 1"),
    ('{"load": {"latest": {"count": 2}}}', "unknown key(s) 'count' in 'load.latest'"),
    ('{"load": {"all": {"versions": [1]}}}', "unknown key(s) 'versions' in 'load.all'"),
    ('{"load": {"specific": {"versions": []}}}', "non-empty list"),
    ('{"load": {"specific": {"versions": ["1", 1]}}}', "lists a version twice"),
    ('{"load": {"specific": {"versions": ["../x"]}}}', "must be a version"),
    ('{"load": {"specific": {"versions": ["1", "2"]}}, "default": "3"}', "default version '3' is not one the policy loads"),
    ('{"default": {"v": 1}}', "'default' must be a version"),
])
def test_a_malformed_policy_is_refused_saying_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy(text)
    assert says in str(refused.value)


@pytest.mark.parametrize("policy, says", [
    (VersionPolicy("specific", versions=("1", "7")), "names version(s) 7 that the model does not have (it has 1, 2, 10)"),
    (VersionPolicy("all", default="7"), "default version '7' is not one the policy loads: the model does not have it"),
    (VersionPolicy("latest", 1, default="1"), "default version '1' is not one the policy loads: the policy loads only 10"),
])
def test_a_policy_naming_versions_the_model_lacks_is_refused(policy: VersionPolicy, says: str) -> None:
    with pytest.raises(PolicyError) as refused:
        policy.check(["1", "2", "10"])
    assert says in str(refused.value)


# --- what loads, what answers


@pytest.mark.parametrize("policy, loads, default", [
    (DEFAULT_POLICY, ("10",), "10"),  # no policy file: the latest (numeric order, not text order)
    (VersionPolicy("latest", 2), ("2", "10"), "10"),
    (VersionPolicy("latest", 5), ("1", "2", "10"), "10"),
    (VersionPolicy("all"), ("1", "2", "10"), "10"),
    (VersionPolicy("all", default="1"), ("1", "2", "10"), "1"),
    (VersionPolicy("specific", versions=("1", "2"), default="1"), ("1", "2"), "1"),
    (VersionPolicy("specific", versions=("1", "2")), ("1", "2"), "2"),
])
def test_which_versions_load_and_which_one_answers(policy: VersionPolicy, loads: tuple, default: str) -> None:
    assert policy.loads(["10", "1", "2"]) == loads
    assert policy.default_of(["10", "1", "2"]) == default


def test_a_runtime_answers_the_policy_default_when_loaded_else_its_highest() -> None:
    assert default_among(["1", "2"], "1") == "1"
    assert default_among(["2", "10"], "1") == "10"  # the default is not loaded here: the highest loaded
    assert default_among(["2", "10"]) == "10"  # no policy
    assert default_among([], "1") is None


# --- the repository


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The iris examples as ``models.build`` writes them (iris_classifier 1 and 2 with the
    shipped policy), plus ``plain`` (versions 1 and 2, no policy) and ``broken`` (versions 1
    and 2, a policy naming version 3)."""
    root = tmp_path_factory.mktemp("policy-store")
    train_iris.train(root)
    train_iris_v2.ship(root)
    for name in ("plain", "broken"):
        for version in ("1", "2"):
            shutil.copytree(root / "iris_classifier" / version, root / name / version)
    (root / "broken" / "versions.json").write_text('{"load": {"specific": {"versions": ["1", "3"]}}}')
    return root


@pytest.fixture
def repo(store: Path, tmp_path) -> TestClient:
    """A repository over a private copy of ``store`` (tests change policies)."""
    root = tmp_path / "store"
    shutil.copytree(store, root)
    return TestClient(create(RepositorySettings(roots=str(root)), base_dir=tmp_path))


def test_the_shipped_iris_classifier_answers_version_1_unpinned_and_loads_both(repo: TestClient) -> None:
    metadata = repo.get("/metadata/iris_classifier").json()
    assert (metadata["version"], metadata["latest"], metadata["versions"]) == ("1", "2", ["1", "2"])
    assert metadata["default_version"] == "1" and metadata["load_versions"] == ["1", "2"]
    assert metadata["version_policy"] == {"load": {"specific": {"versions": ["1", "2"]}}, "default": "1"}
    assert repo.get("/metadata/iris_classifier", params={"version": "2"}).json()["version"] == "2"
    assert repo.get("/files/iris_classifier").json()["version"] == "1"
    plain = repo.get("/metadata/plain").json()  # no policy file: exactly as before policies
    assert (plain["version"], plain["default_version"], plain["load_versions"], plain["version_policy"]) == ("2", "2", ["2"], None)
    listed = {m["name"]: m for m in repo.get("/models").json()}
    assert listed["iris_classifier"]["default_version"] == "1" and listed["iris_classifier"]["policy_error"] is None
    assert repo.get("/models/iris_classifier").json()["load_versions"] == ["1", "2"]


def test_a_refused_policy_fails_unpinned_lookups_clearly_and_pinned_ones_still_answer(repo: TestClient) -> None:
    refused = repo.get("/metadata/broken")
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "bad_version_policy"
    assert "version policy (versions.json) is refused" in error["message"] and "names version(s) 3" in error["message"]
    assert repo.get("/metadata/broken", params={"version": "1"}).status_code == 200
    listed = {m["name"]: m for m in repo.get("/models").json()}  # the listing still answers, naming the problem
    assert listed["broken"]["default_version"] is None and "names version(s) 3" in listed["broken"]["policy_error"]
    assert repo.get("/models/broken").json()["policy_error"] == listed["broken"]["policy_error"]


def test_setting_and_removing_a_policy_through_the_api(repo: TestClient) -> None:
    answer = repo.put("/models/plain/version-policy", json={"load": {"all": {}}, "default": "1"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["default_version"], answer.json()["load_versions"]) == ("1", ["1", "2"])
    assert repo.get("/metadata/plain").json()["version"] == "1"

    before = repo.get("/models/plain").json()
    for body, says in (({"load": {"specific": {"versions": ["9"]}}}, "names version(s) 9"), ({"default": "1", "x": 1}, "unknown key")):
        bad = repo.put("/models/plain/version-policy", json=body)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_version_policy" and says in bad.json()["error"]["message"]
    bad = repo.put("/models/plain/version-policy", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "not valid JSON" in bad.json()["error"]["message"]
    assert repo.get("/models/plain").json() == before  # a refused policy changes nothing

    deleting = repo.delete("/models/plain", params={"version": "1"})  # the policy names version 1
    assert deleting.status_code == 409 and deleting.json()["error"]["code"] == "named_by_version_policy"
    assert repo.get("/metadata/plain", params={"version": "1"}).status_code == 200

    removed = repo.delete("/models/plain/version-policy")
    assert removed.status_code == 200 and removed.json()["version_policy"] is None
    assert repo.get("/metadata/plain").json()["version"] == "2"
    assert repo.delete("/models/plain/version-policy").status_code == 404
    assert repo.put("/models/nope/version-policy", json={}).status_code == 404


def test_policy_fields_read_back_from_an_older_repository_answer_as_no_policy() -> None:
    old = ModelPolicy.from_json({"name": "m", "version": "3", "versions": ["1", "3"], "latest": "3"})
    assert (old.policy, old.preferred, old.unpinned("3")) == (None, None, ("3",))


# --- a runtime's model set loading by it


def _model_set(repo: TestClient, cache: Path) -> ModelSet:
    repository = ModelRepository("http://repository", cache)
    repository.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=repo.app), base_url="http://repository")
    return ModelSet(loader=sklearn_load, repository=repository)


async def _probabilities(models: ModelSet, version: str = "") -> tuple[str, np.ndarray]:
    model = models.get("iris_classifier", version)
    outputs = await model.predict({"features": np.array([[0.3, -0.6, 0.6, 0.4], [1.0, 0.2, 1.1, 1.3]])})
    return model.version, np.asarray(outputs["probabilities"])


async def test_an_unpinned_load_loads_what_the_policy_loads_and_its_default_answers(repo: TestClient, tmp_path) -> None:
    models = _model_set(repo, tmp_path / "cache")
    try:
        model, loaded = await models.load("iris_classifier")  # what SLUICE_RUNTIME_MODELS=iris_classifier does
        assert loaded and model.version == "1"
        assert models.versions("iris_classifier") == ["1", "2"] and models.default_version("iris_classifier") == "1"
        v1, v2 = await _probabilities(models), await _probabilities(models, "2")
        assert v1[0] == "1" and v2[0] == "2" and not np.allclose(v1[1], v2[1])  # two tellable versions
        assert (await models.load("iris_classifier"))[1] is False  # all loaded already

        await models.remove("iris_classifier", "1")  # the default is gone: the highest loaded answers
        assert models.default_version("iris_classifier") == "2"
        await models.load("iris_classifier", "1")
        assert models.default_version("iris_classifier") == "1"

        plain, _ = await models.load("plain")  # no policy: the latest only, as before policies
        assert (plain.version, models.versions("plain")) == ("2", ["2"])
        await models.load("plain", "1")
        assert models.default_version("plain") == "2"
    finally:
        await models.close()


async def test_a_pinned_load_learns_the_policy_default_too(repo: TestClient, tmp_path) -> None:
    models = _model_set(repo, tmp_path / "cache")
    try:
        await models.load("iris_classifier", "2")
        assert models.default_version("iris_classifier") == "2"  # the only one loaded
        await models.load("iris_classifier", "1")
        assert models.default_version("iris_classifier") == "1"  # the policy's, not the highest
    finally:
        await models.close()


async def test_a_refused_policy_fails_the_unpinned_load_with_a_clear_error_and_loads_nothing(repo: TestClient, tmp_path) -> None:
    models = _model_set(repo, tmp_path / "cache")
    try:
        with pytest.raises(ModelLoadError) as refused:
            await models.load("broken")
        assert "version policy (versions.json) is refused" in str(refused.value) and "names version(s) 3" in str(refused.value)
        assert "broken" not in models
        model, _ = await models.load("broken", "2")  # a pinned load still works
        assert model.version == "2" and models.default_version("broken") == "2"
    finally:
        await models.close()
