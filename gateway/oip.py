"""The gateway's gRPC API: every pipeline is served as an OIP v2 model of its name.

So ``tritonclient`` (or any OIP client or tool) can call a whole pipeline exactly as
it would call one model on Triton: ServerLive/Ready/Metadata, ModelReady,
ModelMetadata (the first stage's inputs, the last stage's outputs), ModelConfig,
ModelStatistics, RepositoryIndex, ModelInfer, which runs the pipeline, and
ModelStreamInfer (Triton's bidirectional stream; ``tritonclient.grpc``'s
``start_stream``/``async_stream_infer``). What each answers is
``gateway.oip_models``' (shared with OIP REST); this module only maps it to gRPC:
errors as status codes (unknown pipeline or version NOT_FOUND, bad input
INVALID_ARGUMENT, a failing stage by its failure), inputs raw or typed (typed
``BYTES`` included), outputs raw.

ModelStreamInfer: each request of a stream is one inference (of any pipeline, named in
it), answered by one ModelStreamInferResponse in the requests' order. Up to
``stream_max_in_flight`` requests of a stream run at once; the next is read only once
the oldest is answered (``gateway.streaming.ordered``), so a client sending faster
than the pipeline answers is held back by HTTP/2 flow control. A request that fails
(unknown pipeline, bad tensors, a failing stage) is answered in its place as Triton
does: ``error_message`` set, and ``infer_response`` carrying only the request's ``id``,
the pipeline and version, and the failure as parameters ``sluice.error_code`` (the
gRPC code's name) and ``sluice.status`` (the HTTP status); the stream goes on, since its
requests are independent (tritonclient hands the error to that request's callback).
A stream is one RPC for the server's ``max_in_flight``; closing or cancelling it
cancels its requests still running.

Traffic (``gateway.served_by``): a call's ``x-sluice-variant`` and a stage's sticky
header are read from its metadata (a stream's, for each of its requests) and forwarded
to the stage calls, as the HTTP API does from headers. What served each stage
(``<stage-id>=<runtime>/<model>:<version>``, comma-separated) is answered as initial
metadata ``x-sluice-served-by`` by ModelInfer (also on a failure, if a stage ran), and
as the parameter ``sluice.served_by`` (string) of each streamed answer, failed ones
included.
"""

from __future__ import annotations

import contextlib
import logging
import time

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway import metrics, served_by
from gateway.codec import grpc_inputs
from gateway.executor import Executor
from gateway.oip_models import EXTENSIONS, SERVER_NAME, SERVER_VERSION, OipError, PipelineModels
from gateway.pipelines import PipelineTable
from gateway.streaming import ordered
from sluice.tensors import TensorError

log = logging.getLogger(__name__)


class PipelineInferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, table: PipelineTable, executor: Executor, models: PipelineModels | None = None,
                 stream_max_in_flight: int = 16):
        self.table = table
        self.executor = executor
        self.models = models or PipelineModels(table, executor)
        self.stream_max_in_flight = stream_max_in_flight

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
        headers = served_by.grpc_headers(context)
        with served_by.collecting(headers) as traffic:
            try:
                tracing = self.executor.tracing
                if not tracing.enabled:
                    response = await self._infer(request)
                else:
                    with tracing.server_span(f"infer pipeline {request.model_name}", headers,
                                             {"sluice.pipeline": request.model_name}):
                        response = await self._infer(request)
            except OipError as exc:
                await context.abort(exc.code, exc.message, trailing_metadata=served_by.grpc_trailing_metadata(traffic))
            # in the answer and its trailers, which leave with it in one write: headers sent
            # ahead of it would keep the gateway's sidecar from retrying the call on another
            # gateway, were this one to die before the answer was out
            served_by.on_unary_answer(response, traffic, context)
            return response

    async def ModelStreamInfer(self, request_iterator, context):
        tracing = self.executor.tracing
        metadata = served_by.grpc_headers(context)  # the stream's, for each of its requests

        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            # each request its own traffic (run in its own task by ``ordered``)
            with served_by.collecting(metadata) as traffic:
                answered = await infer_one(request)
                served_by.on_stream_answer(answered.infer_response, traffic)
                return answered

        async def infer_one(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            try:
                if not tracing.enabled:
                    return pb.ModelStreamInferResponse(infer_response=await self._infer(request))
                with tracing.server_span(f"infer pipeline {request.model_name}", metadata,
                                         {"sluice.pipeline": request.model_name, "sluice.stream": True}):
                    return pb.ModelStreamInferResponse(infer_response=await self._infer(request))
            except OipError as exc:
                return stream_error(request, exc.code, exc.status, exc.message)
            except Exception:  # a bug costs its request, not the stream
                log.exception("stream request for %s failed", request.model_name)
                return stream_error(request, grpc.StatusCode.INTERNAL, 500, "internal error")

        # closed at once when the stream ends or is cancelled: the requests still running stop
        async with contextlib.aclosing(ordered(request_iterator, answer, self.stream_max_in_flight)) as answers:
            async for response in answers:
                yield response

    async def _infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """One inference, counted in metrics; OipError when it fails. The revision is
        looked up with no await before the executor holds it."""
        started = time.perf_counter_ns()
        try:
            pipeline = self.models.resolve(request.model_name, request.model_version)
        except OipError as exc:
            metrics.requests("(unknown)", exc.status).inc()
            raise
        try:
            try:
                inputs = grpc_inputs(request)
            except TensorError as exc:
                raise OipError.invalid(str(exc)) from None
            wanted = [o.name for o in request.outputs] or None
            outputs, rows, checked = await self.models.infer(pipeline, inputs, wanted)
        except OipError as exc:
            metrics.answered(pipeline, exc.status, started)
            raise
        ran = time.perf_counter_ns()
        response = pb.ModelInferResponse(model_name=pipeline.name, model_version=pipeline.version, id=request.id)
        for name, (datatype, shape, raw) in outputs.items():
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            response.raw_output_contents.append(raw)
        metrics.answered(pipeline, 200, started, (checked, ran), rows)
        return response


def stream_error(request: pb.ModelInferRequest, code: grpc.StatusCode, status: int, message: str) -> pb.ModelStreamInferResponse:
    """A failed stream request's answer, as Triton writes one, with the failure's code."""
    answer = pb.ModelStreamInferResponse(error_message=message)
    failed = answer.infer_response
    failed.model_name, failed.model_version, failed.id = request.model_name, request.model_version, request.id
    failed.parameters["sluice.error_code"].string_param = code.name
    failed.parameters["sluice.status"].int64_param = status
    return answer
