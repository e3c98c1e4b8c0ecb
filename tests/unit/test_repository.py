"""repository/: the model store's HTTP API over a temporary tree in both layouts."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest

from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():  # "use httpx2": the installed httpx is what the project pins
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from repository.app import create
from repository.catalog import Catalog, PathRefused
from repository.settings import RepositorySettings

SECRET = b"TOP-SECRET-OUTSIDE-THE-MODEL-DIR"
IRIS_IN = [{"name": "features", "datatype": "FP32", "shape": [-1, 4]}]
IRIS_OUT = [{"name": "label", "datatype": "INT64", "shape": [-1]}]


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """store/ in the Sluice layout, triton/ in the Triton layout, a secret beside both."""
    store, triton = tmp_path / "store", tmp_path / "triton"
    for version, blob in (("2", b"iris v2"), ("10", b"iris v10")):
        manifest = {"framework": "sklearn", "inputs": IRIS_IN, "outputs": IRIS_OUT, "version_note": version}
        _write(store / "iris" / version / "model.json", json.dumps(manifest))
        _write(store / "iris" / version / "model.joblib", blob)
    _write(store / "iris" / "10" / "sub" / "extra.txt", "nested file")
    _write(store / "broken" / "1" / "model.json", "{not json")  # a half-written manifest: not a model
    (store / "empty").mkdir()
    _write(triton / "mlp" / "config.pbtxt", 'name: "mlp"\nplatform: "onnxruntime_onnx"\n')
    _write(triton / "mlp" / "1" / "model.onnx", b"onnx v1")
    _write(triton / "mlp" / "2" / "model.onnx", b"onnx v2")
    _write(triton / "mlp" / "notes" / "readme.txt", "not a version")  # not numeric: not a version
    _write(triton / "noversions" / "config.pbtxt", "")  # Triton config without versions: not a model
    _write(tmp_path / "secret.txt", SECRET)
    _write(tmp_path / "outside" / "secret.txt", SECRET)
    (store / "iris" / "10" / "leak").symlink_to(tmp_path / "secret.txt")
    (store / "iris" / "10" / "leakdir").symlink_to(tmp_path / "outside", target_is_directory=True)
    (triton / "mlp" / "1" / "leak.onnx").symlink_to(tmp_path / "secret.txt")
    (store / "iris" / "10" / "alias.joblib").symlink_to(store / "iris" / "10" / "model.joblib")  # inside: fine
    return tmp_path


@pytest.fixture
def client(tree: Path) -> TestClient:
    return TestClient(create(RepositorySettings(roots="store:triton:missing"), base_dir=tree))


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    return body["error"]


def test_models_lists_both_layouts(client: TestClient) -> None:
    assert client.get("/models").json() == [
        {"name": "iris", "framework": "sklearn", "versions": ["2", "10"], "latest": "10",
         "default_version": "10", "load_versions": ["10"], "version_policy": None, "policy_error": None},  # no policy file: the latest
        {"name": "mlp", "framework": "triton", "versions": ["1", "2"], "latest": "2",
         "default_version": "2", "load_versions": ["2"], "version_policy": None, "policy_error": None},
    ]
    assert client.get("/healthz").json() == {"status": "ok", "models": 2}


def test_metadata_latest_and_by_version(client: TestClient) -> None:
    latest = client.get("/metadata/iris").json()
    assert latest["version"] == "10"  # numeric order, not "2" > "10"
    assert latest["layout"] == "sluice" and latest["framework"] == "sklearn"
    assert latest["inputs"] == IRIS_IN and latest["outputs"] == IRIS_OUT
    assert latest["manifest"]["version_note"] == "10"
    older = client.get("/metadata/iris", params={"version": "2"}).json()
    assert older["version"] == "2" and older["manifest"]["version_note"] == "2"
    mlp = client.get("/metadata/mlp").json()
    assert (mlp["layout"], mlp["framework"], mlp["versions"], mlp["version"]) == ("triton", "triton", ["1", "2"], "2")


def test_files_with_sha256(client: TestClient, tree: Path) -> None:
    listing = client.get("/files/iris").json()
    assert listing["name"] == "iris" and listing["version"] == "10"
    files = {f["path"]: f for f in listing["files"]}
    assert set(files) == {"alias.joblib", "model.joblib", "model.json", "sub/extra.txt"}  # no leak, no leakdir
    for path, entry in files.items():
        content = (tree / "store" / "iris" / "10" / path).read_bytes()
        assert entry["size"] == len(content)
        assert entry["sha256"] == hashlib.sha256(content).hexdigest()
    v2 = {f["path"] for f in client.get("/files/iris", params={"version": "2"}).json()["files"]}
    assert v2 == {"model.joblib", "model.json"}


def test_files_triton_layout_is_config_plus_one_version(client: TestClient) -> None:
    files = client.get("/files/mlp", params={"version": "1"}).json()["files"]
    assert [f["path"] for f in files] == ["config.pbtxt", "1/model.onnx"]  # not 2/, not notes/, not the leak
    assert files[1]["sha256"] == hashlib.sha256(b"onnx v1").hexdigest()


def test_download(client: TestClient) -> None:
    response = client.get("/download/iris/model.joblib")
    assert response.status_code == 200 and response.content == b"iris v10"
    assert response.headers["content-type"] == "application/octet-stream"
    assert client.get("/download/iris/model.joblib", params={"version": "2"}).content == b"iris v2"
    assert client.get("/download/iris/sub/extra.txt").content == b"nested file"
    assert client.get("/download/iris/alias.joblib").content == b"iris v10"
    assert client.get("/download/mlp/1/model.onnx", params={"version": "1"}).content == b"onnx v1"
    assert client.get("/download/mlp/config.pbtxt").content.startswith(b'name: "mlp"')


def test_download_of_another_versions_file_is_404(client: TestClient) -> None:
    _error(client.get("/download/mlp/2/model.onnx", params={"version": "1"}), 404, "not_found")
    _error(client.get("/download/mlp/notes/readme.txt"), 404, "not_found")
    _error(client.get("/download/iris/sub/extra.txt", params={"version": "2"}), 404, "not_found")


@pytest.mark.parametrize(
    "url",
    [
        "/download/iris/..%2f..%2f..%2fsecret.txt",
        "/download/iris/%2e%2e%2f%2e%2e%2f%2e%2e%2fsecret.txt",
        "/download/iris/%2E%2E/%2E%2E/%2E%2E/secret.txt",
        "/download/iris/sub/..%2f..%2f..%2f..%2fsecret.txt",
        "/download/iris/model.joblib%2f..%2f..%2f..%2f..%2fsecret.txt",
        "/download/iris/..%5c..%5c..%5csecret.txt",
        "/download/iris/sub%5cextra.txt",
        "/download/mlp/..%2f..%2fsecret.txt",
    ],
)
def test_traversal_is_refused_with_400(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert SECRET not in response.content
    error = _error(response, 400, "bad_path")
    assert "is not allowed" in error["message"]


def test_absolute_paths_are_refused(client: TestClient, tree: Path) -> None:
    secret = (tree / "secret.txt").as_posix()
    for url in (f"/download/iris/{secret}", "/download/iris/" + secret.replace("/", "%2F")):
        response = client.get(url)
        assert SECRET not in response.content
        _error(response, 400, "bad_path")


@pytest.mark.parametrize(
    "url",
    [
        "/download/iris/leak",
        "/download/iris/leakdir/secret.txt",
        "/download/mlp/1/leak.onnx?version=1",
        "/download/iris/../../secret.txt",  # the client normalises it; whatever arrives must not leak
        "/download/iris/sub/../../../../secret.txt",
    ],
)
def test_symlinks_and_dot_segments_never_leak(client: TestClient, url: str) -> None:
    response = client.get(url)
    assert response.status_code in (400, 404)
    assert SECRET not in response.content
    _error(response, response.status_code, "bad_path" if response.status_code == 400 else "not_found")


def test_resolve_file_refuses_before_touching_the_disk(tree: Path) -> None:
    catalog = Catalog([tree / "store"])
    entry = catalog.get("iris")
    assert entry is not None
    for bad in ("../../secret.txt", "sub/../../x", "/etc/passwd", "..\\secret.txt", "", "."):
        with pytest.raises(PathRefused):
            entry.resolve_file("10", bad)
    with pytest.raises(FileNotFoundError):
        entry.resolve_file("10", "leak")
    assert entry.resolve_file("10", "sub/extra.txt").read_text() == "nested file"


def test_unknown_model_and_version(client: TestClient) -> None:
    error = _error(client.get("/metadata/nope"), 404, "not_found")
    assert error == {"code": "not_found", "message": "no model 'nope'", "details": {"model": "nope"}}
    error = _error(client.get("/metadata/iris", params={"version": "3"}), 404, "not_found")
    assert error["message"] == "model 'iris' has no version '3'"
    assert error["details"] == {"versions": ["2", "10"]}
    for url in ("/files/nope", "/download/nope/model.json", "/metadata/broken", "/metadata/empty", "/metadata/noversions"):
        _error(client.get(url), 404, "not_found")
    _error(client.get("/files/iris", params={"version": "../10"}), 404, "not_found")
    _error(client.get("/download/iris/missing.bin"), 404, "not_found")
    _error(client.get("/metadata/%2e%2e"), 404, "not_found")


def test_a_model_added_after_start_is_found(client: TestClient, tree: Path) -> None:
    _write(tree / "store" / "late" / "1" / "model.json", json.dumps({"framework": "spark"}))
    assert client.get("/metadata/late").json()["framework"] == "spark"
    assert [m["name"] for m in client.get("/models").json()] == ["iris", "late", "mlp"]


def test_first_root_wins_on_a_name_clash(tree: Path) -> None:
    _write(tree / "triton" / "iris" / "config.pbtxt", "")
    _write(tree / "triton" / "iris" / "1" / "model.onnx", b"x")
    client = TestClient(create(RepositorySettings(roots="store:triton"), base_dir=tree))
    assert client.get("/metadata/iris").json()["layout"] == "sluice"
