"""Fixtures for the Spark runtime's tests: one local SparkSession, and a parity checker.

The checker saves real pyspark models, loads them with the native evaluator, and
compares its output with Spark's own ``transform`` on the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtimes.spark.native import InvalidInput, load_native_pipeline

TOLERANCE = 1e-9


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("sluice-spark-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "1")
        .config("spark.driver.memory", "768m")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


def struct_type(ddl: str):
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import StructField, StructType, _parse_datatype_string

    fields = []
    for part in ddl.split(","):
        name, kind = part.split(None, 1)
        dtype = VectorUDT() if kind.strip() == "vector" else _parse_datatype_string(kind.strip())
        fields.append(StructField(name, dtype))
    return StructType(fields)


def _spark_value(value: Any) -> Any:
    from pyspark.ml.linalg import Vector

    if isinstance(value, Vector):
        return value.toArray()
    return value


def _column_array(values: list[Any]) -> np.ndarray:
    """Spark values of one column -> the native representation."""
    first = next((v for v in values if v is not None), None)
    if isinstance(first, np.ndarray):
        return np.array(values, dtype=np.float64).reshape(len(values), -1)
    if isinstance(first, (str, list)) or first is None:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.array(values, dtype=np.float64)


class Parity:
    """Saves Spark models, runs them natively and through Spark, compares."""

    def __init__(self, spark, tmp_path: Path):
        self.spark = spark
        self.tmp_path = tmp_path
        self._count = 0

    def save(self, stages: Sequence[Any]) -> Path:
        from pyspark.ml import PipelineModel

        self._count += 1
        path = self.tmp_path / f"pipeline{self._count}"
        PipelineModel(stages=list(stages)).write().save(str(path))
        return path

    def frame(self, rows: Sequence[Sequence[Any]], schema: str):
        """A DataFrame with an ``id`` column first, so surviving rows can be matched.

        ``schema`` is DDL ("a double, t string") where the type ``vector`` means VectorUDT.
        """
        return self.spark.createDataFrame([(i, *row) for i, row in enumerate(rows)], struct_type(f"id long, {schema}"))

    @staticmethod
    def inputs(rows: Sequence[Sequence[Any]], schema: str) -> dict[str, np.ndarray]:
        """The rows as native columns (built from the rows themselves, not read back from Spark)."""
        names = [f.name for f in struct_type(schema).fields]
        return {name: _column_array([_spark_value(row[i]) for row in rows]) for i, name in enumerate(names)}

    def spark_output(self, stages: Sequence[Any], df, columns: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        from pyspark.ml import PipelineModel

        out = PipelineModel(stages=list(stages)).transform(df).select("id", *columns).collect()
        ids = np.array([r["id"] for r in out], dtype=np.int64)
        return ids, {c: _column_array([_spark_value(r[c]) for r in out]) for c in columns}

    def check(self, stages: Sequence[Any], rows: Sequence[Sequence[Any]], schema: str, columns: Sequence[str] | None = None):
        """Assert native == Spark for every column the pipeline adds; returns the native result."""
        native = load_native_pipeline(self.save(stages))
        df = self.frame(rows, schema)
        columns = list(columns or native.output_columns)
        ids, expected = self.spark_output(stages, df, columns)
        got = native.transform(self.inputs(rows, schema))
        np.testing.assert_array_equal(got.rows, ids, err_msg="surviving rows differ")
        for name in columns:
            assert_same(got[name], expected[name], name)
        return got

    def check_rejected(self, stages: Sequence[Any], rows: Sequence[Sequence[Any]], schema: str, match: str) -> None:
        """Both Spark and the native evaluator refuse these rows, with the same reason."""
        native = load_native_pipeline(self.save(stages))
        df = self.frame(rows, schema)
        with pytest.raises(Exception, match=match):
            self.spark_output(stages, df, native.output_columns)
        with pytest.raises(InvalidInput, match=match):
            native.transform(self.inputs(rows, schema))


def assert_same(got: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert len(got) == len(expected), f"{name}: {len(got)} rows, Spark has {len(expected)}"
    if len(expected) == 0:
        return
    if expected.dtype == object:
        assert [_plain(v) for v in got] == [_plain(v) for v in expected], name
        return
    assert got.shape == expected.shape, f"{name}: shape {got.shape}, Spark {expected.shape}"
    np.testing.assert_allclose(got, expected, rtol=TOLERANCE, atol=TOLERANCE, equal_nan=True, err_msg=name)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple, np.ndarray)) else value


@pytest.fixture
def parity(spark, tmp_path) -> Parity:
    return Parity(spark, tmp_path)
