"""The Aggregated Discovery Service (xDS v3) for Envoy sidecars, both variants:
state of the world (``StreamAggregatedResources``) and incremental
(``DeltaAggregatedResources``, what Sluice's own sidecars use).

One stream object per Envoy connection reads the node's snapshot from the passive
cache and reports to the ``Callbacks``. Both variants honour the protocol:

* the node arrives on the first request only; later requests are matched by nonce;
* a request whose ``response_nonce`` is not the pending one for its type is stale
  and ignored;
* a request carrying ``error_detail`` is a NACK: Envoy keeps its last good config;
  the rejection is reported with Envoy's error text and not re-sent until the
  snapshot changes.

Only known nodes: a stream must carry a node token (``manager.xds.auth``), checked
before anything is read; the node on its first request must be the token's (id, role,
service), or the stream is refused (PERMISSION_DENIED) without a response.

Make before break: one response per type is in flight at a time, types go out in the
order secrets, clusters, endpoints, listeners, route scopes, routes, and listeners,
scopes and routes are held back while a secret, cluster or endpoint response is
unacknowledged, so no route points at a cluster Envoy has not warmed. (Envoy asks for
a node's SDS secrets when a cluster or listener it got names them, and keeps those
warming until the secrets arrive; a secret's new version — a rotated certificate —
changes nothing else.)

State of the world re-sends every resource of a type when its version changes (what
that protocol requires). Delta sends only the resources whose versions differ from
what Envoy holds, found from the resource sets' change history, so one pipeline's
change costs the same with ten or ten thousand pipelines.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from manager.xds.auth import NodeAuth, NodeClaims
from manager.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SCOPED_ROUTE, SECRET, NodeInfo
from manager.xds.snapshot import SNAPSHOT_CHANGED, Callbacks, Snapshot, SnapshotCache

log = logging.getLogger(__name__)
_nonces = itertools.count(1)
END = object()
#: types held back while a secret, cluster or endpoint response is unacknowledged
_AFTER_WARMING = (LISTENER, SCOPED_ROUTE, ROUTE)
_WARMING = (SECRET, CLUSTER, ENDPOINT)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


class _Stream:
    """What both variants share: the inbox loop, the node, the callbacks."""

    def __init__(self, cache: SnapshotCache, callbacks: Callbacks, context: grpc.aio.ServicerContext, claims: NodeClaims):
        self.cache = cache
        self.callbacks = callbacks
        self.context = context
        self.claims = claims
        self.node: NodeInfo | None = None
        # requests from Envoy, SNAPSHOT_CHANGED from the cache, END when Envoy hangs up
        self.inbox: asyncio.Queue = asyncio.Queue()

    async def run(self, request_iterator) -> None:
        reader = asyncio.create_task(self._read(request_iterator))
        try:
            while True:
                item = await self.inbox.get()
                if item is END:
                    return
                if item is not SNAPSHOT_CHANGED:
                    await self._handle(item)
                snapshot = self.cache.snapshot(self.node.id) if self.node else None
                if snapshot is not None:
                    await self._flush(snapshot)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if self.node:
                self.cache.unwatch(self.node.id, self.inbox)
                self.callbacks.on_stream_closed(self.node.id)
                log.info("xDS: node %s disconnected", self.node.id)

    async def _read(self, request_iterator) -> None:
        try:
            async for request in request_iterator:
                self.inbox.put_nowait(request)
        finally:
            self.inbox.put_nowait(END)

    async def _attach(self, request) -> None:
        if self.node is not None:
            return
        if not request.node.id:
            await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first request must carry the node")
        node = NodeInfo.from_node(request.node.id, request.node.cluster, request.node.metadata)
        claims = self.claims
        if not claims.admits(node.id) or (node.role, node.service) != (claims.role, claims.service):
            log.warning("xDS: refused node %s (%s, service %s): its token is for %s (%s, service %s)",
                        node.id, node.role, node.service, claims.node_id, claims.role, claims.service)
            await self.context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token is for node {claims.node_id!r} ({claims.role}, {claims.service})")
        self.node = node
        self.callbacks.on_node(self.node)
        self.cache.watch(self.node.id, self.inbox)
        log.info("xDS: node %s connected (%s, role %s, service %s)", self.node.id, type(self).__name__, self.node.role, self.node.service)

    def _nacked(self, type_url: str, version: str, request) -> None:
        log.error(
            "xDS: node %s rejected %s version %s: %s",
            self.node.id, _short(type_url), version, request.error_detail.message,
        )
        self.callbacks.on_nack(self.node.id, type_url, version, request.error_detail.message)

    async def _handle(self, request) -> None:
        raise NotImplementedError

    async def _flush(self, snapshot: Snapshot) -> None:
        raise NotImplementedError


# --- state of the world
@dataclass
class _SotwType:
    open: bool = False  # Envoy has asked for this type (a watch is open)
    names: list[str] = field(default_factory=list)
    sent_version: str | None = None
    sent_names: list[str] | None = None
    nonce: str = ""
    pending: bool = False  # a response awaits its ACK/NACK
    stale: bool = False  # re-send even at the same version (an EDS cluster changed)


class SotwStream(_Stream):
    def __init__(self, *args):
        super().__init__(*args)
        self.types = {t: _SotwType() for t in PUSH_ORDER}

    async def _handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        await self._attach(request)
        state = self.types.get(request.type_url)
        if state is None:
            log.debug("xDS: %s asked for unsupported type %s", self.node.id, request.type_url)
            return
        if request.response_nonce and request.response_nonce != state.nonce:
            return  # stale: answers a response that was superseded
        state.open = True
        state.names = sorted(request.resource_names)
        if not request.response_nonce:
            return  # initial request (or re-subscription after reconnect)
        state.pending = False
        if request.HasField("error_detail"):
            self._nacked(request.type_url, state.sent_version or "", request)
        else:
            self.callbacks.on_ack(self.node.id, request.type_url, request.version_info)

    async def _flush(self, snapshot: Snapshot) -> None:
        for type_url in PUSH_ORDER:
            state = self.types[type_url]
            if not state.open or state.pending:
                continue
            version = snapshot.version(type_url)
            if state.sent_version == version and state.sent_names == state.names and not state.stale:
                continue
            if type_url in _AFTER_WARMING and self._warming():
                continue  # re-flushed when the cluster/endpoint ACK arrives
            if type_url in (SCOPED_ROUTE, ROUTE) and self.types[LISTENER].pending:
                continue
            await self._send(type_url, version, snapshot.select(type_url, state.names), state)
            if type_url == CLUSTER:
                # Envoy keeps a modified EDS cluster warming until it sees its endpoints again
                self.types[ENDPOINT].stale = True

    def _warming(self) -> bool:
        return any(self.types[t].pending for t in _WARMING)

    async def _send(self, type_url: str, version: str, resources, state: _SotwType) -> None:
        state.nonce = str(next(_nonces))
        state.sent_version = version
        state.sent_names = list(state.names)
        state.pending = True
        state.stale = False
        response = discovery_pb2.DiscoveryResponse(version_info=version, resources=resources, type_url=type_url, nonce=state.nonce)
        self.callbacks.on_push(response.ByteSize())
        await self.context.write(response)
        log.debug("xDS: pushed %s v%s (%d resources) to %s", _short(type_url), version, len(resources), self.node.id)


# --- incremental (delta)
@dataclass
class _DeltaType:
    open: bool = False
    wildcard: bool = False
    subscribed: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version Envoy holds (or was sent)
    dirty: set[str] = field(default_factory=set)  # names to look at whatever the history says
    generations: dict[str, int] = field(default_factory=dict)  # lineage -> generation last diffed
    nonce: str = ""
    pending: bool = False
    pending_version: str = ""
    rejected_version: str = ""  # the last version Envoy refused: never reported as acknowledged
    answer: bool = False  # Envoy waits for a first answer to a new subscription, even an empty one


class DeltaStream(_Stream):
    def __init__(self, *args):
        super().__init__(*args)
        self.types = {t: _DeltaType() for t in PUSH_ORDER}

    async def _handle(self, request: discovery_pb2.DeltaDiscoveryRequest) -> None:
        await self._attach(request)
        state = self.types.get(request.type_url)
        if state is None:
            log.debug("xDS: %s asked for unsupported type %s", self.node.id, request.type_url)
            return
        if request.response_nonce:
            if request.response_nonce != state.nonce:
                return  # stale
            state.pending = False
            if request.HasField("error_detail"):
                state.rejected_version = state.pending_version
                self._nacked(request.type_url, state.pending_version, request)
            else:
                state.rejected_version = ""
                self.callbacks.on_ack(self.node.id, request.type_url, state.pending_version)
        if not state.open:
            state.open = True
            state.answer = True
            if request.type_url != ENDPOINT:
                # endpoints are always sent again on a new stream: a cluster that Envoy (re)made
                # around the reconnect waits warming for its assignment even when Envoy's
                # mux already lists that version (seen after manager restarts: the cluster
                # stayed warming until its initial fetch timed out)
                state.known.update(request.initial_resource_versions)
            # the legacy wildcard: a first request naming nothing subscribes to everything
            state.wildcard = not request.resource_names_subscribe or "*" in request.resource_names_subscribe
            state.generations.clear()
        subscribe = set(request.resource_names_subscribe) - {"*"}
        state.subscribed |= subscribe
        state.dirty |= subscribe
        state.answer |= bool(subscribe)
        for name in request.resource_names_unsubscribe:
            if name == "*":
                state.wildcard = False
            state.subscribed.discard(name)
            state.known.pop(name, None)

    def _changed_names(self, snapshot: Snapshot, type_url: str, state: _DeltaType) -> set[str] | None:
        """Names that may differ from what Envoy holds; None: compare everything."""
        names = set(state.dirty)
        layers = snapshot.layers.get(type_url, ())
        for layer in layers:
            since = state.generations.get(layer.lineage)
            if since is None:
                return None
            changed = layer.changed_since(since)
            if changed is None:
                return None
            names |= changed
        if set(state.generations) != {layer.lineage for layer in layers}:
            return None  # a layer left: its names must be removed
        return names

    async def _flush(self, snapshot: Snapshot) -> None:
        for type_url in PUSH_ORDER:
            state = self.types[type_url]
            if not state.open or state.pending:
                continue
            if type_url in _AFTER_WARMING and any(self.types[t].pending for t in _WARMING):
                continue
            if type_url in (SCOPED_ROUTE, ROUTE) and self.types[LISTENER].pending:
                continue
            candidates = self._changed_names(snapshot, type_url, state)
            if candidates is None:
                candidates = set(state.known) | state.dirty | {r.name for r in snapshot.resources(type_url)}
            upserts, removals = [], []
            for name in sorted(candidates):
                if not (state.wildcard or name in state.subscribed):
                    continue
                current = snapshot.get(type_url, name)
                if current is None:
                    # a name Envoy asked for that does not exist is answered as removed, so Envoy
                    # does not wait for it until its initial fetch times out
                    if name in state.known or name in state.dirty:
                        removals.append(name)
                elif state.known.get(name) != current.version:
                    upserts.append(current)
            state.dirty.clear()
            state.generations = {layer.lineage: layer.generation for layer in snapshot.layers.get(type_url, ())}
            version = snapshot.version(type_url)
            if not upserts and not removals and not state.answer:
                if version != state.rejected_version:  # (a refused version stays refused)
                    self.callbacks.on_ack(self.node.id, type_url, version)  # nothing Envoy needs: settled as it is
                continue
            await self._send(type_url, version, upserts, removals, state)
            if type_url == CLUSTER:
                # Envoy keeps a modified EDS cluster warming until it sees its endpoints again
                endpoints = self.types[ENDPOINT]
                for r in upserts:
                    if endpoints.known.pop(r.name, None) is not None:
                        endpoints.dirty.add(r.name)

    async def _send(self, type_url: str, version: str, upserts, removals: list[str], state: _DeltaType) -> None:
        state.answer = False
        state.nonce = str(next(_nonces))
        state.pending = True
        state.pending_version = version
        for r in upserts:
            state.known[r.name] = r.version
        for name in removals:
            state.known.pop(name, None)
        response = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=version,
            type_url=type_url,
            nonce=state.nonce,
            resources=[discovery_pb2.Resource(name=r.name, version=r.version, resource=r.body) for r in upserts],
            removed_resources=removals,
        )
        self.callbacks.on_push(response.ByteSize())
        await self.context.write(response)
        log.debug("xDS: delta %s v%s (+%d -%d) to %s", _short(type_url), version, len(upserts), len(removals), self.node.id)


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache, callbacks: Callbacks, auth: NodeAuth):
        self.cache = cache
        self.callbacks = callbacks
        self.auth = auth

    async def StreamAggregatedResources(self, request_iterator, context):
        claims = await self.auth.authenticate(context)
        await SotwStream(self.cache, self.callbacks, context, claims).run(request_iterator)

    async def DeltaAggregatedResources(self, request_iterator, context):
        claims = await self.auth.authenticate(context)
        await DeltaStream(self.cache, self.callbacks, context, claims).run(request_iterator)
