"""Categorical transformers: StringIndexer, IndexToString, OneHotEncoder.

Strings are looked up in a dict per row (the one per-row step left: NumPy has no fast
string hashing); everything after the lookup is vectorised. IndexToString follows
Spark 4, which casts the index in SQL with ANSI mode on (its default): NaN or an
index beyond the int range fails the cast.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtimes.spark.native.base import (
    DOUBLE,
    STRING,
    ColumnType,
    Frame,
    InvalidInput,
    Stage,
    StageMeta,
    UnaryStage,
    in_out_columns,
    unsupported,
    vector,
)
from runtimes.spark.native.persist import read_data_row, require_spark3
from runtimes.spark.native.registry import register

_FEATURE = "org.apache.spark.ml.feature."
UNKNOWN_LABEL = "__unknown"  # the label Spark gives the "keep" bucket in column metadata


_INT_MIN, _INT_MAX = -(2.0**31), 2.0**31 - 1


def ansi_double_to_int(x: np.ndarray) -> np.ndarray:
    """SQL ``CAST(x AS INT)`` with ANSI mode on (Spark 4's default): truncate, or fail on overflow/NaN."""
    fits = (np.floor(x) <= _INT_MAX) & (np.ceil(x) >= _INT_MIN)
    if not fits.all():
        raise InvalidInput(
            f'[CAST_OVERFLOW] The value {x[~fits][0]} of the type "DOUBLE" cannot be cast to "INT" due to an overflow.'
        )
    return x.astype(np.int64)


@register(_FEATURE + "StringIndexerModel")
class StringIndexer(Stage):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        self.pairs = in_out_columns(meta)
        labels = read_data_row(meta)["labelsArray"]
        if len(labels) != len(self.pairs):
            raise unsupported(meta, "labelsArray does not match the input columns")
        self.labels = [tuple(ls) for ls in labels]
        self.index = [{label: float(i) for i, label in enumerate(ls)} for ls in self.labels]
        self.reads = [i for i, _ in self.pairs]
        self.handle = meta.get("handleInvalid", "error")

    def input_type(self, column: str) -> ColumnType:
        return STRING

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        out = {}
        for (inp, o), labels in zip(self.pairs, self.labels):
            if types[inp].kind != "string":
                raise unsupported(self.meta, f"input {inp!r} is {types[inp].kind}; only strings are indexed natively")
            if self.handle == "keep":
                labels = labels + (UNKNOWN_LABEL,)
            out[o] = ColumnType("double", labels=labels)
        return out

    def _lookup(self, frame: Frame) -> list[np.ndarray]:
        return [
            np.fromiter((index.get(s, -1.0) for s in frame.strings(inp)), dtype=np.float64, count=frame.n)
            for (inp, _), index in zip(self.pairs, self.index)
        ]

    def transform(self, frame: Frame) -> None:
        found = self._lookup(frame)
        if self.handle == "skip":
            ok = np.ones(frame.n, dtype=bool)
            for idx in found:
                ok &= idx >= 0
            if not ok.all():
                frame.keep(ok)
                found = [idx[ok] for idx in found]
        for (inp, out), idx, labels in zip(self.pairs, found, self.labels):
            unseen = idx < 0
            if unseen.any():
                if self.handle == "error":
                    value = frame.strings(inp)[unseen][0]
                    if value is None:
                        raise InvalidInput(
                            "StringIndexer encountered NULL value. To handle or skip NULLS, "
                            "try setting StringIndexer.handleInvalid."
                        )
                    raise InvalidInput(
                        f"Unseen label: {value}. To handle unseen labels, set Param handleInvalid to keep."
                    )
                idx = np.where(unseen, float(len(labels)), idx)
            frame[out] = idx


@register(_FEATURE + "IndexToString")
class IndexToString(UnaryStage):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        labels = meta.get("labels")
        # without a labels param Spark reads them from the input column's metadata;
        # the pipeline resolves that in output_types, before any transform
        self._table = np.array(labels, dtype=object) if labels else None

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        if self._table is None:
            labels = types[self.inp].labels
            if labels is None:
                raise unsupported(self.meta, f"no labels set and none known for column {self.inp!r}")
            self._table = np.array(labels, dtype=object)
        return {self.out: STRING}

    def transform(self, frame: Frame) -> None:
        # Spark 4 evaluates this in SQL: cast to int, then look up or raise_error
        x = frame.double(self.inp)
        idx = ansi_double_to_int(x)
        bad = (idx < 0) | (idx >= len(self._table))
        if bad.any():
            raise InvalidInput(f"Unseen index: {x[bad][0]} ??")
        frame[self.out] = self._table[idx]


@register(_FEATURE + "OneHotEncoderModel")
class OneHotEncoder(Stage):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        self.pairs = in_out_columns(meta)
        self.reads = [i for i, _ in self.pairs]
        self.sizes = [int(s) for s in read_data_row(meta)["categorySizes"]]
        self.keep_invalid = meta.get("handleInvalid", "error") == "keep"
        drop_last = bool(meta.get("dropLast", True))
        # the vector size Spark configures for each column (getConfigedCategorySizes)
        if self.keep_invalid and not drop_last:
            self.widths = [s + 1 for s in self.sizes]
        elif drop_last and not self.keep_invalid:
            self.widths = [s - 1 for s in self.sizes]
        else:
            self.widths = list(self.sizes)

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {o: vector(w) for (_, o), w in zip(self.pairs, self.widths)}

    def transform(self, frame: Frame) -> None:
        rows = np.arange(frame.n)
        for (inp, out), size, width in zip(self.pairs, self.sizes, self.widths):
            x = frame.double(inp)
            valid = (x >= 0) & (x < size)
            if not valid.all() and not self.keep_invalid:
                bad = x[~valid][0]
                if bad < 0:
                    raise InvalidInput(
                        f"Negative value: {bad}. Input can't be negative. "
                        "To handle invalid values, set Param handleInvalid to keep"
                    )
                raise InvalidInput(f"Unseen value: {bad}. To handle unseen values, set Param handleInvalid to keep.")
            idx = np.where(valid, x, size).astype(np.int64)  # Java's label.toInt truncates
            hot = np.zeros((frame.n, width), dtype=np.float64)
            inside = idx < width
            hot[rows[inside], idx[inside]] = 1.0
            frame[out] = hot
