"""A Spark model's signature when its manifest does not declare one.

Inputs are the raw columns the pipeline reads (typed by the stage that reads them);
outputs are what a caller usually wants: every column the last stage adds plus the
added columns no stage reads (e.g. ``rawPrediction``, ``probability``, ``prediction``),
and ``row_index`` when a stage may skip rows.

The native path knows every stage exactly. The JVM path reads stage params instead
(``inputCol(s)``/``featuresCol`` read, ``outputCol(s)`` and the predictors' columns
write); a stage without such params (SQLTransformer) hides what it reads, so a
pipeline with one needs its inputs declared in ``model.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from runtimes.spark.columns import ROW_INDEX
from runtimes.spark.native import ColumnType, NativePipeline, UnsupportedStage
from runtimes.spark.native.base import StageMeta, vector
from runtimes.spark.native.registry import build_stage
from sluice.tensors import TensorSpec

_WRITE_PARAMS = ("outputCol", "predictionCol", "rawPredictionCol", "probabilityCol", "varianceCol", "leafCol")
ROW_INDEX_SPEC = TensorSpec(ROW_INDEX, "INT64", (-1,))


def tensor_spec(name: str, ctype: ColumnType) -> TensorSpec:
    if ctype.kind == "vector":
        return TensorSpec(name, "FP64", (-1, ctype.size))
    if ctype.kind == "string":
        return TensorSpec(name, "BYTES", (-1,))
    if ctype.kind == "strings":
        return TensorSpec(name, "BYTES", (-1, -1))
    return TensorSpec(name, "FP64", (-1,))


def native_signature(pipeline: NativePipeline) -> tuple[list[TensorSpec], list[TensorSpec]]:
    types = pipeline.column_types
    inputs = [tensor_spec(c, types[c]) for c in pipeline.input_columns]
    outputs = [tensor_spec(c, types[c]) for c in pipeline.final_columns]
    return inputs, outputs + ([ROW_INDEX_SPEC] if pipeline.may_drop_rows else [])


@dataclass(frozen=True)
class StageColumns:
    reads: list[str]
    writes: list[str]


def stage_columns(meta: StageMeta) -> StageColumns | None:
    """What a stage reads and writes according to its params; None if they do not say."""
    p = meta.params
    if meta.is_set("inputCols"):
        reads = list(p["inputCols"])
    elif "inputCol" in p:
        reads = [p["inputCol"]]
    elif "featuresCol" in p:
        reads = [p["featuresCol"]]
    else:
        return None
    if meta.is_set("outputCols"):
        writes = list(p["outputCols"])
    else:
        writes = [p[k] for k in _WRITE_PARAMS if p.get(k)]
    return StageColumns(reads, writes)


def raw_input_types(metas: Sequence[StageMeta]) -> dict[str, ColumnType | None] | None:
    """The columns a pipeline reads from its caller, typed where a stage tells; None if unknowable."""
    written: set[str] = set()
    types: dict[str, ColumnType | None] = {}
    for meta in metas:
        columns = stage_columns(meta)
        if columns is None:
            return None
        try:
            stage = build_stage(meta)
        except UnsupportedStage:
            stage = None
        for column in columns.reads:
            if column in written or column in types:
                continue
            if stage is not None:
                types[column] = stage.input_type(column)
            else:
                types[column] = vector() if column == meta.get("featuresCol") else None
        written.update(columns.writes)
    return types


def final_columns(added: Sequence[str], metas: Sequence[StageMeta]) -> list[str]:
    """Of the columns a pipeline added: the last stage's, and those no stage reads."""
    read: set[str] = set()
    for meta in metas:
        columns = stage_columns(meta)
        read.update(columns.reads if columns else ())
    last = stage_columns(metas[-1]) if metas else None
    last_writes = set(last.writes) if last else set()
    return [c for c in added if c not in read or c in last_writes]


def may_drop_rows(metas: Sequence[StageMeta]) -> bool:
    return any(meta.get("handleInvalid") == "skip" for meta in metas)
