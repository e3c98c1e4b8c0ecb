"""sluice.plan and its one wire converter, sluice.plan_proto: a plan survives the wire unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.plan_proto import from_bytes, from_proto, to_bytes, to_proto
from sluice.tensors import TensorSpec
from sluice.v1 import pipeline_pb2
from sluice.wire import route_key


def two_stage_plan(name: str = "endpointML", revision: int = 3) -> PipelinePlan:
    return PipelinePlan(
        name=name,
        revision=revision,
        transport="http",
        stages=(
            StagePlan(
                name="scorer",
                runtime="serving-customscikit",
                model="pm_scikit",
                version="2",
                route=route_key(name, revision, 0),
                timeout_ms=1500,
                inputs=(TensorSpec("Title1", "BYTES", (-1,)), TensorSpec("Price", "FP64", (-1, 1))),
                outputs=(TensorSpec("features", "FP64", (-1, 12)), TensorSpec("label", "BYTES", (-1, -1))),
            ),
            StagePlan(
                name="serving-localml-spark/pm_spark",
                runtime="serving-localml-spark",
                model="pm_spark",
                version="",
                route=route_key(name, revision, 1),
                timeout_ms=30_000,
                inputs=(TensorSpec("vector", "FP64", (-1, 12)), TensorSpec("tag", "BYTES", (-1, -1))),
                outputs=(TensorSpec("prediction", "INT64", (-1,)),),
                bindings=(Binding("vector", "features"), Binding("tag", "label")),
            ),
        ),
    )


def test_round_trips_through_the_message() -> None:
    plan = two_stage_plan()
    message = to_proto(plan)
    assert isinstance(message, pipeline_pb2.Pipeline)
    back = from_proto(message)
    assert back == plan
    # exact types, not just equal values: tuples stay tuples, ints stay ints
    assert isinstance(back.stages, tuple) and isinstance(back.stages[1].bindings, tuple)
    assert back.stages[0].inputs[1].shape == (-1, 1) and isinstance(back.stages[0].inputs[1].shape, tuple)
    assert back.stages[1].inputs[1] == TensorSpec("tag", "BYTES", (-1, -1))


def test_round_trips_through_bytes_deterministically() -> None:
    plan = two_stage_plan()
    data = to_bytes(plan)
    assert from_bytes(data) == plan
    assert to_bytes(from_bytes(data)) == data


def test_wire_fields() -> None:
    message = to_proto(two_stage_plan())
    assert (message.name, message.revision, message.transport) == ("endpointML", 3, "http")
    first, second = message.stages
    assert (first.model_version, first.route, first.timeout_ms) == ("2", "endpointML.r3.s0", 1500)
    assert list(first.inputs[0].shape) == [-1] and first.inputs[0].datatype == "BYTES"
    assert [(b.input, b.source) for b in second.bindings] == [("vector", "features"), ("tag", "label")]
    assert not first.bindings and second.model_version == ""


def test_one_stage_plan_without_bindings() -> None:
    plan = dataclasses.replace(two_stage_plan(), stages=two_stage_plan().stages[:1])
    assert from_bytes(to_bytes(plan)) == plan
    assert plan.inputs == plan.stages[0].inputs and plan.outputs == plan.stages[0].outputs


def test_at_revision_moves_the_route_keys_and_nothing_else() -> None:
    plan = two_stage_plan(revision=3)
    moved = plan.at_revision(4)
    assert moved.revision == 4 and moved.key == ("endpointML", 4)
    assert [s.route for s in moved.stages] == ["endpointML.r4.s0", "endpointML.r4.s1"]
    for old, new in zip(plan.stages, moved.stages):
        assert dataclasses.replace(new, route=old.route) == old
    assert (moved.name, moved.transport) == (plan.name, plan.transport)
    assert moved.at_revision(3) == plan
    assert from_bytes(to_bytes(moved)) == moved


def test_source_of_and_uses() -> None:
    plan = two_stage_plan()
    second = plan.stages[1]
    assert second.source_of("vector") == "features"
    assert second.source_of("unbound") == "unbound"  # same name as the previous output
    assert plan.uses("serving-localml-spark", "pm_spark") == [second]
    assert plan.uses("serving-localml-spark", "other") == []


def test_plans_are_frozen() -> None:
    plan = two_stage_plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.revision = 5  # type: ignore[misc]


def graph_plan() -> PipelinePlan:
    from sluice.plan import AnswerField, Source

    spec = TensorSpec("x", "FP64", (-1,))
    stage = lambda i, sid, after, bindings, **kw: StagePlan(  # noqa: E731
        sid, "rt", "m", "", route_key("g", 1, i), 1000, (spec,), (spec,), bindings, id=sid, after=after, **kw)
    return PipelinePlan(
        "g", 1, "http",
        (
            stage(0, "a", (), (Binding("x", "x", ""),)),
            stage(1, "b", ("a",), (Binding("x", "x", "a"),), when="a.x > 1"),
            stage(2, "c", ("a",), (Binding("x", "x", "a"),), default=True),
        ),
        request=(spec,),
        answer=(AnswerField(spec, (Source("b", "x"), Source("c", "x"))),),
    )


def test_a_graph_plan_round_trips_with_its_ids_edges_conditions_request_and_answer() -> None:
    plan = graph_plan()
    back = from_bytes(to_bytes(plan))
    assert back == plan and back.graph
    assert back.stages[1].when == "a.x > 1" and back.stages[2].default and back.stages[1].after == ("a",)
    assert back.inputs == (TensorSpec("x", "FP64", (-1,)),)
    assert [t.name for t in back.outputs] == ["x"]
    assert back.siblings(back.stages[1]) == back.stages[1:] and back.siblings(back.stages[0]) == ()
    assert back.at_revision(2).stages[2].route == route_key("g", 2, 2) and back.at_revision(2).stages[2].default


def test_graph_form_states_a_chain_as_the_graph_it_is() -> None:
    chain = two_stage_plan()
    assert not chain.graph and chain.graph_form().graph
    graph = chain.graph_form()
    assert [s.id for s in graph.stages] == ["0", "1"] and [s.after for s in graph.stages] == [(), ("0",)]
    assert graph.stages[0].bindings == (Binding("Title1", "Title1", ""), Binding("Price", "Price", ""))
    assert graph.stages[1].bindings == (Binding("vector", "features", "0"), Binding("tag", "label", "0"))
    assert graph.inputs == chain.inputs and graph.outputs == chain.outputs
    assert graph.graph_form() is graph
