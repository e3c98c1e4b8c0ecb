"""Turns a pipeline definition into its typed plan (``sluice.plan``), checked against
model signatures.

A definition that uses none of the graph fields (``after``, ``id``, ``when``,
``default``, ``<stage>.<output>`` inputs) resolves to a chain plan, as it always did;
otherwise to a graph plan (``manager.graph``), checked for cycles, unknown stage ids,
edges whose tensors do not fit and conditions that do not parse or type.

A stage with no version stays unpinned in the plan (``version`` ""): its runtime's
default version serves it (the model's version-policy default when loaded, else the
highest; ``sluice.version_policy``), and its signature is the one the runtime reports
for the model unpinned (``manager.signatures``), i.e. that default's; a pinned stage's is
its version's.

Each stage gets its runtime, model, signature, Envoy route key and input bindings
(which output of the previous stage feeds which input). A stage that names an
unknown runtime or model, or whose inputs the previous stage cannot feed, is refused
with a 422 that names the stage, the tensor and the mismatch.
"""

from __future__ import annotations

from manager.schemas import PipelineSpec, StageSpec
from manager.served_models import Signature
from manager.store import RuntimeRow
from manager.traffic_spec import resolve_traffic
from sluice.errors import ApiError
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.tensors import TensorSpec
from sluice.wire import route_key


def resolve(spec: PipelineSpec, revision: int, runtimes: dict[str, RuntimeRow], default_timeout_ms: int) -> PipelinePlan:
    if is_graph(spec):
        from manager.graph import resolve_graph

        return resolve_graph(spec, revision, runtimes, default_timeout_ms)
    stages: list[StagePlan] = []
    for index, stage in enumerate(spec.stage_list()):
        signature = _signature(index, stage, runtimes)
        inputs, outputs = signature.inputs, signature.outputs
        bindings = _bindings(index, stage, inputs, stages[-1]) if stages else ()
        stages.append(stage_plan(spec, revision, index, stage, runtimes, default_timeout_ms, inputs, outputs, bindings))
    rate_limit = spec.rate_limit.plan() if spec.rate_limit is not None else None
    return PipelinePlan(spec.name, revision, spec.transportType, tuple(stages), rate_limit=rate_limit)


def stage_plan(spec: PipelineSpec, revision: int, index: int, stage, runtimes: dict[str, RuntimeRow], default_timeout_ms: int,
               inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], bindings: tuple[Binding, ...], **graph) -> StagePlan:
    """Stage ``index`` of a plan, chain or graph (``graph``: its id, after, when, default)."""
    return StagePlan(
        name=stage.label,
        runtime=stage.runtime,
        model=stage.model,
        version=stage.version or "",
        route=route_key(spec.name, revision, index),
        timeout_ms=stage.timeout_ms or default_timeout_ms,
        inputs=inputs,
        outputs=outputs,
        bindings=bindings,
        traffic=resolve_traffic(index, stage, runtimes),
        **graph,
    )


def is_graph(spec: PipelineSpec) -> bool:
    """Whether the definition uses any graph field (else it is a chain, resolved as before)."""
    ids = {s.id for s in spec.stages or [] if s.id}
    return any(
        s.after is not None or s.id or s.when or s.default
        or any(v.partition(".")[0] in ids or v.partition(".")[0].isdigit() and "." in v for v in (s.inputs or {}).values())
        for s in spec.stages or []
    )


def stage_signature(index: int, stage: StageSpec, runtimes: dict[str, RuntimeRow]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The stage's model's inputs and outputs (422 for an unknown runtime, model or version)."""
    signature = _signature(index, stage, runtimes)
    return signature.inputs, signature.outputs


def check_compatible(index: int, stage: StageSpec, wanted: TensorSpec, given: TensorSpec) -> None:
    """422 unless ``given`` (an output) can feed ``wanted`` (an input)."""
    _check_compatible(index, stage, wanted, given)


def _signature(index: int, stage: StageSpec, runtimes: dict[str, RuntimeRow]) -> Signature:
    runtime = runtimes.get(stage.runtime)
    if runtime is None:
        raise ApiError(
            422,
            f"stage {index} ({stage.label}): unknown runtime {stage.runtime!r}",
            "unknown_runtime",
            stage=index,
            runtime=stage.runtime,
            known=sorted(runtimes),
        )
    model = runtime.models.get(stage.model)
    if model is None:
        raise ApiError(
            422,
            f"stage {index} ({stage.label}): runtime {stage.runtime!r} serves no model {stage.model!r}",
            "unknown_model",
            stage=index,
            runtime=stage.runtime,
            model=stage.model,
            known=sorted(runtime.models),
        )
    versions = model.versions
    if stage.version and versions and stage.version not in versions:
        raise ApiError(
            422,
            f"stage {index} ({stage.label}): model {stage.model!r} has no version {stage.version!r}",
            "unknown_version",
            stage=index,
            model=stage.model,
            versions=list(versions),
        )
    return model.signature_of(stage.version or "")


def _bindings(index: int, stage: StageSpec, inputs: tuple[TensorSpec, ...], previous: StagePlan) -> tuple[Binding, ...]:
    outputs = {t.name: t for t in previous.outputs}
    explicit = stage.inputs or {}
    unknown = set(explicit) - {t.name for t in inputs}
    if unknown:
        name = sorted(unknown)[0]
        raise _mismatch(index, stage, name, f"the stage has no input {name!r}")
    bindings: list[Binding] = []
    for tensor in inputs:
        name = tensor.name
        if name in explicit:
            source = explicit[name]
        elif name in outputs:
            source = name
        elif len(inputs) == 1 and len(outputs) == 1:
            source = next(iter(outputs))
        else:
            raise _mismatch(
                index, stage, name,
                f"no output of stage {index - 1} ({previous.name}) feeds input {name!r}; "
                f"its outputs are {sorted(outputs)}",
            )
        if source not in outputs:
            raise _mismatch(index, stage, name, f"stage {index - 1} has no output {source!r}")
        _check_compatible(index, stage, tensor, outputs[source])
        bindings.append(Binding(name, source))
    return tuple(bindings)


def _check_compatible(index: int, stage: StageSpec, wanted: TensorSpec, given: TensorSpec) -> None:
    name = wanted.name
    if wanted.datatype != given.datatype:
        raise _mismatch(
            index, stage, name,
            f"input {name!r} wants {wanted.datatype}, output {given.name!r} gives {given.datatype}",
        )
    want_shape, give_shape = list(wanted.shape), list(given.shape)
    if len(want_shape) != len(give_shape) or any(
        w != -1 and g != -1 and w != g for w, g in zip(want_shape, give_shape)
    ):
        raise _mismatch(
            index, stage, name,
            f"input {name!r} wants shape {want_shape}, output {given.name!r} gives {give_shape}",
        )


def _mismatch(index: int, stage: StageSpec, tensor: str, why: str) -> ApiError:
    return ApiError(
        422,
        f"stage {index} ({stage.label}): {why}",
        "signature_mismatch",
        stage=index,
        tensor=tensor,
    )
