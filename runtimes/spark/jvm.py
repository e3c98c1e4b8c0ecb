"""Real Spark for the pipelines the native evaluator does not cover.

A ``JvmPipeline`` is a PipelineModel loaded into the runtime's shared SparkSession.
A batch travels as Arrow both ways: in, numeric and string columns as they are and
vector columns as ``array<double>`` turned into VectorUDT (their size written into the
column metadata, so VectorAssembler need not look at a first row); out, vector
columns turned back into arrays. A ``__sluice_row`` column numbers the rows, so a
micro-batch can be split back per request even when a stage skipped rows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from runtimes.spark import session
from runtimes.spark.columns import empty_arrays
from runtimes.spark.native import ColumnType
from runtimes.spark.native.base import DOUBLE, STRING, STRINGS, vector
from sluice.tensors import TensorError, TensorSpec

ROW_ID = "__sluice_row"


class SparkRejected(TensorError):
    """Spark failed the job on this data (an unseen label, a NaN with handleInvalid="error"...)."""


_JAVA_EXCEPTION = re.compile(r"[\w.$]+(?:Exception|Error): ")


def _reason(exc: Exception) -> str:
    """What the failing stage said, without the job/task/UDF wrapping around it."""
    from py4j.protocol import Py4JJavaError

    if isinstance(exc, Py4JJavaError):
        cause = exc.java_exception
        while cause.getCause() is not None:
            cause = cause.getCause()
        text = str(cause.getMessage() or cause.toString())
    else:
        text = str(exc)
    lines = text.strip().splitlines()
    pieces = [p for p in _JAVA_EXCEPTION.split(lines[0]) if p.strip()] if lines else []
    return (pieces[-1] if pieces else type(exc).__name__).strip()[:500]

Columns = dict[str, np.ndarray]


def _arrow_array(column: np.ndarray, spec: TensorSpec) -> pa.Array:
    if spec.datatype == "BYTES":
        return pa.array(column.tolist(), type=pa.string() if len(spec.shape) < 2 else pa.list_(pa.string()))
    if column.ndim == 2:
        n, k = column.shape
        offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32) if n else np.zeros(1, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(column, dtype=np.float64).reshape(-1)))
    return pa.array(column)


def spark_column_type(field: Any) -> ColumnType | None:
    """The serving type of a Spark output field, or None if it has no tensor form."""
    from pyspark.ml.linalg import VectorUDT
    from pyspark.sql.types import ArrayType, NumericType, StringType

    if isinstance(field.dataType, VectorUDT):
        attrs = (field.metadata or {}).get("ml_attr", {})
        size = attrs.get("num_attrs", sum(len(v) for v in attrs.get("attrs", {}).values()) or -1)
        return vector(int(size))
    if isinstance(field.dataType, NumericType):
        return DOUBLE
    if isinstance(field.dataType, StringType):
        return STRING
    if isinstance(field.dataType, ArrayType) and isinstance(field.dataType.elementType, StringType):
        return STRINGS
    return None


def _from_arrow(chunked: pa.ChunkedArray, ctype: ColumnType) -> np.ndarray:
    array = chunked.combine_chunks()
    if ctype.kind == "vector":
        n = len(array)
        values = array.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(n, -1) if n else values.reshape(0, max(ctype.size, 0))
    if ctype.kind == "double":
        return array.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    out = np.empty(len(array), dtype=object)
    out[:] = array.to_pylist()
    return out


class JvmPipeline:
    """A saved PipelineModel run by real Spark on batches of columns."""

    def __init__(self, path: Path, inputs: Sequence[TensorSpec]):
        from pyspark.ml import PipelineModel

        self.spark = session.acquire()
        self.inputs = list(inputs)
        try:
            self.model = PipelineModel.load(str(path))
            schema = self.model.transform(self._frame(empty_arrays(self.inputs), 0)).schema
        except Exception:
            session.release()
            raise
        known = {s.name for s in self.inputs} | {ROW_ID}
        #: the columns transform adds, in order, and the types of those that have a tensor form
        self.added = [f.name for f in schema.fields if f.name not in known]
        self.column_types = {
            f.name: ctype for f in schema.fields if f.name not in known and (ctype := spark_column_type(f)) is not None
        }

    def _frame(self, columns: Columns, n: int):
        from pyspark.ml.functions import array_to_vector
        from pyspark.sql import functions as F

        arrays = {ROW_ID: pa.array(np.arange(n, dtype=np.int64))}
        for spec in self.inputs:
            arrays[spec.name] = _arrow_array(columns[spec.name], spec)
        df = self.spark.createDataFrame(pa.table(arrays))
        for spec in self.inputs:
            if spec.datatype != "BYTES" and len(spec.shape) == 2:
                size = spec.shape[1]
                metadata = {"ml_attr": {"num_attrs": size}} if size > 0 else {}
                df = df.withColumn(spec.name, array_to_vector(F.col(spec.name)).alias(spec.name, metadata=metadata))
        return df

    def run(self, columns: Columns, n: int, outputs: Sequence[str]) -> tuple[Columns, np.ndarray]:
        """One Spark job: the named output columns, and the input row index of each output row."""
        from pyspark.ml.functions import vector_to_array
        from pyspark.sql import functions as F

        from py4j.protocol import Py4JJavaError
        from pyspark.errors.exceptions.captured import CapturedException

        selected = [F.col(ROW_ID)] + [
            vector_to_array(F.col(c)).alias(c) if self.column_types[c].kind == "vector" else F.col(c) for c in outputs
        ]
        try:
            table = self.model.transform(self._frame(columns, n)).select(*selected).toArrow()
        except (CapturedException, Py4JJavaError) as exc:
            raise SparkRejected(_reason(exc)) from exc
        rows = table.column(ROW_ID).to_numpy()
        result = {c: _from_arrow(table.column(c), self.column_types[c]) for c in outputs}
        if len(rows) > 1 and np.any(np.diff(rows) < 0):
            order = np.argsort(rows, kind="stable")
            rows, result = rows[order], {c: v[order] for c, v in result.items()}
        return result, rows

    def run_batch(self, payloads: Sequence[tuple[Columns, int]], outputs: Sequence[str]) -> list[tuple[Columns, np.ndarray]]:
        """Several requests as one job, split back per request."""
        if len(payloads) == 1:
            return [self.run(payloads[0][0], payloads[0][1], outputs)]
        merged = {s.name: np.concatenate([p[0][s.name] for p in payloads]) for s in self.inputs}
        result, rows = self.run(merged, sum(n for _, n in payloads), outputs)
        split, start = [], 0
        for _, n in payloads:
            mine = (rows >= start) & (rows < start + n)
            split.append(({c: v[mine] for c, v in result.items()}, rows[mine] - start))
            start += n
        return split

    def close(self) -> None:
        session.release()
