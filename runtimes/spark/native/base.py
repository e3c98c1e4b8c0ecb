"""What every native stage shares: column types, the batch frame, the stage base class.

Column representation (batch-major, one NumPy array per column):

* ``double``: 1-D float64 (Spark's numeric columns; ints and bools are cast);
* ``string``: 1-D object array of ``str`` (``None`` is Spark's null);
* ``vector``: 2-D float64, one row per record. Spark's sparse vectors are densified,
  so a 262144-wide HashingTF output really is that wide;
* ``strings``: 1-D object array of lists of ``str`` (Spark's ``array<string>``).

Columns never hold nulls for numbers: the wire (OIP tensors) has none, so NaN is the
only missing value a native stage sees, and it follows Spark's NaN semantics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from sluice.tensors import TensorError


class UnsupportedStage(Exception):
    """A stage (or one of its settings) the native evaluator does not reproduce.

    Raised at load time, so the caller can fall back to real Spark.
    """


class InvalidInput(TensorError):
    """Data Spark itself would reject (``handleInvalid="error"``, bad feature size...).

    A ``TensorError`` (a ``ValueError``), so a runtime answers INVALID_ARGUMENT.
    """


@dataclass(frozen=True, slots=True)
class ColumnType:
    """Spark type of a column as far as serving needs it."""

    kind: str  # "double" | "string" | "vector" | "strings"
    size: int = -1  # vector length, -1 when unknown
    labels: tuple[str, ...] | None = None  # nominal values (StringIndexer output)


DOUBLE = ColumnType("double")
STRING = ColumnType("string")
STRINGS = ColumnType("strings")


def vector(size: int = -1) -> ColumnType:
    return ColumnType("vector", int(size))


@dataclass(frozen=True)
class StageMeta:
    """One saved stage: its Spark class, params (defaults overlaid by explicit ones), files."""

    class_name: str
    uid: str
    spark_version: str
    params: Mapping[str, Any]
    explicit: frozenset[str]  # params set explicitly (paramMap), not defaults
    path: Any  # pathlib.Path of the stage directory
    extra: Mapping[str, Any]  # other top-level metadata keys (numFeatures, numTrees...)

    @property
    def short_name(self) -> str:
        return self.class_name.rsplit(".", 1)[-1]

    def get(self, name: str, default: Any = None) -> Any:
        return self.params.get(name, default)

    def is_set(self, name: str) -> bool:
        return name in self.explicit


class Frame:
    """The columns of one batch, plus which input rows are still present.

    ``rows`` stays ``None`` until a stage drops rows (``handleInvalid="skip"``); then it
    holds the original indices of the surviving rows.
    """

    __slots__ = ("columns", "n", "rows")

    def __init__(self, columns: Mapping[str, np.ndarray], n: int):
        self.columns: dict[str, np.ndarray] = dict(columns)
        self.n = n
        self.rows: np.ndarray | None = None

    def keep(self, mask: np.ndarray) -> None:
        """Drop the rows where ``mask`` is False from every column."""
        if mask.all():
            return
        self.columns = {name: col[mask] for name, col in self.columns.items()}
        base = np.arange(self.n) if self.rows is None else self.rows
        self.rows = base[mask]
        self.n = int(mask.sum())

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.columns[name]
        except KeyError:
            raise InvalidInput(f"column {name!r} is missing") from None

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self.columns[name] = value

    def double(self, name: str) -> np.ndarray:
        col = self[name]
        if col.ndim != 1 or col.dtype.kind not in "fiub":
            raise InvalidInput(f"column {name!r} must be a 1-D numeric array, got {col.dtype} {col.shape}")
        return col if col.dtype == np.float64 else col.astype(np.float64)

    def vector(self, name: str, size: int = -1) -> np.ndarray:
        col = self[name]
        if col.ndim != 2 or col.dtype.kind not in "fiub":
            raise InvalidInput(f"column {name!r} must be a 2-D numeric array (a vector per row)")
        if size >= 0 and col.shape[1] != size:
            raise InvalidInput(f"column {name!r} has vectors of size {col.shape[1]}, the model expects {size}")
        return col if col.dtype == np.float64 else col.astype(np.float64)

    def strings(self, name: str) -> np.ndarray:
        col = self[name]
        if col.ndim != 1:
            raise InvalidInput(f"column {name!r} must be a 1-D array of strings")
        if col.dtype.kind in "iu":
            # Spark casts integer columns to their decimal text; floats are left out
            # because Java and Python print doubles differently.
            return np.array([str(v) for v in col.tolist()], dtype=object)
        if col.dtype.kind not in "OU":
            raise InvalidInput(f"column {name!r} must hold strings, got {col.dtype}")
        return col

    def string_lists(self, name: str) -> np.ndarray:
        col = self[name]
        if col.ndim == 2:  # a padded 2-D array of tokens: each row is one list
            out = np.empty(col.shape[0], dtype=object)
            out[:] = [list(row) for row in col.tolist()]
            return out
        if col.ndim != 1 or col.dtype != object:
            raise InvalidInput(f"column {name!r} must be an object array of string lists")
        return col


class Stage:
    """A native stage: built from a saved stage's metadata and data, then applied to frames.

    Subclasses read everything they need in ``__init__`` (raising ``UnsupportedStage``
    for settings they do not reproduce), declare the columns they read in ``reads``,
    and implement ``output_types`` and ``transform``.
    """

    #: Spark class names this implementation serves (filled by the registry decorator)
    spark_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, meta: StageMeta):
        self.meta = meta
        self.reads: list[str] = []

    def input_type(self, column: str) -> ColumnType:
        """The type this stage expects for ``column`` when it comes straight from the caller."""
        return DOUBLE

    def output_types(self, types: Mapping[str, ColumnType]) -> dict[str, ColumnType]:
        """Columns this stage adds, with their types, given the types of what it reads."""
        raise NotImplementedError

    def transform(self, frame: Frame) -> None:
        """Add this stage's columns to ``frame`` (and drop rows if it skips invalid ones)."""
        raise NotImplementedError

    @property
    def may_drop_rows(self) -> bool:
        return self.meta.get("handleInvalid") == "skip"


class UnaryStage(Stage):
    """A stage of one ``inputCol`` and one ``outputCol``."""

    def __init__(self, meta: StageMeta):
        super().__init__(meta)
        self.inp, self.out = meta.params["inputCol"], meta.params["outputCol"]
        self.reads = [self.inp]


def unsupported(meta: StageMeta, why: str) -> UnsupportedStage:
    return UnsupportedStage(f"{meta.short_name} ({meta.uid}): {why}")


def in_out_columns(meta: StageMeta) -> list[tuple[str, str]]:
    """(input, output) column pairs of a stage with inputCol/outputCol or inputCols/outputCols."""
    if meta.is_set("inputCols"):
        ins, outs = list(meta.params["inputCols"]), list(meta.get("outputCols", []))
        if len(ins) != len(outs):
            raise unsupported(meta, "inputCols and outputCols differ in length")
        return list(zip(ins, outs))
    if "inputCol" not in meta.params:
        raise unsupported(meta, "no input column is set")
    return [(meta.params["inputCol"], meta.params["outputCol"])]


def non_empty(names: Iterable[str | None]) -> list[str]:
    return [n for n in names if n]
