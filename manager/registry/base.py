"""The discovery interface the manager builds EDS endpoints from."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Endpoint:
    runtime: str
    host: str
    port: int
    instance_id: str


class Registry(abc.ABC):
    """Healthy runtime endpoints, and a notification whenever they change."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in self._listeners:
            callback()

    @abc.abstractmethod
    def endpoints(self) -> dict[str, list[Endpoint]]:
        """Runtime name -> its healthy endpoints, sorted."""

    async def start(self) -> None:  # pragma: no cover - trivial default
        """Begin watching (background tasks)."""

    async def stop(self) -> None:  # pragma: no cover - trivial default
        """Stop watching."""
