"""gateway.batching: the fold and the cut (fixed-size and BYTES tensors, records no
stage gave a field), which pipelines may fold, and the Batcher folding concurrent
requests into one run of a real ``Executor`` against a real (in-process) OIP runtime:
at most ``max_rows`` rows a run, each caller its own rows (and, in a graph whose switch
skips records, its own absent records), a request the model refuses failing alone
while the others of its run get their answers, and requests that pin a variant or
carry a sampled trace never folded."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import numpy as np
import pytest

from gateway import graph, metrics, served_by
from gateway.batching import Batcher, BatchSettings, FoldError, cut, cut_tensor, fold, signature
from gateway.pipelines import plain_traffic
from gateway.executor import Executor, StageFailed
from gateway.pipelines import PipelineTable, compile_pipeline
from runtimes.sdk.model import ModelArtifact
from runtimes.sdk.models import ModelSet
from runtimes.sleeper.model import SleeperModel, write_model
from sluice.plan import AnswerField, Binding, PipelinePlan, Source, StagePlan
from sluice.tensors import TensorError, TensorSpec, from_raw, to_raw
from sluice.traffic import Mirror, RateLimit, RetryPolicy, StageTraffic, Variant
from sluice.wire import route_key
from tests.runtime_server import served

X = TensorSpec("x", "FP64", (-1,))
Y = TensorSpec("y", "FP64", (-1,))


def _raw(array: np.ndarray, datatype: str):
    return (datatype, list(array.shape), to_raw(array, datatype)[1])


def _array(tensor) -> np.ndarray:
    return from_raw(tensor[2], tensor[0], tensor[1])


# --- fold and cut


def test_fold_concatenates_fixed_size_and_bytes_tensors_and_cut_gives_each_member_its_rows() -> None:
    members = []
    for rows in (1, 3, 2):
        numbers = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 100 * len(members)
        words = np.array([[f"m{len(members)}r{r}c{c}".encode() * (r + 1) for c in range(2)] for r in range(rows)], dtype=object)
        members.append({"n": _raw(numbers, "FP32"), "w": _raw(words, "BYTES")})
    folded = fold(members)
    assert folded["n"][1] == [6, 3] and folded["w"][1] == [6, 2]
    np.testing.assert_array_equal(_array(folded["n"]), np.concatenate([_array(m["n"]) for m in members]))
    assert _array(folded["w"]).tolist() == np.concatenate([_array(m["w"]) for m in members]).tolist()
    offset = 0
    for member in members:
        rows = member["n"][1][0]
        part = cut(graph.Answer(folded), 6, offset, rows)
        assert part == member  # the very bytes and shapes each member sent
        offset += rows


def test_cut_renumbers_the_records_no_stage_gave_a_field_to() -> None:
    y = _raw(np.arange(6, dtype=np.float64), "FP64")
    answer = graph.Answer({"y": y}, {"y": np.array([1, 4, 5])})  # members of 2, 3 and 1 rows
    assert cut(answer, 6, 0, 2).absent["y"].tolist() == [1]
    assert cut(answer, 6, 2, 3).absent["y"].tolist() == [2]
    assert cut(answer, 6, 5, 1).absent["y"].tolist() == [0]
    assert cut(graph.Answer({"y": y}, {"y": np.array([4])}), 6, 0, 2).absent == {}


def test_a_tensor_without_the_batch_dimension_cannot_be_cut() -> None:
    with pytest.raises(FoldError):
        cut_tensor(_raw(np.zeros(3), "FP64"), 6, 0, 2)  # 3 rows, not the run's 6
    with pytest.raises(FoldError):
        cut_tensor(("BYTES", [2], b"\x05\x00\x00\x00ab"), 2, 0, 1)  # a lying length


def test_signature_refuses_inputs_that_cannot_fold() -> None:
    one = _raw(np.zeros((2, 4)), "FP64")
    assert signature({"a": one, "b": _raw(np.zeros(2), "FP32")}) == ((("a", "FP64", (4,)), ("b", "FP32", ())), 2, 72)  # 64 + 8 bytes
    assert signature({"a": one, "b": _raw(np.zeros(3), "FP32")}) is None  # rows disagree
    assert signature({"a": ("FP64", [], b"\0" * 8)}) is None  # no batch dimension
    assert signature({}) is None


def test_a_pipeline_with_a_split_mirror_sticky_key_or_rate_limit_is_not_plain() -> None:
    stage = StagePlan("rt/m", "rt", "m", "", "p.r1.s0", 1000, (X,), (Y,))
    assert plain_traffic(PipelinePlan("p", 1, "http", (stage,)))
    split = replace(stage, traffic=StageTraffic(variants=(Variant("a", "", 50), Variant("b", "", 50))))
    assert not plain_traffic(PipelinePlan("p", 1, "http", (split,)))
    assert not plain_traffic(PipelinePlan("p", 1, "http", (stage,), rate_limit=RateLimit(10, 10)))
    for traffic in (StageTraffic(mirror=Mirror("b", "", 10.0)), StageTraffic(sticky="x-user"), StageTraffic(rate_limit=RateLimit(5, 5))):
        assert not plain_traffic(PipelinePlan("p", 1, "http", (replace(stage, traffic=traffic),)))
    retries = replace(stage, traffic=StageTraffic(retry=RetryPolicy(3, 0, ("unavailable",))))
    assert plain_traffic(PipelinePlan("p", 1, "http", (retries,)))  # a retry acts on a call, whoever's rows it holds


# --- the Batcher on a real runtime


class _Picky(SleeperModel):
    """Sleeps, answers ``2 x``, refuses (TensorError: INVALID_ARGUMENT) a batch holding a
    negative value, and records the rows of every call it gets."""

    calls: list[int]

    async def predict(self, inputs):
        x = np.asarray(inputs[self.inputs[0].name], dtype=np.float64)
        self.calls.append(len(x))
        await asyncio.sleep(self.sleep_s)
        if (x < 0).any():
            raise TensorError(f"negative x: {x[x < 0].tolist()}")
        return {self.outputs[0].name: 2 * x}


def _picky(root, name: str = "picky", given: str = "x", gives: str = "y") -> _Picky:
    path = write_model(root, name, 40, input=given, output=gives)
    model = _Picky(ModelArtifact(name, "1", path, json.loads((path / "model.json").read_text())))
    model.calls = []
    return model


PLAN = PipelinePlan("p", 1, "http", (StagePlan("rt/picky", "rt", "picky", "", route_key("p", 1, 0), 5000, (X,), (Y,)),))


#: each request's rows and how long it waited for a folded run (``metrics.take_waited``), in ns
waits: list[tuple[list[float], int]] = []


async def _serve_concurrently(tmp_path, settings: BatchSettings, requests: list[list[float]], headers: dict | None = None):
    """Each request's rows through a Batcher over a real Executor, all at once; the
    answers (an array or the StageFailed), and the rows of each call the model got."""
    model = _picky(tmp_path)
    pipeline = compile_pipeline(PLAN, 0)
    waits.clear()
    async with served(ModelSet([model]), kind="sleeper") as address:
        executor = Executor(PipelineTable(), address, 1 << 20)
        batcher = Batcher(executor.run, executor.table, settings, lambda p: True)

        async def one(xs: list[float]):
            with served_by.collecting(headers or {}):
                try:
                    answer = await batcher.run(pipeline, {"x": _raw(np.array(xs), "FP64")})
                except StageFailed as exc:
                    return exc
                finally:
                    waits.append((xs, metrics.take_waited()))
                return _array(answer["y"]).tolist()

        try:
            answers = await asyncio.gather(*(one(xs) for xs in requests))
        finally:
            await executor.close()
    return answers, model.calls


def test_concurrent_requests_fold_into_runs_of_at_most_max_rows_and_each_gets_its_own_rows(tmp_path) -> None:
    requests = [[float(i), float(i) + 0.5] if i % 3 == 0 else [float(i)] for i in range(12)]
    answers, calls = asyncio.run(_serve_concurrently(tmp_path, BatchSettings(max_rows=5, max_runs=1), requests))
    assert answers == [[2 * x for x in xs] for xs in requests]
    assert calls[0] == len(requests[0])  # the first ran at once, alone
    assert max(calls) <= 5 and max(calls) > 2  # the others folded, within the cap
    assert sum(calls) == sum(len(xs) for xs in requests)  # each row ran once
    assert len(calls) < len(requests)


def test_a_folded_request_notes_its_wait_for_the_oip_queue_statistic_and_one_run_at_once_none(tmp_path) -> None:
    requests = [[float(i)] for i in range(6)]
    asyncio.run(_serve_concurrently(tmp_path, BatchSettings(max_rows=64, max_runs=1), requests))
    waited = dict((xs[0], ns) for xs, ns in waits)
    assert waited[0.0] == 0  # ran at once, alone
    assert all(waited[x] > 0 for x in (1.0, 2.0, 3.0, 4.0, 5.0))  # queued behind it, then folded
    stats = metrics.PipelineStats()
    stats.success(1, 0, 10, 100, 120, queued_ns=30)
    assert (stats.queue_ns, stats.input_ns, stats.infer_ns, stats.output_ns, stats.success_ns) == (30, 10, 60, 20, 120)


def test_a_request_the_model_refuses_fails_alone_and_the_others_of_its_run_get_their_answers(tmp_path) -> None:
    requests = [[float(i)] for i in range(8)]
    requests[5] = [-1.0]
    answers, calls = asyncio.run(_serve_concurrently(tmp_path, BatchSettings(max_rows=64, max_runs=1), requests))
    bad = answers[5]
    assert isinstance(bad, StageFailed) and bad.status == 422 and bad.code == "stage_rejected_input" and "-1.0" in bad.message
    assert [a for i, a in enumerate(answers) if i != 5] == [[2 * xs[0]] for i, xs in enumerate(requests) if i != 5]
    # the folded run of the other seven failed, then each of them ran alone
    assert calls[:2] == [1, 7] and sorted(calls[2:]) == [1] * 7


def test_requests_that_pin_a_variant_never_fold(tmp_path) -> None:
    requests = [[float(i)] for i in range(6)]
    answers, calls = asyncio.run(_serve_concurrently(tmp_path, BatchSettings(max_rows=64, max_runs=1), requests,
                                                     headers={"x-sluice-variant": "v1"}))
    assert answers == [[2 * xs[0]] for xs in requests]
    assert calls == [1] * 6


def test_requests_with_a_sampled_trace_never_fold(tmp_path) -> None:
    """Each request under a recording (sampled) span of a real SDK tracer runs alone, so
    its trace holds its own stage calls."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    tracer = TracerProvider(sampler=ALWAYS_ON).get_tracer("test")
    model = _picky(tmp_path)
    pipeline = compile_pipeline(PLAN, 0)
    waits.clear()

    async def scenario():
        async with served(ModelSet([model]), kind="sleeper") as address:
            executor = Executor(PipelineTable(), address, 1 << 20)
            batcher = Batcher(executor.run, executor.table, BatchSettings(max_rows=64, max_runs=1), lambda p: True)

            async def one(x: float):
                with tracer.start_as_current_span("request") as span:
                    assert span.is_recording()
                    answer = await batcher.run(pipeline, {"x": _raw(np.array([x]), "FP64")})
                return _array(answer["y"]).tolist()

            try:
                return await asyncio.gather(*(one(float(i)) for i in range(5)))
            finally:
                await executor.close()

    assert asyncio.run(scenario()) == [[2.0 * i] for i in range(5)]
    assert model.calls == [1] * 5


def test_a_graph_whose_switch_leaves_records_without_a_field_folds_and_each_caller_gets_its_absent_records(tmp_path) -> None:
    """a (x -> y = 2x), then b (y -> z = 2y) only where a.y > 10: the answer's z is absent
    for the other records. Folded, each caller gets its own z and its own absent records."""
    Z = TensorSpec("z", "FP64", (-1,))
    plan = PipelinePlan("g", 1, "http", (
        StagePlan("a", "rt", "ma", "", "g.r1.s0", 5000, (X,), (Y,), (Binding("x", "x", ""),), id="a"),
        StagePlan("b", "rt", "mb", "", "g.r1.s1", 5000, (Y,), (Z,), (Binding("y", "y", "a"),), id="b", after=("a",), when="a.y > 10"),
    ), request=(X,), answer=(AnswerField(Z, (Source("b", "z"),)),))
    pipeline = compile_pipeline(plan, 0)
    requests = [[1.0, 6.0], [7.0], [2.0, 3.0, 8.0], [9.0, 1.0], [4.0]]
    first = _picky(tmp_path, "ma", "x", "y")

    async def scenario():
        async with served(ModelSet([first, _picky(tmp_path, "mb", "y", "z")]), kind="sleeper") as address:
            executor = Executor(PipelineTable(), address, 1 << 20)
            batcher = Batcher(executor.run, executor.table, BatchSettings(max_rows=64, max_runs=1), lambda p: True)
            try:
                return await asyncio.gather(*(batcher.run(pipeline, {"x": _raw(np.array(xs), "FP64")}) for xs in requests))
            finally:
                await executor.close()

    answers = asyncio.run(scenario())
    assert first.calls[0] == 2 and len(first.calls) == 2  # the first alone, the other four folded
    for xs, answer in zip(requests, answers):
        z = _array(answer["z"])
        taken = [i for i, x in enumerate(xs) if 2 * x > 10]
        assert [z[i] for i in taken] == [4 * xs[i] for i in taken]
        assert answer.absent.get("z", np.array([], dtype=int)).tolist() == [i for i in range(len(xs)) if i not in taken]
