"""Stage fusion (``sluice.fusion``): which stages of a plan run as one call, the wire
form of the steps, the gateway's compiled calls, and the runtime running a fused call
over a real gRPC server in this process (models run in order on the arrays, a failing
step is named in the trailing metadata, a bad parameter is INVALID_ARGUMENT)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from gateway.pipelines import CompiledRun, compile_pipeline
from runtimes.sdk.model import Model, ModelArtifact
from runtimes.sdk.models import ModelSet
from runtimes.sdk.server import PredictPool
from sluice import fusion
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.tensors import TensorSpec, raw_outputs
from sluice.traffic import RateLimit, RetryPolicy, StageTraffic, Variant
from sluice.wire import ROUTE_HEADER, route_key
from tests.runtime_server import served, stub_of


def spec(name: str) -> TensorSpec:
    return TensorSpec(name, "FP64", [-1, 2])


def stage(index: int, runtime: str = "scikit", model: str = "", **kw) -> StagePlan:
    model = model or f"m{index}"
    return StagePlan(
        name=f"{runtime}/{model}", runtime=runtime, model=model, version="", route=route_key("p", 1, index),
        timeout_ms=1000 * (index + 1), inputs=(spec(f"in{index}"),), outputs=(spec(f"out{index}"),),
        bindings=(Binding(f"in{index}", f"out{index - 1}"),) if index else (), **kw,
    )


def plan(*stages: StagePlan, **kw) -> PipelinePlan:
    return PipelinePlan("p", 1, "grpc", tuple(stages), **kw)


def test_a_chain_on_one_runtime_is_one_run_with_its_summed_timeout_and_own_route() -> None:
    runs = fusion.fused_runs(plan(stage(0), stage(1), stage(2)))
    assert runs == (fusion.FusedRun(0, 2, "p.r1.s0+3", 1000 + 2000 + 3000),)


def test_runs_stop_at_another_runtime_and_a_lone_stage_is_no_run() -> None:
    assert fusion.fused_runs(plan(stage(0), stage(1, "spark"), stage(2))) == ()
    runs = fusion.fused_runs(plan(stage(0, "spark"), stage(1), stage(2)))
    assert [(r.first, r.last) for r in runs] == [(1, 2)]


@pytest.mark.parametrize("traffic", [
    StageTraffic(retry=RetryPolicy(attempts=2, per_try_timeout_ms=0, on=("unavailable",))),
    StageTraffic(variants=(Variant("scikit", "1", 50), Variant("scikit", "2", 50))),
    StageTraffic(sticky="x-user"),
])
def test_a_stage_with_traffic_or_its_own_policy_is_never_fused(traffic: StageTraffic) -> None:
    runs = fusion.fused_runs(plan(stage(0), stage(1, traffic=traffic), stage(2), stage(3)))
    assert [(r.first, r.last) for r in runs] == [(2, 3)]


def test_the_pipelines_rate_limit_keeps_its_first_stage_out_of_a_run() -> None:
    runs = fusion.fused_runs(plan(stage(0), stage(1), stage(2), rate_limit=RateLimit(20, 5)))
    assert [(r.first, r.last) for r in runs] == [(1, 2)]


def test_a_graph_with_branches_or_conditions_is_not_fused() -> None:
    graph = plan(
        replace(stage(0), id="a"),
        replace(stage(1), id="b", after=("a",), bindings=(Binding("in1", "out0", "a"),)),
        replace(stage(2), id="c", after=("a",), bindings=(Binding("in2", "out0", "a"),)),
    )
    assert fusion.fused_runs(graph) == ()
    switch = plan(replace(stage(0), id="a"), replace(stage(1), id="b", after=("a",), when="a.out0[0] > 1",
                                                      bindings=(Binding("in1", "out0", "a"),)))
    assert fusion.fused_runs(switch) == ()


def test_steps_round_trip_and_bad_parameters_are_refused_with_the_reason() -> None:
    chain = plan(stage(0), stage(1), stage(2))
    steps = fusion.steps(chain, fusion.fused_runs(chain)[0])
    assert [(s.stage, s.model, s.inputs, s.timeout_ms) for s in steps] == [
        (1, "m1", (("in1", "out0"),), 2000), (2, "m2", (("in2", "out1"),), 3000)]  # each stage's own timeout
    assert fusion.decode_steps(fusion.encode_steps(steps)) == steps
    for bad, reason in (("{", "not JSON"), ("[]", "non-empty"), ('[{"stage": 1}]', "lacks"), ("[1]", "must be"),
                        ('[{"stage": "1", "model": "m", "inputs": {}}]', "must be"),
                        ('[{"stage": 1, "model": "m", "inputs": {}, "timeout_ms": -1}]', "must be"),
                        ('[{"stage": 1, "model": "m", "inputs": {}, "timeout_ms": "5"}]', "must be")):
        with pytest.raises(ValueError, match=reason):
            fusion.decode_steps(bad)


def test_the_gateway_compiles_a_run_on_the_runs_route_or_every_stage_when_fusion_is_off() -> None:
    chain = plan(stage(0), stage(1, "spark"), stage(2, "spark"))
    compiled = compile_pipeline(chain, 0)
    assert [type(c).__name__ for c in compiled.calls] == ["CompiledStage", "CompiledRun"]
    run = compiled.calls[1]
    assert isinstance(run, CompiledRun)
    assert [s.index for s in run.stages] == [1, 2] and run.timeout_s == 5.0
    assert run.first_timeout_ms == 2000  # stage 1's own, sent as sluice.timeout_ms
    assert dict(run.metadata)[ROUTE_HEADER] == "p.r1.s1+2"
    assert [c.index for c in compile_pipeline(chain, 0, fuse=False).calls] == [0, 1, 2]


# --- the runtime's side, on a real gRPC server in this process


class Affine(Model):
    """out = in * scale + shift; raises on a negative input when ``fails``."""

    def __init__(self, name: str, given: str, gives: str, scale: float, shift: float, fails: bool = False):
        super().__init__(ModelArtifact(name, "1", None), [spec(given)], [spec(gives)])
        self.scale, self.shift, self.fails = scale, shift, fails

    async def predict(self, inputs):
        x = next(iter(inputs.values()))
        if self.fails and (x < 0).any():
            raise ValueError("negative input")
        return {self.outputs[0].name: x * self.scale + self.shift}


class Sleepy(Affine):
    """An identity that blocks its thread for ``SLEEP_S``; ``finished`` is set after."""

    SLEEP_S = 3.0

    def __init__(self, name: str, given: str, gives: str):
        super().__init__(name, given, gives, 1.0, 0.0)
        self.finished = threading.Event()

    async def predict(self, inputs):
        time.sleep(self.SLEEP_S)  # CPU-bound work as the thread sees it: nothing can interrupt it
        self.finished.set()
        return await super().predict(inputs)


@pytest.fixture
def sleepy() -> dict[str, Sleepy]:
    return {"slow_first": Sleepy("slow_first", "in0", "out0"), "slow": Sleepy("slow", "in1", "out1")}


@pytest.fixture
async def runtime(sleepy):
    models = {
        "m0": Affine("m0", "in0", "out0", 2.0, 0.0),
        "m1": Affine("m1", "in1", "out1", 1.0, -10.0),
        "m2": Affine("m2", "in2", "out2", 3.0, 1.0, fails=True),
        **sleepy,
    }
    pool = PredictPool(2, inline_below_s=0.001)
    try:
        async with served(ModelSet(models), "fused", "python", predict_pool=pool) as address, stub_of(address) as stub:
            yield stub
    finally:
        pool.close()


def fused_request(x: np.ndarray, steps: str, model: str = "m0", first_timeout_ms: int | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="in0", datatype="FP64", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f8").tobytes())
    request.parameters[fusion.FUSED_PARAMETER].string_param = steps
    if first_timeout_ms is not None:
        request.parameters[fusion.TIMEOUT_PARAMETER].int64_param = first_timeout_ms
    return request


STEPS = fusion.encode_steps((fusion.FusedStep(1, "m1", "", (("in1", "out0"),)), fusion.FusedStep(2, "m2", "", (("in2", "out1"),))))


async def test_a_fused_call_runs_each_model_on_the_one_befores_outputs_every_time(runtime) -> None:
    x = np.array([[6.0, 7.0], [8.0, 9.0]])
    for _ in range(3):  # the first call on a thread, later ones inline (cheap models)
        answer = await runtime.ModelInfer(fused_request(x, STEPS))
        datatype, shape, raw = raw_outputs(answer)["out2"]
        np.testing.assert_array_equal(np.frombuffer(raw, "<f8").reshape(shape), (x * 2 - 10) * 3 + 1)
        assert answer.parameters[fusion.VERSIONS_PARAMETER].string_param == "1,1,1"


async def test_a_failing_step_is_named_in_the_trailing_metadata(runtime) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.ModelInfer(fused_request(np.array([[1.0, 2.0]]), STEPS), metadata=(("x-sluice-stage", "0"),))
    assert caught.value.code() == grpc.StatusCode.INTERNAL and "m2" in caught.value.details()
    assert (fusion.FAILED_STAGE_HEADER, "2") in tuple(caught.value.trailing_metadata())


async def test_a_fused_call_naming_an_unknown_model_or_a_missing_output_says_which(runtime) -> None:
    unknown = fusion.encode_steps((fusion.FusedStep(1, "nope", "", (("in1", "out0"),)),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.ModelInfer(fused_request(np.array([[1.0, 2.0]]), unknown))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert (fusion.FAILED_STAGE_HEADER, "1") in tuple(caught.value.trailing_metadata())
    miswired = fusion.encode_steps((fusion.FusedStep(1, "m1", "", (("in1", "nothing"),)),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.ModelInfer(fused_request(np.array([[1.0, 2.0]]), miswired))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nothing" in caught.value.details()


async def test_a_malformed_fused_parameter_is_invalid_argument(runtime) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.ModelInfer(fused_request(np.array([[1.0, 2.0]]), "[1, 2"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fusion.FUSED_PARAMETER in caught.value.details()


# --- each stage's own timeout inside a run


async def test_a_run_within_every_stages_timeout_answers(runtime) -> None:
    steps = fusion.encode_steps((fusion.FusedStep(1, "m1", "", (("in1", "out0"),), 5000),
                                 fusion.FusedStep(2, "m2", "", (("in2", "out1"),), 5000)))
    x = np.array([[6.0, 7.0]])
    for _ in range(3):  # on a thread (watched), then inline
        answer = await runtime.ModelInfer(fused_request(x, steps, first_timeout_ms=5000))
        datatype, shape, raw = raw_outputs(answer)["out2"]
        np.testing.assert_array_equal(np.frombuffer(raw, "<f8").reshape(shape), (x * 2 - 10) * 3 + 1)


async def test_a_stage_running_past_its_own_timeout_fails_the_run_at_that_timeout_naming_it(runtime, sleepy) -> None:
    """The run's stages have 60 s between them, the slow one 200 ms of its own: the runtime
    answers DEADLINE_EXCEEDED for that stage while its model still runs (it takes 3 s)."""
    steps = fusion.encode_steps((fusion.FusedStep(1, "slow", "", (("in1", "out0"),), 200),
                                 fusion.FusedStep(2, "m2", "", (("in2", "out1"),), 60_000)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.ModelInfer(fused_request(np.array([[1.0, 2.0]]), steps, first_timeout_ms=60_000), timeout=30)
    assert not sleepy["slow"].finished.is_set()  # given up on at its budget, not after it ended
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "slow" in caught.value.details() and "200 ms" in caught.value.details()
    assert (fusion.FAILED_STAGE_HEADER, "1") in tuple(caught.value.trailing_metadata())


async def test_the_first_stage_keeps_its_timeout_from_the_timeout_parameter(runtime, sleepy) -> None:
    steps = fusion.encode_steps((fusion.FusedStep(1, "m1", "", (("in1", "out0"),), 60_000),))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.ModelInfer(fused_request(np.array([[1.0, 2.0]]), steps, "slow_first", first_timeout_ms=200),
                                 metadata=(("x-sluice-stage", "4"),), timeout=30)
    assert not sleepy["slow_first"].finished.is_set()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (fusion.FAILED_STAGE_HEADER, "4") in tuple(caught.value.trailing_metadata())


async def test_a_bad_timeout_parameter_is_invalid_argument(runtime) -> None:
    request = fused_request(np.array([[1.0, 2.0]]), STEPS)
    request.parameters[fusion.TIMEOUT_PARAMETER].string_param = "soon"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await runtime.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fusion.TIMEOUT_PARAMETER in caught.value.details()
