"""Stage fusion: consecutive stages of a chain on one runtime run as one call.

A run of two or more consecutive stages is *fused* when each stage after the first
reads only the stage before it, all of them are on the same runtime with no traffic
or policy of their own (no split, mirror, sticky key, retries, rate limit, outlier or
circuit-breaker settings: ``StageTraffic()``), none has a condition, and nothing
else (no later stage, no answer field) reads a stage of the run but its last. The
pipeline's own rate limit keeps its first stage out of any run (the limit is counted
on that stage's own route).

``fused_runs`` is a pure function of the plan, so the manager (which adds one Envoy
route per run, ``route`` below, with the run's summed timeout) and the gateway (which
calls it) agree without a word on the wire. The gateway sends the run's first model
the request as usual, with the route header of the run and the string parameter
``sluice.fused``: JSON ``[{"stage": i, "model": m, "version": v, "inputs": {input:
output of the stage before}, "timeout_ms": t}, ...]`` for each stage after the first,
and the first stage's timeout as the int64 parameter ``sluice.timeout_ms``. The runtime
runs them in order on the arrays the one before gave (nothing is re-encoded in between)
and answers the last stage's outputs; each stage gets a span of its own, and a
failure names its stage in the trailing metadata ``x-sluice-failed-stage``.

Each stage keeps its own timeout inside a run: Envoy's route and the gateway's deadline
bound the whole run by the sum, and the runtime fails the run with DEADLINE_EXCEEDED,
naming the stage, as soon as one stage has run longer than its own ``timeout_ms``
(counted from when the stage began; the first's from when the call reached the runtime).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sluice.plan import REQUEST, PipelinePlan, StagePlan
from sluice.traffic import StageTraffic

#: the ModelInfer parameter carrying the stages after the first (JSON)
FUSED_PARAMETER = "sluice.fused"
#: the int64 ModelInfer parameter carrying a fused run's first stage's timeout (ms)
TIMEOUT_PARAMETER = "sluice.timeout_ms"
#: trailing metadata of a failed fused call: the index of the stage that failed
FAILED_STAGE_HEADER = "x-sluice-failed-stage"
#: the ModelInfer answer parameter listing each fused stage's model version, comma-separated
VERSIONS_PARAMETER = "sluice.versions"
#: the span tag marking a fused call (the gateway's call span, whose ``sluice.stage`` and
#: ``sluice.model`` are then its stages' and models joined by "+") and each stage's span
#: inside the runtime's
FUSED_TAG = "sluice.fused"


@dataclass(frozen=True, slots=True)
class FusedRun:
    """Stages ``first``..``last`` (indexes, inclusive) of a plan, run as one call."""

    first: int
    last: int
    route: str
    timeout_ms: int

    @property
    def indexes(self) -> range:
        return range(self.first, self.last + 1)


@dataclass(frozen=True, slots=True)
class FusedStep:
    """One stage after a fused run's first, as the runtime runs it: its model, and for
    each of its inputs the output of the stage before that feeds it."""

    stage: int
    model: str
    version: str
    inputs: tuple[tuple[str, str], ...]
    timeout_ms: int = 0  # the stage's own timeout; 0: none but the run's


def run_route(first: StagePlan, length: int) -> str:
    """The ``x-sluice-route`` value of a fused run starting at stage ``first``."""
    return f"{first.route}+{length}"


def fused_runs(plan: PipelinePlan) -> tuple[FusedRun, ...]:
    """The plan's fused runs (see the module's docstring), in stage order; the same for
    a chain plan and its ``graph_form()``."""
    if len(plan.stages) < 2:
        return ()
    graph = plan.graph_form()
    stages = graph.stages
    if not _linear(graph):
        return ()
    read_by_others = _read_outside_next(graph)
    runs: list[FusedRun] = []
    start = 0
    for i in range(1, len(stages) + 1):
        if i < len(stages) and _joins(graph, i, read_by_others):
            continue
        if i - start >= 2:
            members = stages[start:i]
            runs.append(FusedRun(start, i - 1, run_route(members[0], i - start), sum(s.timeout_ms for s in members)))
        start = i
    return tuple(runs)


def steps(plan: PipelinePlan, run: FusedRun) -> tuple[FusedStep, ...]:
    """What the runtime runs after the run's first stage."""
    graph = plan.graph_form()
    out = []
    for index in range(run.first + 1, run.last + 1):
        stage = graph.stages[index]
        by_input = {b.input: b.source for b in stage.bindings}
        out.append(FusedStep(index, stage.model, stage.version, tuple((t.name, by_input.get(t.name, t.name)) for t in stage.inputs),
                             stage.timeout_ms))
    return tuple(out)


def encode_steps(fused: tuple[FusedStep, ...]) -> str:
    return json.dumps([{"stage": s.stage, "model": s.model, "version": s.version, "inputs": dict(s.inputs), "timeout_ms": s.timeout_ms}
                       for s in fused], separators=(",", ":"))


def decode_steps(text: str) -> tuple[FusedStep, ...]:
    """The steps of a ``sluice.fused`` parameter; ``ValueError`` saying what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"parameter {FUSED_PARAMETER!r} is not JSON: {exc}") from None
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"parameter {FUSED_PARAMETER!r} must be a non-empty JSON list")
    out = []
    shape = "{stage: int, model: str, version: str, inputs: {str: str}, timeout_ms: int >= 0}"
    for item in raw:
        if not isinstance(item, dict):
            raise ValueError(f"parameter {FUSED_PARAMETER!r}: a step must be {shape}")
        try:
            stage, model, version, inputs = item["stage"], item["model"], item.get("version", ""), item["inputs"]
            timeout_ms = item.get("timeout_ms", 0)
        except KeyError as exc:
            raise ValueError(f"parameter {FUSED_PARAMETER!r}: a step lacks {exc}") from None
        if not (isinstance(stage, int) and isinstance(model, str) and model and isinstance(version, str) and isinstance(inputs, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items())
                and type(timeout_ms) is int and timeout_ms >= 0):
            raise ValueError(f"parameter {FUSED_PARAMETER!r}: a step must be {shape}")
        out.append(FusedStep(stage, model, version, tuple(inputs.items()), timeout_ms))
    return tuple(out)


def _linear(graph: PipelinePlan) -> bool:
    for i, stage in enumerate(graph.stages):
        if stage.when or stage.default or stage.after != ((graph.stages[i - 1].id,) if i else ()):
            return False
    return True


def _plain(stage: StagePlan) -> bool:
    return stage.traffic == StageTraffic()


def _read_outside_next(graph: PipelinePlan) -> set[str]:
    """Ids of stages read by anything other than the stage right after them."""
    ids = [s.id for s in graph.stages]
    read: set[str] = {src.stage for field in graph.answer for src in field.sources}
    for i, stage in enumerate(graph.stages):
        previous = ids[i - 1] if i else REQUEST
        read |= {b.stage for b in stage.bindings if b.stage not in (previous, REQUEST)}
    return read


def _joins(graph: PipelinePlan, i: int, read_by_others: set[str]) -> bool:
    """Whether stage ``i`` can be fused onto stage ``i - 1``'s run."""
    before, stage = graph.stages[i - 1], graph.stages[i]
    if before.runtime != stage.runtime or not (_plain(before) and _plain(stage)):
        return False
    if i - 1 == 0 and graph.rate_limit is not None:
        return False
    if before.id in read_by_others:
        return False
    return all(b.stage == before.id for b in stage.bindings) and len(stage.bindings) == len(stage.inputs)
