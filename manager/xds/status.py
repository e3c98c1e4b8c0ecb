"""What each connected Envoy node holds, learned through the ADS streams' callbacks,
and the wait that orders the control plane's changes on it.

A change is "converged" for a set of types when every connected node (of a role) has
acknowledged, or rejected, the version of its current snapshot for each of them: a
rejected version is settled too, since Envoy keeps its last good config. A node whose
last stream closes is forgotten (and its snapshot dropped from the cache).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from manager.xds.resources import NodeInfo
from manager.xds.snapshot import SnapshotCache

log = logging.getLogger(__name__)


@dataclass
class NodeStatus:
    info: NodeInfo
    streams: int = 0
    acked: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    nacks: int = 0
    last_nack: str = ""
    connected_at: float = field(default_factory=time.time)


class NodeTracker:
    """The ADS ``Callbacks``: ``provide(info)`` puts a snapshot for a new node in the cache,
    ``forget(info)`` drops what was built for a node that left."""

    def __init__(self, cache: SnapshotCache, provide: Callable[[NodeInfo], None], forget: Callable[[NodeInfo], None] = lambda _: None):
        self.cache = cache
        self._provide = provide
        self._forget = forget
        self._nodes: dict[str, NodeStatus] = {}
        self._changed = asyncio.Condition()
        self.pushes = 0
        self.bytes_sent = 0
        self.nacks = 0

    def nodes(self) -> dict[str, NodeStatus]:
        return dict(self._nodes)

    # --- callbacks from the streams
    def on_node(self, info: NodeInfo) -> None:
        status = self._nodes.get(info.id)
        if status is None or status.info != info:
            if status is not None:
                self._forget(status.info)
            status = NodeStatus(info, streams=status.streams if status else 0)
            self._nodes[info.id] = status
            self._provide(info)
        status.streams += 1

    def on_push(self, size: int) -> None:
        self.pushes += 1
        self.bytes_sent += size

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        status = self._nodes.get(node_id)
        if status is not None:
            status.acked[type_url] = version
            self._notify()

    def on_nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        status = self._nodes.get(node_id)
        if status is not None:
            status.rejected[type_url] = version
            status.nacks += 1
            status.last_nack = message
        self.nacks += 1
        self._notify()

    def on_stream_closed(self, node_id: str) -> None:
        status = self._nodes.get(node_id)
        if status is None:
            return
        status.streams -= 1
        if status.streams <= 0:
            del self._nodes[node_id]
            self.cache.clear(node_id)
            self._forget(status.info)
            log.info("xDS: node %s has no stream left: forgotten", node_id)
        self._notify()

    def _notify(self) -> None:
        asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- what the control plane waits on
    def converged(self, role: str | None, type_urls: tuple[str, ...]) -> bool:
        for node_id, status in self._nodes.items():
            if role and status.info.role != role:
                continue
            snapshot = self.cache.snapshot(node_id)
            if snapshot is None:
                return False
            for t in type_urls:
                if t not in status.acked and t not in status.rejected and snapshot.count(t) == 0:
                    continue  # nothing of this type was ever there to hold
                if snapshot.version(t) not in (status.acked.get(t), status.rejected.get(t)):
                    return False
        return True

    async def wait_converged(self, role: str | None, type_urls: tuple[str, ...], timeout: float) -> bool:
        """Wait until every connected node (of ``role``) settled its current snapshot."""
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.converged(role, type_urls)), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("xDS: %s nodes did not acknowledge %s within %.1fs", role or "all", [t.rsplit(".", 1)[-1] for t in type_urls], timeout)
            return False
