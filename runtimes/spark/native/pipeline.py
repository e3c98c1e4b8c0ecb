"""A saved PipelineModel evaluated without a JVM: load, infer column types, transform.

``load_native_pipeline(path)`` builds every stage natively (or raises
``UnsupportedStage``), then walks the stages once to learn which columns come from
the caller (``input_columns``, typed by the first stage that reads them) and which
the pipeline adds (``output_columns``), with their types (``column_types``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from runtimes.spark.native.base import ColumnType, Frame, InvalidInput, Stage, unsupported
from runtimes.spark.native.persist import pipeline_stages
from runtimes.spark.native.registry import build_stage


class TransformResult(dict):
    """The columns a transform added; ``rows`` holds the input row index of each output row.

    ``rows`` is ``arange(n)`` unless a stage skipped invalid rows (``handleInvalid="skip"``).
    """

    rows: np.ndarray


class NativePipeline:
    """A PipelineModel whose every stage has a native implementation.

    ``input_columns``: the raw columns it reads; ``output_columns``: every column it
    adds, in order; ``column_types``: the type of each of both; ``final_columns``: the
    added columns a caller usually wants; ``may_drop_rows``: a stage skips invalid rows.
    """

    def __init__(self, stages: list[Stage]):
        self.stages = stages
        self.input_columns: list[str] = []
        self.output_columns: list[str] = []
        self.column_types: dict[str, ColumnType] = {}
        added_by: list[list[str]] = []
        for stage in stages:
            for column in stage.reads:
                if column not in self.column_types:
                    self.column_types[column] = stage.input_type(column)
                    self.input_columns.append(column)
            added = stage.output_types(self.column_types)
            for column, ctype in added.items():
                if column in self.column_types:
                    raise unsupported(stage.meta, f"output column {column!r} already exists")
                self.column_types[column] = ctype
                self.output_columns.append(column)
            added_by.append(list(added))
        finals = set(added_by[-1]) if stages else set()
        read_after: set[str] = set()
        for stage, added in zip(reversed(stages), reversed(added_by)):
            finals.update(c for c in added if c not in read_after)
            read_after.update(stage.reads)
        #: what a caller usually wants: everything the last stage adds, plus the
        #: columns no later stage reads
        self.final_columns = [c for c in self.output_columns if c in finals]
        self.may_drop_rows = any(stage.may_drop_rows for stage in stages)

    def transform(self, columns: Mapping[str, np.ndarray]) -> TransformResult:
        """Spark's ``transform`` on a batch: every column the stages add, batch-major."""
        arrays = {}
        for name in self.input_columns:
            if name not in columns:
                raise InvalidInput(f"input column {name!r} is missing")
            arrays[name] = np.asarray(columns[name])
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) > 1:
            raise InvalidInput(f"input columns differ in length: {sorted(sizes)}")
        n = sizes.pop() if sizes else 0
        frame = Frame(arrays, n)
        # NaN and infinities propagate as in Spark; NumPy's warnings about them are noise
        with np.errstate(all="ignore"):
            for stage in self.stages:
                stage.transform(frame)
        result = TransformResult((name, frame.columns[name]) for name in self.output_columns)
        result.rows = np.arange(n) if frame.rows is None else frame.rows
        return result


def load_native_pipeline(path: str | Path) -> NativePipeline:
    """Build a saved PipelineModel (or single saved stage) natively; ``UnsupportedStage`` if any stage is not covered."""
    return NativePipeline([build_stage(meta) for meta in pipeline_stages(Path(path))])
