"""sluice.conditions: the per-record switch language parses by hand (no eval), types
against the tensors it names, and evaluates column-wise per record."""

from __future__ import annotations

import numpy as np
import pytest

from sluice import conditions
from sluice.conditions import BoolOp, Compare, ConditionError, Literal, Not, Ref
from sluice.tensors import TensorSpec

SPECS = {
    Ref("scale", "features"): TensorSpec("features", "FP64", (-1, 4)),
    Ref("lr", "label"): TensorSpec("label", "BYTES", (-1,)),
    Ref("", "flag"): TensorSpec("flag", "BOOL", (-1,)),
    Ref("0", "score"): TensorSpec("score", "FP32", (-1,)),
}


def lookup(ref: Ref) -> TensorSpec:
    try:
        return SPECS[Ref(ref.stage, ref.tensor)]
    except KeyError:
        raise ConditionError(f"unknown {ref}") from None


def test_parses_comparisons_indexing_and_boolean_operators_with_precedence() -> None:
    node = conditions.parse("scale.features[0] > 0.5 or not lr.label == 'setosa' and flag")
    assert node == BoolOp("or", (
        Compare(">", Ref("scale", "features", (0,)), Literal(0.5)),
        BoolOp("and", (Not(Compare("==", Ref("lr", "label"), Literal("setosa"))), Ref("", "flag"))),
    ))
    assert conditions.parse('0.score >= -1e-3') == Compare(">=", Ref("0", "score"), Literal(-0.001))
    assert conditions.parse("(flag)") == Ref("", "flag")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("a >", "ends too early"),
        ("a == == b", "unexpected '=='"),
        ("1 < a < 2", "do not chain"),
        ("a + 1 > 2", "unexpected '+'"),
        ("__import__('os')", "unexpected '('"),
        ("a.b.c > 1", "unexpected"),
        ("x[1.5] > 0", "integer"),
        ("(" * 40 + "a" + ")" * 40, "deeper"),
        ("a > 'unterminated", "unexpected"),
    ],
)
def test_refuses_what_is_not_the_language(text: str, why: str) -> None:
    with pytest.raises(ConditionError, match=why.replace("(", r"\(").replace("+", r"\+")):
        conditions.parse(text)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("scale.features > 0", "1 index"),
        ("scale.features[0][1] > 0", "1 index"),
        ("scale.features[4] > 0", "out of range"),
        ("lr.label > 'a'", "only with == or !="),
        ("lr.label == 1", "cannot compare a string with a number"),
        ("scale.features[0]", "true or false"),
        ("flag and 0.score", "not true or false"),
        ("nope.x > 1", "unknown"),
    ],
)
def test_check_types_the_condition_against_the_tensors(text: str, why: str) -> None:
    with pytest.raises(ConditionError, match=why):
        conditions.check(conditions.parse(text), lookup)


def test_well_typed_conditions_pass_the_check() -> None:
    for text in ("scale.features[-1] <= 2", "lr.label != \"virginica\" or flag", "flag == true", "not flag"):
        conditions.check(conditions.parse(text), lookup)


def test_evaluates_per_record() -> None:
    node = conditions.parse("scale.features[2] < 0 and lr.label != 'setosa' or flag")
    values = {
        Ref("scale", "features", (2,)): np.array([[0, 0, -1, 0], [0, 0, -1, 0], [0, 0, 1, 0], [0, 0, 1, 0.0]]),
        Ref("lr", "label"): np.array([b"versicolor", b"setosa", b"virginica", b"setosa"], dtype=object),
        Ref("", "flag"): np.array([False, False, False, True]),
    }
    assert conditions.evaluate(node, values, 4).tolist() == [True, False, False, True]
    assert conditions.evaluate(conditions.parse("true"), {}, 3).tolist() == [True, True, True]
    assert conditions.refs(node) == [Ref("scale", "features", (2,)), Ref("lr", "label"), Ref("", "flag")]
