"""Runs a pipeline: one OIP ModelInfer per stage through the sidecar's egress.

A chain runs stage by stage. A graph (``gateway.pipelines.CompiledPipeline.linear``
false) runs each stage as soon as the stages it waits for are done, so independent
branches run concurrently; a stage with a condition gets only the records its switch
gives it, and the answer is merged back in the request's record order
(``gateway.graph``). A failed stage cancels the others and fails the request.

Consecutive plain stages on one runtime run as one call (``sluice.fusion``,
``CompiledPipeline.calls``): the runtime runs them in order, each stage still has its
span there, ``x-sluice-served-by`` names each, and a failure names the stage that
failed (the runtime says which in its trailing metadata).

The gateway never knows where a runtime is: each call carries the stage's route
header (``sluice.wire.ROUTE_HEADER``) and Envoy's route picks the cluster, timeout
and retries.
A stage at its concurrency limit is a 503 ``stage_overloaded`` naming the stage, at
once: its cluster's circuit breaker overflowed on the sidecar (Envoy marks the answer
``x-envoy-overloaded``) or the runtime itself refused the call (RESOURCE_EXHAUSTED:
its in-flight limit or a full batching queue). The app adds ``Retry-After``
(``sluice.limits.InFlightLimit``).
Between stages the tensors stay raw bytes: a stage's output bytes become the next
stage's input bytes as they are, never decoded or re-encoded in Python.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from opentelemetry import trace
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway import graph, metrics, served_by
from gateway.graph import RawTensor
from gateway.pipelines import CompiledPipeline, CompiledRun, CompiledStage, PipelineTable
from sluice.fusion import FAILED_STAGE_HEADER, FUSED_PARAMETER, FUSED_TAG, TIMEOUT_PARAMETER, VERSIONS_PARAMETER
from sluice.tensors import TensorError, raw_outputs
from sluice.tracing import RUNTIME_TRACED_TAG, TRACED_PARAMETER, Tracing
from sluice.wire import UNROUTED


# Envoy acknowledges a route update on its main thread a moment before its worker
# threads hold it. A call in that window meets the fallback route (it reached no
# runtime: its answer is UNROUTED), so it is retried a few times with a short
# back-off: at most ~60 ms.
UNROUTED_RETRIES = 5

# gRPC status -> (HTTP status, error code) for a failed stage
_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (422, "stage_rejected_input"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "stage_timeout"),
    grpc.StatusCode.UNAVAILABLE: (503, "stage_unavailable"),
    grpc.StatusCode.UNIMPLEMENTED: (503, "stage_unrouted"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (503, "stage_overloaded"),
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
    def __init__(self, table: PipelineTable, egress: str, max_message_bytes: int, tracing: Tracing | None = None):
        self.table = table
        self.tracing = tracing or Tracing("gateway", None)
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

    async def run(self, pipeline: CompiledPipeline, inputs: dict[str, RawTensor]) -> graph.Answer:
        """The answer's fields over every record (``graph.Answer``: a dict of raw tensors)."""
        n = graph.batch_size(inputs)
        parts = {graph.REQUEST: graph.Part(None, inputs)}
        switches: dict = {}
        self.table.enter(pipeline)
        try:
            if pipeline.linear:
                for call in pipeline.calls or pipeline.order:
                    if isinstance(call, CompiledRun):
                        parts[call.stages[-1].id] = await self._fused(pipeline, call, parts, n)
                    else:
                        parts[call.id] = await self._stage(pipeline, call, parts, n, switches)
            else:
                await self._run_graph(pipeline, parts, n, switches)
        finally:
            self.table.leave(pipeline)
        return graph.answer(pipeline, parts, n)

    async def _run_graph(self, pipeline: CompiledPipeline, parts: dict, n: int, switches: dict) -> None:
        """Each stage as a task that starts once the stages it waits for are done."""
        tasks: dict[str, asyncio.Future] = {}

        async def one(stage: CompiledStage) -> None:
            if stage.after:
                await asyncio.gather(*(tasks[d] for d in stage.after))
            parts[stage.id] = await self._stage(pipeline, stage, parts, n, switches)

        for stage in pipeline.order:
            tasks[stage.id] = asyncio.ensure_future(one(stage))
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise

    async def _stage(self, pipeline: CompiledPipeline, stage: CompiledStage, parts: dict, n: int, switches: dict) -> graph.Part:
        """Runs ``stage`` on its records (none: it is skipped) and returns what it gave."""
        rows = graph.candidate_rows(stage, parts)
        if stage.siblings:
            try:
                rows = graph.switch_rows(pipeline, stage, parts, n, switches)
            except (IndexError, ValueError, TypeError) as exc:  # e.g. an index past a variable dimension's end
                raise StageFailed(stage, 422, "condition_failed", f"its switch's conditions could not be evaluated: {exc}") from None
        if rows is not None and len(rows) == 0:
            return graph.Part(rows, {})
        return graph.Part(rows, await self._timed_call(pipeline, stage, parts, rows, n))

    async def _fused(self, pipeline: CompiledPipeline, run: CompiledRun, parts: dict, n: int) -> graph.Part:
        """Runs a fused run of stages (``sluice.fusion``) as one call."""
        return graph.Part(None, await self._timed_call(pipeline, run.first, parts, None, n, run))

    async def _timed_call(self, pipeline: CompiledPipeline, stage: CompiledStage, parts: dict, rows: graph.Rows, n: int,
                          run: CompiledRun | None = None) -> dict[str, RawTensor]:
        """The outputs of ``stage``'s call on ``rows`` (or of a fused ``run``'s, ``stage`` its
        first), timed for each of its stages; a failure is counted on the stage that failed."""
        try:
            current = graph.inputs_for(stage, parts, rows, n)
        except KeyError as exc:
            raise StageFailed(stage, 502, "stage_missing_input", f"no tensor {exc.args[0]!r} for the stage's inputs") from None
        started = time.perf_counter()
        try:
            if self.tracing.enabled:
                return await self._traced_call(pipeline, stage, current, run)
            return await self._call(stage, current, run.metadata if run is not None else stage.metadata, run)
        except StageFailed as exc:
            metrics.STAGE_ERRORS.labels(pipeline.name, str(exc.stage.index), exc.code).inc()
            raise
        finally:
            elapsed = time.perf_counter() - started
            for timed in run.stages if run is not None else (stage,):
                metrics.stage_seconds(pipeline.name, timed.index, timed.model).observe(elapsed)

    async def _traced_call(self, pipeline: CompiledPipeline, stage: CompiledStage, current: dict[str, RawTensor],
                           run: CompiledRun | None = None) -> dict[str, RawTensor]:
        attributes = {
            "sluice.pipeline": pipeline.name,
            "sluice.revision": pipeline.revision,
            "sluice.stage": stage.index,
            "sluice.stage_name": stage.name,
            "sluice.model": stage.model,
        }
        name = f"stage {stage.index} {stage.model}"
        if run is not None:  # one call for the run: its stages and models joined by "+"
            attributes["sluice.stage"] = "+".join(str(s.index) for s in run.stages)
            attributes["sluice.model"] = "+".join(s.model for s in run.stages)
            attributes[FUSED_TAG] = True
            name = f"stages {attributes['sluice.stage']} {attributes['sluice.model']}"
        with self.tracing.tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes) as span:
            # the egress Envoy continues the trace from these B3 headers
            metadata = (run.metadata if run is not None else stage.metadata) + tuple(Tracing.inject({}).items())
            try:
                return await self._call(stage, current, metadata, run)
            except StageFailed as exc:
                span.set_status(trace.StatusCode.ERROR, exc.message)
                span.set_attribute("sluice.error", exc.code)
                raise

    async def _infer(self, request: pb.ModelInferRequest, metadata: tuple, timeout_s: float) -> tuple[pb.ModelInferResponse, tuple]:
        """The answer and its initial metadata."""
        for attempt in range(UNROUTED_RETRIES + 1):
            try:
                call = self.stub.ModelInfer(request, metadata=served_by.forwarded(metadata), timeout=timeout_s)
                response = await call
                return response, await call.initial_metadata()
            except grpc.aio.AioRpcError as exc:
                unrouted = exc.code() == grpc.StatusCode.UNIMPLEMENTED and UNROUTED in (exc.details() or "")
                if not unrouted or attempt == UNROUTED_RETRIES:
                    raise
                await asyncio.sleep(0.002 * 2**attempt)
        raise AssertionError("unreachable")

    async def _call(self, stage: CompiledStage, current: dict[str, RawTensor], metadata: tuple,
                    run: CompiledRun | None = None) -> dict[str, RawTensor]:
        """One stage's call, or a fused run's (``run``: ``stage`` is its first)."""
        request = pb.ModelInferRequest(model_name=stage.model, model_version=stage.version)
        if run is not None:
            request.parameters[FUSED_PARAMETER].string_param = run.steps
            request.parameters[TIMEOUT_PARAMETER].int64_param = run.first_timeout_ms
        for spec in stage.inputs:  # ``current``: the stage's inputs by name (gateway.graph.inputs_for)
            try:
                datatype, shape, raw = current[spec.name]
            except KeyError:
                raise StageFailed(stage, 502, "stage_missing_input", f"no tensor for input {spec.name!r}") from None
            tensor = request.inputs.add()
            tensor.name = spec.name
            tensor.datatype = datatype
            tensor.shape.extend(shape)
            request.raw_input_contents.append(raw)
        try:
            response, answer_metadata = await self._infer(request, metadata, run.timeout_s if run is not None else stage.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if run is not None:
                stage = _failed_stage(run, exc)
            status, code = _STATUS.get(exc.code(), (502, "stage_failed"))
            details = exc.details() or exc.code().name
            if served_by.rate_limited(exc):  # Envoy's local rate limit (manager.xds.traffic)
                status, code = 429, "rate_limited"
                details = f"over the {served_by.rate_limited(exc)}'s rate limit; retry later"
            elif _overloaded(exc):
                status, code = 503, "stage_overloaded"
                details = f"the stage's runtime is at its concurrency limit (Envoy: {details})"
            elif exc.code() == grpc.StatusCode.UNAVAILABLE and "timeout" in details:
                status, code = 504, "stage_timeout"
            raise StageFailed(stage, status, code, details) from None
        if self.tracing.enabled and TRACED_PARAMETER in response.parameters:  # the runtime recorded a span under this call's
            trace.get_current_span().set_attribute(RUNTIME_TRACED_TAG, True)
        if run is None:
            served_by.record(metadata, response.model_version, answer_metadata)  # x-sluice-served-by
        else:
            versions = _fused_versions(response, len(run.stages))
            for member, version in zip(run.stages, versions):
                served_by.record(member.metadata, version, answer_metadata)
            stage = run.stages[-1]
        try:
            return raw_outputs(response)
        except TensorError as exc:
            raise StageFailed(stage, 502, "stage_bad_output", str(exc)) from None


def _failed_stage(run: CompiledRun, exc: grpc.aio.AioRpcError) -> CompiledStage:
    """The stage of a fused run that failed, as the runtime named it (else the first)."""
    for key, value in exc.trailing_metadata() or ():
        if key == FAILED_STAGE_HEADER:
            return next((s for s in run.stages if str(s.index) == value), run.first)
    return run.first


def _fused_versions(response: pb.ModelInferResponse, count: int) -> list[str]:
    """Each fused stage's model version, as the runtime listed them (else the answer's)."""
    listed = response.parameters[VERSIONS_PARAMETER].string_param.split(",") if VERSIONS_PARAMETER in response.parameters else []
    return listed if len(listed) == count else [response.model_version] * count


#: the header Envoy sets on an answer it made because a circuit breaker overflowed
OVERLOADED_HEADER = "x-envoy-overloaded"


def _overloaded(exc: grpc.aio.AioRpcError) -> bool:
    """Whether Envoy shed the call (a cluster's circuit breaker overflowed): its header is
    in the initial metadata, or in the trailers of a trailers-only answer."""
    return any(
        key == OVERLOADED_HEADER for metadata in (exc.initial_metadata(), exc.trailing_metadata()) for key, _ in (metadata or ())
    )
