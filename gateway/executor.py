"""Runs a pipeline: one OIP ModelInfer per stage through the sidecar's egress.

The gateway never knows where a runtime is: each call carries the stage's
``x-sluice-route`` header and Envoy's route picks the cluster, timeout and retries.
Between stages the tensors stay raw bytes: a stage's output bytes become the next
stage's input bytes as they are, never decoded or re-encoded in Python.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.pipelines import CompiledPipeline, CompiledStage, PipelineTable
from sluice.tensors import TensorError, raw_outputs

RawTensor = tuple[str, list[int], bytes]  # (datatype, shape, raw bytes)

# gRPC status -> (HTTP status, error code) for a failed stage
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "stage_rejected_input"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "stage_timeout"),
    grpc.StatusCode.UNAVAILABLE: (503, "stage_unavailable"),
    grpc.StatusCode.UNIMPLEMENTED: (503, "stage_unrouted"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "stage_overloaded"),
    grpc.StatusCode.NOT_FOUND: (502, "stage_model_missing"),
}


class StageFailed(Exception):
    def __init__(self, stage: CompiledStage, status: int, code: str, message: str):
        super().__init__(message)
        self.stage = stage
        self.status = status
        self.code = code
        self.message = message


class Executor:
    def __init__(self, table: PipelineTable, egress: str, max_message_bytes: int):
        self.table = table
        self.channel = grpc.aio.insecure_channel(
            egress,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # one HTTP/2 connection to the local sidecar carries every stage call
                ("grpc.use_local_subchannel_pool", 1),
            ],
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def run(self, pipeline: CompiledPipeline, inputs: dict[str, RawTensor], extra_metadata: tuple = ()) -> dict[str, RawTensor]:
        current = inputs
        self.table.enter(pipeline)
        try:
            for stage in pipeline.stages:
                current = await self._call(stage, current, extra_metadata)
        finally:
            self.table.leave(pipeline)
        return current

    async def _call(self, stage: CompiledStage, current: dict[str, RawTensor], extra_metadata: tuple) -> dict[str, RawTensor]:
        request = pb.ModelInferRequest(model_name=stage.model, model_version=stage.version)
        for spec, source in zip(stage.inputs, stage.sources):
            try:
                datatype, shape, raw = current[source]
            except KeyError:
                raise StageFailed(stage, 502, "stage_missing_input", f"no tensor {source!r} for input {spec.name!r}") from None
            tensor = request.inputs.add()
            tensor.name = spec.name
            tensor.datatype = datatype
            tensor.shape.extend(shape)
            request.raw_input_contents.append(raw)
        try:
            response = await self.stub.ModelInfer(request, metadata=stage.metadata + extra_metadata, timeout=stage.timeout_s)
        except grpc.aio.AioRpcError as exc:
            status, code = _STATUS.get(exc.code(), (502, "stage_failed"))
            details = exc.details() or exc.code().name
            if exc.code() == grpc.StatusCode.UNAVAILABLE and "timeout" in details:
                status, code = 504, "stage_timeout"
            raise StageFailed(stage, status, code, details) from None
        try:
            return raw_outputs(response)
        except TensorError as exc:
            raise StageFailed(stage, 502, "stage_bad_output", str(exc)) from None
