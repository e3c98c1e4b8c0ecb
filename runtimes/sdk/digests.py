"""Where a runtime learns what a model version's files must hash to: the manager.

The manager records every file's SHA-256 when a version is deployed (uploaded or
first loaded through its API, or first asked for here) and never changes them
afterwards. A hot load from the manager carries them (the ``sluice.digests`` load
parameter); for everything else (the models of ``SLUICE_RUNTIME_MODELS`` at start,
a load from another caller) the runtime asks
``GET <manager>/api/v1/models/<m>/versions/<v>/digests``, with
``Authorization: Bearer <SLUICE_RUNTIME_TOKEN>`` when a token is set.

The manager may be starting too (compose starts everything at once): connection
failures and 502/503/504 are retried with back-off for ``wait_s``, then the load
fails with ``DigestsUnavailable``. A 404 (no such model or version) is
``ModelNotInRepository``; any other refusal (401/403: a missing or wrong token) is
``DigestsRefused``, at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from urllib.parse import quote

import httpx

from runtimes.sdk.model import ModelLoadError
from runtimes.sdk.repository import ModelNotInRepository, RepositoryUnavailable, check_digests, safe_version

log = logging.getLogger(__name__)

_RETRIED = {502, 503, 504}


class DigestsUnavailable(RepositoryUnavailable):
    """The manager could not be reached (or kept failing) for a version's recorded digests."""


class DigestsRefused(ModelLoadError):
    """The manager refused to give a version's recorded digests (auth, or a bad request)."""


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:300] or response.reason_phrase


class ManagerDigests:
    """The manager's record of model versions' digests, as one runtime asks for it."""

    def __init__(self, manager_url: str, token: str = "", timeout_s: float = 10.0, wait_s: float = 30.0):
        self.manager_url = manager_url
        self.wait_s = wait_s
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=manager_url, timeout=timeout_s, headers=headers)

    async def expected(self, name: str, version: str) -> dict[str, str]:
        """``{path: sha256}`` as the manager recorded it for ``name`` at ``version``."""
        safe_version(version)
        path = f"/api/v1/models/{quote(name, safe='')}/versions/{quote(version, safe='')}/digests"
        what = f"the recorded digests of model {name!r} version {version}"
        deadline = time.monotonic() + self.wait_s
        backoff = 0.1
        while True:
            try:
                response = await self.client.get(path)
                problem = f"answered {response.status_code}: {_message(response)}"
                if response.status_code not in _RETRIED:
                    break
            except httpx.TransportError as exc:
                problem = f"is unreachable: {type(exc).__name__}: {exc}"
            if time.monotonic() + backoff > deadline:
                raise DigestsUnavailable(f"the manager at {self.manager_url} {problem} (asked for {what} for {self.wait_s:g}s)")
            log.info("the manager %s for %s; retrying", problem, what)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        if response.status_code == 404:
            raise ModelNotInRepository(f"the manager has no {what}: {_message(response)}")
        if response.status_code >= 400:
            hint = " (set SLUICE_RUNTIME_TOKEN to a runtime token)" if response.status_code in (401, 403) else ""
            raise DigestsRefused(f"the manager at {self.manager_url} refused {what} ({response.status_code}): {_message(response)}{hint}")
        try:
            body = response.json()
            return check_digests({f["path"]: f["sha256"] for f in body["files"]})
        except (KeyError, TypeError, ValueError) as exc:
            raise DigestsRefused(f"the manager's answer for {what} is malformed: {exc}") from None

    async def aclose(self) -> None:
        await self.client.aclose()
