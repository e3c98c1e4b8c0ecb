"""Every pipeline as an Open Inference Protocol model: what OIP REST (``gateway.v2``)
and OIP gRPC (``gateway.oip``) both answer, in one place.

* Name and version: a pipeline is the model of its name; its revision is its
  version. ``model_version`` "" means the revision served now; another selects a
  revision while the gateway still holds it (a replaced revision while it drains),
  else NOT_FOUND naming the versions held (``PipelineTable.get``/``held``).
* Metadata: the first stage's inputs, the last stage's outputs.
* Config (Triton's ``ModelConfig``), derived from the pipeline: its inputs and
  outputs, and a ``max_batch_size`` that is the smallest positive one its stages
  report through their own ``ModelConfig`` (asked through the egress on each stage's
  route, once per revision, then cached); 0 (the dims then carry the batch
  dimension, as the pipeline's shapes do) when no stage sets a limit, when a stage
  cannot say (e.g. MLServer answers UNIMPLEMENTED) or when a tensor has no leading
  variable dimension. Platform ``sluice-pipeline`` (not ``ensemble``: tools would
  then look for the stage models on the gateway); ``parameters`` name the stages.
* Statistics (Triton's ``ModelStatistics``): per held revision, from the counters
  the gateway keeps (``gateway.metrics.PipelineStats``).
* Repository index: every pipeline at its revision, READY; a replaced revision still
  draining, UNLOADING.
* Inference: inputs checked against the pipeline's signature (``gateway.codec``), the
  stages run by the ``Executor``, outputs filtered to those asked for.

Errors are ``OipError``: an HTTP status for REST and a gRPC code for gRPC, one message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

import grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from gateway.codec import check_inputs, check_outputs
from gateway.executor import Executor, RawTensor, StageFailed
from gateway.pipelines import CompiledPipeline, PipelineTable
from sluice.tensors import TensorError
from sluice.wire import UNROUTED

log = logging.getLogger(__name__)

SERVER_NAME = "sluice-gateway"
SERVER_VERSION = "0.1.0"
PLATFORM = "sluice-pipeline"
#: OIP/Triton extensions the gateway speaks, on both protocols
EXTENSIONS = ("binary_tensor_data", "model_configuration", "statistics", "model_repository(index)")
#: how long a stage may take to answer its ModelConfig
CONFIG_TIMEOUT_S = 2.0

_STAGE_GRPC = {
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_DATA_TYPES = {name: mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}") for name in (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES",
)}


class OipError(Exception):
    """An OIP error: ``status`` for REST, ``code`` for gRPC."""

    def __init__(self, status: int, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, message: str) -> "OipError":
        return cls(400, grpc.StatusCode.INVALID_ARGUMENT, message)

    @classmethod
    def stage(cls, exc: StageFailed) -> "OipError":
        # a stage that refused the input: the caller's request was wrong (400)
        status = 400 if exc.status == 422 else exc.status
        code = _STAGE_GRPC.get(exc.status, grpc.StatusCode.INTERNAL)
        return cls(status, code, f"stage {exc.stage.index} ({exc.stage.name}) failed: {exc.message}")


class PipelineModels:
    def __init__(self, table: PipelineTable, executor: Executor):
        self.table = table
        self.executor = executor
        self._max_batch: dict[tuple[str, int], int] = {}

    # --- names and versions

    def resolve(self, name: str, version: str = "") -> CompiledPipeline:
        pipeline = self.table.get(name, version)
        if pipeline is not None:
            return pipeline
        held = self.table.held(name)
        if not held:
            raise OipError(404, grpc.StatusCode.NOT_FOUND, f"no pipeline {name!r}")
        served = ", ".join(p.version for p in held)
        raise OipError(404, grpc.StatusCode.NOT_FOUND, f"pipeline {name!r} has no version {version!r}; versions served: {served}")

    def ready(self, name: str, version: str = "") -> bool:
        return self.table.get(name, version) is not None

    def server_ready(self) -> bool:
        return self.table.ready.is_set()

    # --- metadata, config

    def metadata(self, pipeline: CompiledPipeline) -> pb.ModelMetadataResponse:
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=pipeline.name,
            versions=[p.version for p in self.table.held(pipeline.name)] or [pipeline.version],
            platform=PLATFORM,
            inputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in pipeline.inputs],
            outputs=[tensor(name=s.name, datatype=s.datatype, shape=s.shape) for s in pipeline.outputs],
        )

    async def config(self, pipeline: CompiledPipeline) -> mc.ModelConfig:
        batch = self._max_batch.get(pipeline.key)
        if batch is None:
            batch, definite = await self._stage_max_batch(pipeline)
            if definite:
                if len(self._max_batch) > 2 * len(self.table.pipelines) + 64:  # forget revisions no longer held
                    self._max_batch = {k: v for k, v in self._max_batch.items() if self.table.get(k[0], str(k[1]))}
                self._max_batch[pipeline.key] = batch
        specs = (*pipeline.inputs, *pipeline.outputs)
        if batch and not all(s.shape and s.shape[0] == -1 for s in specs):
            batch = 0
        drop = 1 if batch else 0
        config = mc.ModelConfig(name=pipeline.name, platform=PLATFORM, max_batch_size=batch)
        config.version_policy.specific.versions.extend(p.revision for p in self.table.held(pipeline.name))
        for s in pipeline.inputs:
            config.input.add(name=s.name, data_type=_DATA_TYPES[s.datatype], dims=s.shape[drop:])
        for s in pipeline.outputs:
            config.output.add(name=s.name, data_type=_DATA_TYPES[s.datatype], dims=s.shape[drop:])
        config.parameters["sluice.stages"].string_value = ",".join(s.name for s in pipeline.stages)
        config.parameters["sluice.revision"].string_value = pipeline.version
        return config

    async def _stage_max_batch(self, pipeline: CompiledPipeline) -> tuple[int, bool]:
        """(smallest positive max_batch_size of the stages or 0, whether every stage answered for sure)."""
        stub = self.executor.stub

        async def ask(stage) -> tuple[int, bool]:
            request = pb.ModelConfigRequest(name=stage.model, version=stage.version)
            try:
                response = await stub.ModelConfig(request, metadata=stage.metadata, timeout=CONFIG_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                unimplemented = exc.code() == grpc.StatusCode.UNIMPLEMENTED and UNROUTED not in (exc.details() or "")
                if not unimplemented:
                    log.info("pipeline %s stage %d: no ModelConfig (%s: %s)", pipeline.name, stage.index, exc.code().name, exc.details())
                return 0, unimplemented  # a runtime without ModelConfig states no limit
            return max(response.config.max_batch_size, 0), True

        answers = await asyncio.gather(*(ask(s) for s in pipeline.stages))
        limits = [b for b, _ in answers if b > 0]
        return (min(limits) if limits else 0), all(d for _, d in answers)

    # --- statistics, index

    def statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        if name:
            held = [self.resolve(name, version)] if version else self.table.held(name)
            if not held:
                self.resolve(name)  # raises NOT_FOUND
        else:
            if version:
                raise OipError.invalid("a version needs a model name")
            held = [p for n in sorted(self.table.pipelines) for p in self.table.held(n)]
        return pb.ModelStatisticsResponse(model_stats=[_statistics(p) for p in held])

    def index(self, ready_only: bool = False) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        models = []
        for name in sorted(self.table.pipelines):
            held = self.table.held(name)
            current = held[-1]
            models.append(entry(name=name, version=current.version, state="READY"))
            if not ready_only:
                models.extend(
                    entry(name=name, version=p.version, state="UNLOADING", reason=f"draining: replaced by version {current.version}")
                    for p in held[:-1]
                )
        return pb.RepositoryIndexResponse(models=models)

    # --- inference

    async def infer(
        self, pipeline: CompiledPipeline, inputs: dict[str, RawTensor], wanted: Collection[str] | None
    ) -> tuple[dict[str, RawTensor], int, int]:
        """Run the pipeline; (outputs asked for, rows, when the inputs were checked in
        ``perf_counter_ns``). Raises OipError."""
        try:
            rows = check_inputs(pipeline, inputs)
            if wanted:
                check_outputs(pipeline, wanted)
        except TensorError as exc:
            raise OipError.invalid(str(exc)) from None
        checked = time.perf_counter_ns()
        try:
            outputs = await self.executor.run(pipeline, inputs)
        except StageFailed as exc:
            raise OipError.stage(exc) from None
        if wanted:
            outputs = {name: outputs[name] for name in wanted if name in outputs}
        return outputs, rows, checked


def _statistics(pipeline: CompiledPipeline) -> pb.ModelStatistics:
    s = pipeline.stats
    out = pb.ModelStatistics(
        name=pipeline.name,
        version=pipeline.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    stats = out.inference_stats
    stats.success.count, stats.success.ns = s.success_count, s.success_ns
    stats.fail.count, stats.fail.ns = s.fail_count, s.fail_ns
    stats.queue.count, stats.queue.ns = s.success_count, s.queue_ns
    stats.compute_input.count, stats.compute_input.ns = s.success_count, s.input_ns
    stats.compute_infer.count, stats.compute_infer.ns = s.success_count, s.infer_ns
    stats.compute_output.count, stats.compute_output.ns = s.success_count, s.output_ns
    return out
