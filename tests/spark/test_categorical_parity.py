"""Parity of StringIndexer, IndexToString and OneHotEncoder with real Spark."""

from __future__ import annotations

import pytest
from pyspark.ml import Pipeline
from pyspark.ml.feature import IndexToString, OneHotEncoder, StringIndexer

pytestmark = pytest.mark.spark

NAN = float("nan")
# frequencies: a x3, b x2, c x2 (tie with b), "" x1, d x1
TRAIN = ["b", "a", "c", "a", "b", "a", "", "d", "c"]


def fit(parity, rows, schema, *estimators):
    return Pipeline(stages=list(estimators)).fit(parity.frame(rows, schema)).stages


def test_string_indexer_order_types_and_keep(parity):
    rows = [(c,) for c in TRAIN]
    orders = ["frequencyDesc", "frequencyAsc", "alphabetDesc", "alphabetAsc"]
    stages = fit(
        parity,
        rows,
        "c string",
        *[StringIndexer(inputCol="c", outputCol=o, stringOrderType=o, handleInvalid="keep") for o in orders],
    )
    # unseen labels, a null and case variants all land in the extra "keep" index
    got = parity.check(stages, rows + [("zz",), (None,), ("A",), (" a",)], "c string")
    assert set(got["frequencyDesc"][-4:]) == {5.0}


def test_string_indexer_multiple_columns_skip(parity):
    rows = [("a", "x"), ("b", "y"), ("a", "y"), ("c", "x")]
    stages = fit(
        parity, rows, "c string, d string", StringIndexer(inputCols=["c", "d"], outputCols=["ci", "di"], handleInvalid="skip")
    )
    probe = [("a", "unseen"), ("new", "x"), (None, "y"), ("b", "x"), ("", "y")]
    got = parity.check(stages, rows + probe, "c string, d string")
    assert list(got.rows) == [0, 1, 2, 3, 7]


@pytest.mark.parametrize(("value", "match"), [("zz", "Unseen label"), (None, "NULL")])
def test_string_indexer_error(parity, value, match):
    rows = [("a",), ("b",)]
    stages = fit(parity, rows, "c string", StringIndexer(inputCol="c", outputCol="ci"))
    parity.check_rejected(stages, rows + [(value,)], "c string", match=match)


def test_index_to_string_from_labels_and_metadata(parity):
    rows = [("a", 0.0), ("b", 1.0), ("a", 2.0)]
    indexer, = fit(parity, rows, "c string, i double", StringIndexer(inputCol="c", outputCol="ci", handleInvalid="keep"))
    stages = [
        indexer,
        IndexToString(inputCol="ci", outputCol="back"),  # labels from the indexer's metadata, "__unknown" included
        IndexToString(inputCol="i", outputCol="named", labels=["zero", "one", "two"]),
    ]
    # the index is cast to int: 1.7 -> 1, -0.5 -> 0
    probe = [("zz", 1.7), ("b", -0.5)]
    got = parity.check(stages, rows + probe, "c string, i double")
    assert list(got["back"][-2:]) == ["__unknown", "b"]


@pytest.mark.parametrize(("value", "match"), [(2.0, "Unseen index"), (NAN, "CAST_OVERFLOW"), (3e9, "CAST_OVERFLOW")])
def test_index_to_string_invalid_index(parity, value, match):
    stage = IndexToString(inputCol="i", outputCol="s", labels=["a", "b"])
    parity.check_rejected([stage], [(0.0,), (value,)], "i double", match=match)


def test_one_hot_encoder_drop_last_and_keep(parity):
    rows = [(float(i % 3), float(i % 2)) for i in range(6)]
    stages = fit(
        parity,
        rows,
        "a double, b double",
        *[
            OneHotEncoder(inputCols=["a", "b"], outputCols=[f"a_{d}", f"b_{d}"], dropLast=d, handleInvalid="keep")
            for d in (True, False)
        ],
        OneHotEncoder(inputCol="a", outputCol="a_error", dropLast=False),
    )
    parity.check(stages, rows, "a double, b double")
    # invalid values only for the two "keep" encoders (1.5 counts as category 1)
    probe = [(3.0, 1.0), (-1.0, 0.0), (NAN, 2.0), (1.5, 0.0)]
    parity.check(stages[:2], rows + probe, "a double, b double")


@pytest.mark.parametrize(("value", "match"), [(3.0, "Unseen value"), (-1.0, "Negative value")])
def test_one_hot_encoder_error(parity, value, match):
    rows = [(0.0,), (1.0,), (2.0,)]
    stages = fit(parity, rows, "a double", OneHotEncoder(inputCol="a", outputCol="v"))
    parity.check_rejected(stages, rows + [(value,)], "a double", match=match)
