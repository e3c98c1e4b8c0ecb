"""Discovery from Consul: runtimes are Consul services tagged ``sluice-runtime``.

Two kinds of blocking query (Consul's long poll: ``index`` + ``wait``, answered when
the data's ``X-Consul-Index`` moves past ``index`` or the wait expires):

* ``/v1/catalog/services``: which services carry the tag; one watch per such service;
* ``/v1/health/service/<name>?passing=1&tag=sluice-runtime``: its instances whose
  checks all pass, turned into ``Endpoint(runtime, address, port, service id)``.

Listeners hear of a change only when the endpoints really change (Consul may answer a
blocking query with the same data). On an error a watch keeps the last endpoints it
had and retries with exponential back-off; an index that goes backwards is reset to 0
and one that comes back as 0 is raised to 1, as Consul's blocking-query docs require.
Each instance's Meta (``kind``, ``models``) is passed to ``on_runtime`` listeners once
per appearance, so the manager can read its signatures.

Addresses are admitted like registrations through the manager's API (``admit``: the
runtime networks, ``manager.auth.networks``): each answer's service addresses are
resolved off the event loop (again at every answer, so a name is never cached for
long), an instance that does not resolve or resolves outside the networks is left
out with a warning, and endpoints carry the resolved IP. Calls carry the ACL token
(``SLUICE_CONSUL_TOKEN``) when one is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from manager.registry.base import Discovered, Endpoint, Registry
from sluice import consul as sluice_consul
from sluice.consul import RUNTIME_TAG

log = logging.getLogger(__name__)


#: what this backend finds
Instance = Discovered


def passing(entry: dict[str, Any]) -> bool:
    """True when every check of a health entry (node checks included) is passing."""
    return all(check.get("Status") == "passing" for check in entry.get("Checks") or [])


def instances(entries: list[dict[str, Any]] | None) -> list[Instance]:
    """The passing instances in a ``/v1/health/service/<name>`` answer, sorted.

    Address: ``Service.Address``, or ``Node.Address`` when the service has none (as
    Consul documents). Runtime name: ``Meta["sluice-runtime"]``, else ``Service.Service``.
    """
    out: list[Instance] = []
    for entry in entries or []:
        node, service = entry.get("Node") or {}, entry.get("Service") or {}
        meta = service.get("Meta") or {}
        runtime = meta.get(RUNTIME_TAG) or service.get("Service")
        host = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if not passing(entry):
            continue
        if not (runtime and host and port):
            log.warning("consul: ignoring service entry without name/address/port: %s", service.get("ID"))
            continue
        models = tuple(m.strip() for m in (meta.get("models") or "").split(",") if m.strip())
        endpoint = Endpoint(runtime, host, int(port), service.get("ID") or f"{runtime}-{host}-{port}")
        out.append(Instance(endpoint, meta.get("kind") or "", models))
    return sorted(out)


def next_index(previous: int, returned: str | int) -> int:
    """The index for the next blocking query, after Consul answered with ``returned``."""
    index = int(returned)
    if index < previous:
        return 0  # went backwards (e.g. a restored snapshot): start over without blocking
    return max(index, 1)  # 0 would make every query return at once: a busy loop


class ConsulRegistry(Registry):
    def __init__(
        self,
        address: str,
        *,
        wait_s: float = 30.0,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
        tag: str = RUNTIME_TAG,
        token: str | None = None,
        admit: Callable[[str], Awaitable[str]] | None = None,
    ):
        """``token``: the ACL token (default ``SLUICE_CONSUL_TOKEN``); ``admit(host)``: the IP
        address to dial for a service address, raising when it is not allowed."""
        super().__init__()
        self._token = token
        self._admit = admit
        self._refused: dict[str, str] = {}  # host -> why, warned once
        sluice_consul.split_address(address)  # a bad address fails at startup, not in a loop
        self.address = address
        self._wait_s = wait_s
        self._wait = f"{wait_s:g}s"
        self._backoff = (backoff_min_s, backoff_max_s)
        self._tag = tag
        self._client = None
        self._catalog: asyncio.Task | None = None
        self._watches: dict[str, asyncio.Task] = {}
        self._by_service: dict[str, tuple[Instance, ...]] = {}
        self._announced: dict[Endpoint, Instance] = {}
        self._failing: dict[str, str] = {}  # query -> its last error, while it fails

    def endpoints(self) -> dict[str, list[Endpoint]]:
        out: dict[str, list[Endpoint]] = {}
        for found in self._by_service.values():
            for instance in found:
                out.setdefault(instance.endpoint.runtime, []).append(instance.endpoint)
        return {runtime: sorted(eps) for runtime, eps in sorted(out.items())}

    async def start(self) -> None:
        # a blocking query may last wait + wait/16 (Consul's jitter): bound requests a bit above
        self._client = sluice_consul.client(self.address, timeout_s=self._wait_s * 1.1 + 10, token=self._token)
        self._catalog = asyncio.create_task(self._follow("catalog", self._catalog_query, self._sync_watches))
        log.info("discovering runtimes from Consul at %s (services tagged %r)", self.address, self._tag)

    async def stop(self) -> None:
        tasks = [t for t in (self._catalog, *self._watches.values(), *self._listener_tasks) if t]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._catalog, self._watches = None, {}
        if self._client is not None:
            await self._client.close()
            self._client = None

    def health(self) -> str | None:
        if self._failing:
            what, error = next(iter(self._failing.items()))
            return f"consul {what} failing ({error}): serving the last endpoints it gave"
        return None

    # --- blocking queries
    async def _follow(
        self, what: str, query: Callable[[int], Awaitable[tuple[Any, Any]]], handle: Callable[[Any], Any]
    ) -> None:
        index, delay = 0, self._backoff[0]
        while True:
            try:
                returned, data = await query(index)
                index = next_index(index, returned)
            except Exception as exc:  # HTTP 5xx, connection refused, timeout, bad header
                log.warning("consul %s: %s: %s; keeping the last endpoints, retry in %.2fs", what, type(exc).__name__, exc, delay)
                self._failing[what] = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            self._failing.pop(what, None)
            delay = self._backoff[0]
            handled = handle(data)
            if inspect.isawaitable(handled):
                await handled

    def _catalog_query(self, index: int):
        return self._client.catalog.services(index=index or None, wait=self._wait)

    def _health_query(self, service: str, index: int):
        return self._client.health.service(service, index=index or None, wait=self._wait, passing=True, tag=self._tag)

    # --- what the answers change
    def _sync_watches(self, services: dict[str, list[str]] | None) -> None:
        wanted = {name for name, tags in (services or {}).items() if self._tag in (tags or ())}
        for name in sorted(wanted - self._watches.keys()):
            log.info("consul: watching runtime service %s", name)
            self._watches[name] = asyncio.create_task(
                self._follow(f"health of {name}", functools.partial(self._health_query, name), functools.partial(self._admit_and_apply, name))
            )
        for name in sorted(self._watches.keys() - wanted):
            log.info("consul: service %s left the catalog", name)
            self._watches.pop(name).cancel()
            self._apply(name, [])
            self._by_service.pop(name, None)

    async def _admit_and_apply(self, service: str, entries: list[dict[str, Any]] | None) -> None:
        found = instances(entries)
        if self._admit is not None:
            found = [i for i in [await self._admitted(i) for i in found] if i is not None]
        self._apply(service, entries, tuple(sorted(found)))

    async def _admitted(self, instance: Instance) -> Instance | None:
        """The instance with its address resolved, or None when it is not allowed."""
        host = instance.endpoint.host
        try:
            ip = await self._admit(host)
        except Exception as exc:  # ApiError (outside the networks, unresolvable), or a resolver failure
            why = getattr(exc, "message", str(exc))
            if self._refused.get(host) != why:
                self._refused[host] = why
                log.warning("consul: runtime %s instance %s left out: %s", instance.endpoint.runtime, instance.endpoint.instance_id, why)
            return None
        self._refused.pop(host, None)
        return dataclasses.replace(instance, endpoint=dataclasses.replace(instance.endpoint, host=ip))

    def _apply(self, service: str, entries: list[dict[str, Any]] | None, admitted: tuple[Instance, ...] | None = None) -> None:
        found = admitted if admitted is not None else tuple(instances(entries))
        previous = self._by_service.get(service, ())
        if found == previous:
            return  # Consul answered, but nothing we route on changed
        self._by_service[service] = found
        for gone in set(previous) - set(found):
            self._announced.pop(gone.endpoint, None)
        for instance in found:
            if self._announced.get(instance.endpoint) != instance:
                self._announced[instance.endpoint] = instance
                self._announce(instance)
        log.info("consul: service %s has %d passing instance(s)", service, len(found))
        self._changed()


__all__ = ["ConsulRegistry", "Instance", "instances", "next_index", "passing"]
