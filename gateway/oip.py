"""The gateway's gRPC API: every pipeline is served as an OIP v2 model of its name.

So ``tritonclient`` (or any OIP client or tool) can call a whole pipeline exactly as
it would call one model on Triton: ServerLive/Ready/Metadata, ModelReady,
ModelMetadata (the first stage's inputs, the last stage's outputs), ModelConfig,
ModelStatistics, RepositoryIndex and ModelInfer, which runs the chain. What each
answers is ``gateway.oip_models``' (shared with OIP REST); this module only maps it
to gRPC: errors as status codes (unknown pipeline or version NOT_FOUND, bad input
INVALID_ARGUMENT, a failing stage by its failure), inputs raw or typed (typed
``BYTES`` included), outputs raw.
"""

from __future__ import annotations

import time

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway import metrics
from gateway.codec import grpc_inputs
from gateway.executor import Executor
from gateway.oip_models import EXTENSIONS, SERVER_NAME, SERVER_VERSION, OipError, PipelineModels
from gateway.pipelines import PipelineTable
from sluice.tensors import TensorError
from sluice.tracing import Tracing


class PipelineInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, table: PipelineTable, executor: Executor, models: PipelineModels | None = None):
        self.table = table
        self.executor = executor
        self.models = models or PipelineModels(table, executor)

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.models.server_ready())

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.models.ready(request.name, request.version))

    async def ModelMetadata(self, request, context):
        try:
            return self.models.metadata(self.models.resolve(request.name, request.version))
        except OipError as exc:
            await context.abort(exc.code, exc.message)

    async def ModelConfig(self, request, context):
        try:
            pipeline = self.models.resolve(request.name, request.version)
        except OipError as exc:
            await context.abort(exc.code, exc.message)
        return pb.ModelConfigResponse(config=await self.models.config(pipeline))

    async def ModelStatistics(self, request, context):
        try:
            return self.models.statistics(request.name, request.version)
        except OipError as exc:
            await context.abort(exc.code, exc.message)

    async def RepositoryIndex(self, request, context):
        if request.repository_name:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no repository {request.repository_name!r}: the gateway has one, unnamed")
        return self.models.index(request.ready)

    async def ModelInfer(self, request, context):
        tracing = self.executor.tracing
        if not tracing.enabled:
            return await self._infer(request, context)
        metadata = Tracing.grpc_metadata(context)
        with tracing.server_span(f"infer pipeline {request.model_name}", metadata, {"sluice.pipeline": request.model_name}):
            return await self._infer(request, context)

    async def _infer(self, request, context):
        started = time.perf_counter_ns()
        try:
            pipeline = self.models.resolve(request.model_name, request.model_version)
        except OipError as exc:
            metrics.requests("(unknown)", exc.status).inc()
            await context.abort(exc.code, exc.message)
        try:
            try:
                inputs = grpc_inputs(request)
            except TensorError as exc:
                raise OipError.invalid(str(exc)) from None
            wanted = [o.name for o in request.outputs] or None
            outputs, rows, checked = await self.models.infer(pipeline, inputs, wanted)
        except OipError as exc:
            metrics.answered(pipeline, exc.status, started)
            await context.abort(exc.code, exc.message)
        ran = time.perf_counter_ns()
        response = pb.ModelInferResponse(model_name=pipeline.name, model_version=pipeline.version, id=request.id)
        for name, (datatype, shape, raw) in outputs.items():
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        metrics.answered(pipeline, 200, started, (checked, ran), rows)
        return response
