"""manager.resolve + manager.schemas: pipeline definitions checked against model signatures,
resolved into a typed ``sluice.plan.PipelinePlan``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from manager.resolve import resolve
from manager.schemas import PipelineSpec, StageSpec, parse_chain_entry
from manager.served_models import ServedModel
from manager.store import RuntimeRow
from sluice.errors import ApiError
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.tensors import TensorSpec
from sluice.wire import route_key

SCIKIT = "serving-customscikit"
SPARK = "serving-localml-spark"
DEFAULT_TIMEOUT = 3000


def _t(name: str, datatype: str, *shape: int) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape)}


def _model(inputs: list[dict], outputs: list[dict], versions: list[str] | None = None) -> ServedModel:
    return ServedModel.from_json({"versions": versions if versions is not None else ["1"], "platform": "test", "inputs": inputs, "outputs": outputs})


RUNTIMES = {
    SCIKIT: RuntimeRow(
        SCIKIT,
        "oip",
        {
            "pm_scikit": _model([_t("features", "FP32", -1, 4)], [_t("scaled", "FP32", -1, 4)], ["1", "2"]),
            "unversioned": _model([_t("features", "FP32", -1, 4)], [_t("scaled", "FP32", -1, 4)], []),
            "two_out": _model(
                [_t("features", "FP32", -1, 4)], [_t("scaled", "FP32", -1, 4), _t("norm", "FP32", -1)]
            ),
            "any_shape": _model([_t("features", "FP32", -1, 4)], [_t("scaled", "FP32", -1, -1)]),
        },
    ),
    SPARK: RuntimeRow(
        SPARK,
        "oip",
        {
            "pm_spark": _model(
                [_t("scaled", "FP32", -1, 4)], [_t("label", "INT64", -1), _t("proba", "FP32", -1, 3)]
            ),
            "positional": _model([_t("x", "FP32", -1, 4)], [_t("y", "INT64", -1)]),
            "wants_int": _model([_t("scaled", "INT64", -1, 4)], [_t("y", "INT64", -1)]),
            "wants_3": _model([_t("scaled", "FP32", -1, 3)], [_t("y", "INT64", -1)]),
            "any_in": _model([_t("scaled", "FP32", -1, -1)], [_t("y", "INT64", -1)]),
            "wants_rank1": _model([_t("scaled", "FP32", -1)], [_t("y", "INT64", -1)]),
            "two_in": _model([_t("a", "FP32", -1, 4), _t("b", "FP32", -1)], [_t("y", "INT64", -1)]),
        },
    ),
}


def _resolve(body: dict, revision: int = 1) -> PipelinePlan:
    plan = resolve(PipelineSpec.model_validate(body), revision, RUNTIMES, DEFAULT_TIMEOUT)
    assert isinstance(plan, PipelinePlan)
    return plan


def _bindings(stage: StagePlan) -> dict[str, str]:
    return {b.input: b.source for b in stage.bindings}


def _refused(body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        _resolve(body)
    assert info.value.status == 422
    return info.value


SEED = {"name": "endpointML", "transportType": "http", "chain": [f"{SCIKIT}/pm_scikit", f"{SPARK}/pm_spark"]}


# --- resolution ---------------------------------------------------------------------


def test_seed_chain_resolves_to_the_full_plan() -> None:
    plan = _resolve(SEED, revision=3)
    scaled = TensorSpec("scaled", "FP32", (-1, 4))
    assert plan == PipelinePlan(
        name="endpointML",
        revision=3,
        transport="http",
        stages=(
            StagePlan(
                name=f"{SCIKIT}/pm_scikit", runtime=SCIKIT, model="pm_scikit", version="", route="endpointML.r3.s0",
                timeout_ms=DEFAULT_TIMEOUT, inputs=(TensorSpec("features", "FP32", (-1, 4)),), outputs=(scaled,),
            ),
            StagePlan(
                name=f"{SPARK}/pm_spark", runtime=SPARK, model="pm_spark", version="", route="endpointML.r3.s1",
                timeout_ms=DEFAULT_TIMEOUT, inputs=(scaled,),
                outputs=(TensorSpec("label", "INT64", (-1,)), TensorSpec("proba", "FP32", (-1, 3))),
                bindings=(Binding("scaled", "scaled"),),
            ),
        ),
    )
    assert plan.key == ("endpointML", 3)
    assert plan.inputs == plan.stages[0].inputs and [o.name for o in plan.outputs] == ["label", "proba"]
    assert plan.stages[0].bindings == ()  # the first stage is fed by the request
    assert isinstance(plan.stages[1].inputs[0].shape, tuple)


def test_transport_comes_from_the_definition() -> None:
    assert _resolve({**SEED, "transportType": "grpc"}).transport == "grpc"
    assert _resolve({"name": "p", "chain": [f"{SCIKIT}/pm_scikit"]}).transport == "http"


def test_chain_and_stages_forms_resolve_identically() -> None:
    stages_form = {
        "name": "endpointML",
        "stages": [{"runtime": SCIKIT, "model": "pm_scikit"}, {"runtime": SPARK, "model": "pm_spark"}],
    }
    assert _resolve(SEED) == _resolve(stages_form)
    with_version = {"name": "p", "chain": [f"{SCIKIT}/pm_scikit:2"]}
    assert _resolve(with_version) == _resolve({"name": "p", "stages": [{"runtime": SCIKIT, "model": "pm_scikit", "version": "2"}]})


def test_routes_follow_the_revision() -> None:
    plan = _resolve(SEED, revision=12)
    assert [s.route for s in plan.stages] == [route_key("endpointML", 12, i) for i in range(2)]
    assert _resolve(SEED, revision=7) == plan.at_revision(7)


def test_route_key() -> None:
    assert route_key("endpointML", 12, 0) == "endpointML.r12.s0"


def test_chain_entry_with_version() -> None:
    (stage,) = _resolve({"name": "p", "chain": [f"{SCIKIT}/pm_scikit:2"]}).stages
    assert stage.version == "2"
    assert stage.name == f"{SCIKIT}/pm_scikit:2"


def test_stage_name_and_timeout_override() -> None:
    stages = _resolve(
        {
            "name": "p",
            "stages": [
                {"runtime": SCIKIT, "model": "pm_scikit", "name": "scale", "timeout_ms": 250},
                {"runtime": SPARK, "model": "pm_spark"},
            ],
        }
    ).stages
    assert stages[0].name == "scale" and stages[0].timeout_ms == 250
    assert stages[1].timeout_ms == DEFAULT_TIMEOUT


def test_unknown_runtime() -> None:
    err = _refused({"name": "p", "chain": [f"{SCIKIT}/pm_scikit", "nope/pm_spark"]})
    assert err.code == "unknown_runtime"
    assert "stage 1 (nope/pm_spark): unknown runtime 'nope'" in err.message
    assert err.details == {"stage": 1, "runtime": "nope", "known": sorted(RUNTIMES)}


def test_unknown_model() -> None:
    err = _refused({"name": "p", "chain": [f"{SCIKIT}/missing"]})
    assert err.code == "unknown_model"
    assert f"stage 0 ({SCIKIT}/missing): runtime '{SCIKIT}' serves no model 'missing'" in err.message
    assert err.details["stage"] == 0
    assert err.details["runtime"] == SCIKIT
    assert err.details["model"] == "missing"
    assert err.details["known"] == sorted(RUNTIMES[SCIKIT].models)


def test_unknown_version() -> None:
    err = _refused({"name": "p", "chain": [f"{SCIKIT}/pm_scikit:7"]})
    assert err.code == "unknown_version"
    assert "model 'pm_scikit' has no version '7'" in err.message
    assert err.details == {"stage": 0, "model": "pm_scikit", "versions": ["1", "2"]}


def test_any_version_accepted_when_the_model_lists_none() -> None:
    (stage,) = _resolve({"name": "p", "chain": [f"{SCIKIT}/unversioned:9"]}).stages
    assert stage.version == "9"


@pytest.mark.parametrize(
    "model, tensor, why",
    [
        ("wants_int", "scaled", "input 'scaled' wants INT64, output 'scaled' gives FP32"),
        ("wants_3", "scaled", "input 'scaled' wants shape [-1, 3], output 'scaled' gives [-1, 4]"),
        ("wants_rank1", "scaled", "input 'scaled' wants shape [-1], output 'scaled' gives [-1, 4]"),
        ("two_in", "a", "no output of stage 0 (" + SCIKIT + "/pm_scikit) feeds input 'a'; its outputs are ['scaled']"),
    ],
)
def test_signature_mismatch_names_stage_and_tensor(model: str, tensor: str, why: str) -> None:
    err = _refused({"name": "p", "chain": [f"{SCIKIT}/pm_scikit", f"{SPARK}/{model}"]})
    assert err.code == "signature_mismatch"
    assert err.message == f"stage 1 ({SPARK}/{model}): {why}"
    assert err.details == {"stage": 1, "tensor": tensor}


def test_signature_mismatch_uses_the_stage_name() -> None:
    err = _refused(
        {
            "name": "p",
            "stages": [{"runtime": SCIKIT, "model": "pm_scikit"}, {"runtime": SPARK, "model": "wants_int", "name": "classify"}],
        }
    )
    assert err.message.startswith("stage 1 (classify): ")


def test_variable_dimensions_are_compatible() -> None:
    plan = _resolve({"name": "p", "chain": [f"{SCIKIT}/any_shape", f"{SPARK}/pm_spark"]})
    assert plan.stages[1].bindings == (Binding("scaled", "scaled"),)
    # and the other way round: a fixed output feeds a variable input
    plan = _resolve({"name": "p", "chain": [f"{SCIKIT}/pm_scikit", f"{SPARK}/any_in"]})
    assert plan.stages[1].bindings == (Binding("scaled", "scaled"),)


def test_single_input_single_output_binds_by_position() -> None:
    second = _resolve({"name": "p", "chain": [f"{SCIKIT}/pm_scikit", f"{SPARK}/positional"]}).stages[1]
    assert second.bindings == (Binding("x", "scaled"),)
    assert second.source_of("x") == "scaled"


def test_positional_binding_needs_a_single_output() -> None:
    err = _refused({"name": "p", "chain": [f"{SCIKIT}/two_out", f"{SPARK}/positional"]})
    assert err.details == {"stage": 1, "tensor": "x"}
    assert "its outputs are ['norm', 'scaled']" in err.message


def _explicit(first: str, second: str, inputs: dict[str, str]) -> dict:
    """A two-stage pipeline whose second stage binds its inputs explicitly."""
    return {
        "name": "p",
        "stages": [{"runtime": SCIKIT, "model": first}, {"runtime": SPARK, "model": second, "inputs": inputs}],
    }


def test_explicit_bindings() -> None:
    second = _resolve(_explicit("two_out", "two_in", {"a": "scaled", "b": "norm"})).stages[1]
    # one binding per input, in the order of the stage's signature
    assert second.bindings == (Binding("a", "scaled"), Binding("b", "norm"))
    assert _bindings(second) == {"a": "scaled", "b": "norm"}


def test_explicit_binding_is_still_type_checked() -> None:
    err = _refused(_explicit("two_out", "two_in", {"a": "norm", "b": "scaled"}))
    assert err.details == {"stage": 1, "tensor": "a"}
    assert "input 'a' wants shape [-1, 4], output 'norm' gives [-1]" in err.message


def test_explicit_binding_to_a_missing_output() -> None:
    err = _refused(_explicit("pm_scikit", "pm_spark", {"scaled": "nope"}))
    assert err.message == f"stage 1 ({SPARK}/pm_spark): stage 0 has no output 'nope'"
    assert err.details == {"stage": 1, "tensor": "scaled"}


def test_explicit_binding_for_an_unknown_input() -> None:
    err = _refused(_explicit("pm_scikit", "pm_spark", {"zzz": "scaled", "bogus": "scaled"}))
    assert err.message == f"stage 1 ({SPARK}/pm_spark): the stage has no input 'bogus'"
    assert err.details == {"stage": 1, "tensor": "bogus"}


def test_the_first_error_stops_at_its_stage() -> None:
    err = _refused({"name": "p", "chain": [f"{SCIKIT}/pm_scikit", f"{SPARK}/wants_3", "nope/x"]})
    assert err.details["stage"] == 1


# --- schemas -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("rt/model", ("rt", "model", None)),
        ("rt/model:3", ("rt", "model", "3")),
        ("serving-localml-spark/pm_spark:v1.2-rc_1", ("serving-localml-spark", "pm_spark", "v1.2-rc_1")),
        ("a.b/c.d", ("a.b", "c.d", None)),
    ],
)
def test_parse_chain_entry(entry: str, expected: tuple) -> None:
    stage = parse_chain_entry(entry)
    assert (stage.runtime, stage.model, stage.version) == expected


@pytest.mark.parametrize("entry", ["rt", "rt/", "/model", "rt/model:", "rt/m/x", "rt/m:a:b", "-rt/m", "rt/m o", ""])
def test_parse_chain_entry_refuses(entry: str) -> None:
    with pytest.raises(ValueError, match="must look like '<runtime>/<model>\\[:<version>\\]'"):
        parse_chain_entry(entry)


def test_stage_label() -> None:
    assert StageSpec(runtime="r", model="m").label == "r/m"
    assert StageSpec(runtime="r", model="m", version="2").label == "r/m:2"
    assert StageSpec(runtime="r", model="m", name="nice").label == "nice"


def test_seed_form_keeps_its_shape() -> None:
    spec = PipelineSpec.model_validate(SEED)
    assert spec.model_dump(exclude_none=True) == SEED
    assert spec.transportType == "http"
    assert PipelineSpec.model_validate({"name": "p", "chain": ["r/m"]}).transportType == "http"


def _invalid(body: dict) -> str:
    with pytest.raises(ValidationError) as info:
        PipelineSpec.model_validate(body)
    return str(info.value)


def test_exactly_one_of_chain_or_stages() -> None:
    assert "give exactly one of 'chain' or 'stages'" in _invalid({"name": "p"})
    both = {"name": "p", "chain": ["r/m"], "stages": [{"runtime": "r", "model": "m"}]}
    assert "give exactly one of 'chain' or 'stages'" in _invalid(both)


def test_empty_chain_or_stages() -> None:
    assert "chain" in _invalid({"name": "p", "chain": []})
    assert "stages" in _invalid({"name": "p", "stages": []})


def test_malformed_chain_entry_is_refused_at_validation() -> None:
    assert "chain entry 'runtime-only' must look like" in _invalid({"name": "p", "chain": ["r/m", "runtime-only"]})


@pytest.mark.parametrize("name", ["", "-lead", "_lead", "has space", "dot.ted", "slash/ed", "x" * 64, "ü"])
def test_bad_pipeline_names(name: str) -> None:
    assert "name" in _invalid({"name": name, "chain": ["r/m"]})


@pytest.mark.parametrize("name", ["a", "A1", "end_point-ML", "x" * 63])
def test_good_pipeline_names(name: str) -> None:
    assert PipelineSpec.model_validate({"name": name, "chain": ["r/m"]}).name == name


@pytest.mark.parametrize(
    "body, where",
    [
        ({"name": "p", "transportType": "tcp", "chain": ["r/m"]}, "transportType"),
        ({"name": "p", "chain": ["r/m"], "extra": 1}, "extra"),
        ({"name": "p", "stages": [{"runtime": "r", "model": "m", "extra": 1}]}, "extra"),
        ({"name": "p", "stages": [{"runtime": "-r", "model": "m"}]}, "runtime"),
        ({"name": "p", "stages": [{"runtime": "r", "model": "m/x"}]}, "model"),
        ({"name": "p", "stages": [{"runtime": "r", "model": "m", "version": "1 2"}]}, "version"),
        ({"name": "p", "stages": [{"runtime": "r", "model": "m", "timeout_ms": 0}]}, "timeout_ms"),
        ({"name": "p", "stages": [{"runtime": "r", "model": "m", "timeout_ms": 600_001}]}, "timeout_ms"),
        ({"name": "p", "stages": [{"model": "m"}]}, "runtime"),
        ({"name": "p", "chain": ["r/m"] * 65}, "chain"),
    ],
)
def test_schema_errors_name_the_field(body: dict, where: str) -> None:
    assert where in _invalid(body)


# --- graphs (manager.graph) ----------------------------------------------------------

FEATS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
CLASSIFIER = _model([_t("features", "FP64", -1, 4)], [_t("label", "BYTES", -1), _t("probabilities", "FP64", -1, 3)])
IRIS = {
    "scikit": RuntimeRow("scikit", "oip", {
        "iris_scaler": _model([_t(f, "FP64", -1) for f in FEATS], [_t("features", "FP64", -1, 4)]),
        "iris_classifier": CLASSIFIER,
        "iris_tree": CLASSIFIER,
        "iris_vote": _model([_t("p1", "FP64", -1, 3), _t("p2", "FP64", -1, 3)],
                            [_t("label", "BYTES", -1), _t("probabilities", "FP64", -1, 3)]),
    })
}


def _ensemble(**changes) -> dict:
    stages = [
        {"id": "scale", "runtime": "scikit", "model": "iris_scaler"},
        {"id": "lr", "runtime": "scikit", "model": "iris_classifier", "after": ["scale"]},
        {"id": "tree", "runtime": "scikit", "model": "iris_tree", "after": ["scale"]},
        {"id": "vote", "runtime": "scikit", "model": "iris_vote", "after": ["lr", "tree"],
         "inputs": {"p1": "lr.probabilities", "p2": "tree.probabilities"}},
    ]
    for index, fields in changes.items():
        stages[int(index[1:])].update(fields)
    return {"name": "ens", "stages": stages}


def _graph(definition: dict) -> PipelinePlan:
    return resolve(PipelineSpec.model_validate(definition), 1, IRIS, DEFAULT_TIMEOUT)


def _graph_error(definition: dict) -> ApiError:
    with pytest.raises(ApiError) as caught:
        _graph(definition)
    assert caught.value.status == 422
    return caught.value


def test_ensemble_resolves_to_a_graph_with_edges_bindings_request_and_answer() -> None:
    plan = _graph(_ensemble())
    assert plan.graph and [s.id for s in plan.stages] == ["scale", "lr", "tree", "vote"]
    assert [s.after for s in plan.stages] == [(), ("scale",), ("scale",), ("lr", "tree")]
    assert plan.stages[1].bindings == (Binding("features", "features", "scale"),)
    assert plan.stages[3].bindings == (Binding("p1", "probabilities", "lr"), Binding("p2", "probabilities", "tree"))
    assert [t.name for t in plan.inputs] == FEATS and plan.stages[0].bindings[0] == Binding("sepal_length", "sepal_length", "")
    assert [(f.spec.name, [(s.stage, s.output) for s in f.sources]) for f in plan.answer] == [
        ("label", [("vote", "label")]), ("probabilities", [("vote", "probabilities")])]
    assert [s.route for s in plan.stages] == [route_key("ens", 1, i) for i in range(4)]


def test_chain_definitions_still_resolve_to_chain_plans() -> None:
    plan = _graph({"name": "c", "chain": ["scikit/iris_scaler", "scikit/iris_classifier"]})
    assert not plan.graph and plan.stages[1].bindings == (Binding("features", "features"),)


def test_ids_without_after_are_a_chain_of_those_ids() -> None:
    plan = _graph({"name": "c", "stages": [{"id": "a", "runtime": "scikit", "model": "iris_scaler"},
                                           {"id": "b", "runtime": "scikit", "model": "iris_classifier"}]})
    assert [s.after for s in plan.stages] == [(), ("a",)] and [f.spec.name for f in plan.answer] == ["label", "probabilities"]


def test_sinks_that_collide_are_prefixed_and_switch_branches_merge() -> None:
    fan = _graph({"name": "f", "stages": _ensemble()["stages"][:3]})  # lr and tree both end the pipeline
    assert [f.spec.name for f in fan.answer] == ["lr.label", "tree.label", "lr.probabilities", "tree.probabilities"]
    switch = _graph(_ensemble(s1={"when": "scale.features[2] < 0"}, s2={"default": True}) | {"stages": _ensemble(
        s1={"when": "scale.features[2] < 0"}, s2={"default": True})["stages"][:3]})
    assert [(f.spec.name, [s.stage for s in f.sources]) for f in switch.answer] == [
        ("label", ["lr", "tree"]), ("probabilities", ["lr", "tree"])]
    assert switch.siblings(switch.stages[1]) == switch.siblings(switch.stages[2]) == switch.stages[1:3]


def test_a_condition_adds_the_stages_it_reads_to_what_the_stage_waits_for() -> None:
    plan = _graph(_ensemble(s3={"after": ["tree"], "inputs": {"p1": "tree.probabilities", "p2": "tree.probabilities"},
                                "when": "lr.label == 'setosa'"}))
    assert plan.stages[3].after == ("tree", "lr")


@pytest.mark.parametrize(
    ("changes", "code", "words"),
    [
        ({"s0": {"after": ["vote"]}}, "cycle", ["scale -> ", "vote"]),
        ({"s1": {"after": ["lr"]}}, "cycle", ["lr", "itself"]),
        ({"s1": {"after": ["nope"]}}, "unknown_stage", ["'nope'"]),
        ({"s1": {"id": "tree"}}, "duplicate_stage_id", ["'tree'"]),
        ({"s3": {"inputs": {"p1": "nope.probabilities"}}}, "unknown_stage", ["'nope'", "'p1'"]),
        ({"s3": {"inputs": {"p1": "lr.label", "p2": "tree.probabilities"}}}, "signature_mismatch", ["lr.label -> vote.p1", "BYTES"]),
        ({"s3": {"inputs": {}}}, "signature_mismatch", ["'p1'"]),
        ({"s3": {"inputs": {"p1": "lr.probabilities"}, "after": ["lr", "tree"]}}, "signature_mismatch", ["'p2'"]),
        ({"s3": {"inputs": {"q": "lr.probabilities"}}}, "signature_mismatch", ["no input 'q'"]),
        ({"s1": {"when": "scale.features[9] > 0"}}, "bad_condition", ["out of range"]),
        ({"s1": {"when": "lr.label == 'x'"}}, "bad_condition", ["own outputs"]),
        ({"s1": {"when": "petal > 1"}}, "bad_condition", ["'petal'", "request field"]),
        ({"s2": {"default": True}}, "bad_condition", ["'default'"]),
        ({"s1": {"when": "scale.features[0] > 1", "default": True}}, "bad_condition", ["not both"]),
    ],
)
def test_graphs_that_cannot_run_are_refused(changes: dict, code: str, words: list[str]) -> None:
    error = _graph_error(_ensemble(**changes))
    assert error.code == code, error.message
    for word in words:
        assert word in error.message
    assert "stage_id" in error.details or "stages" in error.details


def test_request_fields_read_twice_must_agree() -> None:
    definition = {"name": "r", "stages": [
        {"id": "a", "runtime": "scikit", "model": "iris_classifier", "after": []},
        {"id": "b", "runtime": "scikit", "model": "iris_vote", "after": [], "inputs": {"p1": "features", "p2": "features"}},
    ]}
    error = _graph_error(definition)
    assert error.code == "signature_mismatch" and "request field 'features'" in error.message
