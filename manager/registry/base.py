"""The discovery interface the manager builds EDS endpoints from."""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: (runtime name, kind, host, port, model refs) -> learn that runtime's models
RuntimeListener = Callable[[str, str, str, int, list[str]], Awaitable[None]]


@dataclass(frozen=True, order=True)
class Endpoint:
    """A runtime instance as Envoy and the manager dial it: ``host`` is an IP address,
    resolved when the instance registered (``manager.auth.networks``)."""

    runtime: str
    host: str
    port: int
    instance_id: str


@dataclass(frozen=True)
class Holder:
    """Who holds a registered instance: its runtime, and the id of the token that registered it
    (None in dev mode)."""

    instance_id: str
    runtime: str
    token_id: str | None


@dataclass(frozen=True, order=True)
class Discovered:
    """An instance a discovery backend (Consul, Kubernetes) found: where, its kind, and
    the models its service says it serves."""

    endpoint: Endpoint
    kind: str
    models: tuple[str, ...]


class Registry(abc.ABC):
    """Healthy runtime endpoints, and a notification whenever they change."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []
        self._runtime_listeners: list[RuntimeListener] = []
        #: runtime listeners running for announced instances (``_announce``)
        self._listener_tasks: set[asyncio.Task] = set()

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def on_runtime(self, callback: RuntimeListener) -> None:
        """Be told of a runtime instance found by discovery, with what it says it serves.

        Only registries whose runtimes do not announce themselves through the manager
        (Consul) call this; the embedded registry's REST path learns models directly.
        """
        self._runtime_listeners.append(callback)

    async def _runtime_found(self, name: str, kind: str, host: str, port: int, models: list[str]) -> None:
        for callback in self._runtime_listeners:
            try:
                await callback(name, kind, host, port, models)
            except Exception:  # one listener's failure must not stop discovery
                log.exception("runtime listener failed for %s at %s:%d", name, host, port)

    def _announce(self, instance: "Discovered") -> None:
        """Tell the runtime listeners (in a task of their own) of an instance discovery found."""
        if not self._runtime_listeners:
            return
        e = instance.endpoint
        task = asyncio.create_task(self._runtime_found(e.runtime, instance.kind, e.host, e.port, list(instance.models)))
        self._listener_tasks.add(task)
        task.add_done_callback(self._listener_tasks.discard)

    def _changed(self) -> None:
        for callback in self._listeners:
            callback()

    #: whether runtimes register through the manager's API (the embedded registry), or
    #: elsewhere (Consul: then the API's registration calls answer 409)
    accepts_registrations: bool = False

    @abc.abstractmethod
    def endpoints(self) -> dict[str, list[Endpoint]]:
        """Runtime name -> its healthy endpoints, sorted."""

    def register(self, instance_id: str, runtime: str, host: str, port: int, *, ip: str = "",
                 token_id: str | None = None, replaces: str | None = None) -> None:
        """Add an instance announced at ``host`` (resolved to ``ip``), registered with token
        ``token_id``; ``replaces``: the id of an instance at the same address it takes over."""
        raise NotImplementedError(f"{type(self).__name__} does not take registrations")

    def holder(self, instance_id: str) -> Holder | None:
        """Who holds an instance registered through the manager; None when unknown."""
        return None

    def holder_at(self, runtime: str, ip: str, port: int) -> Holder | None:
        """The instance of ``runtime`` registered at this address, if any."""
        return None

    def heartbeat(self, instance_id: str) -> bool:
        """Renew an instance; False when it is unknown."""
        return False

    def deregister(self, instance_id: str) -> bool:
        """Remove an instance; False when it is unknown."""
        return False

    def health(self) -> str | None:
        """None while the registry works; else what is wrong (for the manager's /healthz)."""
        return None

    def last_seen(self) -> dict[str, float]:
        """Instance id -> when it last registered or renewed (wall clock), where known."""
        return {}

    async def start(self) -> None:  # pragma: no cover - trivial default
        """Begin watching (background tasks)."""

    async def stop(self) -> None:  # pragma: no cover - trivial default
        """Stop watching."""
