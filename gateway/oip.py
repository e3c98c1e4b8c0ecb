"""The gateway's gRPC API: every pipeline is served as an OIP v2 model of its name.

So ``tritonclient`` (or any OIP client) can call a whole pipeline exactly as it would
call one model: ModelMetadata gives the first stage's inputs and the last stage's
outputs, ModelInfer runs the chain.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.executor import Executor, StageFailed
from gateway.pipelines import PipelineTable
from sluice.tensors import TensorError, from_contents
from sluice.tracing import Tracing

_HTTP_TO_GRPC = {
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class PipelineInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, table: PipelineTable, executor: Executor):
        self.table = table
        self.executor = executor

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.table.ready.is_set())

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.table.get(request.name) is not None)

    async def ModelMetadata(self, request, context):
        pipeline = self.table.get(request.name)
        if pipeline is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no pipeline {request.name!r}")
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=pipeline.name,
            versions=[str(pipeline.revision)],
            platform="sluice-pipeline",
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in pipeline.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in pipeline.stages[-1].outputs],
        )

    async def ModelInfer(self, request, context):
        tracing = self.executor.tracing
        if not tracing.enabled:
            return await self._infer(request, context)
        metadata = Tracing.grpc_metadata(context)
        with tracing.server_span(f"infer pipeline {request.model_name}", metadata, {"sluice.pipeline": request.model_name}):
            return await self._infer(request, context)

    async def _infer(self, request, context):
        pipeline = self.table.get(request.model_name)
        if pipeline is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no pipeline {request.model_name!r}")
        try:
            inputs = {}
            for i, t in enumerate(request.inputs):
                raw = request.raw_input_contents[i] if request.raw_input_contents else from_contents(t.contents, t.datatype, t.shape).tobytes()
                inputs[t.name] = (t.datatype, list(t.shape), raw)
        except (TensorError, IndexError) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            outputs = await self.executor.run(pipeline, inputs)
        except StageFailed as exc:
            code = _HTTP_TO_GRPC.get(exc.status, grpc.StatusCode.INTERNAL)
            await context.abort(code, f"stage {exc.stage.index} ({exc.stage.name}) failed: {exc.message}")
        response = pb.ModelInferResponse(model_name=pipeline.name, model_version=str(pipeline.revision), id=request.id)
        for name, (datatype, shape, raw) in outputs.items():
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        return response
