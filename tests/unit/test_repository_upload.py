"""repository/: uploads (tar, tar.gz, multipart), deletes and full model descriptions,
through the real FastAPI app over a temporary tree of roots.

Every refused upload is checked twice: its status and error code, and the whole tree
byte-identical afterwards (nothing staged, nothing half-installed).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

with warnings.catch_warnings():  # "use httpx2": the installed httpx is what the project pins
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

from repository.app import create
from repository.catalog import Catalog
from repository.settings import RepositorySettings

REPO = Path(__file__).resolve().parents[2]
IRIS_ONNX = REPO / "models" / "triton" / "iris_onnx"
FEATURES = {"name": "features", "datatype": "FP32", "shape": [-1, 4]}
LABEL = {"name": "label", "datatype": "INT64", "shape": [-1], "method": "predict"}


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def manifest(**changes: object) -> bytes:
    doc: dict = {"framework": "sklearn", "artifact": "model.joblib", "inputs": [FEATURES], "outputs": [LABEL]}
    doc.update(changes)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


def sluice_files(blob: bytes = b"joblib bytes", **changes: object) -> dict[str, bytes]:
    return {"model.json": manifest(**changes), "model.joblib": blob, "extra/notes.txt": b"nested"}


@pytest.fixture(scope="module")
def triton_files() -> dict[str, bytes]:
    """iris_onnx's config.pbtxt and model, copied from the repository's models/triton."""
    onnx = IRIS_ONNX / "1" / "model.onnx"  # trained by `python -m models.build`; any bytes do for the repository
    return {
        "config.pbtxt": (IRIS_ONNX / "config.pbtxt").read_bytes(),
        "model.onnx": onnx.read_bytes() if onnx.is_file() else b"onnx model bytes",
    }


def tar_bytes(members: dict[str, bytes] | list[tarfile.TarInfo | tuple[str, bytes]], gz: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as tar:
        for item in members.items() if isinstance(members, dict) else members:
            if isinstance(item, tarfile.TarInfo):
                tar.addfile(item)
                continue
            name, data = item
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its type and content: a tree that changes in any way compares unequal."""
    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[relative] = "link:" + os.readlink(path)
            elif path.is_dir():
                out[relative] = "dir"
            else:
                out[relative] = "file:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """store/ (Sluice layout: iris v1, v2) and triton/ (Triton layout: mlp v1)."""
    for version in ("1", "2"):
        _write(tmp_path / "store" / "iris" / version / "model.json", manifest())
        _write(tmp_path / "store" / "iris" / version / "model.joblib", f"iris v{version}")
    _write(tmp_path / "triton" / "mlp" / "config.pbtxt", 'name: "mlp"\nplatform: "onnxruntime_onnx"\n')
    _write(tmp_path / "triton" / "mlp" / "1" / "model.onnx", b"onnx v1")
    return tmp_path


def make_client(tree: Path, **settings: object) -> TestClient:
    return TestClient(create(RepositorySettings(roots="store:triton", **settings), base_dir=tree))


@pytest.fixture
def client(tree: Path) -> TestClient:
    return make_client(tree)


def upload_tar(client: TestClient, name: str, files: dict[str, bytes] | list, gz: bool = True,
               content_type: str | None = None) -> httpx.Response:
    body = tar_bytes(files, gz=gz)
    return client.post(f"/models/{name}", content=body,
                       headers={"content-type": content_type or ("application/gzip" if gz else "application/x-tar")})


def upload_form(client: TestClient, name: str, files: dict[str, bytes]) -> httpx.Response:
    return client.post(f"/models/{name}", files=[("files", (path, data)) for path, data in files.items()])


def error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    return body["error"]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- uploads that succeed ---------------------------------------------------------


def test_tar_gz_upload_of_a_new_sluice_model(client: TestClient, tree: Path) -> None:
    files = sluice_files()
    response = upload_tar(client, "fraud", files)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["version"], body["layout"], body["framework"]) == ("fraud", "1", "sluice", "sklearn")
    assert body["files"] == [
        {"path": p, "size": len(files[p]), "sha256": digest(files[p])} for p in ("extra/notes.txt", "model.joblib", "model.json")
    ]
    assert body["files"] == client.get("/files/fraud").json()["files"]  # as /files lists them
    for path, data in files.items():
        assert (tree / "store" / "fraud" / "1" / path).read_bytes() == data
        download = client.get(f"/download/fraud/{path}", params={"version": "1"})
        assert download.status_code == 200 and download.content == data
    assert client.get("/metadata/fraud").json()["inputs"] == [FEATURES]
    assert [m["name"] for m in client.get("/models").json()] == ["fraud", "iris", "mlp"]
    assert not (tree / "store" / ".staging").exists()


def test_multipart_upload_with_subdirectories(client: TestClient, tree: Path) -> None:
    files = {**sluice_files(blob=b"form joblib"), "deep/er/weights.bin": bytes(range(256)) * 64}
    response = upload_form(client, "formed", files)
    assert response.status_code == 201, response.text
    assert response.json()["version"] == "1"
    listing = {f["path"]: f for f in client.get("/files/formed").json()["files"]}
    assert set(listing) == set(files)
    for path, data in files.items():
        assert listing[path] == {"path": path, "size": len(data), "sha256": digest(data)}
        assert client.get(f"/download/formed/{path}").content == data


def test_plain_tar_and_tar_dot_prefix_and_octet_stream(client: TestClient, tree: Path) -> None:
    """`tar -C dir .` writes ./-prefixed names and a "." entry; gzip is told by its magic bytes, not the type."""
    members: list = [special(".", tarfile.DIRTYPE), special("./extra", tarfile.DIRTYPE)]
    members += [(f"./{path}", data) for path, data in sluice_files().items()]
    response = upload_tar(client, "dotted", members, gz=False, content_type="application/octet-stream")
    assert response.status_code == 201, response.text
    assert [f["path"] for f in response.json()["files"]] == ["extra/notes.txt", "model.joblib", "model.json"]
    gz_as_tar = upload_tar(client, "dotted", sluice_files(), gz=True, content_type="application/x-tar")
    assert gz_as_tar.status_code == 201 and gz_as_tar.json()["version"] == "2"


def test_new_versions_are_numbered_1_2_3(client: TestClient) -> None:
    versions = [upload_tar(client, "counted", sluice_files(blob=f"v{i}".encode())).json()["version"] for i in range(3)]
    assert versions == ["1", "2", "3"]
    assert client.get("/models/counted").json()["latest"] == "3"
    for i, version in enumerate(versions):
        assert client.get("/download/counted/model.joblib", params={"version": version}).content == f"v{i}".encode()


def test_a_new_version_of_an_existing_model_goes_after_the_highest(client: TestClient, tree: Path) -> None:
    (tree / "store" / "iris" / "7").mkdir()  # a numeric directory counts, model.json or not
    (tree / "store" / "iris" / "notes").mkdir()
    response = upload_form(client, "iris", sluice_files(blob=b"iris v8"))
    assert response.status_code == 201 and response.json()["version"] == "8"
    assert (tree / "store" / "iris" / "8" / "model.joblib").read_bytes() == b"iris v8"


def test_triton_model_upload_and_a_second_version(client: TestClient, tree: Path, triton_files: dict[str, bytes]) -> None:
    first = upload_form(client, "iris_onnx", triton_files)
    assert first.status_code == 201, first.text
    assert (first.json()["version"], first.json()["layout"], first.json()["framework"]) == ("1", "triton", "triton")
    assert first.json()["files"] == [
        {"path": "config.pbtxt", "size": len(triton_files["config.pbtxt"]), "sha256": digest(triton_files["config.pbtxt"])},
        {"path": "1/model.onnx", "size": len(triton_files["model.onnx"]), "sha256": digest(triton_files["model.onnx"])},
    ]
    model_dir = tree / "store" / "iris_onnx"  # a new model goes to the upload root: the first root
    assert (model_dir / "config.pbtxt").read_bytes() == triton_files["config.pbtxt"]
    assert (model_dir / "1" / "model.onnx").read_bytes() == triton_files["model.onnx"]
    second = upload_tar(client, "iris_onnx", {**triton_files, "model.onnx": b"retrained"})
    assert second.status_code == 201, second.text
    assert second.json()["version"] == "2"
    assert [f["path"] for f in second.json()["files"]] == ["config.pbtxt", "2/model.onnx"]
    assert client.get("/download/iris_onnx/2/model.onnx").content == b"retrained"
    assert client.get("/download/iris_onnx/1/model.onnx", params={"version": "1"}).content == triton_files["model.onnx"]
    assert client.get("/files/iris_onnx", params={"version": "1"}).json()["files"] == first.json()["files"]


def test_a_new_version_goes_to_the_root_its_model_lives_in(client: TestClient, tree: Path) -> None:
    config = (tree / "triton" / "mlp" / "config.pbtxt").read_bytes()
    response = upload_form(client, "mlp", {"config.pbtxt": config, "model.onnx": b"onnx v2"})
    assert response.status_code == 201 and response.json()["version"] == "2"
    assert (tree / "triton" / "mlp" / "2" / "model.onnx").read_bytes() == b"onnx v2"
    assert not (tree / "store" / "mlp").exists()


def test_upload_root_setting(tree: Path) -> None:
    client = make_client(tree, upload_root="uploads")
    response = upload_tar(client, "fresh", sluice_files())
    assert response.status_code == 201
    assert (tree / "uploads" / "fresh" / "1" / "model.json").is_file()
    assert "fresh" in [m["name"] for m in client.get("/models").json()]  # the upload root is served too
    assert upload_tar(client, "iris", sluice_files()).json()["version"] == "3"  # an existing model stays in store/
    assert (tree / "store" / "iris" / "3").is_dir()


def test_artifact_may_name_a_directory(client: TestClient) -> None:
    files = {"model.json": json.dumps({"framework": "spark", "artifact": "pipeline"}).encode(),
             "pipeline/metadata/part-00000": b"{}", "pipeline/stages/0_x/data.parquet": b"PAR1"}
    assert upload_form(client, "sparky", files).status_code == 201


def test_concurrent_uploads_get_distinct_versions(tree: Path) -> None:
    app = create(RepositorySettings(roots="store:triton"), base_dir=tree)
    blobs = [f"concurrent {i}".encode() * 1000 for i in range(8)]

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://repository") as client:
            return await asyncio.gather(*(
                client.post("/models/racer", content=tar_bytes(sluice_files(blob=blob)),
                            headers={"content-type": "application/gzip"})
                for blob in blobs
            ))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [201] * len(blobs)
    versions = [r.json()["version"] for r in responses]
    assert sorted(versions, key=int) == [str(i) for i in range(1, len(blobs) + 1)]
    client = TestClient(app)
    for blob, version in zip(blobs, versions):  # each version holds its own upload's files
        assert client.get("/download/racer/model.joblib", params={"version": version}).content == blob
    assert not (tree / "store" / ".staging").exists()


# --- uploads that are refused, leaving the tree as it was --------------------------


def refused(tree: Path, response_of, status: int, code: str) -> dict:
    before = snapshot(tree)
    err = error(response_of(), status, code)
    assert snapshot(tree) == before
    return err


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("../x", "'..' segment"),
        ("/etc/passwd", "absolute path"),
        ("a/../../x", "'..' segment"),
        ("sub\\..\\..\\x", "backslash"),
        ("", "empty name"),
        ("n\u00fcl\x00byte", "NUL"),  # in a PAX header: a ustar name field ends at its NUL
    ],
)
def test_bad_member_paths_in_a_tar(client: TestClient, tree: Path, member: str, reason: str) -> None:
    members = [*sluice_files().items(), (member, b"escape")]
    err = refused(tree, lambda: upload_tar(client, "iris", members), 400, "bad_path")
    assert reason in err["message"]
    assert not (tree / "x").exists() and not (tree.parent / "x").exists()


@pytest.mark.parametrize("member", ["../x", "/etc/passwd", "a/../../x", "sub\\x", "C:\\x"])
def test_bad_member_paths_in_a_form(client: TestClient, tree: Path, member: str) -> None:
    err = refused(tree, lambda: upload_form(client, "iris", {**sluice_files(), member: b"escape"}), 400, "bad_path")
    assert err["details"]["member"]


@pytest.mark.parametrize(
    ("member", "what"),
    [
        (special("model.joblib", tarfile.SYMTYPE, "/etc/passwd"), "symlink"),
        (special("alias.json", tarfile.LNKTYPE, "model.json"), "hard link"),
        (special("dev", tarfile.CHRTYPE), "device"),
        (special("pipe", tarfile.FIFOTYPE), "fifo"),
        (special("volume", b"V"), "not a regular file"),  # a GNU volume header
    ],
)
def test_links_and_special_members_are_refused(client: TestClient, tree: Path, member: tarfile.TarInfo, what: str) -> None:
    members = [("model.json", manifest()), member]
    err = refused(tree, lambda: upload_tar(client, "linked", members), 400, "bad_path")
    assert what in err["message"] and err["details"]["member"] == member.name


def test_duplicate_and_clashing_members(client: TestClient, tree: Path) -> None:
    twice = [*sluice_files().items(), ("model.joblib", b"again")]
    assert "duplicate" in refused(tree, lambda: upload_tar(client, "dup", twice), 400, "bad_path")["message"]
    clash = [*sluice_files().items(), ("model.joblib/inner", b"x")]
    refused(tree, lambda: upload_tar(client, "dup", clash), 400, "bad_path")
    twice_form = [("files", ("model.json", manifest())), ("files", ("model.joblib", b"a")), ("files", ("model.joblib", b"b"))]
    refused(tree, lambda: client.post("/models/dup", files=twice_form), 400, "bad_path")


def test_oversized_body_with_content_length(tree: Path) -> None:
    client = make_client(tree, max_upload_bytes=1000)
    body = tar_bytes({"model.json": manifest(), "model.joblib": os.urandom(4000)})
    err = refused(tree, lambda: client.post("/models/big", content=body, headers={"content-type": "application/gzip"}),
                  413, "too_large")
    assert err["details"] == {"limit": 1000}


def test_oversized_streamed_body(tree: Path) -> None:
    client = make_client(tree, max_upload_bytes=1000)
    chunks = (b"x" * 300 for _ in range(10))  # no Content-Length: chunked
    refused(tree, lambda: client.post("/models/big", content=chunks, headers={"content-type": "application/gzip"}),
            413, "too_large")


def _asgi_post(app, headers: list[tuple[bytes, bytes]], chunks: Iterator[bytes]) -> tuple[int, bytes, int]:
    """POST straight through ASGI; answers (status, body, how many body chunks the app pulled)."""
    pulled = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/models/big", "raw_path": b"/models/big", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("repository", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, pulled


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit(tree: Path) -> None:
    app = create(RepositorySettings(roots="store:triton", max_upload_bytes=1000), base_dir=tree)
    before = snapshot(tree)
    endless = (b"y" * 100 for _ in range(1_000_000))
    status, body, pulled = _asgi_post(app, [(b"content-type", b"application/gzip")], endless)
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    assert pulled == 11  # 1,100 bytes: one chunk past the limit, not one more
    assert snapshot(tree) == before


def test_a_content_length_above_the_limit_is_refused_before_reading(tree: Path) -> None:
    app = create(RepositorySettings(roots="store:triton", max_upload_bytes=1000), base_dir=tree)
    before = snapshot(tree)
    status, body, pulled = _asgi_post(
        app, [(b"content-type", b"application/gzip"), (b"content-length", b"1000000000000")], iter([b"z" * 100] * 5)
    )
    assert (status, json.loads(body)["error"]["code"], pulled) == (413, "too_large", 0)
    assert snapshot(tree) == before


def test_tar_bomb(tree: Path) -> None:
    client = make_client(tree, max_unpacked_bytes=1 << 20)
    bomb = tar_bytes({"model.json": manifest(), "model.joblib": bytes(8 << 20)})  # 8 MiB of zeros, a few KiB gzipped
    assert len(bomb) < 20_000
    err = refused(tree, lambda: client.post("/models/bomb", content=bomb, headers={"content-type": "application/gzip"}),
                  413, "too_large")
    assert err["details"] == {"limit": 1 << 20}
    several = {"model.json": manifest(), "model.joblib": bytes(600_000), "b.bin": bytes(600_000)}  # each under, together over
    refused(tree, lambda: upload_tar(client, "bomb", several), 413, "too_large")
    refused(tree, lambda: upload_form(client, "bomb", several), 413, "too_large")


def test_a_huge_extended_header_is_not_read_into_memory(client: TestClient, tree: Path) -> None:
    members = [("model.json", manifest(artifact=None)), ("n" * (2 << 20), b"x")]  # a 2 MiB name: a PAX header
    err = refused(tree, lambda: upload_tar(client, "longname", members), 400, "bad_archive")
    assert "extended header" in err["message"]


def test_too_many_files(tree: Path) -> None:
    client = make_client(tree, max_upload_files=3)
    files = {**sluice_files(), "a.txt": b"a", "b.txt": b"b"}
    err = refused(tree, lambda: upload_tar(client, "many", files), 413, "too_large")
    assert err["details"] == {"limit": 3}
    refused(tree, lambda: upload_form(client, "many", files), 413, "too_large")
    assert upload_tar(client, "many", {"model.json": manifest(artifact=None), "a.txt": b"a"}).status_code == 201


@pytest.mark.parametrize(
    ("model_json", "expected"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"inputs": []}).encode(), "'framework' must be a non-empty string"),
        (json.dumps({"framework": 3}).encode(), "'framework' must be a non-empty string"),
        (manifest(inputs={"name": "x"}), "'inputs' must be a list"),
        (manifest(inputs=["features"]), "inputs[0] must be an object"),
        (manifest(inputs=[{"datatype": "FP32", "shape": [1]}]), "inputs[0].name"),
        (manifest(outputs=[LABEL, {"name": "p", "datatype": "FLOAT32", "shape": [-1]}]), "outputs[1].datatype 'FLOAT32'"),
        (manifest(inputs=[{**FEATURES, "shape": [-2, 4]}]), "inputs[0].shape"),
        (manifest(inputs=[{**FEATURES, "shape": "[-1, 4]"}]), "inputs[0].shape"),
        (manifest(inputs=[{**FEATURES, "shape": [True]}]), "inputs[0].shape"),
        (manifest(artifact="missing.joblib"), "artifact 'missing.joblib' is not among the uploaded files"),
        (manifest(artifact="../model.joblib"), "artifact '../model.joblib' has a '..' segment"),
        (manifest(artifact=["model.joblib"]), "'artifact' must be a string"),
    ],
)
def test_broken_model_json(client: TestClient, tree: Path, model_json: bytes, expected: str) -> None:
    files = {"model.json": model_json, "model.joblib": b"x"}
    err = refused(tree, lambda: upload_tar(client, "broken", files), 422, "bad_manifest")
    assert expected in err["message"], err["message"]


def test_neither_or_both_manifests(client: TestClient, tree: Path, triton_files: dict[str, bytes]) -> None:
    err = refused(tree, lambda: upload_tar(client, "what", {"model.joblib": b"x"}), 422, "bad_manifest")
    assert "neither model.json nor config.pbtxt" in err["message"]
    nested = {"sub/model.json": manifest(), "model.joblib": b"x"}  # only the top level counts
    refused(tree, lambda: upload_tar(client, "what", nested), 422, "bad_manifest")
    both = {**triton_files, "model.json": manifest(artifact=None)}
    assert "both" in refused(tree, lambda: upload_form(client, "what", both), 422, "bad_manifest")["message"]
    refused(tree, lambda: upload_tar(client, "what", []), 422, "bad_manifest")  # an empty archive


def test_triton_config_problems(client: TestClient, tree: Path, triton_files: dict[str, bytes]) -> None:
    err = refused(tree, lambda: upload_form(client, "other_name", triton_files), 422, "bad_manifest")
    assert err["message"] == "config.pbtxt names model 'iris_onnx', but the upload is for model 'other_name'"
    broken = {"config.pbtxt": b'name: "x"\nnot_a_field: 3\n', "model.onnx": b"x"}
    assert "not a Triton ModelConfig" in refused(tree, lambda: upload_form(client, "x", broken), 422, "bad_manifest")["message"]
    binary = {"config.pbtxt": b"\xff\xfe\x00", "model.onnx": b"x"}
    refused(tree, lambda: upload_form(client, "x", binary), 422, "bad_manifest")
    # a config without a name is fine: Triton takes the directory's
    unnamed = {"config.pbtxt": triton_files["config.pbtxt"].replace(b'name: "iris_onnx"', b""), "model.onnx": b"x"}
    assert upload_form(client, "renamed", unnamed).status_code == 201


def test_config_conflict_on_a_triton_model(client: TestClient, tree: Path) -> None:
    other = {"config.pbtxt": b'name: "mlp"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n', "model.onnx": b"v2"}
    err = refused(tree, lambda: upload_form(client, "mlp", other), 409, "config_conflict")
    assert "differs" in err["message"]


def test_layout_conflicts(client: TestClient, tree: Path, triton_files: dict[str, bytes]) -> None:
    as_triton = {**triton_files, "config.pbtxt": triton_files["config.pbtxt"].replace(b"iris_onnx", b"iris")}
    err = refused(tree, lambda: upload_form(client, "iris", as_triton), 409, "layout_conflict")
    assert err["details"] == {"layout": "sluice"}
    err = refused(tree, lambda: upload_tar(client, "mlp", sluice_files()), 409, "layout_conflict")
    assert err["details"] == {"layout": "triton"}


@pytest.mark.parametrize("name", ["bad name", ".hidden", "-dash", "a" * 64, "x!"])
def test_bad_model_names(client: TestClient, tree: Path, name: str) -> None:
    refused(tree, lambda: upload_tar(client, name, sluice_files()), 422, "bad_name")


def test_bad_bodies(client: TestClient, tree: Path) -> None:
    post = client.post
    refused(tree, lambda: post("/models/x", content=b"junk", headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    refused(tree, lambda: post("/models/x", content=b"junk"), 415, "unsupported_media_type")
    refused(tree, lambda: post("/models/x", content=b"not a tar" * 100, headers={"content-type": "application/x-tar"}), 400, "bad_archive")
    refused(tree, lambda: post("/models/x", content=b"", headers={"content-type": "application/gzip"}), 400, "bad_archive")
    truncated = tar_bytes(sluice_files())[:-40]
    refused(tree, lambda: post("/models/x", content=truncated, headers={"content-type": "application/gzip"}), 400, "bad_archive")
    short_member = tar_bytes(sluice_files(blob=os.urandom(5000)), gz=False)[:2048]
    refused(tree, lambda: post("/models/x", content=short_member, headers={"content-type": "application/x-tar"}), 400, "bad_archive")
    form = b'--B\r\nContent-Disposition: form-data; name="files"; filename="model.json"\r\n\r\n{"fram'  # no closing boundary
    refused(tree, lambda: post("/models/x", content=form, headers={"content-type": "multipart/form-data; boundary=B"}), 400, "bad_archive")
    refused(tree, lambda: post("/models/x", content=form, headers={"content-type": "multipart/form-data"}), 400, "bad_archive")
    wrong_field = [("file", ("model.json", manifest(artifact=None)))]
    err = refused(tree, lambda: post("/models/x", files=wrong_field), 400, "bad_archive")
    assert "'file'" in err["message"]
    refused(tree, lambda: post("/models/x", data={"files": "not a file"}, files=[("files", ("model.json", b"{}"))]), 400, "bad_archive")


# --- delete -------------------------------------------------------------------------


def test_delete_one_version_then_the_last(client: TestClient, tree: Path) -> None:
    assert client.delete("/models/iris", params={"version": "1"}).status_code == 204
    assert not (tree / "store" / "iris" / "1").exists()
    assert client.get("/models/iris").json()["versions"][0]["version"] == "2"
    assert client.get("/metadata/iris").json()["versions"] == ["2"]
    error(client.get("/files/iris", params={"version": "1"}), 404, "not_found")
    response = client.delete("/models/iris", params={"version": "2"})
    assert response.status_code == 204 and response.content == b""
    assert not (tree / "store" / "iris").exists()  # the last version takes the model directory with it
    error(client.get("/models/iris"), 404, "not_found")
    assert [m["name"] for m in client.get("/models").json()] == ["mlp"]
    assert client.get("/healthz").json()["models"] == 1
    assert not (tree / "store" / ".staging").exists()


def test_delete_a_whole_model_in_each_layout(client: TestClient, tree: Path) -> None:
    assert upload_form(client, "mlp", {"config.pbtxt": (tree / "triton/mlp/config.pbtxt").read_bytes(), "model.onnx": b"2"}).status_code == 201
    assert client.delete("/models/mlp").status_code == 204
    assert not (tree / "triton" / "mlp").exists()  # config.pbtxt and every version
    assert client.delete("/models/iris").status_code == 204
    assert not (tree / "store" / "iris").exists()
    assert client.get("/models").json() == []
    assert sorted(p.name for p in tree.iterdir()) == ["store", "triton"] and snapshot(tree) == {"store": "dir", "triton": "dir"}


def test_delete_the_last_triton_version_removes_its_config(client: TestClient, tree: Path) -> None:
    assert client.delete("/models/mlp", params={"version": "1"}).status_code == 204
    assert not (tree / "triton" / "mlp").exists()


def test_delete_unknown_model_or_version(client: TestClient, tree: Path) -> None:
    for params, url in (({}, "/models/nope"), ({"version": "3"}, "/models/iris"), ({"version": "../iris"}, "/models/iris"),
                        ({"version": ".."}, "/models/iris"), ({}, "/models/.staging"), ({}, "/models/%2e%2e")):
        refused(tree, lambda: client.delete(url, params=params), 404, "not_found")


def test_upload_after_delete_numbers_from_what_is_left(client: TestClient) -> None:
    assert client.delete("/models/iris", params={"version": "2"}).status_code == 204
    assert upload_tar(client, "iris", sluice_files()).json()["version"] == "2"


# --- describing models ----------------------------------------------------------------


def test_get_model_sluice_layout(client: TestClient, tree: Path) -> None:
    model = client.get("/models/iris").json()
    assert {k: model[k] for k in ("name", "layout", "framework", "latest")} == {
        "name": "iris", "layout": "sluice", "framework": "sklearn", "latest": "2"}
    assert [v["version"] for v in model["versions"]] == ["1", "2"]
    v2 = model["versions"][1]
    assert v2["framework"] == "sklearn"
    assert v2["inputs"] == [FEATURES]
    assert v2["outputs"] == [{"name": "label", "datatype": "INT64", "shape": [-1]}]  # "method" dropped
    assert v2["files"] == client.get("/files/iris", params={"version": "2"}).json()["files"]
    assert {f["path"]: f["sha256"] for f in v2["files"]}["model.joblib"] == digest(b"iris v2")


def test_get_model_triton_layout(client: TestClient, triton_files: dict[str, bytes]) -> None:
    assert upload_tar(client, "iris_onnx", triton_files).status_code == 201
    model = client.get("/models/iris_onnx").json()
    assert {k: model[k] for k in ("name", "layout", "framework", "latest")} == {
        "name": "iris_onnx", "layout": "triton", "framework": "triton", "latest": "1"}
    (version,) = model["versions"]
    assert version["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]  # max_batch_size > 0: -1 first
    assert version["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                                  {"name": "label", "datatype": "INT64", "shape": [-1, 1]}]
    assert [f["path"] for f in version["files"]] == ["config.pbtxt", "1/model.onnx"]
    mlp = client.get("/models/mlp").json()  # no inputs in its config: an empty signature, not an error
    assert mlp["versions"][0]["inputs"] == [] and mlp["versions"][0]["framework"] == "triton"


def test_triton_datatypes_and_unbatched_dims(client: TestClient) -> None:
    config = b"""name: "texty" backend: "python" max_batch_size: 0
        input { name: "text" data_type: TYPE_STRING dims: [ 1 ] }
        output { name: "flags" data_type: TYPE_BOOL dims: [ -1, 2 ] }
        output { name: "half" data_type: TYPE_FP16 dims: [ 3 ] }"""
    assert upload_form(client, "texty", {"config.pbtxt": config, "model.py": b"pass"}).status_code == 201
    version = client.get("/models/texty").json()["versions"][0]
    assert version["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [1]}]
    assert version["outputs"] == [{"name": "flags", "datatype": "BOOL", "shape": [-1, 2]},
                                  {"name": "half", "datatype": "FP16", "shape": [3]}]


def test_models_detail(client: TestClient) -> None:
    summary = client.get("/models").json()
    assert summary[0] == {"name": "iris", "framework": "sklearn", "versions": ["1", "2"], "latest": "2",
                          "default_version": "2", "load_versions": ["2"], "version_policy": None, "policy_error": None}
    detail = client.get("/models", params={"detail": "true"}).json()
    assert [m["name"] for m in detail] == ["iris", "mlp"]
    assert detail == [client.get(f"/models/{m}").json() for m in ("iris", "mlp")]
    error(client.get("/models/nope"), 404, "not_found")


def test_catalog_skips_staging_and_dot_directories(tree: Path) -> None:
    _write(tree / "store" / ".staging" / "abc" / "model" / "1" / "model.json", manifest())
    _write(tree / "store" / ".hidden" / "1" / "model.json", manifest())
    _write(tree / "store" / "iris" / ".partial" / "model.json", manifest())
    catalog = Catalog([tree / "store"])
    assert sorted(catalog.scan()) == ["iris"]
    assert catalog.get(".staging") is None and catalog.get(".hidden") is None
    assert catalog.get("iris").versions == ("1", "2")  # type: ignore[union-attr]


def test_openapi_documents_the_new_operations(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    operations = paths["/models/{name}"]
    assert set(operations) >= {"get", "post", "delete"}
    post = operations["post"]
    assert set(post["responses"]) >= {"201", "400", "409", "413", "415", "422"}
    assert set(post["requestBody"]["content"]) >= {"multipart/form-data", "application/gzip", "application/x-tar"}
    assert "404" in operations["delete"]["responses"] and "204" in operations["delete"]["responses"]
    assert "404" in operations["get"]["responses"]
    assert "detail" in [p["name"] for p in paths["/models"]["get"]["parameters"]]


# --- read-only roots ------------------------------------------------------------------


def test_models_in_read_only_roots_get_no_new_version_and_are_not_deleted(tree: Path) -> None:
    """``read_only_roots``: the example models beside a mesh's upload root are served but
    never changed: an upload of a new version and a delete are refused with 409
    ``read_only`` and the tree is untouched; a new model goes to the (writable) upload root."""
    client = make_client(tree, upload_root="uploads", read_only_roots="store:triton")
    before = snapshot(tree)
    refused(tree, lambda: upload_tar(client, "iris", sluice_files()), 409, "read_only")
    refused(tree, lambda: client.delete("/models/iris", params={"version": "1"}), 409, "read_only")
    refused(tree, lambda: client.delete("/models/mlp"), 409, "read_only")
    assert snapshot(tree) == before
    assert upload_tar(client, "mine", sluice_files()).status_code == 201
    assert (tree / "uploads" / "mine" / "1" / "model.json").is_file()
    assert client.delete("/models/mine").status_code == 204
