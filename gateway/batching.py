"""Adaptive batching of concurrent requests to one pipeline revision, in the gateway.

Requests to the same revision whose inputs have the same names, datatypes and
non-batch dimensions share a *lane*. While fewer than ``max_runs`` runs of the lane
are in flight a request runs at once, alone (at one client nothing ever waits: no
added latency). Beyond that it queues; when a run of the lane ends, every request
queued behind it (up to ``max_rows`` rows and ``max_bytes`` of inputs) runs as one
pipeline run on its inputs concatenated along dimension 0 (``fold``: raw bytes
concatenate, BYTES tensors' length-prefixed elements too), and each caller gets its
own rows cut back out of the answer, the records no stage gave a field included
(``cut``). No timer: a batch is what arrived while the lane was busy, so it grows
with the load and is one request when there is none. The queue is bounded by the
gateway's in-flight limit (every queued request is one admitted request).

A request runs alone, never folded, where folding could change what its caller sees:
* its trace is sampled (its trace must show its own stage calls, one trace per request);
* it pins a variant (``x-sluice-variant``), or the revision has a split, a mirror, a
  sticky key or a rate limit on a stage, or a rate limit of its own: a split draws a
  variant, a mirror its percentage and a rate limit its tokens per stage call, and a
  folded run is one call for several requests (``CompiledPipeline.plain_traffic``);
* a tensor of the revision's signature has no leading variable (batch) dimension, or
  the request's inputs disagree on their rows, or it alone fills a batch.

``x-sluice-served-by`` stays right for each caller: the folded run records its stage
calls in a traffic list of its own (``gateway.served_by.collecting``), copied to each
caller's. A queued request holds its revision (``PipelineTable.enter``) so a replace
drains it too.

Errors: a folded run that fails with 429, 503 or 504 (rate limited, overloaded or
down, timed out) fails the same way for each of its requests, and each gets that
error. Any other failure (422 ``stage_rejected_input`` or ``condition_failed``, a
model's 502 ...: one request's data could be the cause), or an answer that cannot be
cut back, runs each of its requests again alone, so a bad request fails alone and
the others get their answers.

What folding does change, as any dynamic batching does: a model's floating-point
results for a row may differ in the last bits with the number of rows it computes at
once (BLAS kernels pick their paths by size); and the per-stage series
(``sluice_gateway_stage_*``, the runtimes' own) count stage calls, a folded run as one.

Counted in ``sluice_gateway_batch_requests`` and ``sluice_gateway_batch_rows`` (one
observation per folded run). Settings: ``SLUICE_GATEWAY_BATCH_MAX_ROWS`` (0 or 1: off),
``SLUICE_GATEWAY_BATCH_MAX_BYTES``, ``SLUICE_GATEWAY_BATCH_MAX_RUNS``.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from opentelemetry import trace

from gateway import graph, metrics, served_by
from gateway.executor import StageFailed
from gateway.graph import RawTensor
from gateway.pipelines import CompiledPipeline, PipelineTable
from sluice.tensors import DATATYPE_TO_DTYPE
from sluice.traffic import VARIANT_HEADER

Inputs = dict[str, RawTensor]
RunFn = Callable[[CompiledPipeline, Inputs], Awaitable[graph.Answer]]
#: (name, datatype, dimensions after the first) of each input, by name
Signature = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(frozen=True, slots=True)
class BatchSettings:
    #: most rows one folded run holds (0 or 1: batching is off)
    max_rows: int = 64
    #: most input bytes one folded run holds
    max_bytes: int = 1 << 20
    #: runs of one lane in flight before a request queues for the next folded run
    max_runs: int = 2

    @property
    def enabled(self) -> bool:
        return self.max_rows > 1


class FoldError(ValueError):
    """Tensors that cannot be folded or cut (no batch dimension, a short BYTES tensor)."""


# --- the fold and the cut


def signature(inputs: Inputs) -> tuple[Signature, int, int] | None:
    """(the inputs' signature, their rows, their bytes), or None when they cannot be
    folded: no inputs, a tensor with no dimension, or rows that differ between inputs."""
    rows = -1
    size = 0
    out = []
    for name in sorted(inputs):
        datatype, shape, raw = inputs[name]
        if not shape or shape[0] < 1 or (rows >= 0 and shape[0] != rows):
            return None
        rows = shape[0]
        size += len(raw)
        out.append((name, datatype, tuple(shape[1:])))
    if rows < 1:
        return None
    return tuple(out), rows, size


def fold(members: Sequence[Inputs]) -> Inputs:
    """The members' inputs (one signature) concatenated along dimension 0."""
    first = members[0]
    out: Inputs = {}
    for name, (datatype, shape, _) in first.items():
        rows = sum(m[name][1][0] for m in members)
        out[name] = (datatype, [rows, *shape[1:]], b"".join(m[name][2] for m in members))
    return out


def _bytes_bounds(raw: bytes, count: int) -> list[int]:
    """Where each of a BYTES tensor's ``count`` elements starts, and where the last ends."""
    bounds = [0]
    position = 0
    size = len(raw)
    for _ in range(count):
        if position + 4 > size:
            raise FoldError("BYTES tensor is shorter than its shape says")
        (length,) = struct.unpack_from("<I", raw, position)
        position += 4 + length
        bounds.append(position)
    if position != size:
        raise FoldError("BYTES tensor is longer than its shape says")
    return bounds


def cut_tensor(tensor: RawTensor, total: int, offset: int, rows: int) -> RawTensor:
    """Rows ``offset``..``offset + rows`` of a tensor over ``total`` rows."""
    datatype, shape, raw = tensor
    if not shape or shape[0] != total:
        raise FoldError(f"a {datatype} tensor of shape {shape} has no batch dimension of {total} rows")
    per_row = math.prod(shape[1:])
    if datatype == "BYTES":
        bounds = _bytes_bounds(raw, total * per_row)
        start, end = bounds[offset * per_row], bounds[(offset + rows) * per_row]
    else:
        width = per_row * DATATYPE_TO_DTYPE[datatype].itemsize
        if len(raw) != total * width:
            raise FoldError(f"a {datatype} tensor of shape {shape} holds {len(raw)} bytes")
        start, end = offset * width, (offset + rows) * width
    return datatype, [rows, *shape[1:]], raw[start:end]


def cut(answer: graph.Answer, total: int, offset: int, rows: int) -> graph.Answer:
    """One member's part of a folded run's answer: its rows of every field, and the
    records of those rows no stage gave a field to, renumbered from 0."""
    tensors = {name: cut_tensor(tensor, total, offset, rows) for name, tensor in answer.items()}
    absent = {}
    for name, where in answer.absent.items():
        mine = where[(where >= offset) & (where < offset + rows)] - offset
        if len(mine):
            absent[name] = mine
    return graph.Answer(tensors, absent)


# --- which revisions may fold


def _batch_dimensions(pipeline: CompiledPipeline) -> bool:
    return all(s.shape and s.shape[0] == -1 for s in (*pipeline.inputs, *pipeline.outputs))


# --- the batcher


@dataclass(slots=True)
class _Done:
    answer: graph.Answer
    served: list[str]


@dataclass(slots=True)
class _Failed:
    error: BaseException
    served: list[str]


#: a folded run's failures that are the same for each of its requests (overload, rate limit,
#: timeout: running each alone would only add load); any other may be one request's fault
SHARED_FAILURES = frozenset({429, 503, 504})
#: a folded run's answer to each member: run again alone
_ALONE = object()


@dataclass(slots=True)
class _Waiter:
    inputs: Inputs
    rows: int
    size: int
    context: contextvars.Context
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    queued_ns: int = field(default_factory=time.perf_counter_ns)  # when it began to wait
    taken_ns: int = 0  # when a folded run took it


@dataclass(slots=True)
class _Lane:
    pipeline: CompiledPipeline
    running: int = 0
    waiting: deque[_Waiter] = field(default_factory=deque)


class Batcher:
    """Folds concurrent ``run(pipeline, inputs)`` calls (see the module's docstring);
    ``run`` is the executor's own run of one set of inputs."""

    def __init__(self, run: RunFn, table: PipelineTable, settings: BatchSettings,
                 plain: Callable[[CompiledPipeline], bool] | None = None):
        """``plain``: whether a revision may fold (default: its ``plain_traffic``)."""
        self._run = run
        self.table = table
        self.settings = settings
        self._plain = plain or (lambda pipeline: pipeline.plain_traffic)
        self._lanes: dict[tuple[int, Signature], _Lane] = {}
        self._tasks: set[asyncio.Task] = set()

    async def run(self, pipeline: CompiledPipeline, inputs: Inputs) -> graph.Answer:
        settings = self.settings
        if not settings.enabled or not self._plain(pipeline) or not _batch_dimensions(pipeline) or trace.get_current_span().is_recording():
            return await self._run(pipeline, inputs)
        traffic = served_by.current()
        if traffic is not None and traffic.headers.get(VARIANT_HEADER):
            return await self._run(pipeline, inputs)
        found = signature(inputs)
        if found is None or found[1] >= settings.max_rows or found[2] > settings.max_bytes:
            return await self._run(pipeline, inputs)
        key = (id(pipeline), found[0])
        lane = self._lanes.get(key)
        if lane is None or lane.pipeline is not pipeline:
            lane = self._lanes[key] = _Lane(pipeline)
        if lane.running < settings.max_runs:
            lane.running += 1
            try:
                return await self._run(pipeline, inputs)
            finally:
                self._ended(key, lane)
        waiter = _Waiter(inputs, found[1], found[2], contextvars.copy_context())
        lane.waiting.append(waiter)
        self.table.enter(pipeline)  # a replace drains queued requests too
        try:
            outcome = await waiter.future
        finally:
            self.table.leave(pipeline)
        metrics.waited((waiter.taken_ns or time.perf_counter_ns()) - waiter.queued_ns)
        if outcome is _ALONE:
            return await self._run(pipeline, inputs)
        if traffic is not None:
            for entry in outcome.served:
                traffic.add(entry)
        if isinstance(outcome, _Failed):
            raise outcome.error
        return outcome.answer

    def _ended(self, key: tuple[int, Signature], lane: _Lane) -> None:
        """A run of ``lane`` ended: start folded runs of what queued, while there is room."""
        lane.running -= 1
        while lane.waiting and lane.running < self.settings.max_runs:
            batch = self._take(lane)
            if not batch:
                break
            lane.running += 1
            # in the first member's context (its trace is not sampled: the stage spans are not either)
            task = asyncio.get_running_loop().create_task(self._folded(key, lane, batch), context=batch[0].context)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not lane.running and not lane.waiting and self._lanes.get(key) is lane:
            del self._lanes[key]

    def _take(self, lane: _Lane) -> list[_Waiter]:
        """The oldest queued requests that fit in one run (callers gone are dropped)."""
        batch: list[_Waiter] = []
        rows = size = 0
        waiting = lane.waiting
        while waiting:
            waiter = waiting[0]
            if waiter.future.done():  # its caller went away
                waiting.popleft()
                continue
            if batch and (rows + waiter.rows > self.settings.max_rows or size + waiter.size > self.settings.max_bytes):
                break
            waiting.popleft()
            waiter.taken_ns = time.perf_counter_ns()
            batch.append(waiter)
            rows += waiter.rows
            size += waiter.size
        return batch

    async def _folded(self, key: tuple[int, Signature], lane: _Lane, batch: list[_Waiter]) -> None:
        """One folded run of ``batch`` (its own task); each member is answered, then the lane goes on."""
        total = sum(w.rows for w in batch)
        metrics.batch_requests(lane.pipeline.name).observe(len(batch))
        metrics.batch_rows(lane.pipeline.name).observe(total)
        try:
            outcomes = await self._outcomes(lane.pipeline, batch, total)
            for waiter, outcome in zip(batch, outcomes):
                if not waiter.future.done():  # else its caller went away
                    waiter.future.set_result(outcome)
        except asyncio.CancelledError:  # the gateway stops
            for waiter in batch:
                waiter.future.cancel()
            raise
        finally:
            self._ended(key, lane)

    async def _outcomes(self, pipeline: CompiledPipeline, batch: list[_Waiter], total: int) -> list[object]:
        """What each member of a folded run gets: its part of the answer (``_Done``), the
        run's failure (``_Failed``), or ``_ALONE`` (it runs again by itself)."""
        alone = [_ALONE] * len(batch)
        with served_by.collecting({}) as traffic:  # the run's stage calls, copied to each member
            try:
                answer = await self._run(pipeline, fold([w.inputs for w in batch]) if len(batch) > 1 else batch[0].inputs)
            except StageFailed as exc:
                if exc.status in SHARED_FAILURES or len(batch) == 1:  # the same for everyone
                    return [_Failed(StageFailed(exc.stage, exc.status, exc.code, exc.message), list(traffic.served)) for _ in batch]
                return alone  # maybe one member's data: each runs alone
            except Exception as exc:  # noqa: BLE001 - e.g. a tensor that cannot fold: each runs alone
                return [_Failed(exc, list(traffic.served))] if len(batch) == 1 else alone
        if len(batch) == 1:
            return [_Done(answer, traffic.served)]
        outcomes: list[object] = []
        offset = 0
        try:
            for waiter in batch:
                outcomes.append(_Done(cut(answer, total, offset, waiter.rows), traffic.served))
                offset += waiter.rows
        except FoldError:
            return alone
        return outcomes


