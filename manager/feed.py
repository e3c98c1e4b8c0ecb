"""Pushes pipelines to gateways over ``PipelineDiscovery.Watch``, incrementally.

Every ``publish`` is one new version holding only what changed (plans created or
replaced, names removed), converted to its wire form once; its cost is the size of
the change, never the number of pipelines. A stream starts with the whole set
(``full``) and then gets deltas. Each gateway acknowledges the version it now
serves; ``wait_acked`` lets the manager order a change against Envoy's routes (a new
pipeline is served only once its routes exist; a deleted one stops being served
before its routes go).

A stream has at most one unacknowledged message in flight: the gateway applies
messages in order and acknowledges each only after draining the revisions it
dropped, so anything sent meanwhile would just queue in the transport. Waiting lets
the feed coalesce every version published in between into one delta, from a bounded
history of deltas; a stream further behind than that history, or whose coalesced
change would be larger than the whole set, gets the whole set again. So a slow or
silent gateway costs nothing to anyone else: no queue grows for it, and ``publish``
never waits on a stream.

``wait_acked`` answers a ``FeedAck`` that names the gateways (by node id) that did not
confirm, so the manager can roll a change back rather than go on as if it had worked.

Held feed: a manager restarted in the middle of a change (``manager.control``) must
have Envoy's routes in place before any gateway gets the pipeline set, so it starts
the feed ``held`` (streams get nothing) and ``release``s it once the routes are there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from sluice.plan import PipelinePlan
from sluice.plan_proto import to_proto
from sluice.v1 import pipeline_pb2, pipeline_pb2_grpc

log = logging.getLogger(__name__)

_NOT_SENT = -1


@dataclass(frozen=True, slots=True)
class _Delta:
    version: int
    upserts: dict[str, pipeline_pb2.Pipeline]
    removed: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.upserts) + len(self.removed)


@dataclass(frozen=True, slots=True)
class FeedAck:
    """Whether every connected gateway acknowledged a version (true when it is ``ok``)."""

    version: int
    #: gateways (node ids) that did not say they received it within the ACK timeout
    silent: tuple[str, ...] = ()
    #: gateways that received it but did not acknowledge it (drained) within the drain timeout
    behind: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.silent and not self.behind

    def __bool__(self) -> bool:
        return self.ok


@dataclass(slots=True)
class _Stream:
    id: int
    node: str = ""  # the gateway's node id, from its first request
    sent: int = _NOT_SENT  # version of the last message written
    sent_at: float = 0.0  # when (monotonic)
    received: int = _NOT_SENT  # the gateway said it got this version
    acked: int = _NOT_SENT  # ... and serves it, drained
    unresponsive: bool = False  # missed a receipt deadline: not waited for until it catches up


class PipelineFeed(pipeline_pb2_grpc.PipelineDiscoveryServicer):
    def __init__(self, initial: Sequence[PipelinePlan] = (), *, history: int = 1024, held: bool = False) -> None:
        self._version = 0
        self._held = held
        self._plans: dict[str, PipelinePlan] = {p.name: p for p in initial}
        self._protos: dict[str, pipeline_pb2.Pipeline] = {n: to_proto(p) for n, p in self._plans.items()}
        self._history: deque[_Delta] = deque()
        self._history_max = history
        self._history_entries = 0  # pipelines and names in all of it
        # messages built for the current version, by the version the stream was last
        # sent (_NOT_SENT: the whole set): streams in step share one message
        self._messages: dict[int, pipeline_pb2.PipelineSet] = {}
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self._changed = asyncio.Condition()

    @property
    def version(self) -> int:
        return self._version

    @property
    def held(self) -> bool:
        return self._held

    async def release(self) -> None:
        """Let the streams of a ``held`` feed get their pipeline sets."""
        async with self._changed:
            self._held = False
            self._changed.notify_all()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until at least one gateway stream is open, at most ``timeout``."""
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(lambda: bool(self._streams)), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    @property
    def gateways(self) -> int:
        """Connected gateway streams."""
        return len(self._streams)

    @property
    def pipelines(self) -> Mapping[str, PipelinePlan]:
        """The current set, name -> plan (read-only, live)."""
        return MappingProxyType(self._plans)

    async def publish(self, upserts: Sequence[PipelinePlan] = (), removed: Sequence[str] = ()) -> int:
        """Make one new version of this change; returns its number. A change that
        changes nothing (plans equal to the current ones, unknown names) makes no
        version and returns the current one."""
        changed = {p.name: p for p in upserts}
        clash = changed.keys() & set(removed)
        if clash:
            raise ValueError(f"pipelines both upserted and removed: {sorted(clash)}")
        async with self._changed:
            changed = {n: p for n, p in changed.items() if self._plans.get(n) != p}
            gone = tuple(n for n in dict.fromkeys(removed) if n in self._plans)
            if not changed and not gone:
                return self._version
            protos = {n: to_proto(p) for n, p in changed.items()}
            self._version += 1
            self._plans.update(changed)
            self._protos.update(protos)
            for name in gone:
                del self._plans[name]
                del self._protos[name]
            self._remember(_Delta(self._version, protos, gone))
            self._messages.clear()
            self._changed.notify_all()
            return self._version

    async def wait_acked(self, version: int, timeout: float, drain_timeout: float | None = None) -> FeedAck:
        """Whether every connected gateway acknowledged ``version`` (or later) in time.

        Two deadlines: a gateway must say it *received* what it was sent within
        ``timeout``, or it is marked unresponsive and not waited for (now or at later
        changes) until it acknowledges the current version — so a stream that never
        answers costs one ACK timeout, not a drain timeout, and cannot stall changes
        for everyone else; it is named in ``silent`` each time. A gateway that received
        but is still draining requests on a revision it dropped is waited for up to
        ``drain_timeout`` (the longest such request's stage timeouts), however much
        longer than ``timeout`` that is; named in ``behind`` if that runs out."""
        drain_timeout = max(drain_timeout or timeout, timeout)
        start = time.monotonic()
        async with self._changed:
            while True:
                now = time.monotonic()
                waiting = [s for s in self._streams.values() if s.acked < version and not s.unresponsive]
                for s in waiting:
                    if s.received < s.sent and now - s.sent_at >= timeout:
                        s.unresponsive = True
                        log.warning("gateway %s (stream %d) did not say it received v%d within %.1fs: not waited for until it catches up",
                                    s.node or "?", s.id, s.sent, timeout)
                waiting = [s for s in waiting if not s.unresponsive]
                silent = tuple(sorted(s.node or f"stream-{s.id}" for s in self._streams.values() if s.acked < version and s.unresponsive))
                if not waiting:
                    return FeedAck(version, silent)
                if now - start >= drain_timeout:
                    log.warning("pipelines v%d: gateway streams %s did not acknowledge within %.1fs", version, sorted(s.id for s in waiting), drain_timeout)
                    return FeedAck(version, silent, tuple(sorted(s.node or f"stream-{s.id}" for s in waiting)))
                deadlines = [start + drain_timeout] + [s.sent_at + timeout for s in waiting if s.received < s.sent]
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), max(0.0, min(deadlines) - now))

    def _remember(self, delta: _Delta) -> None:
        self._history.append(delta)
        self._history_entries += delta.size
        # a delta longer than the whole set is never sent (see _delta_since), so the
        # history need never hold more entries than the set has pipelines
        while self._history and (len(self._history) > self._history_max or self._history_entries > len(self._protos)):
            self._history_entries -= self._history.popleft().size

    def _message_since(self, sent: int) -> pipeline_pb2.PipelineSet:
        message = self._messages.get(sent)
        if message is None:
            message = self._delta_since(sent)
            if message is None:
                message = self._full()
            self._messages[sent] = message
        return message

    def _full(self) -> pipeline_pb2.PipelineSet:
        return pipeline_pb2.PipelineSet(version=str(self._version), pipelines=self._protos.values(), full=True)

    def _delta_since(self, sent: int) -> pipeline_pb2.PipelineSet | None:
        """Versions ``sent``+1 .. now as one delta; None if the history no longer holds
        them all, or if they add up to more than the whole set."""
        if sent == _NOT_SENT or not self._history or self._history[0].version > sent + 1:
            return None
        upserts: dict[str, pipeline_pb2.Pipeline] = {}
        removed: dict[str, None] = {}
        budget = len(self._protos)
        start = sent + 1 - self._history[0].version
        for delta in itertools.islice(self._history, start, None):
            budget -= delta.size
            if budget < 0:
                return None
            for name in delta.removed:
                upserts.pop(name, None)
                removed[name] = None
            for name, proto in delta.upserts.items():
                removed.pop(name, None)
                upserts[name] = proto
        return pipeline_pb2.PipelineSet(version=str(self._version), pipelines=upserts.values(), removed=removed)

    async def Watch(self, request_iterator, context):
        stream = _Stream(next(self._stream_ids))
        async with self._changed:
            self._streams[stream.id] = stream
            self._changed.notify_all()  # wakes wait_connected
        peer = context.peer()
        log.info("gateway stream %d opened (%s)", stream.id, peer)
        reader = asyncio.create_task(self._read_acks(stream, request_iterator))
        try:
            while True:
                async with self._changed:
                    await self._changed.wait_for(
                        lambda: reader.done() or (not self._held and stream.acked >= stream.sent and self._version > stream.sent)
                    )
                    if reader.done():
                        break
                    message = self._message_since(stream.sent)
                    stream.sent, stream.sent_at = self._version, time.monotonic()
                    self._changed.notify_all()  # a wait_acked must start this stream's receipt deadline
                await context.write(message)
        finally:
            reader.cancel()
            try:
                await reader
            except asyncio.CancelledError:
                pass
            except Exception as exc:  # the peer vanished, or reading failed: say so, never swallow it
                log.warning("gateway stream %d (%s): reading its acknowledgements failed: %s: %s",
                            stream.id, peer, type(exc).__name__, exc)
            async with self._changed:
                self._streams.pop(stream.id, None)
                self._changed.notify_all()
            log.info("gateway stream %d closed (%s)", stream.id, peer)

    async def _read_acks(self, stream: _Stream, request_iterator) -> None:
        try:
            async for request in request_iterator:
                if not stream.node and request.node_id:
                    stream.node = request.node_id[:128]
                received = _version_number(stream, request.received_version, "received_version")
                acked = _version_number(stream, request.ack_version, "ack_version")
                if received is None and acked is None:
                    continue
                async with self._changed:
                    # a gateway can only receive or serve what it was sent
                    if received is not None:
                        stream.received = max(stream.received, min(received, stream.sent))
                    if acked is not None:
                        stream.acked = max(stream.acked, min(acked, stream.sent))
                        stream.received = max(stream.received, stream.acked)
                    if stream.unresponsive and stream.acked >= self._version:
                        stream.unresponsive = False
                        log.info("gateway stream %d caught up (v%d): waited for again", stream.id, stream.acked)
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._changed.notify_all()


def _version_number(stream: _Stream, text: str, field: str) -> int | None:
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        log.warning("gateway stream %d: ignoring %s %r", stream.id, field, text[:32])
        return None
