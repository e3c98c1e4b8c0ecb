"""The OIP v2 gRPC service (``inference.GRPCInferenceService``) over a set of models.

Built on the stubs tritonclient ships, so Triton's own client, MLServer's and ours
all speak to it. Inputs arrive raw (``raw_input_contents``) or typed; outputs always
leave raw. Errors map to gRPC status codes: unknown model NOT_FOUND, bad input
INVALID_ARGUMENT, a failing model INTERNAL with the model's message.
"""

from __future__ import annotations

import logging
import time

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtimes.sdk import metrics
from runtimes.sdk.model import Model
from sluice.tensors import TensorError, fill_response, request_inputs
from sluice.tracing import Tracing

log = logging.getLogger(__name__)


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, name: str, kind: str, models: dict[str, Model], tracing: Tracing | None = None):
        self.name = name
        self.kind = kind
        self.models = models
        self.tracing = tracing or Tracing(kind, None)

    def _model(self, name: str, version: str, context) -> Model | None:
        model = self.models.get(name)
        if model is None or (version and version != model.version):
            return None
        return model

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=f"sluice-{self.kind}", version="0.1.0", extensions=["model_repository"])

    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self._model(request.name, request.version, context) is not None)

    async def ModelMetadata(self, request, context):
        model = self._model(request.name, request.version, context)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"runtime {self.name!r} serves no model {request.name!r} {request.version}".strip())
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=[model.version],
            platform=model.platform,
            inputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.inputs],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in model.outputs],
        )

    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=m.version, state="READY")
                for m in self.models.values()
            ]
        )

    async def ModelInfer(self, request, context):
        started = time.perf_counter()
        status = "OK"
        try:
            if not self.tracing.enabled:
                return await self._infer(request, context)
            metadata = Tracing.grpc_metadata(context)
            attributes = {
                "sluice.runtime": self.name,
                "sluice.model": request.model_name,
                "sluice.pipeline": metadata.get("x-sluice-pipeline", ""),
                "sluice.stage": metadata.get("x-sluice-stage", ""),
            }
            with self.tracing.server_span(f"infer {request.model_name}", metadata, attributes):
                return await self._infer(request, context)
        except BaseException:
            status = getattr(context.code(), "name", "ERROR")  # the code context.abort() set
            raise
        finally:
            metrics.inferences(request.model_name, status).inc()
            metrics.inference_seconds(request.model_name).observe(time.perf_counter() - started)

    async def _infer(self, request, context):
        model = self._model(request.model_name, request.model_version, context)
        if model is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"runtime {self.name!r} serves no model {request.model_name!r}")
        try:
            inputs = request_inputs(request)
            _check_inputs(model, inputs)
        except TensorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{model.name}: {exc}")
        try:
            outputs = await model.predict(inputs)
        except TensorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{model.name}: {exc}")
        except Exception as exc:  # the model's own failure: report it, keep serving
            log.exception("model %s failed", model.name)
            await context.abort(grpc.StatusCode.INTERNAL, f"{model.name}: {type(exc).__name__}: {exc}")
        if request.outputs:
            wanted = {o.name for o in request.outputs}
            outputs = {k: v for k, v in outputs.items() if k in wanted}
        response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        return fill_response(response, outputs, model.output_specs)


def _check_inputs(model: Model, inputs: dict) -> None:
    for spec in model.inputs:
        array = inputs.get(spec.name)
        if array is None:
            raise TensorError(f"missing input {spec.name!r}")
        if len(spec.shape) != array.ndim:
            raise TensorError(f"input {spec.name!r} must have rank {len(spec.shape)}, got shape {list(array.shape)}")
