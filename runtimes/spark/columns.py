"""Between OIP tensors and pipeline columns, both ways, for both execution paths.

Inputs: ``BYTES`` tensors arrive as object arrays of ``bytes`` and become ``str``
columns (a 2-D one becomes a column of token lists); numeric tensors are cast to
their spec's dtype; ``[-1, k]`` tensors are vector columns.
Outputs: vectors stay 2-D float64, strings go back to UTF-8 ``bytes``, token lists
are padded with ``b""`` into a 2-D array, and ``row_index`` says which input row
each output row came from (it differs from ``arange(n)`` only when a stage skips rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from sluice.tensors import DATATYPE_TO_DTYPE, TensorError, TensorSpec

ROW_INDEX = "row_index"


def _decode(value: object, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise TensorError(f"input {name!r} holds bytes that are not UTF-8") from None
    if isinstance(value, str):
        return value
    raise TensorError(f"input {name!r} must hold strings, got {type(value).__name__}")


def to_columns(inputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> tuple[dict[str, np.ndarray], int]:
    """Input tensors -> pipeline columns, and the batch size."""
    columns: dict[str, np.ndarray] = {}
    sizes = set()
    for spec in specs:
        if spec.name not in inputs:
            raise TensorError(f"input {spec.name!r} is missing")
        array = np.asarray(inputs[spec.name])
        want = spec.shape or (-1,)
        if array.ndim != len(want) or (array.ndim == 2 and want[1] not in (-1, array.shape[1])):
            raise TensorError(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(array.shape)}")
        if spec.datatype == "BYTES":
            text = [_decode(v, spec.name) for v in array.reshape(-1).tolist()]
            column = np.empty(len(array), dtype=object)
            if array.ndim == 1:
                column[:] = text
            else:
                width = array.shape[1]
                column[:] = [text[i * width : (i + 1) * width] for i in range(len(array))]
        else:
            try:
                column = array.astype(DATATYPE_TO_DTYPE[spec.datatype], copy=False)
            except (TypeError, ValueError):
                raise TensorError(f"input {spec.name!r} must hold {spec.datatype} values") from None
        columns[spec.name] = column
        sizes.add(len(array))
    if len(sizes) > 1:
        raise TensorError(f"inputs differ in batch size: {sorted(sizes)}")
    return columns, (sizes.pop() if sizes else 0)


def _padded_bytes(lists: np.ndarray) -> np.ndarray:
    width = max((len(x) for x in lists), default=0)
    out = np.full((len(lists), width), b"", dtype=object)
    for i, tokens in enumerate(lists):
        out[i, : len(tokens)] = [t.encode("utf-8") if t is not None else b"" for t in tokens]
    return out


def to_tensors(columns: Mapping[str, np.ndarray], rows: np.ndarray, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Pipeline columns (those named by ``specs``) -> output tensors."""
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name == ROW_INDEX and spec.name not in columns:
            out[spec.name] = rows.astype(np.int64)
            continue
        column = columns[spec.name]
        if spec.datatype != "BYTES":
            out[spec.name] = column.astype(DATATYPE_TO_DTYPE[spec.datatype], copy=False)
        elif len(spec.shape) > 1:
            out[spec.name] = _padded_bytes(column)
        else:
            encoded = np.empty(len(column), dtype=object)
            encoded[:] = [v.encode("utf-8") if isinstance(v, str) else (v or b"") for v in column.tolist()]
            out[spec.name] = encoded
    return out


def empty_arrays(specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Zero-row arrays shaped and typed as ``specs`` say."""
    out = {}
    for spec in specs:
        shape = (0, max(spec.shape[1], 0)) if len(spec.shape) > 1 else (0,)
        out[spec.name] = np.empty(shape, dtype=DATATYPE_TO_DTYPE[spec.datatype])
    return out
