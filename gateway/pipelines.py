"""The pipelines this gateway serves, kept current by the manager's watch stream.

``PipelineTable`` is swapped whole on every update (readers never see a half-made
set). ``watch_pipelines`` holds the stream open, applies each set, acknowledges its
version, and reconnects with back-off if the manager goes away; meanwhile the last
set keeps being served.

An acknowledgement means "nothing here uses what this set dropped": requests still
running on a replaced or deleted revision are drained first (bounded by that
revision's stage timeouts), because the manager withdraws the revision's Envoy
routes as soon as every gateway has acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc

from sluice.tensors import TensorSpec
from sluice.v1 import pipeline_pb2, pipeline_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompiledStage:
    index: int
    name: str
    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sources: tuple[str, ...]  # for each input, the previous stage's output feeding it
    metadata: tuple[tuple[str, str], ...]  # gRPC headers Envoy routes and tags on
    timeout_s: float


@dataclass(frozen=True, slots=True)
class CompiledPipeline:
    name: str
    revision: int
    stages: tuple[CompiledStage, ...]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[0].inputs

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.revision

    @property
    def max_duration_s(self) -> float:
        return sum(s.timeout_s for s in self.stages)


def compile_pipeline(message: pipeline_pb2.Pipeline, deadline_slack_ms: int) -> CompiledPipeline:
    stages = []
    for index, s in enumerate(message.stages):
        bindings = {b.input: b.source for b in s.bindings}
        inputs = tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in s.inputs)
        stages.append(
            CompiledStage(
                index=index,
                name=s.name,
                model=s.model,
                version=s.model_version,
                inputs=inputs,
                outputs=tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in s.outputs),
                sources=tuple(bindings.get(t.name, t.name) for t in inputs),
                metadata=(
                    ("x-sluice-route", s.route),
                    ("x-sluice-pipeline", message.name),
                    ("x-sluice-stage", str(index)),
                    ("x-sluice-model", s.model),
                ),
                timeout_s=(s.timeout_ms + deadline_slack_ms) / 1000,
            )
        )
    return CompiledPipeline(message.name, message.revision, tuple(stages))


class PipelineTable:
    def __init__(self) -> None:
        self.pipelines: dict[str, CompiledPipeline] = {}
        self.version = ""
        self.ready = asyncio.Event()
        self._inflight: dict[tuple[str, int], int] = {}
        self._finished = asyncio.Event()

    def get(self, name: str) -> CompiledPipeline | None:
        return self.pipelines.get(name)

    def enter(self, pipeline: CompiledPipeline) -> None:
        """A request starts running ``pipeline`` (this revision)."""
        self._inflight[pipeline.key] = self._inflight.get(pipeline.key, 0) + 1

    def leave(self, pipeline: CompiledPipeline) -> None:
        left = self._inflight[pipeline.key] - 1
        if left:
            self._inflight[pipeline.key] = left
        else:
            del self._inflight[pipeline.key]
            self._finished.set()

    def apply(self, message: pipeline_pb2.PipelineSet, deadline_slack_ms: int) -> list[CompiledPipeline]:
        """Serve ``message`` from now on; returns the revisions it dropped."""
        previous = self.pipelines
        self.pipelines = {p.name: compile_pipeline(p, deadline_slack_ms) for p in message.pipelines}
        self.version = message.version
        self.ready.set()
        live = {p.key for p in self.pipelines.values()}
        return [p for p in previous.values() if p.key not in live]

    async def drain(self, dropped: list[CompiledPipeline]) -> None:
        """Wait until no request runs on a dropped revision, at most their longest duration."""
        keys = {p.key for p in dropped}
        deadline = time.monotonic() + max((p.max_duration_s for p in dropped), default=0)
        while keys & self._inflight.keys():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                log.warning("acknowledging with requests still running on %s", sorted(keys & self._inflight.keys()))
                return
            self._finished.clear()
            try:
                await asyncio.wait_for(self._finished.wait(), remaining)
            except asyncio.TimeoutError:
                pass


async def watch_pipelines(table: PipelineTable, manager: str, node_id: str, deadline_slack_ms: int) -> None:
    backoff = 0.1
    while True:
        try:
            async with grpc.aio.insecure_channel(manager) as channel:
                stub = pipeline_pb2_grpc.PipelineDiscoveryStub(channel)
                acks: asyncio.Queue[pipeline_pb2.WatchRequest] = asyncio.Queue()
                acks.put_nowait(pipeline_pb2.WatchRequest(node_id=node_id))

                async def requests():
                    while True:
                        yield await acks.get()

                async for pipeline_set in stub.Watch(requests()):
                    dropped = table.apply(pipeline_set, deadline_slack_ms)
                    await table.drain(dropped)
                    log.info("serving %d pipelines (v%s)", len(table.pipelines), pipeline_set.version)
                    acks.put_nowait(pipeline_pb2.WatchRequest(node_id=node_id, ack_version=pipeline_set.version))
                    backoff = 0.1
        except grpc.aio.AioRpcError as exc:
            log.warning("pipeline watch: %s; still serving %d pipelines; reconnecting", exc.code().name, len(table.pipelines))
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)
