"""The manager's own registry: runtimes register over REST and renew with heartbeats.

An instance that misses heartbeats for ``ttl_s`` is removed (and so its endpoint
leaves Envoy). Instances are persisted, so after a manager restart they keep serving
for one more TTL while their heartbeats find the new manager.

Each instance keeps the IP address its host resolved to at registration (that is its
endpoint) and the id of the token that registered it (secure mode), which heartbeats
and deregistrations must present. Instances restored from the store whose address is
not an IP inside the runtime networks (``allows``) are dropped: they register again.

On a store several managers share (PostgreSQL): heartbeats also write the instance's
``last_seen``, and ``reload`` (called when another manager wrote ``instances``) takes in
what others registered, renewed or removed, each instance's deadline counted from its
``last_seen``; so every manager routes to every instance and expires the same ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from manager.registry.base import Endpoint, Holder, Registry
from manager.store import InstanceRow, Store

log = logging.getLogger(__name__)


class EmbeddedRegistry(Registry):
    accepts_registrations = True

    def __init__(self, store: Store, ttl_s: float, clock=time.monotonic, allows: Callable[[str], bool] | None = None):
        super().__init__()
        self._store = store
        self._ttl = ttl_s
        self._clock = clock
        self._instances: dict[str, InstanceRow] = {}
        self._deadline: dict[str, float] = {}
        self._sweeper: asyncio.Task | None = None
        self._allows = allows
        self._shared = bool(getattr(store, "shared", False))
        now = clock()
        for inst in store.instances():  # grace period after a restart
            if not _is_ip(inst.address) or (allows is not None and not allows(inst.address)):
                log.warning("runtime %s instance %s at %s: not an address the runtime networks allow; dropped",
                            inst.runtime, inst.id, inst.address)
                store.delete_instance(inst.id)
                continue
            self._instances[inst.id] = inst
            self._deadline[inst.id] = now + ttl_s

    def endpoints(self) -> dict[str, list[Endpoint]]:
        out: dict[str, list[Endpoint]] = {}
        for inst in self._instances.values():
            out.setdefault(inst.runtime, []).append(Endpoint(inst.runtime, inst.address, inst.port, inst.id))
        return {k: sorted(v) for k, v in out.items()}

    def instances(self) -> list[InstanceRow]:
        return list(self._instances.values())

    def health(self) -> str | None:
        if self._sweeper is not None and self._sweeper.done():
            return "the heartbeat sweeper stopped: dead instances would never be removed"
        return None

    def last_seen(self) -> dict[str, float]:
        return {i.id: i.last_seen for i in self._instances.values()}

    def register(self, instance_id: str, runtime: str, host: str, port: int, *, ip: str = "",
                 token_id: str | None = None, replaces: str | None = None) -> None:
        inst = InstanceRow(instance_id, runtime, host, port, time.time(), ip, token_id)
        replaced = self._instances.pop(replaces, None) if replaces and replaces != instance_id else None
        if replaced is not None:
            self._deadline.pop(replaces, None)
            self._store.delete_instance(replaces)
        previous = self._instances.get(instance_id) or replaced
        self._instances[instance_id] = inst
        self._deadline[instance_id] = self._clock() + self._ttl
        self._store.put_instance(inst)
        if previous is None or (previous.address, previous.port, previous.runtime) != (inst.address, port, runtime):
            log.info("runtime %s instance %s registered at %s:%d", runtime, instance_id, inst.address, port)
            self._changed()
        elif replaced is not None:
            log.info("runtime %s instance %s took over from %s at %s:%d", runtime, instance_id, replaces, inst.address, port)

    def holder(self, instance_id: str) -> Holder | None:
        inst = self._instances.get(instance_id)
        return Holder(inst.id, inst.runtime, inst.token_id) if inst else None

    def holder_at(self, runtime: str, ip: str, port: int) -> Holder | None:
        for inst in self._instances.values():
            if inst.runtime == runtime and inst.address == ip and inst.port == port:
                return Holder(inst.id, inst.runtime, inst.token_id)
        return None

    def heartbeat(self, instance_id: str) -> bool:
        if instance_id not in self._instances:
            return False
        self._deadline[instance_id] = self._clock() + self._ttl
        if self._shared:  # the other managers count its deadline from last_seen
            self._instances[instance_id] = replace(self._instances[instance_id], last_seen=time.time())
            self._store.put_instance(self._instances[instance_id])
        return True

    def reload(self) -> None:
        """Shared store: the instances as the store holds them (another manager wrote them)."""
        stored = {inst.id: inst for inst in self._store.instances()}
        before = self.endpoints()
        for instance_id in set(self._instances) - set(stored):
            del self._instances[instance_id]
            self._deadline.pop(instance_id, None)
        now, wall = self._clock(), time.time()
        for inst in stored.values():
            if not _is_ip(inst.address) or (self._allows is not None and not self._allows(inst.address)):
                continue
            self._instances[inst.id] = inst
            self._deadline[inst.id] = max(self._deadline.get(inst.id, 0.0), now + self._ttl - max(0.0, wall - inst.last_seen))
        if self.endpoints() != before:
            self._changed()

    def deregister(self, instance_id: str) -> bool:
        inst = self._instances.pop(instance_id, None)
        self._deadline.pop(instance_id, None)
        self._store.delete_instance(instance_id)
        if inst is not None:
            log.info("runtime %s instance %s deregistered", inst.runtime, instance_id)
            self._changed()
        return inst is not None

    def sweep(self) -> list[str]:
        """Remove instances whose heartbeats stopped; returns their ids."""
        now = self._clock()
        expired = [i for i, deadline in self._deadline.items() if deadline < now]
        for instance_id in expired:
            inst = self._instances.pop(instance_id)
            del self._deadline[instance_id]
            self._store.delete_instance(instance_id)
            log.warning("runtime %s instance %s missed its heartbeats: removed", inst.runtime, instance_id)
        if expired:
            self._changed()
        return expired

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep_forever(self) -> None:
        interval = min(1.0, self._ttl / 4)
        while True:
            await asyncio.sleep(interval)
            self.sweep()


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return False
