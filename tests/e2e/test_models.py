"""Bring your own model, on a real mesh: upload through the manager, hot-load onto a
running runtime (no process restarts), serve it in a pipeline, and compare with the
same model run in this process; a new version under load; refusals that leave
nothing behind; the SDK's errors and the CLI.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
from collections import Counter

import httpx
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from typer.testing import CliRunner

from runtimes.sdk.model import ModelArtifact
from runtimes.spark.model import load as load_spark
from sluice.cli import app as cli
from sluice.client import Client, ModelRef, SluiceError
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.conftest import STORE, TRITON_REPOSITORY

pytestmark = pytest.mark.e2e
UPLOAD_LIMIT = 2 << 20  # the repository's upload limit in this mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("models"),
        [
            RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier")),
            RuntimeSpec("spark", "spark", ()),  # starts with no model at all
            RuntimeSpec("triton", "triton", ()),
        ],
        MeshPorts.ephemeral(),
        env={"SLUICE_REPOSITORY_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT)},
    )
    with mesh:
        yield mesh


def pids(mesh) -> dict[str, int]:
    """Every process of the mesh by name, to show that a hot load restarted none."""
    return {name: proc.pid for name, proc in mesh.procs.items()}


@pytest.fixture(scope="module")
def client(mesh):
    with Client(mesh.manager_url) as c:
        yield c


@pytest.fixture(scope="module")
def cancer():
    data = load_breast_cancer(as_frame=True)
    return data.data.iloc[:, :6], data.target  # six named columns keep the records short


def uploads(mesh) -> list[str]:
    """Every file and directory under the repository's upload root, to check nothing is left behind."""
    root = mesh.workdir / "models"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_sklearn_estimator_upload_load_predict_equals_in_process(mesh, client, cancer):
    X, y = cancer
    started = pids(mesh)
    estimator = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    ref = client.upload(estimator, "cancer_lr", runtime="scikit")
    assert (ref.name, ref.version, ref.runtime) == ("cancer_lr", "1", "scikit")
    client.create_pipeline("cancer", [ref])

    sample = X.iloc[:25]
    answer = client.predict("cancer", sample.to_dict(orient="records"))
    assert [r["label"] for r in answer] == estimator.predict(sample).tolist()
    np.testing.assert_allclose([r["probabilities"] for r in answer], estimator.predict_proba(sample), rtol=1e-9)

    frame = client.predict("cancer", sample)  # a DataFrame in, a DataFrame out
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == list(sample.index)
    assert frame["label"].tolist() == estimator.predict(sample).tolist()
    assert pids(mesh) == started


def test_model_listing_shows_versions_signatures_digests_and_who_serves(client):
    listing = {m["name"]: m for m in client.models()}
    assert {"iris_scaler", "iris_classifier", "cancer_lr", "mlp"} <= set(listing)
    (version,) = listing["cancer_lr"]["versions"]
    assert version["version"] == "1" and version["framework"] == "sklearn"
    assert [t["name"] for t in version["inputs"]][:2] == ["mean radius", "mean texture"]
    assert {t["name"] for t in version["outputs"]} == {"label", "probabilities"}
    assert all(len(f["sha256"]) == 64 for f in version["files"])
    assert version["served_by"] == [{"runtime": "scikit", "instances": 1}]
    assert client.model("iris_classifier")["versions"][0]["served_by"][0]["runtime"] == "scikit"
    assert listing["mlp"]["versions"][0]["served_by"] == []  # in the repository, loaded nowhere


def test_spark_pipeline_model_directory_upload_equals_in_process(client):
    saved = STORE / "pm_spark" / "1"
    ref = client.upload(saved / "pipeline", "pm_spark_byo", runtime="spark")
    client.create_pipeline("spark-byo", [ref])
    rng = np.random.default_rng(3)
    features = rng.random((20, json.loads((saved / "model.json").read_text())["inputs"][0]["shape"][1]))
    answer = client.predict("spark-byo", [{"features": row.tolist()} for row in features])

    import asyncio

    model = load_spark(ModelArtifact("pm_spark", "1", saved, json.loads((saved / "model.json").read_text())))
    expected = asyncio.run(model.predict({"features": features}))
    np.testing.assert_allclose([r["probability"] for r in answer], expected["probability"], rtol=1e-9)
    assert [r["prediction"] for r in answer] == expected["prediction"].tolist()


def test_onnx_file_upload_gets_a_triton_config_and_equals_onnxruntime(client):
    onnx_file = TRITON_REPOSITORY / "mlp" / "1" / "model.onnx"
    ref = client.upload(onnx_file, "mlp_byo", runtime="triton")
    assert ref.runtime == "triton"
    files = {f["path"] for f in client.model("mlp_byo")["versions"][0]["files"]}
    assert files == {"config.pbtxt", "1/model.onnx"}
    client.create_pipeline("mlp-byo", [ref])
    X = np.random.default_rng(5).random((16, 4)).astype(np.float32)
    answer = client.predict("mlp-byo", [{"input": row.tolist()} for row in X])
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (expected,) = session.run(["probabilities"], {"input": X})
    np.testing.assert_allclose([r["probabilities"] for r in answer], expected, rtol=1e-6)


class Load:
    """``clients`` threads posting one record each, as fast as answers come, counting every status."""

    def __init__(self, url: str, pipeline: str, record: dict, clients: int = 4):
        self.url, self.pipeline, self.record = url, pipeline, record
        self.statuses: Counter[int] = Counter()
        self.labels: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self._stop.is_set():
                try:
                    response = http.post(f"/serve/{self.pipeline}", json=[self.record])
                    self.statuses[response.status_code] += 1
                    if response.status_code == 200:
                        self.labels[str(response.json()[0]["label"])] += 1
                    else:
                        self.errors.append(response.text[:200])
                except httpx.HTTPError as exc:
                    self.statuses[0] += 1
                    self.errors.append(repr(exc))

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def test_second_version_loaded_under_load_loses_no_request(mesh, client, cancer):
    X, y = cancer
    started = pids(mesh)
    first = DecisionTreeClassifier(max_depth=1, random_state=0).fit(X, y)
    second = DecisionTreeClassifier(max_depth=8, random_state=0).fit(X, 1 - y)  # answers the opposite class
    ref1 = client.upload(first, "cancer_tree", runtime="scikit")
    client.create_pipeline("tree", ["scikit/cancer_tree"])  # unpinned: the highest loaded version answers
    record = X.iloc[0].to_dict()
    before, after = str(first.predict(X.iloc[:1])[0]), str(second.predict(X.iloc[:1])[0])
    assert before != after

    with Load(mesh.gateway_url, "tree", record) as load:
        while sum(load.statuses.values()) < 50:
            threading.Event().wait(0.01)
        ref2 = client.upload(second, "cancer_tree", runtime="scikit")
        seen = sum(load.statuses.values())
        while sum(load.statuses.values()) < seen + 50:
            threading.Event().wait(0.01)
    assert ref2.version == "2"
    assert set(load.statuses) == {200}, (load.statuses, load.errors[:3])
    assert load.labels[before] > 0 and load.labels[after] > 0  # both versions answered, none failed
    assert client.predict("tree", [record])[0]["label"] == int(after)
    # the pinned first version still answers while loaded
    client.create_pipeline("tree-v1", [ref1])
    assert client.predict("tree-v1", [record])[0]["label"] == int(before)
    served = client.model("cancer_tree")["versions"]
    assert [[s["runtime"] for s in v["served_by"]] for v in served] == [["scikit"], ["scikit"]]
    assert pids(mesh) == started


def _tar(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


GOOD_MANIFEST = json.dumps({"framework": "sklearn", "artifact": "model.joblib", "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1]}], "outputs": [{"name": "y", "datatype": "FP64", "shape": [-1]}]}).encode()


@pytest.mark.parametrize(
    "body, status, code",
    [
        (_tar({"model.json": GOOD_MANIFEST, "../escape.joblib": b"x"}), 400, "bad_path"),
        (_tar({"model.json": GOOD_MANIFEST, "/etc/cron.d/x": b"x"}), 400, "bad_path"),
        (_tar({"model.json": GOOD_MANIFEST, "model.joblib": b"x"}, symlink="link"), 400, "bad_path"),
        (_tar({"model.json": b"{not json", "model.joblib": b"x"}), 422, "bad_manifest"),
        (_tar({"model.json": GOOD_MANIFEST}), 422, "bad_manifest"),  # its artifact is missing
        (b"this is not a tar archive", 400, "bad_archive"),
    ],
    ids=["traversal", "absolute", "symlink", "broken-json", "missing-artifact", "not-an-archive"],
)
def test_bad_uploads_are_refused_and_leave_nothing_behind(mesh, body, status, code):
    before = uploads(mesh)
    response = httpx.post(f"{mesh.manager_url}/api/v1/models/evil", content=body, headers={"content-type": "application/gzip"}, timeout=10)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert uploads(mesh) == before
    assert httpx.get(f"{mesh.manager_url}/api/v1/models/evil", timeout=5).status_code == 404


def test_oversized_upload_is_refused_with_413_and_leaves_nothing_behind(mesh):
    before = uploads(mesh)
    body = _tar({"model.json": GOOD_MANIFEST, "model.joblib": np.random.default_rng(0).bytes(UPLOAD_LIMIT + 1024)})
    response = httpx.post(f"{mesh.manager_url}/api/v1/models/huge", content=body, headers={"content-type": "application/gzip"}, timeout=30)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["code"] in ("too_large", "payload_too_large")
    assert uploads(mesh) == before


def test_upload_needs_an_archive_content_type(mesh):
    response = httpx.post(f"{mesh.manager_url}/api/v1/models/m", json={"a": 1}, timeout=5)
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_media_type"


def test_sdk_errors_carry_the_servers_code_message_and_details(mesh, client):
    with pytest.raises(SluiceError) as missing:
        client.predict("no-such-pipeline", [{"x": 1}])
    assert missing.value.status == 404 and missing.value.code == "not_found"
    with pytest.raises(SluiceError) as in_use:
        client.delete_model("cancer_lr")
    assert in_use.value.status == 409 and in_use.value.code == "model_in_use"
    assert in_use.value.details["pipelines"] == ["cancer"]
    with pytest.raises(SluiceError) as unknown:
        client.load("scikit", "no_such_model")
    assert unknown.value.status == 404 and "no_such_model" in unknown.value.message
    with pytest.raises(SluiceError) as broken:
        client.create_pipeline("bad", ["scikit/iris_classifier", "scikit/iris_scaler"])
    assert broken.value.status == 422 and broken.value.code == "signature_mismatch"
    assert broken.value.details["stage"] == 1


def test_unload_refused_while_used_then_delete_when_unused(mesh, client):
    with pytest.raises(SluiceError) as in_use:
        client.unload("scikit", "cancer_tree", "1")  # pinned by tree-v1
    assert in_use.value.status == 409 and in_use.value.details["pipelines"] == ["tree-v1"]
    client.delete_pipeline("tree-v1")
    client.unload("scikit", "cancer_tree", "1")
    with pytest.raises(SluiceError) as gone:
        client.create_pipeline("tree-v1", ["scikit/cancer_tree:1"])
    assert gone.value.code == "unknown_version"
    client.delete_pipeline("tree")
    before = uploads(mesh)
    client.delete_model("cancer_tree")
    assert not any(p.startswith("cancer_tree") for p in uploads(mesh)) and before != uploads(mesh)
    with pytest.raises(SluiceError) as deleted:
        client.model("cancer_tree")
    assert deleted.value.status == 404
    runtime = httpx.get(f"{mesh.manager_url}/api/v1/runtimes/scikit", timeout=5).json()
    assert "cancer_tree" not in {m["name"] for m in runtime["models"]}


def test_restarted_runtime_loads_its_recorded_models_before_serving(mesh, client, cancer):
    X, _ = cancer
    mesh.stop_runtime("scikit")
    mesh.start_runtime("scikit")  # returns once it has registered again
    answer = client.predict("cancer", X.iloc[:3].to_dict(orient="records"))
    assert len(answer) == 3 and {"label", "probabilities"} <= set(answer[0])


def test_cli_upload_models_and_predict(mesh, tmp_path, cancer):
    import joblib

    X, y = cancer
    estimator = LogisticRegression(max_iter=2000).fit(X.to_numpy(), y)  # no feature names: one [-1, 6] input
    path = tmp_path / "lr.joblib"
    joblib.dump(estimator, path)
    runner = CliRunner()
    env = {"SLUICE_MANAGER_URL": mesh.manager_url, "COLUMNS": "200"}
    result = runner.invoke(cli, ["upload", str(path), "--name", "cli_lr", "--runtime", "scikit"], env=env)
    assert result.exit_code == 0, result.output
    assert "uploaded cli_lr version 1" in result.output
    listing = runner.invoke(cli, ["models"], env=env)
    assert listing.exit_code == 0 and "cli_lr" in listing.output
    Client(mesh.manager_url).create_pipeline("cli", [ModelRef("cli_lr", "1", "scikit")])
    records = tmp_path / "records.json"
    records.write_text(json.dumps([{"input": row} for row in X.iloc[:4].to_numpy().tolist()]))
    predicted = runner.invoke(cli, ["predict", "cli", "-f", str(records)], env=env)
    assert predicted.exit_code == 0, predicted.output
    assert [r["label"] for r in json.loads(predicted.stdout)] == estimator.predict(X.iloc[:4].to_numpy()).tolist()
    failed = runner.invoke(cli, ["predict", "nope", "-f", str(records)], env=env)
    assert failed.exit_code == 1 and "404 not_found" in failed.output
