"""What each connected Envoy node holds, learned through the ADS streams' callbacks,
and the wait that orders the control plane's changes on it.

A change is "converged" for a set of types when every connected node (of a role) has
acknowledged, or rejected, the version of its current snapshot for each of them: a
rejected version is settled too, since Envoy keeps its last good config. A node whose
last stream closes is forgotten (and its snapshot dropped from the cache).

Secrets are asked for on demand: Envoy subscribes to a node's SDS secrets only once a
cluster or listener it holds names them (a gateway before its first runtime cluster
never does). So a node is not waited on for secrets it never asked for; once it has
answered a secret push, its secrets count like any other type.

Two waits: ``wait_converged`` (lenient: a rejection counts as settled, and a node that
misses a deadline is marked lagging and skipped until it catches up) for pushes that
need not be confirmed; ``settle`` (strict) for the steps of a pipeline change: it waits
for every node of the role, lagging or not, and reports which node rejected (with
Envoy's ``error_detail``) or did not answer in time, so the change can be rolled back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from manager.xds.resources import SECRET, NodeInfo
from manager.xds.snapshot import SnapshotCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """A node that rejected (NACK) the version of a type it was sent, and Envoy's reason."""

    node: str
    type: str  # short type name, e.g. ScopedRouteConfiguration
    reason: str


@dataclass(frozen=True)
class Convergence:
    """What ``settle`` found: every node acknowledged (``ok``), or who refused or was silent."""

    refused: tuple[Refusal, ...] = ()
    #: nodes that neither acknowledged nor rejected their current version in time
    silent: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.refused and not self.silent


@dataclass
class NodeStatus:
    info: NodeInfo
    streams: int = 0
    acked: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # type -> Envoy's text for the rejected version
    nacks: int = 0
    last_nack: str = ""
    connected_at: float = field(default_factory=time.time)
    lagging: bool = False  # missed an acknowledgement deadline; see wait_converged


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
        self._notify()

    def on_push(self, size: int) -> None:
        self.pushes += 1
        self.bytes_sent += size

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        status = self._nodes.get(node_id)
        if status is not None:
            status.acked[type_url] = version
            if status.lagging and self.node_converged(node_id, tuple(status.acked)):
                status.lagging = False
                log.info("xDS: node %s caught up: waited for again", node_id)
            self._notify()

    def on_nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        status = self._nodes.get(node_id)
        if status is not None:
            status.rejected[type_url] = version
            status.reasons[type_url] = message
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
    def node_converged(self, node_id: str, type_urls: tuple[str, ...]) -> bool:
        status = self._nodes.get(node_id)
        snapshot = self.cache.snapshot(node_id)
        if status is None or snapshot is None:
            return False
        for t in type_urls:
            if t not in status.acked and t not in status.rejected and (snapshot.count(t) == 0 or t == SECRET):
                continue  # nothing of this type was ever there to hold (or asked for)
            if snapshot.version(t) not in (status.acked.get(t), status.rejected.get(t)):
                return False
        return True

    def _waited_for(self, role: str | None) -> list[str]:
        return [n for n, s in self._nodes.items() if not s.lagging and (not role or s.info.role == role)]

    def converged(self, role: str | None, type_urls: tuple[str, ...]) -> bool:
        return all(self.node_converged(node_id, type_urls) for node_id in self._waited_for(role))

    async def wait_converged(self, role: str | None, type_urls: tuple[str, ...], timeout: float) -> bool:
        """Wait until every connected node (of ``role``) settled its current snapshot. A node
        that misses the deadline is marked lagging and not waited for at later changes until
        it has acknowledged everything again, so one stuck Envoy costs one timeout, not one
        per change."""
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.converged(role, type_urls)), timeout)
            return True
        except asyncio.TimeoutError:
            behind = [n for n in self._waited_for(role) if not self.node_converged(n, type_urls)]
            for node_id in behind:
                self._nodes[node_id].lagging = True
            log.warning("xDS: nodes %s did not acknowledge %s within %.1fs: not waited for until they catch up",
                        behind, [t.rsplit(".", 1)[-1] for t in type_urls], timeout)
            return False

    # --- the strict wait of a pipeline change's steps
    def _refusals(self, role: str | None, type_urls: tuple[str, ...]) -> list[Refusal]:
        found = []
        for node_id, status in self._nodes.items():
            snapshot = self.cache.snapshot(node_id)
            if snapshot is None or (role and status.info.role != role):
                continue
            for t in type_urls:
                version = snapshot.version(t)
                if status.rejected.get(t) == version and status.acked.get(t) != version:
                    found.append(Refusal(node_id, t.rsplit(".", 1)[-1], status.reasons.get(t, "")))
        return found

    async def settle(self, role: str | None, type_urls: tuple[str, ...], timeout: float) -> Convergence:
        """Wait until every connected node of ``role`` (lagging ones too) acknowledged or
        rejected its current snapshot's version of ``type_urls``, at most ``timeout``;
        then report the rejections (with Envoy's reasons) and the nodes still silent."""
        def nodes() -> list[str]:
            return [n for n, s in self._nodes.items() if not role or s.info.role == role]

        def settled() -> bool:
            return all(self.node_converged(n, type_urls) for n in nodes())

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(settled), timeout)
        except asyncio.TimeoutError:
            pass
        silent = tuple(sorted(n for n in nodes() if not self.node_converged(n, type_urls)))
        result = Convergence(tuple(self._refusals(role, type_urls)), silent)
        if not result.ok:
            log.warning("xDS: change not confirmed: refused by %s, silent after %.1fs: %s",
                        [(r.node, r.type, r.reason) for r in result.refused] or "none", timeout, list(silent) or "none")
        return result

    async def wait_connected(self, role: str, timeout: float) -> bool:
        """Wait until at least one node of ``role`` has a stream open (a restarted manager
        waits so for the sidecars that reconnect), at most ``timeout``."""
        def connected() -> bool:
            return any(s.info.role == role for s in self._nodes.values())

        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(connected), timeout)
            return True
        except asyncio.TimeoutError:
            return False
