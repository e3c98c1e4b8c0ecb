"""The typed pipeline plan: what a pipeline definition resolves to, once, in the
manager, and what every other part reads: the store persists it, the xDS builder
turns it into Envoy routes, the gateway feed carries it (as ``sluice.v1.Pipeline``,
see ``sluice.plan_proto``) and the gateway runs it.

A plan is a frozen value: a change to a pipeline is a new plan with a new revision.
"""

from __future__ import annotations

from dataclasses import dataclass

from sluice.tensors import TensorSpec
from sluice.wire import route_key


@dataclass(frozen=True, slots=True)
class Binding:
    """One input of a stage and the output of the previous stage that feeds it."""

    input: str
    source: str


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

    def source_of(self, input_name: str) -> str:
        return next((b.source for b in self.bindings if b.input == input_name), input_name)


@dataclass(frozen=True, slots=True)
class PipelinePlan:
    name: str
    revision: int
    transport: str
    stages: tuple[StagePlan, ...]

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[0].inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.stages[-1].outputs

    @property
    def key(self) -> tuple[str, int]:
        return self.name, self.revision

    def uses(self, runtime: str, model: str) -> list[StagePlan]:
        return [s for s in self.stages if s.runtime == runtime and s.model == model]

    def at_revision(self, revision: int) -> "PipelinePlan":
        """The same plan under another revision (its route keys follow)."""
        stages = tuple(
            StagePlan(s.name, s.runtime, s.model, s.version, route_key(self.name, revision, i), s.timeout_ms, s.inputs, s.outputs, s.bindings)
            for i, s in enumerate(self.stages)
        )
        return PipelinePlan(self.name, revision, self.transport, stages)
