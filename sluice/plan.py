"""The typed pipeline plan: what a pipeline definition resolves to, once, in the
manager, and what every other part reads: the store persists it, the xDS builder
turns it into Envoy routes, the gateway feed carries it (as ``sluice.v1.Pipeline``,
see ``sluice.plan_proto``) and the gateway runs it.

A plan is a frozen value: a change to a pipeline is a new plan with a new revision.

Two shapes, one meaning. A *chain* plan (the seed's ``chain`` form, and ``stages``
without ``after``, ids or conditions; every plan stored before graphs existed) has
no stage ids: stage i reads stage i-1's outputs (``bindings`` rename them) and the
answer is the last stage's outputs. A *graph* plan has an id on every stage, the
stages each one waits for (``after``: named there, or read through ``inputs`` or
``when``), a binding for every input naming the producing stage ("" for a request
field), the request's fields (``request``) and the answer's fields (``answer``).
``PipelinePlan.graph_form()`` states a chain plan as the graph it is, so the gateway
runs one shape.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sluice.tensors import TensorSpec
from sluice.traffic import RateLimit, StageTraffic
from sluice.wire import route_key


@dataclass(frozen=True, slots=True)
class Binding:
    """One input of a stage and the tensor that feeds it: in a graph plan the output
    ``source`` of stage ``stage`` (``REQUEST``: the request's field ``source``); in a
    chain plan (``stage`` unset) the previous stage's output ``source``."""

    input: str
    source: str
    stage: str = ""


#: ``Binding.stage`` of a request field in a graph plan
REQUEST = ""


@dataclass(frozen=True, slots=True)
class Source:
    """A stage's output: ``stage`` is the stage's id."""

    stage: str
    output: str


@dataclass(frozen=True, slots=True)
class AnswerField:
    """One field of a graph pipeline's answer: ``spec`` as the answer names it (an
    output of a stage nothing comes after, prefixed ``<stage-id>.`` where two such
    stages' names collide), and the stages that give it, each for the records it ran on
    (several only for the branches of one switch, which take disjoint records)."""

    spec: TensorSpec
    sources: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class StagePlan:
    name: str  # "<runtime>/<model>[:<version>]" unless the definition named it
    runtime: str
    model: str
    version: str  # "": the runtime's default (highest loaded) version
    route: str  # the x-sluice-route value Envoy routes this stage on
    timeout_ms: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    bindings: tuple[Binding, ...] = ()  # empty for the first stage
    traffic: StageTraffic = StageTraffic()  # splits, mirror, policies (sluice.traffic)
    # --- graphs (empty in a chain plan): see the module's docstring
    id: str = ""
    after: tuple[str, ...] = ()  # every stage this one waits for
    when: str = ""  # per-record condition (sluice.conditions); "": every record
    default: bool = False  # takes the records no sibling's condition took

    def source_of(self, input_name: str) -> str:
        return next((b.source for b in self.bindings if b.input == input_name), input_name)


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    name: str
    revision: int
    transport: str
    stages: tuple[StagePlan, ...]
    rate_limit: RateLimit | None = None  # the pipeline's own limit, on its first stage's call
    # --- graphs (empty in a chain plan)
    request: tuple[TensorSpec, ...] = ()  # the request's fields
    answer: tuple[AnswerField, ...] = ()  # the answer's fields

    @property
    def graph(self) -> bool:
        return bool(self.stages) and bool(self.stages[0].id)

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.request if self.graph else self.stages[0].inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return tuple(f.spec for f in self.answer) if self.graph else self.stages[-1].outputs

    def graph_form(self) -> "PipelinePlan":
        """This plan as a graph plan (itself if it is one): a chain's stage i gets the
        id ``str(i)``, waits for stage i-1 and reads it (stage 0 reads the request)."""
        if self.graph:
            return self
        stages = []
        for i, s in enumerate(self.stages):
            previous = str(i - 1) if i else REQUEST
            bindings = tuple(Binding(t.name, s.source_of(t.name) if i else t.name, previous) for t in s.inputs)
            stages.append(replace(s, id=str(i), after=(previous,) if i else (), bindings=bindings))
        last = str(len(self.stages) - 1)
        answer = tuple(AnswerField(t, (Source(last, t.name),)) for t in self.stages[-1].outputs)
        return replace(self, stages=tuple(stages), request=self.stages[0].inputs, answer=answer)

    def siblings(self, stage: StagePlan) -> tuple[StagePlan, ...]:
        """The stages of ``stage``'s switch, in definition order: those that wait for the
        same stages and carry a condition or ``default`` (empty for an unconditional stage)."""
        if not (stage.when or stage.default):
            return ()
        key = frozenset(stage.after)
        return tuple(s for s in self.stages if (s.when or s.default) and frozenset(s.after) == key)

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.revision

    def uses(self, runtime: str, model: str) -> list[StagePlan]:
        return [s for s in self.stages if s.runtime == runtime and s.model == model]

    def at_revision(self, revision: int) -> "PipelinePlan":
        """The same plan under another revision (its route keys follow)."""
        stages = tuple(replace(s, route=route_key(self.name, revision, i)) for i, s in enumerate(self.stages))
        return replace(self, revision=revision, stages=stages)
