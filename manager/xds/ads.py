"""The Aggregated Discovery Service (xDS v3, state of the world) for Envoy sidecars.

One ``AdsStream`` per Envoy connection. It answers each resource type from the
node's current snapshot and honours the protocol:

* the node arrives on the first request only; later requests are matched by nonce;
* a request whose ``response_nonce`` is not the last one sent for its type is stale
  and ignored;
* a request carrying ``error_detail`` is a NACK: Envoy keeps its last good config;
  the rejection is logged with Envoy's error text and the version is not re-sent;
* a type is re-sent when the snapshot's version changes, or when Envoy asks for
  other names (EDS and RDS subscriptions grow as clusters and listeners appear).

Make before break: types go out in the order clusters, endpoints, listeners, routes,
and listeners and routes are held back while a cluster or endpoint response is still
unacknowledged, so no route ever points at a cluster Envoy has not warmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from manager.xds.resources import CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, NodeInfo
from manager.xds.snapshot import SNAPSHOT_CHANGED, SnapshotCache

log = logging.getLogger(__name__)
_nonces = itertools.count(1)
END = object()


@dataclass
class _TypeState:
    open: bool = False  # Envoy has asked for this type (a watch is open)
    names: list[str] = field(default_factory=list)
    sent_version: str | None = None
    sent_names: list[str] | None = None
    nonce: str = ""
    pending: bool = False  # a response awaits its ACK/NACK


class AdsStream:
    def __init__(self, cache: SnapshotCache, context: grpc.aio.ServicerContext):
        self.cache = cache
        self.context = context
        self.node: NodeInfo | None = None
        self.types: dict[str, _TypeState] = {t: _TypeState() for t in PUSH_ORDER}
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
                await self._flush()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            if self.node:
                self.cache.detach(self.node.id, self.inbox)
                log.info("xDS: node %s disconnected", self.node.id)

    async def _read(self, request_iterator) -> None:
        try:
            async for request in request_iterator:
                self.inbox.put_nowait(request)
        finally:
            self.inbox.put_nowait(END)

    async def _handle(self, request: discovery_pb2.DiscoveryRequest) -> None:
        if self.node is None:
            if not request.node.id:
                await self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first request must carry the node")
            self.node = NodeInfo.from_node(request.node.id, request.node.cluster, request.node.metadata)
            self.cache.attach(self.node, self.inbox)
            log.info("xDS: node %s connected (role %s, service %s)", self.node.id, self.node.role, self.node.service)
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
            log.error(
                "xDS: node %s rejected %s version %s (keeps %s): %s",
                self.node.id, _short(request.type_url), state.sent_version,
                request.version_info or "none", request.error_detail.message,
            )
            await self.cache.record_nack(self.node.id, request.type_url, state.sent_version or "", request.error_detail.message)
        else:
            await self.cache.record_ack(self.node.id, request.type_url, request.version_info)

    async def _flush(self) -> None:
        if self.node is None:
            return
        snapshot = self.cache.snapshot(self.node.id)
        for type_url in PUSH_ORDER:
            state = self.types[type_url]
            if not state.open:
                continue
            version = snapshot.versions[type_url]
            if state.sent_version == version and state.sent_names == state.names:
                continue
            if type_url in (LISTENER, ROUTE) and self._warming():
                continue  # re-flushed when the cluster/endpoint ACK arrives
            if type_url == ROUTE and self.types[LISTENER].pending:
                continue
            await self._send(type_url, version, snapshot.select(type_url, state.names), state)

    def _warming(self) -> bool:
        return self.types[CLUSTER].pending or self.types[ENDPOINT].pending

    async def _send(self, type_url: str, version: str, resources, state: _TypeState) -> None:
        state.nonce = str(next(_nonces))
        state.sent_version = version
        state.sent_names = list(state.names)
        state.pending = True
        self.cache.pushes += 1
        await self.context.write(
            discovery_pb2.DiscoveryResponse(version_info=version, resources=resources, type_url=type_url, nonce=state.nonce)
        )
        log.debug("xDS: pushed %s v%s (%d resources) to %s", _short(type_url), version, len(resources), self.node.id)


def _short(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, cache: SnapshotCache):
        self.cache = cache

    async def StreamAggregatedResources(self, request_iterator, context):
        await AdsStream(self.cache, context).run(request_iterator)

    async def DeltaAggregatedResources(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Sluice serves state-of-the-world ADS only")
