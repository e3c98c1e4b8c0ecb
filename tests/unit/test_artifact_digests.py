"""Model artifacts are checked against the digests the manager recorded before any
loader opens them; names, versions and paths are checked like every other path.

The repository and the manager are fakes behind ``httpx.MockTransport`` (what they
answer is the point: a repository that lies); the runtime side is the SDK's real
``fetch_model``, ``ModelSet`` and, for the gRPC answers, its real ``InferenceService``
on an in-process grpc.aio server. The manager side is the real ``Store`` and
``DigestBook``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
from pathlib import Path
from urllib.parse import unquote

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as pb

from manager import runtime_models
from manager.digests import DigestBook, checked_files
from manager.store import SCHEMA_VERSION, RecordedFile, Store
from runtimes.sdk.digests import DigestsRefused, DigestsUnavailable, ManagerDigests
from runtimes.sdk.model import Model, ModelArtifact, ModelLoadError
from runtimes.sdk.models import ModelSet, UnverifiedRefused
from runtimes.sdk.repository import DigestMismatch, ModelRepository, UnsafeArtifact, fetch_model
from tests.runtime_server import served, stub_of
from sluice.errors import ApiError
from sluice.paths import UnsafePath, check_version, is_sha256, relative_parts
from sluice.tensors import TensorSpec
from sluice.wire import DIGESTS_PARAMETER

MANIFEST = {
    "framework": "test",
    "artifact": "model.bin",
    "inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, 1]}],
    "outputs": [{"name": "y", "datatype": "FP64", "shape": [-1, 1]}],
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_of(manifest: dict | None = None, artifact: bytes = b"the real weights", **extra: bytes) -> dict[str, bytes]:
    return {"model.json": json.dumps(manifest or MANIFEST).encode(), "model.bin": artifact, **extra}


def digests_of(files: dict[str, bytes]) -> dict[str, str]:
    return {path: sha(data) for path, data in files.items()}


class FakeRepository:
    """``/metadata``, ``/files``, ``/download`` over ``{(model, version): {path: bytes}}``.
    ``listed`` overrides what ``/files`` says (a repository that lies about digests)."""

    def __init__(self, models: dict[tuple[str, str], dict[str, bytes]]):
        self.models = models
        self.listed: dict[tuple[str, str], list[dict]] = {}
        self.metadata_manifest: dict[tuple[str, str], dict] = {}
        self.answer_version: str | None = None
        self.requests: list[str] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = unquote(request.url.path)
        self.requests.append(path)
        kind, _, rest = path.lstrip("/").partition("/")
        model, _, file = rest.partition("/")
        versions = sorted(v for m, v in self.models if m == model)
        version = request.url.params.get("version") or (versions[-1] if versions else "")
        files = self.models.get((model, version))
        if files is None:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": f"no model {model!r} version {version!r}", "details": {}}})
        if kind == "metadata":
            manifest = self.metadata_manifest.get((model, version), json.loads(files.get("model.json", b"{}")))
            return httpx.Response(200, json={"name": model, "version": self.answer_version or version, "manifest": manifest})
        if kind == "files":
            listed = self.listed.get((model, version)) or [
                {"path": p, "size": len(d), "sha256": sha(d)} for p, d in sorted(files.items())
            ]
            return httpx.Response(200, json={"name": model, "version": version, "files": listed})
        if kind == "download" and file in files:
            return httpx.Response(200, content=files[file])
        return httpx.Response(404, json={"error": {"code": "not_found", "message": f"no file {file!r}", "details": {}}})

    def downloads(self) -> list[str]:
        return [p for p in self.requests if p.startswith("/download/")]

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url="http://repository", transport=httpx.MockTransport(self.handler))

    def repository(self, cache: Path) -> ModelRepository:
        repository = ModelRepository("http://repository", cache)
        repository.client = self.client()
        return repository


# --- the one path rule ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../model.joblib", "'..' segment"),
        ("sub/../../x", "'..' segment"),
        ("/etc/passwd", "absolute path"),
        ("sub\\model.joblib", "backslash"),
        ("model\x00.joblib", "NUL byte"),
        ("", "empty name"),
        ("./", "empty name"),
        ("x" * 256, "longer than 255 bytes"),
    ],
)
def test_unsafe_relative_paths_are_refused_with_the_reason(path: str, reason: str) -> None:
    with pytest.raises(UnsafePath) as err:
        relative_parts(path)
    assert reason in str(err.value)


def test_safe_relative_paths_are_normalised() -> None:
    assert relative_parts("./pipeline//stages/0/data.parquet") == ("pipeline", "stages", "0", "data.parquet")
    assert relative_parts("model.joblib") == ("model.joblib",)


@pytest.mark.parametrize("version", ["..", ".", "1/2", "a\\b", "", "1\x00", "x" * 65, "/1", "ü"])
def test_unsafe_versions_are_refused(version: str) -> None:
    with pytest.raises(UnsafePath):
        check_version(version)


def test_versions_and_digests_that_pass() -> None:
    assert check_version("12") == "12" and check_version("v1.2-rc_3") == "v1.2-rc_3"
    assert is_sha256(sha(b"x")) and not is_sha256(sha(b"x").upper()) and not is_sha256("ab") and not is_sha256(None)


# --- fetch_model: the runtime's check --------------------------------------------------------


async def test_files_are_checked_against_the_recorded_digests_not_the_repository_listing(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): files})
    async with repo.client() as client:
        artifact = await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
    assert artifact.version == "1" and (artifact.path / "model.bin").read_bytes() == b"the real weights"
    assert artifact.manifest == MANIFEST
    assert not any(p.startswith("/files/") for p in repo.requests)  # the repository's listing is not asked


async def test_a_tampered_file_is_refused_naming_the_file_and_both_digests(tmp_path: Path) -> None:
    recorded = digests_of(files_of())
    tampered = files_of(artifact=b"import os; os.system('evil')")
    repo = FakeRepository({("m", "1"): tampered})
    repo.listed[("m", "1")] = [{"path": p, "size": 1, "sha256": d} for p, d in recorded.items()]  # and lies about it
    async with repo.client() as client:
        with pytest.raises(DigestMismatch) as err:
            await fetch_model(client, "m:1", tmp_path, expected=recorded)
    message = str(err.value)
    assert "'model.bin'" in message and recorded["model.bin"] in message and sha(tampered["model.bin"]) in message
    assert "the manager recorded" in message
    version_dir = tmp_path / "m" / "1"
    assert not (version_dir / "model.bin").exists() and not (version_dir / "model.bin.part").exists()


async def test_a_tampered_cached_file_is_downloaded_again_and_checked(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): files})
    async with repo.client() as client:
        await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
        cached = tmp_path / "m" / "1" / "model.bin"
        repo.requests.clear()
        await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
        assert repo.downloads() == []  # intact cache: nothing downloaded

        cached.write_bytes(b"tampered on the runtime's disk")
        await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
        assert repo.downloads() == ["/download/m/model.bin"]
        assert cached.read_bytes() == b"the real weights"

        # tampered in the cache AND in the repository: refused, and the bad copy is gone
        cached.write_bytes(b"tampered on the runtime's disk")
        repo.models[("m", "1")] = files_of(artifact=b"tampered in the repository")
        with pytest.raises(DigestMismatch):
            await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
        assert not cached.exists()


async def test_files_that_were_not_recorded_are_neither_downloaded_nor_left_in_the_cache(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): {**files, "extra.pkl": b"planted in the repository"}})
    stray = tmp_path / "m" / "1" / "sub" / "planted.pkl"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"planted in the cache")
    async with repo.client() as client:
        artifact = await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
    assert sorted(p.name for p in artifact.path.rglob("*")) == ["model.bin", "model.json"]
    assert "/download/m/extra.pkl" not in repo.requests


async def test_a_recorded_file_the_repository_lost_is_not_found(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): {"model.json": files["model.json"]}})
    async with repo.client() as client:
        with pytest.raises(ModelLoadError, match="model.bin"):
            await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))


async def test_without_recorded_digests_the_repository_listing_is_checked(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): files})
    async with repo.client() as client:
        artifact = await fetch_model(client, "m:1", tmp_path)
        assert (artifact.path / "model.bin").read_bytes() == b"the real weights"
        # bytes that do not match even the repository's own listing (corrupted in transit)
        repo.listed[("m", "1")] = [{"path": p, "size": 1, "sha256": sha(b"other")} for p in files]
        with pytest.raises(DigestMismatch, match="the repository lists"):
            await fetch_model(client, "m:1", tmp_path / "fresh")


async def test_the_manifest_comes_from_the_checked_model_json_not_the_metadata_answer(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): files})
    repo.metadata_manifest[("m", "1")] = {**MANIFEST, "artifact": "model.json"}  # the repository's answer lies
    async with repo.client() as client:
        artifact = await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
    assert artifact.manifest["artifact"] == "model.bin"


@pytest.mark.parametrize(
    ("artifact", "message"),
    [
        ("../../other/model.bin", "'..' segment"),
        ("/etc/passwd", "absolute path"),
        ("sub\\model.bin", "backslash"),
        ("model\x00.bin", "NUL byte"),
        ("missing.bin", "not one of the version's checked files"),
        (7, "must be a path"),
    ],
)
async def test_the_manifest_artifact_is_checked_like_every_path(tmp_path: Path, artifact, message: str) -> None:
    files = files_of({**MANIFEST, "artifact": artifact})
    repo = FakeRepository({("m", "1"): files})
    async with repo.client() as client:
        with pytest.raises(UnsafeArtifact) as err:
            await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
    assert message in str(err.value)


async def test_an_artifact_directory_of_checked_files_is_accepted(tmp_path: Path) -> None:
    files = {"model.json": json.dumps({**MANIFEST, "artifact": "pipeline"}).encode(), "pipeline/stages/0": b"x"}
    repo = FakeRepository({("m", "1"): files})
    async with repo.client() as client:
        artifact = await fetch_model(client, "m:1", tmp_path, expected=digests_of(files))
    assert (artifact.path / "pipeline" / "stages" / "0").read_bytes() == b"x"


@pytest.mark.parametrize("version", ["..", "1/../2", "a\\b", "1\x00"])
async def test_an_unsafe_version_is_refused_before_any_request(tmp_path: Path, version: str) -> None:
    repo = FakeRepository({("m", "1"): files_of()})
    async with repo.client() as client:
        with pytest.raises(UnsafeArtifact):
            await fetch_model(client, f"m:{version}", tmp_path)
    assert repo.requests == []


async def test_unsafe_paths_in_a_listing_or_in_recorded_digests_are_refused(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): files})
    repo.listed[("m", "1")] = [{"path": "../../escape.pkl", "size": 1, "sha256": sha(b"x")}]
    async with repo.client() as client:
        with pytest.raises(UnsafeArtifact, match="'..' segment"):
            await fetch_model(client, "m:1", tmp_path)
        with pytest.raises(UnsafeArtifact, match="absolute path"):
            await fetch_model(client, "m:1", tmp_path, expected={"/etc/cron.d/x": sha(b"x")})
        with pytest.raises(UnsafeArtifact, match="not a SHA-256"):
            await fetch_model(client, "m:1", tmp_path, expected={"model.bin": "abc"})
    assert not (tmp_path.parent / "escape.pkl").exists()


async def test_a_repository_that_answers_another_version_is_refused(tmp_path: Path) -> None:
    repo = FakeRepository({("m", "1"): files_of()})
    repo.answer_version = "2"
    async with repo.client() as client:
        with pytest.raises(ModelLoadError, match="answered version '2'"):
            await fetch_model(client, "m:1", tmp_path)


# --- ModelSet: nothing half-loaded, digests from the manager ------------------------------------


class Loaded(Model):
    def __init__(self, artifact: ModelArtifact):
        super().__init__(artifact, [TensorSpec("x", "FP64", (-1, 1))], [TensorSpec("y", "FP64", (-1, 1))])
        self.weights = (artifact.path / artifact.manifest["artifact"]).read_bytes()

    async def predict(self, inputs):
        return {"y": inputs["x"]}


class RecordingLoader:
    def __init__(self):
        self.opened: list[tuple[str, str]] = []

    def __call__(self, artifact: ModelArtifact) -> Model:
        self.opened.append((artifact.name, artifact.version))
        return Loaded(artifact)


def fake_manager(digests: dict[tuple[str, str], dict[str, str]], status: list[int] | None = None) -> tuple[ManagerDigests, list[httpx.Request]]:
    """A manager whose digests API answers ``digests``; ``status``: statuses to answer first."""
    seen: list[httpx.Request] = []
    pending = list(status or [])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if pending:
            code = pending.pop(0)
            return httpx.Response(code, json={"error": {"code": "x", "message": f"status {code}", "details": {}}})
        _, _, _, _, model, _, version, _ = request.url.path.split("/")
        recorded = digests.get((model, version))
        if recorded is None:
            return httpx.Response(404, json={"error": {"code": "not_found", "message": "no such version", "details": {}}})
        return httpx.Response(200, json={"model": model, "version": version, "recorded_at": 1.0,
                                         "files": [{"path": p, "sha256": d, "size": 1} for p, d in recorded.items()]})

    manager = ManagerDigests("http://manager", token="secret-token", wait_s=5)
    manager.client = httpx.AsyncClient(base_url="http://manager", transport=httpx.MockTransport(handler),
                                       headers=manager.client.headers)
    return manager, seen


async def test_a_load_whose_files_fail_their_check_leaves_the_set_as_it_was(tmp_path: Path) -> None:
    good, recorded = files_of(), digests_of(files_of())
    repo = FakeRepository({("m", "1"): good, ("m", "2"): files_of(artifact=b"evil")})
    loader = RecordingLoader()
    models = ModelSet(loader=loader, repository=repo.repository(tmp_path))
    try:
        await models.load("m", "1", recorded)
        with pytest.raises(DigestMismatch):
            await models.load("m", "2", recorded)  # version 2's bytes are not the recorded ones
        assert loader.opened == [("m", "1")]  # the loader never saw version 2
        assert models.versions("m") == ["1"] and models.get("m").weights == b"the real weights"
    finally:
        await models.close()
        await models.repository.aclose()


async def test_loads_without_digests_ask_the_manager_with_the_runtime_token(tmp_path: Path) -> None:
    files = files_of()
    repo = FakeRepository({("m", "1"): files, ("evil", "1"): files_of(artifact=b"evil"), ("unrecorded", "1"): files})
    manager, seen = fake_manager({("m", "1"): digests_of(files), ("evil", "1"): digests_of(files)})
    loader = RecordingLoader()
    models = ModelSet(loader=loader, repository=repo.repository(tmp_path), digests=manager)
    try:
        await models.load("m")  # latest, resolved by the repository, then checked against the record
        assert [r.url.path for r in seen] == ["/api/v1/models/m/versions/1/digests"]
        assert seen[0].headers["authorization"] == "Bearer secret-token"
        with pytest.raises(DigestMismatch):
            await models.load("evil", "1")
        assert loader.opened == [("m", "1")]
        with pytest.raises(ModelLoadError, match="the manager has no .* no such version"):
            await models.load("unrecorded", "1")
    finally:
        await models.close()
        await models.repository.aclose()
        await manager.aclose()


async def test_the_manager_is_waited_for_then_reported(tmp_path: Path) -> None:
    files = files_of()
    manager, seen = fake_manager({("m", "1"): digests_of(files)}, status=[503, 502])
    assert await manager.expected("m", "1") == digests_of(files)  # retried through a starting manager
    assert len(seen) == 3
    await manager.aclose()

    refused, _ = fake_manager({}, status=[401])
    with pytest.raises(DigestsRefused, match="SLUICE_RUNTIME_TOKEN"):
        await refused.expected("m", "1")
    await refused.aclose()

    nowhere = ManagerDigests("http://127.0.0.1:9", wait_s=0.3)
    with pytest.raises(DigestsUnavailable, match="unreachable"):
        await nowhere.expected("m", "1")
    await nowhere.aclose()


async def test_without_a_manager_loads_warn_or_are_refused_in_secure_mode(tmp_path: Path, caplog) -> None:
    repo = FakeRepository({("m", "1"): files_of()})
    loader = RecordingLoader()
    strict = ModelSet(loader=loader, repository=repo.repository(tmp_path), require_digests=True)
    with pytest.raises(UnverifiedRefused, match="SLUICE_RUNTIME_REQUIRE_DIGESTS"):
        await strict.load("m", "1")
    assert loader.opened == []
    await strict.repository.aclose()

    lenient = ModelSet(loader=loader, repository=repo.repository(tmp_path))
    with caplog.at_level("WARNING"):
        await lenient.load("m", "1")
    assert "repository's own digests only" in caplog.text
    assert loader.opened == [("m", "1")]
    await lenient.close()
    await lenient.repository.aclose()


# --- the gRPC answers of a hot load -----------------------------------------------------------


@contextlib.asynccontextmanager
async def serving(models: ModelSet):
    async with served(models, kind="test") as address, stub_of(address) as stub:
        yield stub


def load_request(model: str, **params: str) -> pb.RepositoryModelLoadRequest:
    return pb.RepositoryModelLoadRequest(
        model_name=model, parameters={k: pb.ModelRepositoryParameter(string_param=v) for k, v in params.items()}
    )


async def test_hot_load_answers(tmp_path: Path) -> None:
    good = files_of()
    recorded = digests_of(good)
    repo = FakeRepository({("m", "1"): good, ("m", "2"): files_of(artifact=b"evil")})
    loader = RecordingLoader()
    async with serving(ModelSet(loader=loader, repository=repo.repository(tmp_path))) as stub:
        # what the manager sends: version + recorded digests (the same helper the manager uses)
        request = pb.RepositoryModelLoadRequest(model_name="m", parameters=runtime_models._parameters("1", recorded))
        await stub.RepositoryModelLoad(request, timeout=10)

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RepositoryModelLoad(load_request("m", version="2", **{DIGESTS_PARAMETER: json.dumps(recorded)}), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = err.value.details()
        assert "'model.bin'" in details and recorded["model.bin"] in details and sha(b"evil") in details

        bad = [
            ({"version": "1", DIGESTS_PARAMETER: "not json"}, "is not JSON"),
            ({"version": "1", DIGESTS_PARAMETER: json.dumps(["model.bin"])}, "non-empty object"),
            ({"version": "1", DIGESTS_PARAMETER: json.dumps({"../x": sha(b"x")})}, "'..' segment"),
            ({DIGESTS_PARAMETER: json.dumps(recorded)}, "needs the parameter 'version'"),
            ({"version": "../1"}, "is not a version"),
        ]
        for params, message in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RepositoryModelLoad(load_request("m", **params), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, params
            assert message in err.value.details(), (params, err.value.details())

        assert loader.opened == [("m", "1")]
        ready = await stub.ModelReady(pb.ModelReadyRequest(name="m", version="1"), timeout=10)
        assert ready.ready
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="m", version="2"), timeout=10)).ready


def test_the_manager_sends_no_digests_without_a_version() -> None:
    assert set(runtime_models._parameters("3", {"a": sha(b"a")})) == {"version", DIGESTS_PARAMETER}
    assert runtime_models._parameters(None, {"a": sha(b"a")}) == {}


# --- the manager's record ------------------------------------------------------------------------


def recorded_files(files: dict[str, bytes]) -> list[RecordedFile]:
    return [RecordedFile(p, sha(d), len(d)) for p, d in sorted(files.items())]


def test_recorded_digests_never_change_and_are_forgotten_on_delete(tmp_path: Path) -> None:
    store = Store(tmp_path / "manager.db")
    first = store.record_model_digests("m", "1", recorded_files(files_of()))
    again = store.record_model_digests("m", "1", recorded_files(files_of(artifact=b"other")))
    assert again == first and first.as_dict() == digests_of(files_of())
    store.record_model_digests("m", "2", recorded_files(files_of()))
    store.close()

    reopened = Store(tmp_path / "manager.db")
    assert reopened.model_digests("m", "1") == first
    reopened.forget_model_digests("m", "1")
    assert reopened.model_digests("m", "1") is None and reopened.model_digests("m", "2") is not None
    reopened.forget_model_digests("m")
    assert reopened.model_digests("m", "2") is None
    with pytest.raises(ValueError):
        reopened.record_model_digests("m", "3", [])


def test_a_version_1_store_gets_the_digests_table(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    Store(path).close()
    with sqlite3.connect(path) as raw:  # back to what a version-1 file is
        raw.execute("DROP TABLE model_digests")
        raw.execute("PRAGMA user_version=1")
    store = Store(path)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    assert store.model_digests("m", "1") is None
    store.record_model_digests("m", "1", recorded_files(files_of()))
    assert store.model_digests("m", "1").as_dict() == digests_of(files_of())


class FakeRepositoryClient:
    def __init__(self, listing: dict):
        self.listing = listing
        self.asked = 0

    async def files(self, name: str, version: str) -> dict:
        self.asked += 1
        return self.listing


async def test_first_use_records_the_listing_then_the_record_holds(tmp_path: Path) -> None:
    files = files_of()
    listing = {"name": "m", "version": "1", "files": [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files.items()]}
    repository = FakeRepositoryClient(listing)
    book = DigestBook(Store(tmp_path / "m.db"), repository)
    assert book.recorded("m", "1") is None
    assert (await book.deployed("m", "1")).as_dict() == digests_of(files)
    listing["files"][1]["sha256"] = sha(b"replaced behind the repository's back")
    assert (await book.deployed("m", "1")).as_dict() == digests_of(files)  # recorded: the repository is not asked again
    assert repository.asked == 1
    book.forget("m", "1")
    assert (await book.deployed("m", "1")).as_dict() != digests_of(files)  # deleted and re-uploaded: a new record


async def test_an_upload_is_recorded_from_the_repository_answer(tmp_path: Path) -> None:
    book = DigestBook(Store(tmp_path / "m.db"), FakeRepositoryClient({}))
    answer = [{"path": p, "size": len(d), "sha256": sha(d)} for p, d in files_of().items()]
    assert book.uploaded("m", "4", answer).as_dict() == digests_of(files_of())
    assert book.recorded("m", "4").version == "4"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ([], "no files listed"),
        ([{"path": "../x", "size": 1, "sha256": sha(b"x")}], "'..' segment"),
        ([{"path": "/x", "size": 1, "sha256": sha(b"x")}], "absolute path"),
        ([{"path": "a\\b", "size": 1, "sha256": sha(b"x")}], "backslash"),
        ([{"path": "x", "size": 1, "sha256": "nope"}], "no SHA-256"),
        ([{"path": "x", "size": -1, "sha256": sha(b"x")}], "bad size"),
        ([{"path": "x", "size": 1}], "malformed entry"),
        ([{"path": "x", "size": 1, "sha256": sha(b"x")}, {"path": "./x", "size": 1, "sha256": sha(b"x")}], "listed twice"),
    ],
)
def test_a_listing_with_unsafe_paths_or_bad_digests_is_not_recorded(files: list, message: str) -> None:
    with pytest.raises(ApiError) as err:
        checked_files("m", "1", files, "the listing")
    assert err.value.status == 502 and message in err.value.message


async def test_an_unsafe_version_is_refused_by_the_manager(tmp_path: Path) -> None:
    book = DigestBook(Store(tmp_path / "m.db"), FakeRepositoryClient({}))
    with pytest.raises(ApiError) as err:
        await book.deployed("m", "..")
    assert err.value.status == 422


@pytest.mark.parametrize("version", ["..", ".", "a/b", "1\x00"])
def test_the_managers_model_calls_refuse_unsafe_versions(version: str) -> None:
    from manager.models import _checked_version

    with pytest.raises(ApiError) as err:
        _checked_version(version)
    assert err.value.status == 422 and err.value.code == "bad_version"
    assert _checked_version("12") == "12" and _checked_version(None) is None
