"""The manager's client of the model repository: model listings, uploads streamed
through, deletes.

The repository is the only place model files live (and models' version policies);
the manager fronts it so that a user (or the SDK) needs one URL, and so that a delete can first be checked against
the pipelines that use the model. An error the repository answers in the project's
JSON shape passes through with its status, code and details; an unreachable
repository is a 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any
from urllib.parse import quote

import httpx

from sluice.errors import ApiError


class RepositoryClient:
    def __init__(self, base_url: str, timeout_s: float = 30.0):
        self.base_url = base_url
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout_s)

    async def close(self) -> None:
        await self._client.aclose()

    async def models(self) -> list[dict[str, Any]]:
        """Every model with its versions, signatures and file digests."""
        return await self._json("GET", "/models", params={"detail": "true"})

    async def model(self, name: str) -> dict[str, Any]:
        return await self._json("GET", f"/models/{name}")

    async def metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        """One version's metadata (the model's default version when ``version`` is None:
        its version policy's, else the latest), with the model's policy fields."""
        return await self._json("GET", f"/metadata/{name}", params={"version": version} if version else None)

    async def files(self, name: str, version: str) -> dict[str, Any]:
        """One version's files with their sizes and SHA-256 (``{"name", "version", "files"}``)."""
        return await self._json("GET", f"/files/{quote(name, safe='')}", params={"version": version})

    async def upload(self, name: str, body: AsyncIterable[bytes], content_type: str, authorization: str = "") -> dict[str, Any]:
        """Stream an upload (tar/tar.gz or multipart) through; answers the new version.
        ``authorization``: the caller's own header, which the repository's sidecar checks
        for the ``deploy`` scope in secure mode (the manager holds no write credential)."""
        headers = {"content-type": content_type, **({"authorization": authorization} if authorization else {})}
        return await self._json("POST", f"/models/{name}", content=body, headers=headers, timeout=None)

    async def put_policy(self, name: str, body: Any, authorization: str = "") -> dict[str, Any]:
        """Set the model's version policy (the repository checks it); answers the policy's fields."""
        headers = {"authorization": authorization} if authorization else None
        return await self._json("PUT", f"/models/{quote(name, safe='')}/version-policy", json=body, headers=headers)

    async def delete_policy(self, name: str, authorization: str = "") -> dict[str, Any]:
        headers = {"authorization": authorization} if authorization else None
        return await self._json("DELETE", f"/models/{quote(name, safe='')}/version-policy", headers=headers)

    async def delete(self, name: str, version: str | None = None, authorization: str = "") -> None:
        await self._send(
            "DELETE", f"/models/{name}", params={"version": version} if version else None,
            headers={"authorization": authorization} if authorization else None,
        )

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return (await self._send(method, path, **kwargs)).json()

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(
                503, f"the model repository at {self.base_url} is unreachable: {type(exc).__name__}",
                "repository_unavailable",
            ) from exc
        if response.is_success:
            return response
        raise _passed_through(response)


def _passed_through(response: httpx.Response) -> ApiError:
    try:
        error = response.json()["error"]
        return ApiError(response.status_code, error["message"], error["code"], **(error.get("details") or {}))
    except (ValueError, KeyError, TypeError):
        return ApiError(502, f"the model repository answered {response.status_code}", "repository_error")
