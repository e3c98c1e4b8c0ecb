"""Fetches a model version's files from the model repository into a local cache, and
checks every file's bytes before any loader may open it.

What a file must hash to (``Digests``: path -> SHA-256) comes from one of two places:

* the manager (``expected``): the digests it recorded when the version was deployed,
  sent with a hot load or fetched from the manager's API (``runtimes.sdk.digests``).
  Then the recorded files are exactly the version's files: each is downloaded by its
  recorded path, whatever the repository now lists, and the repository's own
  listing (and the digests in it) is not read at all;
* the repository's own listing, only when there is no manager to ask (a runtime run
  on its own, e.g. in tests): a check against corruption in transit, not against a
  repository that lies. ``runtimes.sdk.models`` warns (or, with
  ``SLUICE_RUNTIME_REQUIRE_DIGESTS``, refuses) before it gets here.

A file is downloaded to ``<file>.part`` and hashed while it is written; it takes its
place only when the digest matches, else it is deleted and ``DigestMismatch`` names
the file and both digests. A cached file is used only if it hashes to the expected
digest; otherwise it is downloaded again and checked again. Files in the version's
cache directory that are not among the expected ones are removed, so a loader that
walks a directory (a Spark pipeline) sees only checked files. The manifest the
loader gets is the version's own ``model.json`` as checked on local disk (not the
repository's metadata answer), and its ``artifact`` must be a safe relative path
that names one of the checked files or directories.

Failures are told apart, because a runtime answers them differently:
``ModelNotInRepository`` (the repository has no such model or version: its own
message is kept), ``RepositoryUnavailable`` (it cannot be reached, or answers 5xx),
``DigestMismatch`` (a file's bytes are not the recorded ones), ``UnsafeArtifact``
(an unsafe name, version or path) and plain ``ModelLoadError`` (anything else the
repository refuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import httpx

from runtimes.sdk.model import ModelArtifact, ModelLoadError
from sluice.files import sha256_file
from sluice.paths import UnsafePath, check_version, is_sha256, relative_parts

log = logging.getLogger(__name__)

#: a version's files and the SHA-256 (lowercase hex) each must have, by relative POSIX path
Digests = Mapping[str, str]

_PART = ".part"


class ModelNotInRepository(ModelLoadError):
    """The repository has no such model, or no such version of it."""


class RepositoryUnavailable(ModelLoadError):
    """The repository could not be reached, or failed (5xx)."""


class UnsafeArtifact(ModelLoadError):
    """A model name, version, file path or manifest ``artifact`` that could leave its directory."""


class DigestMismatch(ModelLoadError):
    """A file whose bytes do not hash to the digest it must have; nothing opened it."""

    def __init__(self, model: str, version: str, path: str, expected: str, actual: str, source: str):
        super().__init__(
            f"model {model!r} version {version}: file {path!r} has sha256 {actual}, but {source} "
            f"{expected}; refused before loading"
        )
        self.model, self.version, self.path = model, version, path
        self.expected, self.actual = expected, actual


def _message(response: httpx.Response) -> str:
    """The repository's error message (its JSON error shape), else the body's start."""
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:300] or response.reason_phrase


def _check(response: httpx.Response, what: str) -> None:
    if response.status_code == 404:
        raise ModelNotInRepository(f"the repository has no {what}: {_message(response)}")
    if response.status_code >= 500:
        raise RepositoryUnavailable(f"the repository failed ({response.status_code}) for {what}: {_message(response)}")
    if response.status_code >= 400:
        raise ModelLoadError(f"the repository refused {what} ({response.status_code}): {_message(response)}")


@contextlib.contextmanager
def _reachable(client: httpx.AsyncClient) -> Iterator[None]:
    try:
        yield
    except httpx.TransportError as exc:  # connect, read, timeouts, protocol errors
        raise RepositoryUnavailable(f"the repository at {client.base_url} is unreachable: {type(exc).__name__}: {exc}") from exc


def _segment(value: str, what: str) -> str:
    """A model name as one path segment (URL and cache directory), or refused."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ModelNotInRepository(f"the repository has no {what} {value!r}: not a valid {what}")
    return value


def safe_version(version: str) -> str:
    """``version`` as one safe path segment, else ``UnsafeArtifact``."""
    try:
        return check_version(version)
    except UnsafePath as exc:
        raise UnsafeArtifact(f"version {exc}") from None


def safe_path(path: str, what: str = "file path") -> PurePosixPath:
    """A relative path inside a model version, normalised, else ``UnsafeArtifact``."""
    try:
        return PurePosixPath(*relative_parts(path))
    except UnsafePath as exc:
        raise UnsafeArtifact(f"{what} {exc}") from None


def check_digests(digests: Any) -> dict[str, str]:
    """A ``{path: sha256}`` mapping with safe paths and well-formed digests (normalised
    paths), else ``UnsafeArtifact`` saying what is wrong."""
    if not isinstance(digests, Mapping) or not digests:
        raise UnsafeArtifact("expected digests must be a non-empty object of {path: sha256}")
    checked: dict[str, str] = {}
    for path, digest in digests.items():
        relative = safe_path(path).as_posix()
        if not is_sha256(digest):
            raise UnsafeArtifact(f"the expected digest of {path!r} is not a SHA-256 (64 lowercase hex digits): {digest!r}")
        if relative in checked:
            raise UnsafeArtifact(f"file {path!r} is listed twice in the expected digests")
        checked[relative] = digest
    return checked


async def model_metadata(client: httpx.AsyncClient, name: str, version: str = "") -> dict[str, Any]:
    """The repository's metadata of ``name`` at ``version`` (default: the model's default
    version, which its version policy names, else the latest); its ``version`` key is the
    version it resolved to, and ``default_version``, ``load_versions`` and
    ``version_policy`` carry the model's policy (``runtimes.sdk.models`` loads by them)."""
    _segment(name, "model")
    if version:
        safe_version(version)
    what = f"model {name!r}" + (f" version {version!r}" if version else "")
    with _reachable(client):
        response = await client.get(f"/metadata/{quote(name, safe='')}", params={"version": version} if version else {})
    _check(response, what)
    return response.json()


async def _listed(client: httpx.AsyncClient, path_name: str, version: str, what: str) -> dict[str, str]:
    """The repository's own listing as ``{path: sha256}`` (used only without a manager)."""
    with _reachable(client):
        listing = await client.get(f"/files/{path_name}", params={"version": version})
    _check(listing, what)
    try:
        return check_digests({item["path"]: item["sha256"] for item in listing.json()["files"]})
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"the repository's file listing of {what} is malformed: {exc}") from None


async def fetch_model(
    client: httpx.AsyncClient,
    ref: str,
    cache_dir: Path,
    metadata: dict[str, Any] | None = None,
    expected: Digests | None = None,
) -> ModelArtifact:
    """Download ``name[:version]`` (default: the model's default version) and return its local artifact, every
    file checked. ``metadata``: the version's metadata when the caller already has it.
    ``expected``: the digests the manager recorded for the version (``{path: sha256}``);
    None: check against the repository's own listing (no manager to ask)."""
    name, _, version = ref.partition(":")
    _segment(name, "model")
    if version:
        safe_version(version)
    if metadata is None:
        metadata = await model_metadata(client, name, version)
    resolved = safe_version(str(metadata["version"]))
    if version and resolved != version:
        raise ModelLoadError(f"asked the repository for model {name!r} version {version!r}, it answered version {resolved!r}")
    version = resolved
    what = f"model {name!r} version {version!r}"
    path_name = quote(name, safe="")
    if expected is not None:
        files, source = check_digests(expected), "the manager recorded"
    else:
        files, source = await _listed(client, path_name, version, what), "the repository lists"
    target = cache_dir / name / version
    for relative, digest in sorted(files.items()):
        local = target.joinpath(*PurePosixPath(relative).parts)
        if local.is_file():
            cached = await asyncio.to_thread(sha256_file, local)
            if cached == digest:
                continue
            log.warning("%s: cached file %r has sha256 %s, not %s; downloading it again", what, relative, cached, digest)
        await _download(client, path_name, version, relative, local, digest, what, source, name)
    _prune(target, set(files))
    manifest = _manifest(target, files, metadata, what)
    return ModelArtifact(name=name, version=version, path=target, manifest=manifest)


async def _download(
    client: httpx.AsyncClient, path_name: str, version: str, relative: str, local: Path,
    digest: str, what: str, source: str, name: str,
) -> None:
    """Stream one file to ``<local>.part`` while hashing it; rename it into place only if
    it hashes to ``digest``."""
    if local.is_dir():
        shutil.rmtree(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    partial = local.with_name(local.name + _PART)
    hasher = hashlib.sha256()
    try:
        with _reachable(client):
            async with client.stream("GET", f"/download/{path_name}/{quote(relative)}", params={"version": version}) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _check(response, f"file {relative!r} of {what}")
                with open(partial, "wb") as f:
                    async for chunk in response.aiter_bytes():
                        hasher.update(chunk)
                        f.write(chunk)
        actual = hasher.hexdigest()
        if actual != digest:
            raise DigestMismatch(name, version, relative, digest, actual, source)
        partial.replace(local)
    except BaseException:
        partial.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            if local.is_file() and sha256_file(local) != digest:
                local.unlink()  # never leave a file that fails its check where a loader could find it
        raise


def _prune(target: Path, files: set[str]) -> None:
    """Remove what is in the version's cache directory but not among ``files``."""
    if not target.is_dir():
        return
    for path in sorted(target.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        relative = path.relative_to(target).as_posix()
        if path.is_symlink() or (path.is_file() and relative not in files):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _manifest(target: Path, files: dict[str, str], metadata: dict[str, Any], what: str) -> dict[str, Any]:
    """The version's ``model.json`` as checked on disk (Sluice layout), else the metadata's
    (Triton layout: none); its ``artifact`` must name a checked file or directory."""
    if "model.json" in files:
        try:
            manifest = json.loads((target / "model.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise ModelLoadError(f"{what}: model.json cannot be read: {exc}") from None
        if not isinstance(manifest, dict):
            raise ModelLoadError(f"{what}: model.json is not a JSON object")
    else:
        manifest = metadata.get("manifest") or {}
    if "artifact" in manifest:
        artifact = manifest["artifact"]
        if not isinstance(artifact, str):
            raise UnsafeArtifact(f"{what}: the manifest's artifact must be a path, not {type(artifact).__name__}")
        relative = safe_path(artifact, f"{what}: the manifest's artifact").as_posix()
        if relative not in files and not any(f.startswith(relative + "/") for f in files):
            raise UnsafeArtifact(f"{what}: the manifest's artifact {artifact!r} is not one of the version's checked files")
    return manifest


class ModelRepository:
    """The model repository as one runtime sees it: its URL and the local file cache."""

    def __init__(self, url: str, cache_dir: Path | str, timeout_s: float = 60.0):
        self.url = url
        self.cache_dir = Path(cache_dir)
        self.client = httpx.AsyncClient(base_url=url, timeout=timeout_s)

    async def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        return await model_metadata(self.client, name, version)

    async def fetch(
        self, name: str, version: str = "", metadata: dict[str, Any] | None = None, expected: Digests | None = None
    ) -> ModelArtifact:
        ref = f"{name}:{version}" if version else name
        return await fetch_model(self.client, ref, self.cache_dir, metadata, expected)

    async def models(self) -> list[dict[str, Any]]:
        """``GET /models``: every model with its ``versions`` (and ``latest``)."""
        with _reachable(self.client):
            response = await self.client.get("/models")
        _check(response, "model list")
        return response.json()

    async def aclose(self) -> None:
        await self.client.aclose()
