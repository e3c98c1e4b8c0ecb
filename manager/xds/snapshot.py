"""Snapshots of Envoy configuration as plain immutable values, and the passive cache
the control plane pushes them into.

Modelled on envoyproxy/go-control-plane: the control plane computes a ``Snapshot``
per node and calls ``SnapshotCache.set_snapshot``; the ADS streams read from the
cache and nothing in the cache calls back into the control plane to build anything.
What happens on the streams (a node connects, acknowledges, rejects) is reported
through a ``Callbacks`` object.

A snapshot holds, per resource type, a few layers of ``ResourceSet``s (for a gateway's
sidecar: its own clusters beside every runtime's cluster), so that thousands of
pipeline resources are shared by every node's snapshot instead of copied into each.
A ``ResourceSet`` is immutable too: an update makes a new set (one dict copy, done in
C) one generation later that remembers which names changed, so a delta stream sends
just those, whatever the number of resources. Versions are content hashes: a
resource's is the hash of its bytes, a type's the XOR of its resources' hashes (O(1)
to update), so identical content always has the same version.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from google.protobuf import any_pb2
from google.protobuf.message import Message

#: how many generations of changed names a ResourceSet remembers for delta streams
HISTORY = 64


@dataclass(frozen=True, slots=True)
class Resource:
    name: str
    version: str
    body: any_pb2.Any
    digest: int  # 64-bit hash of name and bytes: the type version is the XOR of these


def resource(type_url: str, message: Message) -> Resource:
    name = getattr(message, "name", "") or getattr(message, "cluster_name")
    blob = message.SerializeToString(deterministic=True)
    digest = hashlib.blake2b(name.encode() + b"\0" + blob, digest_size=8).digest()
    return Resource(name, digest.hex(), any_pb2.Any(type_url=type_url, value=blob), int.from_bytes(digest, "big"))


class ResourceSet:
    """Immutable resources of one type under one ``lineage`` (e.g. "scopes"), numbered by generation."""

    __slots__ = ("lineage", "generation", "items", "digest", "_history")

    def __init__(self, lineage: str, items: dict[str, Resource], generation: int = 0, digest: int | None = None,
                 history: tuple[tuple[int, frozenset[str]], ...] = ()):
        self.lineage = lineage
        self.items = items
        self.generation = generation
        self.digest = digest if digest is not None else _xor(r.digest for r in items.values())
        self._history = history

    @classmethod
    def of(cls, lineage: str, resources: Iterable[Resource]) -> "ResourceSet":
        return cls(lineage, {r.name: r for r in resources})

    def update(self, upserts: Iterable[Resource] = (), removals: Iterable[str] = ()) -> "ResourceSet":
        """A new set with these resources added or replaced and those names removed
        (the same set when nothing changes)."""
        items = self.items
        digest = self.digest
        changed: set[str] = set()
        copied = False
        for r in upserts:
            old = items.get(r.name)
            if old is not None and old.version == r.version:
                continue
            if not copied:
                items, copied = dict(items), True
            digest ^= r.digest ^ (old.digest if old is not None else 0)
            items[r.name] = r
            changed.add(r.name)
        for name in removals:
            if name in items:
                if not copied:
                    items, copied = dict(items), True
                digest ^= items.pop(name).digest
                changed.add(name)
        if not changed:
            return self
        generation = self.generation + 1
        history = (*self._history[-(HISTORY - 1):], (generation, frozenset(changed)))
        return ResourceSet(self.lineage, items, generation, digest, history)

    def changed_since(self, generation: int) -> set[str] | None:
        """Names that changed after ``generation``, or None when that is older than the history."""
        if generation == self.generation:
            return set()
        if not self._history or self._history[0][0] > generation + 1:
            return None
        names: set[str] = set()
        for gen, changed in self._history:
            if gen > generation:
                names |= changed
        return names


def _xor(values: Iterable[int]) -> int:
    out = 0
    for v in values:
        out ^= v
    return out


@dataclass(frozen=True)
class Snapshot:
    """Everything one node should hold: per type URL, its layers of resources."""

    layers: dict[str, tuple[ResourceSet, ...]]

    def version(self, type_url: str) -> str:
        return f"{_xor(layer.digest for layer in self.layers.get(type_url, ())):016x}"

    @property
    def versions(self) -> dict[str, str]:
        return {t: self.version(t) for t in self.layers}

    def get(self, type_url: str, name: str) -> Resource | None:
        for layer in self.layers.get(type_url, ()):
            found = layer.items.get(name)
            if found is not None:
                return found
        return None

    def resources(self, type_url: str) -> Iterator[Resource]:
        for layer in self.layers.get(type_url, ()):
            yield from layer.items.values()

    def count(self, type_url: str) -> int:
        return sum(len(layer.items) for layer in self.layers.get(type_url, ()))

    def select(self, type_url: str, names: list[str]) -> list[any_pb2.Any]:
        """State of the world: every resource for a wildcard request (no names), else those named."""
        if not names:
            return [r.body for r in self.resources(type_url)]
        return [r.body for r in (self.get(type_url, n) for n in names) if r is not None]


class Callbacks(Protocol):
    """What the ADS streams report (go-control-plane's Callbacks, the parts used here)."""

    def on_node(self, info) -> None:
        """A node opened a stream; it has a snapshot in the cache when this returns."""

    def on_push(self, size: int) -> None:
        """A response of ``size`` bytes went out."""

    def on_ack(self, node_id: str, type_url: str, version: str) -> None: ...

    def on_nack(self, node_id: str, type_url: str, version: str, message: str) -> None: ...

    def on_stream_closed(self, node_id: str) -> None: ...


class SnapshotCache:
    """Per node id, the latest snapshot; streams of a node are woken when it changes."""

    def __init__(self) -> None:
        self._snapshots: dict[str, Snapshot] = {}
        self._inboxes: dict[str, set[asyncio.Queue]] = {}

    def set_snapshot(self, node_id: str, snapshot: Snapshot) -> None:
        if self._snapshots.get(node_id) is snapshot:
            return
        self._snapshots[node_id] = snapshot
        for inbox in self._inboxes.get(node_id, ()):
            inbox.put_nowait(SNAPSHOT_CHANGED)

    def snapshot(self, node_id: str) -> Snapshot | None:
        return self._snapshots.get(node_id)

    def clear(self, node_id: str) -> None:
        """Forget a node (its last stream closed)."""
        self._snapshots.pop(node_id, None)

    def node_ids(self) -> list[str]:
        return list(self._snapshots)

    def watch(self, node_id: str, inbox: asyncio.Queue) -> None:
        self._inboxes.setdefault(node_id, set()).add(inbox)

    def unwatch(self, node_id: str, inbox: asyncio.Queue) -> int:
        """Stop waking ``inbox``; returns how many streams of the node remain."""
        inboxes = self._inboxes.get(node_id, set())
        inboxes.discard(inbox)
        if not inboxes:
            self._inboxes.pop(node_id, None)
        return len(inboxes)


#: put on a stream's inbox when its node's snapshot changed
SNAPSHOT_CHANGED = object()
