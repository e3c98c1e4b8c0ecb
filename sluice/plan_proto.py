"""The one converter between the typed plan (``sluice.plan``) and its wire form,
``sluice.v1.Pipeline`` (the gateway feed's message, and the store's column)."""

from __future__ import annotations

from sluice.plan import AnswerField, Binding, PipelinePlan, Source, StagePlan
from sluice import traffic
from sluice.tensors import TensorSpec
from sluice.v1 import pipeline_pb2


def _tensor_to_proto(t: TensorSpec) -> pipeline_pb2.TensorSpec:
    return pipeline_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape)


def _tensor_from_proto(t: pipeline_pb2.TensorSpec) -> TensorSpec:
    return TensorSpec(t.name, t.datatype, tuple(t.shape))


def to_proto(plan: PipelinePlan) -> pipeline_pb2.Pipeline:
    return pipeline_pb2.Pipeline(
        name=plan.name,
        revision=plan.revision,
        transport=plan.transport,
        stages=[
            pipeline_pb2.Stage(
                name=s.name,
                runtime=s.runtime,
                model=s.model,
                model_version=s.version,
                route=s.route,
                timeout_ms=s.timeout_ms,
                inputs=[_tensor_to_proto(t) for t in s.inputs],
                outputs=[_tensor_to_proto(t) for t in s.outputs],
                bindings=[pipeline_pb2.InputBinding(input=b.input, source=b.source, stage=b.stage) for b in s.bindings],
                traffic=traffic.to_proto(s.traffic),
                id=s.id,
                after=s.after,
                when=s.when,
                is_default=s.default,
            )
            for s in plan.stages
        ],
        rate_limit=traffic.rate_limit_to_proto(plan.rate_limit),
        request=[_tensor_to_proto(t) for t in plan.request],
        answer=[
            pipeline_pb2.AnswerField(
                spec=_tensor_to_proto(f.spec),
                sources=[pipeline_pb2.StageOutput(stage=x.stage, output=x.output) for x in f.sources],
            )
            for f in plan.answer
        ],
    )


def from_proto(message: pipeline_pb2.Pipeline) -> PipelinePlan:
    return PipelinePlan(
        name=message.name,
        revision=message.revision,
        transport=message.transport,
        stages=tuple(
            StagePlan(
                name=s.name,
                runtime=s.runtime,
                model=s.model,
                version=s.model_version,
                route=s.route,
                timeout_ms=s.timeout_ms,
                inputs=tuple(_tensor_from_proto(t) for t in s.inputs),
                outputs=tuple(_tensor_from_proto(t) for t in s.outputs),
                bindings=tuple(Binding(b.input, b.source, b.stage) for b in s.bindings),
                traffic=traffic.from_proto(s.traffic),
                id=s.id,
                after=tuple(s.after),
                when=s.when,
                default=s.is_default,
            )
            for s in message.stages
        ),
        rate_limit=traffic.rate_limit_from_proto(message.rate_limit, message.HasField("rate_limit")),
        request=tuple(_tensor_from_proto(t) for t in message.request),
        answer=tuple(
            AnswerField(_tensor_from_proto(f.spec), tuple(Source(x.stage, x.output) for x in f.sources))
            for f in message.answer
        ),
    )


def to_bytes(plan: PipelinePlan) -> bytes:
    return to_proto(plan).SerializeToString(deterministic=True)


def from_bytes(data: bytes) -> PipelinePlan:
    return from_proto(pipeline_pb2.Pipeline.FromString(data))
