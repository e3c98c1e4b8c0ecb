"""Announces a runtime to Consul (when ``SLUICE_CONSUL_ADDR`` is set) instead of the manager.

The runtime becomes a Consul service: name = the runtime's name, ID = its instance id,
address/port = its public (sidecar) address, tags ``[sluice-runtime, <kind>]``, Meta
``{"sluice-runtime": name, "kind": kind, "models": "a,b:2"}``, and a gRPC health check
(``grpc.health.v1``) on that address, so Consul itself judges the instance; one that
stays critical for ``deregister_after`` is removed by Consul. Registration retries
with back-off until the agent answers, is made again if the agent forgets it (an agent
restart), and is withdrawn on shutdown. Same ``start()``/``stop()`` shape as
``runtimes.sdk.registration.Registration``.

``models`` may be a callable returning the names now loaded: the Meta is built at each
registration, and the service is registered again (same ID and check) when the loaded
models differ from the Meta last sent, found at the same recheck as a forgotten service.

With ACLs on in Consul, every call carries ``SLUICE_CONSUL_TOKEN`` (or ``token``): a
token whose policy lets it write this service (``service "<name>" { policy = "write" }``).
"""

from __future__ import annotations

import asyncio
import logging

from consul import Check, ConsulException

from runtimes.sdk.registration import ModelNames, cancel, instance_id, model_names
from sluice import consul as sluice_consul
from sluice.consul import RUNTIME_TAG

log = logging.getLogger(__name__)

#: Consul rejects a Meta value longer than this
META_VALUE_MAX = 512


def models_meta(models: list[str]) -> str:
    """The ``models`` Meta value: the refs comma-separated, or "" when too long for Consul."""
    joined = ",".join(models)
    return joined if len(joined) <= META_VALUE_MAX else ""


def service_definition(
    name: str,
    kind: str,
    host: str,
    port: int,
    models: list[str],
    check_interval: str = "5s",
    check_timeout: str = "2s",
    deregister_after: str = "1m",
) -> dict:
    """Keyword arguments for py-consul's ``agent.service.register``."""
    meta_value = models_meta(models)
    if models and not meta_value:
        log.warning("model list too long for Consul Meta: the manager will read this runtime's repository index")
    return {
        "name": name,
        "service_id": instance_id(name, host, port),
        "address": host,
        "port": port,
        "tags": [RUNTIME_TAG, kind],
        "meta": {RUNTIME_TAG: name, "kind": kind, "models": meta_value},
        "check": Check.grpc(f"{host}:{port}", check_interval, timeout=check_timeout, deregister=deregister_after),
    }


class ConsulRegistration:
    def __init__(
        self,
        address: str,
        name: str,
        kind: str,
        host: str,
        port: int,
        models: ModelNames,
        *,
        recheck_s: float = 10.0,
        token: str | None = None,
        **check: str,
    ):
        """``check``: ``check_interval``, ``check_timeout``, ``deregister_after`` (Consul durations);
        ``token``: the Consul ACL token (default ``SLUICE_CONSUL_TOKEN``)."""
        sluice_consul.split_address(address)
        self.address = address
        self._token = token
        self.models = models
        self._define = lambda names: service_definition(name, kind, host, port, names, **check)
        self.service = self._define(model_names(models))
        self.service_id: str = self.service["service_id"]
        self.registered = asyncio.Event()
        self._recheck_s = recheck_s
        self._client = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._client = sluice_consul.client(self.address, timeout_s=10, token=self._token)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await cancel(self._task)
        if self._client is None:
            return
        if self.registered.is_set():
            try:
                await asyncio.wait_for(self._client.agent.service.deregister(self.service_id), 2)
                log.info("deregistered %s from Consul", self.service_id)
            except Exception as exc:  # the agent is gone: its check will fail and Consul reaps us
                log.warning("could not deregister %s from Consul: %s", self.service_id, exc)
        await self._client.close()
        self._client = None

    async def _register(self) -> None:
        backoff = 0.1
        self.service = self._define(model_names(self.models))
        while True:
            try:
                await self._client.agent.service.register(**self.service)
                self.registered.set()
                log.info("registered as %s with Consul at %s", self.service_id, self.address)
                return
            except ConsulException as exc:
                log.warning("Consul refused the registration: %s", exc)
            except Exception as exc:  # connection refused, timeout
                log.info("Consul agent at %s not reachable yet (%s); retrying", self.address, type(exc).__name__)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _run(self) -> None:
        await self._register()
        while True:
            await asyncio.sleep(self._recheck_s)
            try:
                services = await self._client.agent.services()
            except Exception as exc:
                log.warning("Consul agent at %s: %s", self.address, exc)
                continue
            if self.service_id not in (services or {}):
                log.warning("the Consul agent forgot %s; registering again", self.service_id)
                await self._register()
            elif models_meta(model_names(self.models)) != self.service["meta"]["models"]:
                log.info("the loaded models changed; registering %s again with Consul", self.service_id)
                await self._register()
