"""Pushes the set of pipelines to gateways over ``PipelineDiscovery.Watch``.

State of the world, like ADS: every change sends the whole set with a new version;
each gateway acknowledges the version it now serves. ``wait_acked`` lets the manager
order a change against Envoy's routes (a new pipeline is served only once its routes
exist; a deleted one stops being served before its routes go).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sluice.v1 import pipeline_pb2, pipeline_pb2_grpc

log = logging.getLogger(__name__)


class PipelineFeed(pipeline_pb2_grpc.PipelineDiscoveryServicer):
    def __init__(self) -> None:
        self._version = 0
        self._current = pipeline_pb2.PipelineSet(version="0")
        self._acked: dict[int, int] = {}  # stream -> acked version
        self._stream_ids = 0
        self._changed = asyncio.Condition()

    @property
    def gateways(self) -> int:
        return len(self._acked)

    async def publish(self, pipelines: list[pipeline_pb2.Pipeline]) -> int:
        async with self._changed:
            self._version += 1
            self._current = pipeline_pb2.PipelineSet(version=str(self._version), pipelines=pipelines)
            self._changed.notify_all()
            return self._version

    async def wait_acked(self, version: int, timeout: float) -> bool:
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: all(v >= version for v in self._acked.values())), timeout
                )
            return True
        except asyncio.TimeoutError:
            log.warning("pipelines v%d: not every gateway acknowledged within %.1fs", version, timeout)
            return False

    async def Watch(self, request_iterator, context):
        self._stream_ids += 1
        stream = self._stream_ids
        self._acked[stream] = 0
        reader = asyncio.create_task(self._read_acks(stream, request_iterator))
        try:
            sent = -1
            while not reader.done():
                async with self._changed:
                    await self._changed.wait_for(lambda: int(self._current.version) != sent or reader.done())
                    current = self._current
                if reader.done():
                    break
                await context.write(current)
                sent = int(current.version)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # the peer may have vanished
                await reader
            async with self._changed:
                self._acked.pop(stream, None)
                self._changed.notify_all()
            log.info("gateway stream %d closed", stream)

    async def _read_acks(self, stream: int, request_iterator) -> None:
        try:
            async for request in request_iterator:
                if request.ack_version:
                    async with self._changed:
                        self._acked[stream] = int(request.ack_version)
                        self._changed.notify_all()
        finally:
            async with self._changed:
                self._changed.notify_all()
