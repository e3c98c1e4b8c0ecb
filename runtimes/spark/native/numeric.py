"""Numeric feature transformers: assembling, scaling, normalising, thresholding, PCA.

Each reproduces the arithmetic of its Spark 3.x/4.x ``transform`` in the same order of
operations (e.g. StandardScaler multiplies by a precomputed ``1/std``), so results
agree with Spark's to the last bits or very nearly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from runtimes.spark.native.base import (
    DOUBLE,
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
from runtimes.spark.native.persist import read_data_row, require_spark3, to_matrix, to_vector
from runtimes.spark.native.registry import register

_FEATURE = "org.apache.spark.ml.feature."


@register(_FEATURE + "VectorAssembler")
class VectorAssembler(Stage):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.reads = list(meta.params["inputCols"])
        self.out = meta.params["outputCol"]
        self.handle = meta.get("handleInvalid", "error")

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        sizes = [1 if types[c].kind == "double" else types[c].size for c in self.reads]
        return {self.out: vector(-1 if min(sizes, default=0) < 0 else sum(sizes))}

    def _assemble(self, frame: Frame) -> tuple[np.ndarray, list[int]]:
        """The assembled vectors, and the positions that came from scalar columns."""
        parts, scalars, position = [], [], 0
        for name in self.reads:
            if frame[name].ndim == 2:
                part = frame.vector(name)
            else:
                part = frame.double(name).reshape(-1, 1)
                scalars.append(position)
            parts.append(part)
            position += part.shape[1]
        return (np.concatenate(parts, axis=1) if parts else np.zeros((frame.n, 0))), scalars

    def transform(self, frame: Frame) -> None:
        out, scalars = self._assemble(frame)
        # only NaN in a scalar column is invalid: Spark passes NaN inside vectors through
        if scalars and self.handle != "keep":
            nan = np.isnan(out[:, scalars]).any(axis=1)
            if nan.any():
                if self.handle == "error":
                    raise InvalidInput(
                        'Encountered NaN while assembling a row with handleInvalid = "error". '
                        'Consider removing NaNs from dataset or using handleInvalid = "keep" or "skip".'
                    )
                frame.keep(~nan)
                out = out[~nan]
        frame[self.out] = out


class VectorMap(UnaryStage):
    """A vector -> vector stage with a fixed input size (-1: any)."""

    size = -1

    def input_type(self, column: str) -> ColumnType:
        return vector(self.size)

    def output_size(self, input_type: ColumnType) -> int:
        return self.size if self.size >= 0 else input_type.size

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {self.out: vector(self.output_size(types[self.inp]))}

    def transform(self, frame: Frame) -> None:
        frame[self.out] = self.apply(frame.vector(self.inp, self.size))

    def apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@register(_FEATURE + "StandardScalerModel")
class StandardScaler(VectorMap):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        data = read_data_row(meta)
        std, self.mean = to_vector(data["std"]), to_vector(data["mean"])
        self.size = len(std)
        self.with_mean = bool(meta.get("withMean", False))
        self.with_std = bool(meta.get("withStd", True))
        with np.errstate(divide="ignore"):
            self.scale = np.where(std == 0.0, 0.0, 1.0 / std)

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.with_mean and self.with_std:
            return (x - self.mean) * self.scale
        if self.with_mean:
            return x - self.mean
        if self.with_std:
            return x * self.scale
        return x.copy()


@register(_FEATURE + "MinMaxScalerModel")
class MinMaxScaler(VectorMap):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        data = read_data_row(meta)
        self.lo, hi = to_vector(data["originalMin"]), to_vector(data["originalMax"])
        self.size = len(self.lo)
        self.min, span = float(meta.get("min", 0.0)), float(meta.get("max", 1.0)) - float(meta.get("min", 0.0))
        rng = hi - self.lo
        with np.errstate(divide="ignore", invalid="ignore"):
            self.scale = np.where(rng != 0.0, span / rng, 0.0)
        self.constant = self.scale == 0.0  # constant feature -> the middle of [min, max]
        self.constant_value = 0.5 * span + self.min

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = (x - self.lo) * self.scale + self.min
        out = np.where(self.constant, self.constant_value, out)
        return np.where(np.isnan(x), x, out)


@register(_FEATURE + "MaxAbsScalerModel")
class MaxAbsScaler(VectorMap):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        max_abs = to_vector(read_data_row(meta)["maxAbs"])
        self.size = len(max_abs)
        with np.errstate(divide="ignore"):
            self.scale = np.where(max_abs == 0.0, 1.0, 1.0 / max_abs)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale


@register(_FEATURE + "Normalizer")
class Normalizer(VectorMap):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.p = float(meta.get("p", 2.0))
        if self.p < 1.0:
            raise unsupported(meta, f"p={self.p} (Spark requires p >= 1)")

    def apply(self, x: np.ndarray) -> np.ndarray:
        a = np.abs(x)
        if self.p == 1.0:
            norm = a.sum(axis=1)
        elif self.p == 2.0:
            norm = np.sqrt((x * x).sum(axis=1))
        elif np.isinf(self.p):
            norm = np.where(np.isnan(a), 0.0, a).max(axis=1, initial=0.0)  # Spark's max skips NaN
        else:
            norm = np.power(np.power(a, self.p).sum(axis=1), 1.0 / self.p)
        norm = norm.reshape(-1, 1)
        zero = norm == 0.0
        return np.where(zero, x, x / np.where(zero, 1.0, norm))


@register(_FEATURE + "PCAModel")
class PCA(VectorMap):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        require_spark3(meta)
        self.pc = to_matrix(read_data_row(meta)["pc"])  # (input size, k)
        self.size = self.pc.shape[0]

    def output_size(self, input_type: ColumnType) -> int:
        return self.pc.shape[1]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return x @ self.pc


@register(_FEATURE + "Binarizer")
class Binarizer(Stage):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        pairs = in_out_columns(meta)
        if meta.is_set("inputCols"):
            thresholds = [float(t) for t in meta.params["thresholds"]]
        else:
            thresholds = [float(meta.get("threshold", 0.0))]
        self.columns = [(i, o, t) for (i, o), t in zip(pairs, thresholds)]
        self.reads = [i for i, _, _ in self.columns]

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {o: (types[i] if types[i].kind == "vector" else DOUBLE) for i, o, _ in self.columns}

    def transform(self, frame: Frame) -> None:
        for inp, out, t in self.columns:
            col = frame[inp]
            if col.ndim == 2:
                x = frame.vector(inp)
                # Spark's vector path for t < 0 starts from ones and clears values <= t,
                # so NaN becomes 1 there (and 0 on the t >= 0 path)
                hit = (x > t) if t >= 0 else ~(x <= t)
            else:
                hit = frame.double(inp) > t
            frame[out] = hit.astype(np.float64)


def _java_order(x: np.ndarray) -> np.ndarray:
    # java.util.Arrays.binarySearch orders -0.0 before 0.0; NumPy treats them as equal
    return np.where((x == 0.0) & np.signbit(x), -np.finfo(np.float64).smallest_subnormal, x)


@register(_FEATURE + "Bucketizer")
class Bucketizer(Stage):
    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        pairs = in_out_columns(meta)
        if meta.is_set("inputCols"):
            splits = meta.params["splitsArray"]
        else:
            splits = [meta.params["splits"]]
        self.columns = [(i, o, np.array([float(s) for s in sp])) for (i, o), sp in zip(pairs, splits)]
        self.reads = [i for i, _, _ in self.columns]
        self.handle = meta.get("handleInvalid", "error")

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        return {o: DOUBLE for _, o, _ in self.columns}

    def transform(self, frame: Frame) -> None:
        if self.handle == "skip":
            nan = np.zeros(frame.n, dtype=bool)
            for inp in self.reads:
                nan |= np.isnan(frame.double(inp))
            frame.keep(~nan)
        for inp, out, splits in self.columns:
            frame[out] = self._buckets(frame.double(inp), splits)

    def _buckets(self, x: np.ndarray, splits: np.ndarray) -> np.ndarray:
        nan = np.isnan(x)
        if nan.any() and self.handle == "error":
            raise InvalidInput(
                "Bucketizer encountered NaN value. To handle or skip NaNs, try setting Bucketizer.handleInvalid."
            )
        xs, ss = _java_order(x), _java_order(splits)
        outside = ((xs < ss[0]) | (xs > ss[-1])) & ~nan
        if outside.any():
            bad = x[outside][0]
            raise InvalidInput(
                f"Feature value {bad} out of Bucketizer bounds [{splits[0]}, {splits[-1]}]. "
                "Check your features, or loosen the lower/upper bound constraints."
            )
        idx = np.searchsorted(ss, xs, side="right") - 1
        idx = np.where(x == splits[-1], len(splits) - 2, idx)
        return np.where(nan, float(len(splits) - 1), idx.astype(np.float64))
