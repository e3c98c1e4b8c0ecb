"""Fetches a model version's files from the model repository into a local cache.

Files whose size and SHA-256 already match are not downloaded again, so a restarted
runtime loads from disk.

Failures are told apart, because a runtime answers them differently:
``ModelNotInRepository`` (the repository has no such model or version: its own
message is kept), ``RepositoryUnavailable`` (it cannot be reached, or answers 5xx),
and plain ``ModelLoadError`` (anything else the repository refuses, an unsafe path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from urllib.parse import quote
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

from sluice.files import sha256_file
from runtimes.sdk.model import ModelArtifact, ModelLoadError


class ModelNotInRepository(ModelLoadError):
    """The repository has no such model, or no such version of it."""


class RepositoryUnavailable(ModelLoadError):
    """The repository could not be reached, or failed (5xx)."""


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
    """A model name or version as one path segment (URL and cache directory), or refused."""
    if not value or value in (".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ModelNotInRepository(f"the repository has no {what} {value!r}: not a valid {what}")
    return value


async def model_metadata(client: httpx.AsyncClient, name: str, version: str = "") -> dict[str, Any]:
    """The repository's metadata of ``name`` at ``version`` (default: latest); its
    ``version`` key is the version it resolved to."""
    _segment(name, "model")
    if version:
        _segment(version, "version")
    what = f"model {name!r}" + (f" version {version!r}" if version else "")
    with _reachable(client):
        response = await client.get(f"/metadata/{quote(name, safe='')}", params={"version": version} if version else {})
    _check(response, what)
    return response.json()


async def fetch_model(client: httpx.AsyncClient, ref: str, cache_dir: Path, metadata: dict[str, Any] | None = None) -> ModelArtifact:
    """Download ``name[:version]`` (default: latest) and return its local artifact.
    ``metadata``: the version's metadata when the caller already has it."""
    name, _, version = ref.partition(":")
    if metadata is None:
        metadata = await model_metadata(client, name, version)
    version = _segment(str(metadata["version"]), "version")
    what = f"model {name!r} version {version!r}"
    path_name = quote(_segment(name, "model"), safe="")
    with _reachable(client):
        listing = await client.get(f"/files/{path_name}", params={"version": version})
        _check(listing, what)
        target = cache_dir / name / version
        for item in listing.json()["files"]:
            relative = PurePosixPath(item["path"])
            if relative.is_absolute() or ".." in relative.parts:
                raise ModelLoadError(f"repository listed an unsafe path {item['path']!r}")
            local = target.joinpath(*relative.parts)
            if local.is_file() and local.stat().st_size == item["size"] and sha256_file(local) == item["sha256"]:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            partial = local.with_name(local.name + ".part")
            async with client.stream("GET", f"/download/{path_name}/{quote(item['path'])}", params={"version": version}) as response:
                if response.status_code >= 400:
                    await response.aread()
                    _check(response, f"file {item['path']!r} of {what}")
                with open(partial, "wb") as f:
                    async for chunk in response.aiter_bytes():
                        f.write(chunk)
            partial.replace(local)
    return ModelArtifact(name=name, version=version, path=target, manifest=metadata.get("manifest") or {})


class ModelRepository:
    """The model repository as one runtime sees it: its URL and the local file cache."""

    def __init__(self, url: str, cache_dir: Path | str, timeout_s: float = 60.0):
        self.url = url
        self.cache_dir = Path(cache_dir)
        self.client = httpx.AsyncClient(base_url=url, timeout=timeout_s)

    async def metadata(self, name: str, version: str = "") -> dict[str, Any]:
        return await model_metadata(self.client, name, version)

    async def fetch(self, name: str, version: str = "", metadata: dict[str, Any] | None = None) -> ModelArtifact:
        ref = f"{name}:{version}" if version else name
        return await fetch_model(self.client, ref, self.cache_dir, metadata)

    async def models(self) -> list[dict[str, Any]]:
        """``GET /models``: every model with its ``versions`` (and ``latest``)."""
        with _reachable(self.client):
            response = await self.client.get("/models")
        _check(response, "model list")
        return response.json()

    async def aclose(self) -> None:
        await self.client.aclose()
