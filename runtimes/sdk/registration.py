"""Announces a runtime to the manager's embedded registry and keeps it alive.

Registers (retrying with back-off until the manager can read the runtime's models),
heartbeats at the interval the manager asks for, registers again when the manager
no longer knows the instance (e.g. it restarted), and deregisters on shutdown.

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
    """This instance's id in any registry: stable across restarts at the same address."""
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


class Registration:
    def __init__(self, manager_url: str, name: str, kind: str, host: str, port: int, models: ModelNames):
        self.client = httpx.AsyncClient(base_url=manager_url, timeout=10)
        self.models = models
        self.body = {
            "name": name,
            "kind": kind,
            "host": host,
            "port": port,
            "models": model_names(models),
            "instance_id": instance_id(name, host, port),
        }
        self.registered = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel(self._task)
        if self.registered.is_set():
            try:
                await self.client.delete(f"/api/v1/runtimes/{self.body['name']}/instances/{self.body['instance_id']}", timeout=2)
            except httpx.HTTPError:
                pass
        await self.client.aclose()

    async def _register(self) -> float:
        backoff = 0.1
        while True:
            try:
                self.body["models"] = model_names(self.models)
                response = await self.client.post("/api/v1/runtimes", json=self.body)
                if response.status_code == 201:
                    self.registered.set()
                    log.info("registered as %s with the manager", self.body["instance_id"])
                    return float(response.json()["heartbeat_interval_s"])
                log.warning("registration refused (%d): %s", response.status_code, response.text[:300])
            except httpx.HTTPError as exc:
                log.info("manager not reachable yet (%s); retrying", type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _run(self) -> None:
        interval = await self._register()
        path = f"/api/v1/runtimes/{self.body['name']}/instances/{self.body['instance_id']}/heartbeat"
        while True:
            await asyncio.sleep(interval)
            try:
                response = await self.client.put(path)
                if response.status_code == 404:
                    log.warning("the manager forgot this instance; registering again")
                    interval = await self._register()
            except httpx.HTTPError as exc:
                log.warning("heartbeat failed: %s", exc)
