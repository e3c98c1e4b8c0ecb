"""Announces a runtime to the manager's embedded registry and keeps it alive.

Registers (retrying with back-off until the manager can read the runtime's models),
heartbeats at the interval the manager asks for, registers again when the manager
no longer knows the instance (e.g. it restarted), and deregisters on shutdown.

The instance id is the manager's: the registration answers it, and heartbeats and the
deregistration use it. In secure mode every call carries the runtime's token
(``SLUICE_RUNTIME_TOKEN``, a ``runtime:<name>`` token) as ``Authorization: Bearer``;
heartbeats must come with the token that registered the instance. A refusal (401,
403, 422: no token, a token for another runtime, a host outside the manager's runtime
networks) is logged with the manager's reason and retried ever more slowly.

The models it announces are read at each registration (``models`` is a list or a
callable returning the names now loaded), so registering again after a manager
restart lists the models loaded at run time too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx

log = logging.getLogger(__name__)


def instance_id(name: str, host: str, port: int) -> str:
    """This instance's service id in Consul (where a client names its services): stable
    across restarts at the same address. The manager's registry issues its own ids."""
    return f"{name}-{host}-{port}".replace("/", "_")


ModelNames = list[str] | Callable[[], list[str]]


def model_names(models: ModelNames) -> list[str]:
    """The names to announce now: the list itself, or what the callable returns."""
    return list(models() if callable(models) else models)


async def cancel(task: asyncio.Task | None) -> None:
    """Cancel a background task and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


#: refusals that will not change by asking again soon (the token or the host is wrong)
_REFUSED = {401, 403, 422}


class Registration:
    def __init__(self, manager_url: str, name: str, kind: str, host: str, port: int, models: ModelNames,
                 token: str | None = None):
        """``token``: the bearer token for the manager (default ``SLUICE_RUNTIME_TOKEN``)."""
        if token is None:
            from runtimes.sdk.settings import RuntimeSettings

            token = RuntimeSettings().token
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.AsyncClient(base_url=manager_url, timeout=10, headers=headers)
        self.models = models
        self.body = {
            "name": name,
            "kind": kind,
            "host": host,
            "port": port,
            "models": model_names(models),
        }
        #: the id the manager gave this instance (None until registered)
        self.instance_id: str | None = None
        self.registered = asyncio.Event()
        self._task: asyncio.Task | None = None

    def _instance_path(self) -> str:
        return f"/api/v1/runtimes/{self.body['name']}/instances/{self.instance_id}"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel(self._task)
        if self.registered.is_set() and self.instance_id:
            try:
                await self.client.delete(self._instance_path(), timeout=2)
            except httpx.HTTPError:
                pass
        await self.client.aclose()

    async def _register(self) -> float:
        backoff = 0.1
        while True:
            ceiling = 2.0
            try:
                self.body["models"] = model_names(self.models)
                response = await self.client.post("/api/v1/runtimes", json=self.body)
                if response.status_code == 201:
                    answer = response.json()
                    self.instance_id = str(answer["instance_id"])
                    self.registered.set()
                    log.info("registered as %s with the manager", self.instance_id)
                    return float(answer["heartbeat_interval_s"])
                if response.status_code in _REFUSED:
                    ceiling = 30.0
                    log.error("registration refused (%d): %s", response.status_code, _reason(response))
                else:
                    log.warning("registration not accepted yet (%d): %s", response.status_code, _reason(response))
            except httpx.HTTPError as exc:
                log.info("manager not reachable yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, ceiling)

    async def _run(self) -> None:
        interval = await self._register()
        while True:
            await asyncio.sleep(interval)
            try:
                response = await self.client.put(f"{self._instance_path()}/heartbeat")
                if response.status_code in (403, 404):
                    log.warning("the manager does not renew instance %s (%d: %s); registering again",
                                self.instance_id, response.status_code, _reason(response))
                    interval = await self._register()
            except httpx.HTTPError as exc:
                log.warning("heartbeat failed: %s", exc)


def _reason(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:
        return response.text[:300]
