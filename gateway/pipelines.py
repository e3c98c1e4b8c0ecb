"""The pipelines this gateway serves, kept current by the manager's watch stream.

``watch_pipelines`` holds the stream open and applies each message to the
``PipelineTable``: the first (``full``) replaces the table, each later one (a delta)
touches only the pipelines it names, so a change costs the size of the change. It
acknowledges each version once applied, and on any failure (the manager gone, a
broken message, a bug) logs it, keeps serving the last table, and reconnects with
back-off; a new stream starts with the whole set again.

Compiling states every pipeline as a graph (``sluice.plan.PipelinePlan.graph_form``):
each stage with its id, the stages it waits for, where each input comes from, its
parsed condition and its switch's siblings, and the stages in an order that runs
each after what it waits for; a chain is the graph whose every stage waits for the one
before (``CompiledPipeline.linear``).

A message is compiled first and then applied without an await in between, so a
request never sees a half-applied one.

A pipeline's revision is its OIP model version. While a replaced revision drains it
is still *held*: ``get(name, version)`` finds it by its version (OIP's
``model_version``), and ``held(name)`` lists every held revision; once drained
it is forgotten. Holding and forgetting cost the size of the change too.

An acknowledgement means "nothing here uses what this message dropped": requests
still running on a replaced or removed revision are drained first (bounded by that
revision's stage timeouts), because the manager withdraws the revision's Envoy
routes as soon as every gateway has acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc

from gateway import served_by
from gateway.metrics import PipelineStats
from sluice import conditions, fusion
from sluice.plan import REQUEST, AnswerField, PipelinePlan
from sluice.plan_proto import from_proto
from sluice.tensors import TensorSpec
from sluice.v1 import pipeline_pb2, pipeline_pb2_grpc
from sluice.wire import MANAGER_TLS_NAME, MODEL_HEADER, PIPELINE_HEADER, ROUTE_HEADER, STAGE_HEADER, XDS_TOKEN_HEADER

log = logging.getLogger(__name__)

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 2.0
# a full set of many pipelines, or a bulk apply, is larger than gRPC's 4 MiB default
MAX_MESSAGE_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class CompiledStage:
    index: int
    name: str
    model: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sources: tuple[str, ...]  # for each input, the tensor feeding it (an output of ``source_stages``' stage)
    metadata: tuple[tuple[str, str], ...]  # gRPC headers Envoy routes and tags on
    timeout_s: float
    # --- the graph (sluice.plan)
    id: str = ""
    source_stages: tuple[str, ...] = ()  # for each input, the id of the stage giving it (REQUEST: the request)
    after: tuple[str, ...] = ()  # the stages it waits for
    reads: tuple[str, ...] = ()  # the stages it reads (inputs, condition): it runs where all of them ran
    condition: conditions.Node | None = None
    default: bool = False
    siblings: tuple[str, ...] = ()  # its switch's stages, in definition order (itself included)


@dataclass(frozen=True, slots=True)
class CompiledRun:
    """Consecutive stages run as one call (``sluice.fusion``): the first stage's request,
    on the run's route, with the later stages in the ``sluice.fused`` parameter."""

    stages: tuple[CompiledStage, ...]
    metadata: tuple[tuple[str, str], ...]  # the first stage's, on the run's route
    timeout_s: float
    steps: str  # the ``sluice.fused`` parameter (JSON)
    first_timeout_ms: int  # the ``sluice.timeout_ms`` parameter: the first stage's own timeout

    @property
    def first(self) -> CompiledStage:
        return self.stages[0]


@dataclass(frozen=True, slots=True)
class CompiledPipeline:
    name: str
    revision: int
    stages: tuple[CompiledStage, ...]
    #: this revision's OIP statistics (counters, mutable inside the frozen plan)
    stats: PipelineStats = field(default_factory=PipelineStats, compare=False, repr=False)
    #: the request's fields and the answer's (a chain: the first stage's inputs, the last one's outputs)
    request: tuple[TensorSpec, ...] = ()
    answer: tuple[AnswerField, ...] = ()
    #: the stages in an order that runs each after the stages it waits for
    order: tuple[CompiledStage, ...] = ()
    #: every stage waits for the one before and none has a condition: run one by one
    linear: bool = True
    #: a linear pipeline's calls in order: a stage, or a fused run of stages (``sluice.fusion``)
    calls: tuple[CompiledStage | CompiledRun, ...] = ()
    #: no stage draws a variant, a mirror or a rate-limit token per call (``plain_traffic``):
    #: concurrent requests may share its calls (``gateway.batching``)
    plain_traffic: bool = False

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.request or self.stages[0].inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(f.spec for f in self.answer) if self.answer else self.stages[-1].outputs

    @property
    def version(self) -> str:
        """The OIP model version: the revision, as a string."""
        return str(self.revision)

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.revision

    @property
    def max_duration_s(self) -> float:
        return sum(s.timeout_s for s in self.stages)


def compile_pipeline(plan: PipelinePlan, deadline_slack_ms: int, fuse: bool = True) -> CompiledPipeline:
    """``fuse``: run the plan's fused runs (``sluice.fusion``) as one call each."""
    named = plan.graph  # a chain's stages are known by their index (STAGE_HEADER)
    plan = plan.graph_form()  # the same stages, routes and runs (sluice.fusion)
    runs = fusion.fused_runs(plan) if fuse else ()
    steps = [fusion.encode_steps(fusion.steps(plan, run)) for run in runs]
    stages = []
    for index, s in enumerate(plan.stages):
        by_input = {b.input: b for b in s.bindings}
        bindings = [by_input.get(t.name) for t in s.inputs]
        condition = conditions.parse(s.when) if s.when else None
        reads = {b.stage for b in bindings if b is not None and b.stage != REQUEST}
        if condition is not None:
            reads |= {r.stage for r in conditions.refs(condition) if r.stage}
        stages.append(
            CompiledStage(
                index=index,
                name=s.name,
                model=s.model,
                version=s.version,
                inputs=s.inputs,
                outputs=s.outputs,
                sources=tuple(b.source if b is not None else t.name for b, t in zip(bindings, s.inputs)),
                metadata=(
                    (ROUTE_HEADER, s.route),
                    (PIPELINE_HEADER, plan.name),
                    (STAGE_HEADER, str(index)),
                    (MODEL_HEADER, s.model),
                ) + served_by.stage_metadata(s.traffic.sticky, s.id if named else ""),
                timeout_s=(s.timeout_ms + deadline_slack_ms) / 1000,
                id=s.id,
                source_stages=tuple(b.stage if b is not None else REQUEST for b in bindings),
                after=s.after,
                reads=tuple(sorted(reads)),
                condition=condition,
                default=s.default,
                siblings=tuple(x.id for x in plan.siblings(s)),
            )
        )
    order = _topological(stages)
    linear = all(not (s.condition or s.default) for s in stages) and all(
        s.after == ((order[i - 1].id,) if i else ()) for i, s in enumerate(order)
    )
    calls: list[CompiledStage | CompiledRun] = list(order) if linear else []
    for run, encoded in zip(reversed(runs), reversed(steps)):  # from the end: indexes stay valid
        first = stages[run.first]
        metadata = tuple((k, run.route if k == ROUTE_HEADER else v) for k, v in first.metadata)
        calls[run.first:run.last + 1] = [
            CompiledRun(tuple(stages[run.indexes.start:run.indexes.stop]), metadata, (run.timeout_ms + deadline_slack_ms) / 1000, encoded,
                        plan.stages[run.first].timeout_ms)
        ]
    return CompiledPipeline(plan.name, plan.revision, tuple(stages), request=plan.request, answer=plan.answer,
                            order=order, linear=linear, calls=tuple(calls), plain_traffic=plain_traffic(plan))


def plain_traffic(plan: PipelinePlan) -> bool:
    """No stage chooses between variants per call or counts calls: no split, mirror,
    sticky key or rate limit on a stage, and no rate limit on the pipeline. (Retries,
    outlier detection and circuit breakers act on a call whoever's rows it holds.)"""
    return plan.rate_limit is None and all(
        len(t.variants) < 2 and t.mirror is None and not t.sticky and t.rate_limit is None
        for t in (s.traffic for s in plan.stages)
    )


def _topological(stages: list[CompiledStage]) -> tuple[CompiledStage, ...]:
    """The stages, each after those it waits for (definition order where free); the
    manager refused cycles, so every stage is placed."""
    placed: list[CompiledStage] = []
    done: set[str] = set()
    waiting = list(stages)
    while waiting:
        ready = [s for s in waiting if all(d in done for d in s.after)]
        if not ready:
            raise ValueError(f"stages {[s.id for s in waiting]} wait for each other in a cycle")
        for s in ready:
            placed.append(s)
            done.add(s.id)
        waiting = [s for s in waiting if s.id not in done]
    return tuple(placed)


class PipelineTable:
    def __init__(self, fuse: bool = True) -> None:
        """``fuse``: run fused runs of stages as one call (``sluice.fusion``)."""
        self.fuse = fuse
        self.pipelines: dict[str, CompiledPipeline] = {}
        self.version = ""
        self.ready = asyncio.Event()
        self._inflight: dict[tuple[str, int], int] = {}
        self._finished = asyncio.Event()
        # revisions replaced or removed but still draining: name -> version -> revision
        self._draining: dict[str, dict[str, CompiledPipeline]] = {}

    def get(self, name: str, version: str = "") -> CompiledPipeline | None:
        """The pipeline ``name`` now served, or with ``version`` that revision while it
        is held (the current one, or a replaced one still draining). A deleted
        pipeline is not served at any version."""
        pipeline = self.pipelines.get(name)
        if pipeline is None or not version or pipeline.version == version:
            return pipeline
        draining = self._draining.get(name)
        return draining.get(version) if draining else None

    def held(self, name: str) -> list[CompiledPipeline]:
        """Every held revision of a served pipeline, oldest first (the current one last)."""
        pipeline = self.pipelines.get(name)
        if pipeline is None:
            return []
        draining = self._draining.get(name)
        if not draining:
            return [pipeline]
        older = sorted((p for p in draining.values() if p is not pipeline), key=lambda p: p.revision)
        return [*older, pipeline]

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
        """Serve ``message`` from now on; returns the revisions it replaced or removed."""
        compiled = [compile_pipeline(from_proto(p), deadline_slack_ms, self.fuse) for p in message.pipelines]
        # from here on nothing can fail or yield: the change is applied whole
        if message.full:
            previous, self.pipelines = self.pipelines, {p.name: p for p in compiled}
            dropped = [p for p in previous.values() if _replaced(p, self.pipelines.get(p.name))]
        else:
            dropped = []
            for pipeline in compiled:
                old = self.pipelines.get(pipeline.name)
                self.pipelines[pipeline.name] = pipeline
                if _replaced(old, pipeline):
                    dropped.append(old)
            for name in message.removed:
                old = self.pipelines.pop(name, None)
                if old is not None:
                    dropped.append(old)
        for old in dropped:
            self._draining.setdefault(old.name, {})[old.version] = old
        self.version = message.version
        self.ready.set()
        return dropped

    async def drain(self, dropped: list[CompiledPipeline]) -> None:
        """Wait until no request runs on a dropped revision, at most their longest
        duration; then they are no longer held."""
        try:
            await self._drain(dropped)
        finally:
            for old in dropped:
                draining = self._draining.get(old.name)
                if draining is not None and draining.get(old.version) is old:
                    del draining[old.version]
                    if not draining:
                        del self._draining[old.name]

    async def _drain(self, dropped: list[CompiledPipeline]) -> None:
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


def _replaced(old: CompiledPipeline | None, new: CompiledPipeline | None) -> bool:
    return old is not None and (new is None or new.key != old.key)


@dataclass(frozen=True)
class WatchCredentials:
    """How the gateway proves itself to the manager: its node token, sent as metadata on
    the Watch call, over TLS checked against the mesh CA (``ca_pem``)."""

    token: str
    ca_pem: bytes

    @classmethod
    def load(cls, token: str, token_file: str, ca_file: str) -> "WatchCredentials":
        from pathlib import Path

        token = token or (Path(token_file).read_text().strip() if token_file else "")
        if not token or not ca_file:
            raise ValueError("the gateway needs its node token (SLUICE_GATEWAY_XDS_TOKEN or _XDS_TOKEN_FILE) "
                             "and the mesh CA (SLUICE_GATEWAY_XDS_CA_FILE) to watch the manager's pipelines")
        return cls(token, Path(ca_file).read_bytes())


async def watch_pipelines(table: PipelineTable, manager: str, node_id: str, deadline_slack_ms: int,
                          credentials: WatchCredentials | None = None) -> None:
    """Keep ``table`` current from the manager at ``manager``, forever (until cancelled).
    Without ``credentials`` the channel is plaintext (a feed in one process, in tests);
    the manager itself takes only TLS and a node token."""
    backoff = BACKOFF_MIN_S
    while True:
        still = "still serving %d pipelines (v%s); reconnecting in %.1fs"
        try:
            async for _ in _watch(table, manager, node_id, deadline_slack_ms, credentials):
                backoff = BACKOFF_MIN_S
            log.warning("pipeline watch: the manager ended the stream; " + still, len(table.pipelines), table.version, backoff)
        except grpc.aio.AioRpcError as exc:
            log.warning("pipeline watch: %s (%s); " + still, exc.code().name, exc.details(), len(table.pipelines), table.version, backoff)
        except Exception:  # any failure must end in a reconnect, never in a silently stale table
            log.exception("pipeline watch failed; " + still, len(table.pipelines), table.version, backoff)
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, BACKOFF_MAX_S)


def _channel(manager: str, credentials: WatchCredentials | None) -> grpc.aio.Channel:
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    if credentials is None:
        return grpc.aio.insecure_channel(manager, options=options)
    return grpc.aio.secure_channel(
        manager,
        grpc.ssl_channel_credentials(root_certificates=credentials.ca_pem),
        options=[*options, ("grpc.ssl_target_name_override", MANAGER_TLS_NAME)],
    )


async def _watch(table: PipelineTable, manager: str, node_id: str, deadline_slack_ms: int,
                 credentials: WatchCredentials | None = None):
    """One watch stream: applies and acknowledges each message, yields its version."""
    metadata = ((XDS_TOKEN_HEADER, credentials.token),) if credentials is not None else None
    async with _channel(manager, credentials) as channel:
        stub = pipeline_pb2_grpc.PipelineDiscoveryStub(channel)
        acks: asyncio.Queue[pipeline_pb2.WatchRequest] = asyncio.Queue()
        acks.put_nowait(pipeline_pb2.WatchRequest(node_id=node_id))

        async def requests():
            while True:
                yield await acks.get()

        connected = False
        call = stub.Watch(requests(), metadata=metadata)
        try:
            async for message in call:
                acks.put_nowait(pipeline_pb2.WatchRequest(node_id=node_id, received_version=message.version))
                dropped = table.apply(message, deadline_slack_ms)
                await table.drain(dropped)
                if message.full:
                    log.info(
                        "pipeline watch: %s %s; serving %d pipelines (v%s)",
                        "full set from" if connected else "connected to", manager, len(table.pipelines), message.version,
                    )
                    connected = True
                else:
                    log.info(
                        "pipeline watch: v%s: %d created or replaced, %d removed; serving %d pipelines",
                        message.version, len(message.pipelines), len(message.removed), len(table.pipelines),
                    )
                acks.put_nowait(pipeline_pb2.WatchRequest(node_id=node_id, ack_version=message.version))
                yield message.version
        finally:
            call.cancel()  # also ends the task feeding it ``requests()``, however the stream ended
