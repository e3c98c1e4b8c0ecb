"""gateway.pipelines' graph compile and gateway.graph's per-record bookkeeping: a switch
splits a batch by condition (first sibling that holds, then the default), each stage
gets its own records' inputs, and the answer comes back in the request's record order;
and gateway.executor running independent branches at once against a real (in-process)
OIP runtime."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import orjson

from gateway import graph
from gateway.codec import decode_outputs
from gateway.executor import Executor
from gateway.pipelines import PipelineTable, compile_pipeline
from runtimes.sdk.model import ModelArtifact
from runtimes.sdk.models import ModelSet
from runtimes.sleeper.model import SleeperModel, write_model
from sluice.plan import AnswerField, Binding, PipelinePlan, Source, StagePlan
from sluice.tensors import TensorSpec, from_raw, to_raw
from sluice.wire import route_key
from tests.runtime_server import served

X = TensorSpec("x", "FP64", (-1,))
Y = TensorSpec("y", "BYTES", (-1,))


def _stage(i: int, sid: str, after: tuple, bindings: tuple, outputs=(Y,), **kw) -> StagePlan:
    return StagePlan(sid, "rt", "m", "", route_key("p", 1, i), 1000, (X,), outputs, bindings, id=sid, after=after, **kw)


def switch_plan(default: bool = True) -> PipelinePlan:
    stages = [
        _stage(0, "a", (), (Binding("x", "x", ""),), outputs=(X,)),
        _stage(1, "low", ("a",), (Binding("x", "x", "a"),), when="a.x < 0"),
        _stage(2, "mid", ("a",), (Binding("x", "x", "a"),), when="a.x < 10"),
    ]
    if default:
        stages.append(_stage(3, "high", ("a",), (Binding("x", "x", "a"),), default=True))
    sources = tuple(Source(s.id, "y") for s in stages[1:])
    return PipelinePlan("p", 1, "http", tuple(stages), request=(X,), answer=(AnswerField(Y, sources),))


def _raw(array: np.ndarray, datatype: str):
    return (datatype, list(array.shape), to_raw(array, datatype)[1])


def _run(plan: PipelinePlan, xs: list[float]) -> tuple[graph.Answer, dict[str, list[float]]]:
    """Runs the plan's bookkeeping with stages that answer their name per record (no network)."""
    pipeline = compile_pipeline(plan, 0)
    n = len(xs)
    parts = {graph.REQUEST: graph.Part(None, {"x": _raw(np.array(xs), "FP64")})}
    switches: dict = {}
    seen: dict[str, list[float]] = {}
    for stage in pipeline.order:
        rows = graph.candidate_rows(stage, parts)
        if stage.siblings:
            rows = graph.switch_rows(pipeline, stage, parts, n, switches)
        if rows is not None and len(rows) == 0:
            parts[stage.id] = graph.Part(rows, {})
            continue
        inputs = graph.inputs_for(stage, parts, rows, n)
        x = from_raw(inputs["x"][2], "FP64", inputs["x"][1])
        seen[stage.id] = x.tolist()
        if stage.id == "a":
            out = {"x": inputs["x"]}
        else:
            out = {"y": _raw(np.array([f"{stage.id}:{v:g}".encode() for v in x], dtype=object), "BYTES")}
        parts[stage.id] = graph.Part(rows, out)
    return graph.answer(pipeline, parts, n), seen


def test_compile_orders_the_graph_and_knows_a_switch() -> None:
    pipeline = compile_pipeline(switch_plan(), 0)
    assert not pipeline.linear and [s.id for s in pipeline.order] == ["a", "low", "mid", "high"]
    assert pipeline.stages[1].siblings == ("low", "mid", "high") and pipeline.stages[1].reads == ("a",)
    assert [t.name for t in pipeline.inputs] == ["x"] and [t.name for t in pipeline.outputs] == ["y"]


def test_a_chain_compiles_to_a_linear_graph() -> None:
    chain = PipelinePlan("c", 1, "http", (
        StagePlan("s0", "rt", "m", "", "c.r1.s0", 1000, (X,), (X,)),
        StagePlan("s1", "rt", "m", "", "c.r1.s1", 1000, (X,), (Y,), (Binding("x", "x"),)),
    ))
    pipeline = compile_pipeline(chain, 0)
    assert pipeline.linear and [s.id for s in pipeline.order] == ["0", "1"]
    assert pipeline.stages[1].source_stages == ("0",) and [t.name for t in pipeline.outputs] == ["y"]


def test_switch_splits_a_mixed_batch_and_merges_answers_in_record_order() -> None:
    xs = [5.0, -1.0, 20.0, -3.0, 7.0, 30.0]
    answer, seen = _run(switch_plan(), xs)
    # the first sibling whose condition holds takes a record: -1 and -3 go low, not mid
    assert seen == {"a": xs, "low": [-1.0, -3.0], "mid": [5.0, 7.0], "high": [20.0, 30.0]}
    y = from_raw(answer["y"][2], "BYTES", answer["y"][1])
    assert [v.decode() for v in y] == ["mid:5", "low:-1", "high:20", "low:-3", "mid:7", "high:30"]
    assert answer.absent == {}


def test_records_no_branch_took_have_no_answer_field() -> None:
    answer, seen = _run(switch_plan(default=False), [5.0, 20.0, -1.0])
    assert "high" not in seen and answer.absent["y"].tolist() == [1]
    assert orjson.loads(decode_outputs(answer, False)) == [{"y": "mid:5"}, {}, {"y": "low:-1"}]


def test_a_switch_that_takes_no_record_skips_the_stage() -> None:
    answer, seen = _run(switch_plan(), [50.0, 60.0])
    assert set(seen) == {"a", "high"}
    assert [v.decode() for v in from_raw(answer["y"][2], "BYTES", answer["y"][1])] == ["high:50", "high:60"]


class _Overlap:
    """Counts how many calls of the models that share it are inside ``predict`` at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0


def _counting_sleeper(root, name: str, given: str, gives: str, overlap: _Overlap):
    path = write_model(root, name, 50, input=given, output=gives)

    class Counting(SleeperModel):
        async def predict(self, inputs):
            overlap.now += 1
            overlap.most = max(overlap.most, overlap.now)
            try:
                return await super().predict(inputs)
            finally:
                overlap.now -= 1

    return Counting(ModelArtifact(name, "1", path, json.loads((path / "model.json").read_text())))


def test_the_executor_runs_independent_branches_at_once_on_a_real_runtime(tmp_path) -> None:
    """a, then b and c (both after a) on an in-process OIP runtime: b and c are in the
    runtime at the same time; the answer holds both sinks' outputs for every record."""
    Yt, Zt, Wt = TensorSpec("y", "FP64", (-1,)), TensorSpec("z", "FP64", (-1,)), TensorSpec("w", "FP64", (-1,))
    plan = PipelinePlan("fan", 1, "http", (
        StagePlan("a", "rt", "slow_a", "", "fan.r1.s0", 5000, (X,), (Yt,), (Binding("x", "x", ""),), id="a"),
        StagePlan("b", "rt", "slow_b", "", "fan.r1.s1", 5000, (Yt,), (Zt,), (Binding("y", "y", "a"),), id="b", after=("a",)),
        StagePlan("c", "rt", "slow_c", "", "fan.r1.s2", 5000, (Yt,), (Wt,), (Binding("y", "y", "a"),), id="c", after=("a",)),
    ), request=(X,), answer=(AnswerField(Zt, (Source("b", "z"),)), AnswerField(Wt, (Source("c", "w"),))))
    pipeline = compile_pipeline(plan, 0)
    assert not pipeline.linear

    async def scenario():
        overlap = _Overlap()
        models = ModelSet([_counting_sleeper(tmp_path, n, i, o, overlap)
                           for n, i, o in (("slow_a", "x", "y"), ("slow_b", "y", "z"), ("slow_c", "y", "w"))])
        async with served(models, kind="sleeper") as address:
            executor = Executor(PipelineTable(), address, 1 << 20)
            try:
                answer = await executor.run(pipeline, {"x": _raw(np.array([1.0, 2.0, 3.0]), "FP64")})
            finally:
                await executor.close()
        return answer, overlap.most

    answer, most = asyncio.run(scenario())
    assert most == 2  # b and c ran at the same time (a ran alone before them)
    assert sorted(answer) == ["w", "z"]
    assert from_raw(answer["z"][2], "FP64", answer["z"][1]).tolist() == [1.0, 2.0, 3.0] == \
        from_raw(answer["w"][2], "FP64", answer["w"][1]).tolist()
