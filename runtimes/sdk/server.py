"""The OIP v2 gRPC service (``inference.GRPCInferenceService``) over a set of models.

Built on the stubs tritonclient ships, so Triton's own client, MLServer's and ours
all speak to it. Inputs arrive raw (``raw_input_contents``) or typed; outputs always
leave raw. Errors map to gRPC status codes: unknown model NOT_FOUND, bad input
INVALID_ARGUMENT, a failing model INTERNAL with the model's message. Inputs are checked
before anything is allocated from them (``sluice.tensors.request_inputs``): a shape
that overflows or exceeds ``max_tensor_elements``, a negative dimension, an unknown
datatype, contents whose length or count does not match the shape, lying BYTES
lengths, raw and typed contents mixed, an input given twice, and a shape that
contradicts the model's signature are INVALID_ARGUMENT naming the input.

The models are a ``models.ModelSet``: several versions per name; the default is the
model's version-policy default when loaded (``sluice.version_policy``), else the
highest loaded one. A request with an empty version gets the default; with a version,
exactly that one, or NOT_FOUND naming the versions loaded (ModelReady answers
``ready: false`` instead, as Triton does, so ``is_model_ready`` stays a yes/no).

The model-repository extension, exactly as tritonclient's ``load_model`` /
``unload_model`` / ``get_model_repository_index`` call it:

* ``RepositoryModelLoad``: the string parameter ``version`` picks the version
  (default: every version the model's version policy loads, else the repository's
  latest; not one safe path segment: INVALID_ARGUMENT);
  the string parameter ``sluice.digests`` (JSON ``{path: sha256}``, what the manager
  recorded when the version was deployed; needs ``version``) is what every file
  must hash to; without it the runtime asks the manager (``models.ModelSet``). The
  model is fetched from the repository, checked, and built off the event loop while
  requests keep being served. Already loaded: success, nothing done. The repository
  lacks it: NOT_FOUND; the repository (or the manager) is unreachable: UNAVAILABLE;
  a file whose bytes are not the recorded ones: FAILED_PRECONDITION naming the file
  and both digests (nothing was loaded); a malformed ``sluice.digests``, an unsafe
  path, or the loader refusing it: INVALID_ARGUMENT with the reason. Triton's
  override parameters (``config``, ``file:<path>``) are refused with INVALID_ARGUMENT;
  other parameters are ignored.
* ``RepositoryModelUnload``: ``version`` unloads that version, else every version of
  the name; unknown: NOT_FOUND. Calls already running on an unloaded model finish.
* ``RepositoryIndex``: every loaded (name, version), READY; with ``ready: false`` also
  the repository's versions that are not loaded, UNAVAILABLE, reason "not loaded".

Metrics are labelled by model name only for models loaded when the call arrives;
any other name counts as "unknown", so clients cannot grow the series.

Overload: at most ``max_in_flight`` ModelInfer calls run at once; one more is refused
at once with RESOURCE_EXHAUSTED (so is a call a full batching queue refuses,
``sluice.limits.Overloaded``). Health checks, metadata and the repository extension
are not counted: they keep answering under load. A model whose ``predict`` computes
on the calling thread (``Model.runs_on_loop`` false, the default) runs in the
server's predict pool (``PredictPool``), off the event loop, so a slow CPU-bound
model does not stall health checks, heartbeats or other calls; only a model whose
recent calls took less than ``inline_below_ms`` (a hand-off to a thread costs more)
runs on the loop itself.

Fused calls (``sluice.fusion``): a ModelInfer with the ``sluice.fused`` parameter runs
its model and then each step's model on the outputs before, in one hand-off to the
pool; every stage gets a span of its own under the call's, each model's metrics count
it, the answer lists each model's version (``sluice.versions``), and a failure says
which stage failed in the trailing metadata (``x-sluice-failed-stage``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtimes.sdk import metrics
from runtimes.sdk.model import Model
from runtimes.sdk.digests import DigestsRefused
from runtimes.sdk.models import ModelLoadFailed, ModelNotFound, ModelSet, NoRepository, UnverifiedRefused
from sluice.versions import version_key
from sluice.wire import PIPELINE_HEADER, STAGE_HEADER, DIGESTS_PARAMETER
from runtimes.sdk.repository import (
    DigestMismatch, ModelNotInRepository, RepositoryUnavailable, UnsafeArtifact, check_digests, safe_version,
)
from sluice.limits import Overloaded
from sluice.traffic import VERSION_HEADER
from sluice.tensors import TensorError, fill_response, request_inputs
from sluice.fusion import FAILED_STAGE_HEADER, FUSED_PARAMETER, FUSED_TAG, TIMEOUT_PARAMETER, VERSIONS_PARAMETER, decode_steps
from sluice.tracing import COMPUTE_MS_TAG, TRACED_PARAMETER, Tracing, tag_model_time
from opentelemetry import trace

log = logging.getLogger(__name__)

def _tensors(specs) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=s.shape) for s in specs]


def _version_param(parameters) -> str:
    """The ``version`` parameter (a string; an int64 is taken too), "" when absent."""
    if "version" not in parameters:
        return ""
    param = parameters["version"]
    kind = param.WhichOneof("parameter_choice")
    if kind == "string_param":
        return param.string_param
    if kind == "int64_param":
        return str(param.int64_param)
    raise ValueError(f"parameter 'version' must be a string, not {kind or 'empty'}")


def _digests_param(parameters) -> dict[str, str] | None:
    """The ``sluice.digests`` parameter (JSON ``{path: sha256}``), None when absent;
    ``ValueError`` (or ``UnsafeArtifact``) saying what is wrong with a bad one."""
    if DIGESTS_PARAMETER not in parameters:
        return None
    param = parameters[DIGESTS_PARAMETER]
    kind = param.WhichOneof("parameter_choice")
    if kind != "string_param":
        raise ValueError(f"parameter {DIGESTS_PARAMETER!r} must be a JSON string, not {kind or 'empty'}")
    try:
        value = json.loads(param.string_param)
    except ValueError as exc:
        raise ValueError(f"parameter {DIGESTS_PARAMETER!r} is not JSON: {exc}") from None
    return check_digests(value)


def _timeout_param(parameters) -> int:
    """The ``sluice.timeout_ms`` parameter (a fused run's first stage's timeout), 0 when
    absent; ``ValueError`` unless a non-negative int64."""
    if TIMEOUT_PARAMETER not in parameters:
        return 0
    param = parameters[TIMEOUT_PARAMETER]
    if param.WhichOneof("parameter_choice") != "int64_param" or param.int64_param < 0:
        raise ValueError(f"parameter {TIMEOUT_PARAMETER!r} must be a non-negative int64")
    return param.int64_param


class StepFailed(Exception):
    """A step of a chain run by ``PredictPool.predict_chain`` failed: ``index`` says which."""

    def __init__(self, index: int, error: Exception):
        super().__init__(str(error))
        self.index = index
        self.error = error


class StepTimedOut(Exception):
    """A step of a fused run ran longer than its stage's own timeout."""


class StepClock:
    """Which step of a chain runs and since when, against each step's budget (seconds;
    0: none): inside a fused run each stage keeps its own timeout (``sluice.fusion``).
    The thread running the chain moves it on; the event loop reads it to give up on a
    step that overran (``watched``). The first step's time counts from the clock's making."""

    __slots__ = ("budgets", "step")
    #: how often ``watched`` looks whether the next step has begun (its budget is then kept
    #: to within this)
    POLL_S = 0.025

    def __init__(self, budgets: list[float]):
        self.budgets = budgets
        self.step = (0, time.perf_counter())  # one attribute: read whole from another thread

    def start(self, index: int) -> None:
        if index:
            self.step = (index, time.perf_counter())

    def left(self) -> tuple[int, float | None]:
        """The step running, and the seconds left of its budget (None: no budget)."""
        index, began = self.step
        budget = self.budgets[index]
        return index, (budget - (time.perf_counter() - began) if budget else None)

    def check(self) -> None:
        """``StepTimedOut`` if the step that just ended overran its budget."""
        index, left = self.left()
        if left is not None and left < 0:
            raise self.overran(index)

    def overran(self, index: int) -> StepTimedOut:
        return StepTimedOut(f"ran past its stage's timeout of {self.budgets[index] * 1000:g} ms")

    async def watched(self, running: asyncio.Future, cancel: bool) -> object:
        """``running``'s result, or ``StepFailed(StepTimedOut)`` for the step that overran its
        budget first; ``cancel``: cancel ``running`` then (a thread's work cannot be: it
        finishes unseen, as a call's whose deadline passed)."""
        while True:
            index, left = self.left()
            wait = None if left is None else max(left, 0.0)
            if any(self.budgets[index + 1:]):  # look again soon: the next step brings its own budget
                wait = self.POLL_S if wait is None else min(wait, self.POLL_S)
            done, _ = await asyncio.wait((running,), timeout=wait)
            if done:
                return running.result()
            index, left = self.left()
            if left is not None and left <= 0:
                if cancel:
                    running.cancel()
                running.add_done_callback(_ignore_outcome)
                raise StepFailed(index, self.overran(index))


def _ignore_outcome(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: an abandoned step's failure is not logged as unhandled


Link = tuple[tuple[str, str], ...]  # a chain step's inputs: (input, output of the step before)
Timing = tuple[int, int]  # when a step's model began and ended computing, time.time_ns()


class PredictPool:
    """Where models' ``predict`` runs: worker threads off the event loop, each driving the
    coroutine on an event loop of its own (made once per thread); or, for a model whose
    recent calls computed in under ``inline_below_s`` (a moving average per model, the
    first call always measured on a thread), on the event loop itself, since handing a
    call to a thread and back costs more than such a model's whole computation. A model
    that turns slow is back on a thread from its next call."""

    #: weight of the newest call in a model's moving average of compute time
    SMOOTHING = 0.2

    def __init__(self, threads: int, inline_below_s: float = 0.0):
        self._executor = ThreadPoolExecutor(max(1, threads), thread_name_prefix="predict")
        self._local = threading.local()
        self.inline_below_s = inline_below_s
        self._cost: dict[int, float] = {}  # id(model) -> moving average of its compute seconds

    def _measured(self, model: Model, seconds: float) -> None:
        key = id(model)
        previous = self._cost.get(key)
        self._cost[key] = seconds if previous is None else previous + self.SMOOTHING * (seconds - previous)

    def _inline(self, models) -> bool:
        if self.inline_below_s <= 0:
            return False
        total = 0.0
        for model in models:
            cost = self._cost.get(id(model))
            if cost is None:
                return False
            total += cost
        return total < self.inline_below_s

    def _loop(self) -> asyncio.AbstractEventLoop:
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = asyncio.new_event_loop()
        return loop

    def _drive(self, model: Model, inputs: dict) -> tuple[dict, float, float]:
        began = time.perf_counter()
        return self._loop().run_until_complete(model.predict(inputs)), began, time.perf_counter()

    async def predict(self, model: Model, inputs: dict) -> dict:
        """The model's answer; the time it waited for a thread and computed go on the span."""
        if self._inline((model,)):
            began = time.perf_counter()
            outputs = await model.predict(inputs)
            computed = time.perf_counter() - began
            self._measured(model, computed)
            tag_model_time(0.0, computed)
            return outputs
        submitted = time.perf_counter()
        outputs, began, ended = await asyncio.get_running_loop().run_in_executor(self._executor, self._drive, model, inputs)
        self._measured(model, ended - began)
        tag_model_time(began - submitted, ended - began)
        return outputs

    async def predict_chain(self, models: list[Model], links: list[Link], inputs: dict,
                            clock: StepClock | None = None) -> tuple[dict, list[Timing], float]:
        """Run ``models`` in order, each on the outputs of the one before (``links[i]``: for
        model ``i + 1``, its inputs from model ``i``'s outputs), in one hand-off to a thread
        (or inline, as ``predict``). The last outputs, each model's compute timing, and how
        long the chain waited for a thread; ``StepFailed`` naming the step that failed, or
        (with a ``clock``) the step that overran its budget, given up on at its budget's end."""
        if self._inline(models):
            timings: list[Timing] = []
            return await _chain(models, links, inputs, self._measured, timings, clock), timings, 0.0
        submitted = time.perf_counter()
        running = asyncio.get_running_loop().run_in_executor(self._executor, self._drive_chain, models, links, inputs, clock)
        if clock is not None and any(clock.budgets):
            outputs, timings, began = await clock.watched(running, cancel=False)
        else:
            outputs, timings, began = await running
        return outputs, timings, began - submitted

    def _drive_chain(self, models: list[Model], links: list[Link], inputs: dict,
                     clock: StepClock | None) -> tuple[dict, list[Timing], float]:
        began = time.perf_counter()
        timings: list[Timing] = []
        outputs = self._loop().run_until_complete(_chain(models, links, inputs, self._measured, timings, clock))
        return outputs, timings, began

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _chain(models: list[Model], links: list[Link], inputs: dict, measured, timings: list[Timing] | None = None,
                 clock: StepClock | None = None) -> dict:
    """The models in order, each checked against and fed from the one before's outputs;
    with a ``clock``, a step that overran its budget fails (``StepTimedOut``)."""
    outputs = inputs
    for index, model in enumerate(models):
        try:
            if index:
                try:
                    inputs = {name: outputs[source] for name, source in links[index - 1]}
                except KeyError as exc:
                    raise TensorError(f"the stage before gave no output {exc.args[0]!r}") from None
                _check_inputs(model, inputs)
            if clock is not None:
                clock.start(index)
            began_ns = time.time_ns()
            outputs = await model.predict(inputs)
            ended_ns = time.time_ns()
            if clock is not None:
                clock.check()
        except Exception as exc:
            raise StepFailed(index, exc) from exc
        measured(model, (ended_ns - began_ns) / 1e9)
        if timings is not None:
            timings.append((began_ns, ended_ns))
    return outputs


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        name: str,
        kind: str,
        models: ModelSet | dict[str, Model],
        tracing: Tracing | None = None,
        max_tensor_elements: int | None = None,
        max_in_flight: int = 0,
        predict_pool: PredictPool | None = None,
    ):
        """``max_tensor_elements``: the most elements a request's inputs may hold together
        (default ``sluice.tensors.MAX_ELEMENTS``); more is INVALID_ARGUMENT.
        ``max_in_flight``: ModelInfer calls served at once (0: no limit); one more is
        RESOURCE_EXHAUSTED. ``predict_pool``: where models that compute on the calling
        thread run (None: on the event loop, for tests of the service alone)."""
        self.name = name
        self.max_in_flight = max_in_flight
        self.predict_pool = predict_pool
        #: ModelInfer calls being served now
        self.in_flight = 0
        self.max_tensor_elements = max_tensor_elements
        self.kind = kind
        self.models = models if isinstance(models, ModelSet) else ModelSet(models)
        self.tracing = tracing or Tracing(kind, None)

    async def _not_found(self, context, exc: ModelNotFound) -> None:
        await context.abort(grpc.StatusCode.NOT_FOUND, f"runtime {self.name!r}: {exc.message}")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name=f"sluice-{self.kind}", version="0.1.0", extensions=["model_repository"])

    async def ModelReady(self, request, context):
        try:
            self.models.get(request.name, request.version)
        except ModelNotFound:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        try:
            model = self.models.get(request.name, request.version)
        except ModelNotFound as exc:
            await self._not_found(context, exc)
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=self.models.versions(model.name),
            platform=model.platform,
            inputs=_tensors(model.inputs),
            outputs=_tensors(model.outputs),
        )

    # --- configuration and statistics, as Triton's clients and tools ask for them

    async def ModelConfig(self, request, context):
        """A Triton-style configuration from the model's signature. ``max_batch_size``
        is the model's own limit where it has one (a ``max_batch_size`` attribute, or
        its Triton configuration's), and the dims then leave out the batch dimension;
        else 0, with the dims as the signature has them (``-1`` rows first)."""
        from tritonclient.grpc import model_config_pb2 as mc

        try:
            model = self.models.get(request.name, request.version)
        except ModelNotFound as exc:
            await self._not_found(context, exc)
        limit = getattr(model, "max_batch_size", None)
        if limit is None:
            limit = getattr(getattr(model, "config", None), "max_batch_size", 0)
        specs = (*model.inputs, *model.outputs)
        batch = int(limit) if isinstance(limit, int) and limit > 0 and all(s.shape and s.shape[0] == -1 for s in specs) else 0
        config = mc.ModelConfig(name=model.name, platform=model.platform, backend=self.kind, max_batch_size=batch)
        config.version_policy.specific.versions.extend(int(v) for v in self.models.versions(model.name) if v.isdigit())
        for tensors, add in ((model.inputs, config.input.add), (model.outputs, config.output.add)):
            for s in tensors:
                datatype = mc.DataType.Value("TYPE_STRING" if s.datatype == "BYTES" else f"TYPE_{s.datatype}")
                add(name=s.name, data_type=datatype, dims=s.shape[1 if batch else 0 :])
        return pb.ModelConfigResponse(config=config)

    async def ModelStatistics(self, request, context):
        """Per loaded model name (at its default version), from this runtime's metrics
        (``runtimes.sdk.metrics``): ``success`` counts OK calls, ``fail`` the others;
        every call is timed in one histogram, so ``compute_infer`` holds all calls and
        their time, and ``success.ns`` that same time (``fail.ns`` stays 0)."""
        if request.name:
            try:
                model = self.models.get(request.name, request.version)
            except ModelNotFound as exc:
                await self._not_found(context, exc)
            wanted = {model.name: model.version}
        else:
            wanted = {name: self.models.default_version(name) for name in self.models.names()}
        calls: dict[str, dict[str, float]] = {name: {} for name in wanted}
        for family in metrics.INFERENCES.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels["model"] in calls:
                    calls[sample.labels["model"]][sample.labels["status"]] = sample.value
        timed: dict[str, dict[str, float]] = {name: {} for name in wanted}
        for family in metrics.INFERENCE_SECONDS.collect():
            for sample in family.samples:
                if sample.labels.get("model") in timed and sample.name.endswith(("_count", "_sum")):
                    timed[sample.labels["model"]][sample.name.rsplit("_", 1)[1]] = sample.value
        response = pb.ModelStatisticsResponse()
        for name, version in wanted.items():
            ok = int(calls[name].get("OK", 0))
            failed = int(sum(v for status, v in calls[name].items() if status != "OK"))
            ns = int(timed[name].get("sum", 0.0) * 1e9)
            entry = response.model_stats.add(name=name, version=version, inference_count=ok, execution_count=ok)
            stats = entry.inference_stats
            stats.success.count, stats.success.ns = ok, ns
            stats.fail.count = failed
            stats.compute_infer.count, stats.compute_infer.ns = int(timed[name].get("count", 0)), ns
        return response

    # --- the model-repository extension

    async def RepositoryIndex(self, request, context):
        index = [
            pb.RepositoryIndexResponse.ModelIndex(name=m.name, version=m.version, state="READY")
            for m in self.models.models()
        ]
        if not request.ready and self.models.repository is not None:
            try:
                listed = await self.models.repository.models()
                available = [(str(entry["name"]), str(v)) for entry in listed for v in entry.get("versions", [])]
            except Exception as exc:  # unreachable, or an answer we cannot read: the loaded ones only
                log.warning("repository index: cannot list the repository's models: %s", exc)
                available = []
            available.sort(key=lambda nv: (nv[0], version_key(nv[1])))
            index.extend(
                pb.RepositoryIndexResponse.ModelIndex(name=name, version=version, state="UNAVAILABLE", reason="not loaded")
                for name, version in available
                if not self.models.loaded(name, version)
            )
        return pb.RepositoryIndexResponse(models=index)

    async def RepositoryModelLoad(self, request, context):
        name = request.model_name
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if overrides:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"runtime {self.name!r} does not support load parameters {overrides}: "
                "models are loaded from the model repository only (no override config or files)",
            )
        try:
            version = _version_param(request.parameters)
            if version:
                safe_version(version)
            digests = _digests_param(request.parameters)
            if digests is not None and not version:
                raise ValueError(f"parameter {DIGESTS_PARAMETER!r} needs the parameter 'version' (digests are per version)")
        except (ValueError, UnsafeArtifact) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"runtime {self.name!r}: {exc}")
        try:
            model, loaded = await self.models.load(name, version, digests)
        except ModelNotInRepository as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except RepositoryUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except (NoRepository, UnverifiedRefused, DigestsRefused) as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"runtime {self.name!r}: {exc}")
        except DigestMismatch as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"runtime {self.name!r}: {exc}")
        except (ModelLoadFailed, UnsafeArtifact) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # anything else (a repository answer we cannot use); logged by the set
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"failed to load {name!r}{f' version {version}' if version else ''}: {exc}")
        if not loaded:
            log.info("load %s version %s: already loaded", model.name, model.version)
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        try:
            version = _version_param(request.parameters)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            await self.models.remove(request.model_name, version)
        except ModelNotFound as exc:
            await self._not_found(context, exc)
        return pb.RepositoryModelUnloadResponse()

    # --- inference

    async def ModelInfer(self, request, context):
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            metrics.inferences(metrics.model_label(request.model_name, self.models), "RESOURCE_EXHAUSTED").inc()
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"runtime {self.name!r} is serving its limit of {self.max_in_flight} inferences; retry later",
            )
        self.in_flight += 1
        try:
            return await self._model_infer(request, context)
        finally:
            self.in_flight -= 1

    async def _model_infer(self, request, context):
        started = time.perf_counter()
        status = "OK"
        label = metrics.model_label(request.model_name, self.models)
        try:
            if not self.tracing.enabled:
                return await self._infer(request, context)
            metadata = Tracing.grpc_metadata(context)
            attributes = {
                "sluice.runtime": self.name,
                "sluice.model": request.model_name,
                "sluice.pipeline": metadata.get(PIPELINE_HEADER, ""),
                "sluice.stage": metadata.get(STAGE_HEADER, ""),
            }
            with self.tracing.server_span(f"infer {request.model_name}", metadata, attributes) as span:
                response = await self._infer(request, context)
                if span.is_recording():  # the gateway's span says so: the trace waits for this one
                    response.parameters[TRACED_PARAMETER].bool_param = True
                return response
        except BaseException:
            status = getattr(context.code(), "name", "ERROR")  # the code context.abort() set
            raise
        finally:
            metrics.inferences(label, status).inc()
            metrics.inference_seconds(label).observe(time.perf_counter() - started)

    async def _infer(self, request, context):
        if FUSED_PARAMETER in request.parameters:
            return await self._infer_fused(request, context)
        try:
            with self.models.use(request.model_name, _routed_version(context) or request.model_version) as model:
                return await self._run(model, request, context)
        except ModelNotFound as exc:
            await self._not_found(context, exc)

    async def _infer_fused(self, request, context):
        """A fused run of stages (``sluice.fusion``): the request's model, then each step's,
        in one call; a failure names its stage (``FAILED_STAGE_HEADER``)."""
        param = request.parameters[FUSED_PARAMETER]
        try:
            if param.WhichOneof("parameter_choice") != "string_param":
                raise ValueError(f"parameter {FUSED_PARAMETER!r} must be a JSON string")
            steps = decode_steps(param.string_param)
            clock = StepClock([_timeout_param(request.parameters) / 1000, *(s.timeout_ms / 1000 for s in steps)])
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"runtime {self.name!r}: {exc}")

        def stage(index: int) -> str:  # the stage of model ``index``, for errors and spans
            return _header(context, STAGE_HEADER) if index == 0 else str(steps[index - 1].stage)

        with contextlib.ExitStack() as using:
            models = []
            for index, (name, version) in enumerate(((request.model_name, _routed_version(context) or request.model_version),
                                                     *((s.model, s.version) for s in steps))):
                try:
                    models.append(using.enter_context(self.models.use(name, version)))
                except ModelNotFound as exc:
                    context.set_trailing_metadata(((FAILED_STAGE_HEADER, stage(index)),))
                    await self._not_found(context, exc)
            try:
                inputs = request_inputs(request, self.max_tensor_elements)
                _check_inputs(models[0], inputs)
            except TensorError as exc:
                context.set_trailing_metadata(((FAILED_STAGE_HEADER, stage(0)),))
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{models[0].name}: {exc}")
            links = [s.inputs for s in steps]
            try:
                if self.predict_pool is not None and not any(getattr(m, "runs_on_loop", False) for m in models):
                    outputs, timings, queued = await self.predict_pool.predict_chain(models, links, inputs, clock)
                else:  # on the loop, as ``_run`` runs such models
                    timings, queued = [], 0.0
                    running = asyncio.ensure_future(_chain(models, links, inputs, lambda model, seconds: None, timings, clock))
                    outputs = await (clock.watched(running, cancel=True) if any(clock.budgets) else running)
            except StepFailed as failed:
                context.set_trailing_metadata(((FAILED_STAGE_HEADER, stage(failed.index)),))
                await self._model_failed(context, models[failed.index], failed.error)
            self._trace_steps(models, stage, timings, queued)
            for model, (began, ended) in zip(models[1:], timings[1:]):  # the call itself counts the first
                metrics.inferences(model.name, "OK").inc()
                metrics.inference_seconds(model.name).observe((ended - began) / 1e9)
            response = _answer(request, outputs, models[-1])
            response.parameters[VERSIONS_PARAMETER].string_param = ",".join(m.version for m in models)
            return response

    async def _model_failed(self, context, model: Model, exc: Exception) -> None:
        """Abort the call for ``model``'s failure: bad input INVALID_ARGUMENT, a full queue
        RESOURCE_EXHAUSTED, anything else (logged) INTERNAL with the model's message."""
        if isinstance(exc, TensorError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{model.name}: {exc}")
        if isinstance(exc, StepTimedOut):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{model.name}: {exc}")
        if isinstance(exc, Overloaded):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"runtime {self.name!r}: {model.name}: {exc}")
        log.error("model %s failed", model.name, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, f"{model.name}: {type(exc).__name__}: {exc}")

    def _trace_steps(self, models: list[Model], stage: Callable[[int], str], timings: list, queued: float) -> None:
        """One span per fused stage under the call's span, at the times its model computed;
        the call's span carries the time the chain waited for a thread."""
        span = trace.get_current_span()
        if not span.is_recording():
            return
        tag_model_time(queued, 0.0)  # the model time is on the stages' spans, each its own
        for index, (model, (began, ended)) in enumerate(zip(models, timings)):
            child = self.tracing.tracer.start_span(
                f"infer {model.name}", start_time=began, kind=trace.SpanKind.INTERNAL,
                attributes={"sluice.runtime": self.name, "sluice.model": model.name, "sluice.stage": stage(index),
                            COMPUTE_MS_TAG: round((ended - began) / 1e6, 3), FUSED_TAG: True})
            child.end(end_time=ended)

    async def _run(self, model: Model, request, context):
        try:
            inputs = request_inputs(request, self.max_tensor_elements)
            _check_inputs(model, inputs)
        except TensorError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{model.name}: {exc}")
        try:
            if self.predict_pool is not None and not getattr(model, "runs_on_loop", False):
                outputs = await self.predict_pool.predict(model, inputs)
            else:
                began = time.perf_counter()
                outputs = await model.predict(inputs)
                tag_model_time(0.0, time.perf_counter() - began)
        except Exception as exc:  # bad input, a full queue, or the model's own failure: report it, keep serving
            await self._model_failed(context, model, exc)
        return _answer(request, outputs, model)


def _answer(request, outputs: dict, model: Model) -> pb.ModelInferResponse:
    """The answer to ``request`` (named as asked; ``model``'s version): the outputs it asked
    for (all when it named none), raw."""
    if request.outputs:
        wanted = {o.name for o in request.outputs}
        outputs = {k: v for k, v in outputs.items() if k in wanted}
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=model.version, id=request.id)
    return fill_response(response, outputs, model.output_specs)


def _header(context, name: str) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == name and isinstance(value, str):
            return value
    return ""


def _routed_version(context) -> str:
    """The model version Envoy's route chose for this call (``x-sluice-model-version``,
    added per weighted cluster of a version split or by a mirror policy, see
    ``manager.xds.traffic``): it wins over the body's ``model_version``, since Envoy
    cannot rewrite a gRPC body. Empty when the route set none."""
    return _header(context, VERSION_HEADER)


def _check_inputs(model: Model, inputs: dict) -> None:
    for spec in model.inputs:
        array = inputs.get(spec.name)
        if array is None:
            raise TensorError(f"missing input {spec.name!r}")
        if len(spec.shape) != array.ndim:
            raise TensorError(f"input {spec.name!r} must have rank {len(spec.shape)}, got shape {list(array.shape)}")
        if spec.datatype != "BYTES" and array.dtype == object:
            raise TensorError(f"input {spec.name!r} must be {spec.datatype}, got BYTES")
        if any(want >= 0 and got != want for got, want in zip(array.shape, spec.shape)):
            raise TensorError(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(array.shape)}")
