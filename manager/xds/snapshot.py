"""Immutable per-node snapshots and the cache that holds them.

Modelled on envoyproxy/go-control-plane's snapshot cache: each Envoy node has one
immutable snapshot of every resource type; a type's version is a content hash, so a
change to routes alone re-sends routes alone. The cache also records what each node
has acknowledged (or rejected), which the manager awaits to order its updates.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import any_pb2
from google.protobuf.message import Message

from manager.xds.resources import PUSH_ORDER, NodeInfo

log = logging.getLogger(__name__)

#: put on a stream's inbox when its node's snapshot changed
SNAPSHOT_CHANGED = object()


@dataclass(frozen=True)
class Snapshot:
    resources: dict[str, dict[str, any_pb2.Any]]
    versions: dict[str, str]

    @classmethod
    def of(cls, by_type: dict[str, list[Message]]) -> "Snapshot":
        resources: dict[str, dict[str, any_pb2.Any]] = {}
        versions: dict[str, str] = {}
        for type_url in PUSH_ORDER:
            digest = hashlib.sha256()
            packed: dict[str, any_pb2.Any] = {}
            for message in by_type.get(type_url, []):
                name = getattr(message, "name", "") or getattr(message, "cluster_name")
                blob = message.SerializeToString(deterministic=True)
                digest.update(name.encode() + b"\0" + blob + b"\0")
                packed[name] = any_pb2.Any(type_url=type_url, value=blob)
            resources[type_url] = packed
            versions[type_url] = digest.hexdigest()[:16]
        return cls(resources, versions)

    def select(self, type_url: str, names: list[str]) -> list[any_pb2.Any]:
        """The resources a request asks for: all of them for wildcard (no names)."""
        all_of_type = self.resources.get(type_url, {})
        if not names:
            return list(all_of_type.values())
        return [all_of_type[n] for n in names if n in all_of_type]


@dataclass
class NodeStatus:
    info: NodeInfo
    snapshot: Snapshot
    streams: int = 0
    acked: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    nacks: int = 0
    last_nack: str = ""
    connected_at: float = field(default_factory=time.time)


class SnapshotCache:
    def __init__(self, build: Callable[[NodeInfo], Snapshot]):
        self._build = build
        self._nodes: dict[str, NodeStatus] = {}
        self._inboxes: dict[str, set[asyncio.Queue]] = {}
        self._acks = asyncio.Condition()
        self.pushes = 0
        self.nacks = 0

    def nodes(self) -> dict[str, NodeStatus]:
        return dict(self._nodes)

    def snapshot(self, node_id: str) -> Snapshot:
        return self._nodes[node_id].snapshot

    def attach(self, info: NodeInfo, inbox: asyncio.Queue) -> NodeStatus:
        """A stream for ``info`` opened; build its snapshot if the node is new."""
        status = self._nodes.get(info.id)
        if status is None or status.info != info:
            status = NodeStatus(info=info, snapshot=self._build(info))
            self._nodes[info.id] = status
        status.streams += 1
        self._inboxes.setdefault(info.id, set()).add(inbox)
        return status

    def detach(self, node_id: str, inbox: asyncio.Queue) -> None:
        status = self._nodes.get(node_id)
        if status:
            status.streams = max(0, status.streams - 1)
        self._inboxes.get(node_id, set()).discard(inbox)

    def rebuild(self) -> None:
        """The mesh state changed: rebuild every node's snapshot and wake its streams."""
        for node_id, status in self._nodes.items():
            snapshot = self._build(status.info)
            if snapshot.versions != status.snapshot.versions:
                status.snapshot = snapshot
                for inbox in self._inboxes.get(node_id, ()):
                    inbox.put_nowait(SNAPSHOT_CHANGED)

    async def record_ack(self, node_id: str, type_url: str, version: str) -> None:
        async with self._acks:
            self._nodes[node_id].acked[type_url] = version
            self._acks.notify_all()

    async def record_nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        async with self._acks:
            status = self._nodes[node_id]
            status.rejected[type_url] = version
            status.nacks += 1
            status.last_nack = message
            self.nacks += 1
            self._acks.notify_all()

    def converged(self, role: str | None, type_urls: tuple[str, ...]) -> bool:
        for status in self._nodes.values():
            if status.streams == 0 or (role and status.info.role != role):
                continue
            for t in type_urls:
                # a rejected version is settled too: the node keeps its last good config
                if status.snapshot.versions[t] not in (status.acked.get(t), status.rejected.get(t)):
                    return False
        return True

    async def wait_converged(self, role: str | None, type_urls: tuple[str, ...], timeout: float) -> bool:
        """Wait until every connected node (of ``role``) acknowledged its current snapshot."""
        try:
            async with self._acks:
                await asyncio.wait_for(self._acks.wait_for(lambda: self.converged(role, type_urls)), timeout)
            return True
        except asyncio.TimeoutError:
            log.warning("xDS: %s nodes did not acknowledge %s within %.1fs", role or "all", type_urls, timeout)
            return False
