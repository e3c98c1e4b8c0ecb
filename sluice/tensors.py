"""Tensor codecs: NumPy arrays <-> Open Inference Protocol v2 tensors <-> JSON records.

One layer, three representations:

* NumPy arrays, what models compute on;
* OIP v2 wire tensors (``InferInputTensor``/``InferOutputTensor`` metadata plus
  ``raw_*_contents`` bytes), what travels between the gateway and runtimes. Strings
  are OIP ``BYTES``: each element a 4-byte little-endian length then its bytes,
  exactly Triton's layout, so Triton and MLServer read what we write;
* JSON records (a list of flat dicts), what users send to ``/serve/<pipeline>``.

Nothing here knows about pipelines or models; it only converts.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tritonclient.grpc import service_pb2 as pb

# OIP datatype name -> NumPy dtype. BYTES maps to object arrays of bytes.
DATATYPE_TO_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
_DTYPE_TO_DATATYPE = {v: k for k, v in DATATYPE_TO_DTYPE.items() if k != "BYTES"}

# Typed-contents field of InferTensorContents for each datatype (for peers that do
# not send raw contents, e.g. MLServer answers in typed fields).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP16": "fp32_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class TensorError(ValueError):
    """Input that cannot be turned into (or read as) a tensor; the message says why."""


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, OIP datatype and shape of one tensor; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorSpec":
        datatype = str(d["datatype"]).upper()
        if datatype not in DATATYPE_TO_DTYPE:
            raise TensorError(f"unknown datatype {datatype!r} for tensor {d.get('name')!r}")
        return cls(name=str(d["name"]), datatype=datatype, shape=tuple(int(x) for x in d["shape"]))


def datatype_of(array: np.ndarray) -> str:
    """OIP datatype of a NumPy array (object and string arrays are BYTES)."""
    if array.dtype.kind in ("O", "U", "S"):
        return "BYTES"
    try:
        return _DTYPE_TO_DATATYPE[array.dtype.newbyteorder("=")]
    except KeyError as exc:
        raise TensorError(f"dtype {array.dtype} has no OIP datatype") from exc


# --- BYTES serialisation -------------------------------------------------------


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if value is None:
        return b""
    return str(value).encode("utf-8")


def encode_bytes(array: np.ndarray) -> bytes:
    """Serialise a BYTES tensor (row-major) as length-prefixed elements."""
    items = [_as_bytes(v) for v in array.reshape(-1)]
    lengths = struct.pack(f"<{len(items)}I", *(len(b) for b in items))
    # interleave: <len0><bytes0><len1><bytes1>...
    parts: list[bytes] = []
    for i, b in enumerate(items):
        parts.append(lengths[4 * i : 4 * i + 4])
        parts.append(b)
    return b"".join(parts)


def decode_bytes(raw: bytes, shape: Sequence[int], max_elements: int | None = None) -> np.ndarray:
    """Read length-prefixed elements back into an object array of ``bytes``.

    The shape is checked against the data before anything is allocated: each element
    takes at least its 4-byte length, so a shape that claims more cannot pass."""
    count = element_count(shape, max_elements)
    size = len(raw)
    if count * 4 > size:
        raise TensorError(
            f"BYTES tensor is shorter than its shape says: shape {list(shape)} needs at least {count * 4} bytes, got {size}"
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    pos = 0
    for i in range(count):
        if pos + 4 > size:
            raise TensorError("BYTES tensor is shorter than its shape says")
        (n,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + n > size:
            raise TensorError("BYTES element runs past the end of the tensor")
        out[i] = bytes(view[pos : pos + n])
        pos += n
    if pos != size:
        raise TensorError("BYTES tensor is longer than its shape says")
    return out.reshape(tuple(shape))


# --- NumPy <-> raw bytes -------------------------------------------------------


def to_raw(array: np.ndarray, datatype: str | None = None) -> tuple[str, bytes]:
    """Array -> (OIP datatype, raw little-endian bytes)."""
    datatype = datatype or datatype_of(array)
    if datatype == "BYTES":
        return datatype, encode_bytes(array)
    dtype = DATATYPE_TO_DTYPE[datatype].newbyteorder("<")
    return datatype, np.ascontiguousarray(array, dtype=dtype).tobytes()


#: the most elements a decoded tensor (or all of a request's tensors) may hold when the
#: caller sets no cap; runtimes set theirs (``SLUICE_RUNTIME_MAX_TENSOR_ELEMENTS``)
MAX_ELEMENTS = 64 << 20
#: the most dimensions a tensor may have (NumPy's own limit is 64)
MAX_RANK = 32


def _exact_count(shape: Sequence[int]) -> int:
    """Elements in ``shape`` as a Python int, refusing negative dimensions and too many."""
    if len(shape) > MAX_RANK:
        raise TensorError(f"shape has {len(shape)} dimensions, at most {MAX_RANK} are allowed")
    if any(d < 0 for d in shape):
        raise TensorError(f"shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def element_count(shape: Sequence[int], max_elements: int | None = None) -> int:
    """Elements in ``shape``, computed with Python ints (no overflow), or TensorError.

    Refused: a negative dimension, more than MAX_RANK dimensions, and a shape that
    holds (or, ignoring its zero dimensions, would hold) more than ``max_elements``."""
    limit = MAX_ELEMENTS if max_elements is None else max_elements
    _exact_count(shape)
    # zero dimensions aside: NumPy refuses [0, 2**62] too, and it is never meant
    if math.prod(d for d in shape if d) > limit:
        raise TensorError(f"shape {list(shape)} holds more than {limit} elements, the most a tensor may hold here")
    return math.prod(shape)


def from_raw(raw: bytes, datatype: str, shape: Sequence[int], max_elements: int | None = None) -> np.ndarray:
    """Raw bytes -> array of the given datatype and shape (zero-copy for numerics).

    The size the shape implies is compared with ``len(raw)`` before anything is made."""
    if datatype == "BYTES":
        return decode_bytes(raw, shape, max_elements)
    try:
        dtype = DATATYPE_TO_DTYPE[datatype].newbyteorder("<")
    except KeyError as exc:
        raise TensorError(f"unknown datatype {datatype!r} (one of {', '.join(DATATYPE_TO_DTYPE)})") from exc
    expected = element_count(shape, max_elements) * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"{datatype} tensor of shape {list(shape)} needs {expected} bytes, got {len(raw)}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))


def from_contents(
    contents: pb.InferTensorContents, datatype: str, shape: Sequence[int], max_elements: int | None = None
) -> np.ndarray:
    """Typed ``InferTensorContents`` -> array (for peers that do not send raw bytes).

    The number of values is compared with the shape before any array is made, and
    integers outside the datatype's range are refused."""
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise TensorError(f"unknown datatype {datatype!r} (one of {', '.join(DATATYPE_TO_DTYPE)})")
    count = _exact_count(shape)  # a Python int: compared with the values actually sent
    values = getattr(contents, field)
    if len(values) != count:
        raise TensorError(
            f"{len(values)} values do not fill shape {list(shape)} ({count} {datatype} elements in contents.{field})"
        )
    element_count(shape, max_elements)
    others = [f.name for f, _ in contents.ListFields() if f.name != field]
    if others:
        raise TensorError(f"a {datatype} tensor takes its values in contents.{field}, not {', '.join(others)}")
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(tuple(shape))
    dtype = DATATYPE_TO_DTYPE[datatype]
    if dtype.kind in "iu" and count:
        wide = np.asarray(values, dtype=np.uint64 if field == "uint64_contents" else np.int64)
        info = np.iinfo(dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise TensorError(f"a value in contents.{field} is out of {datatype}'s range")
        return wide.astype(dtype).reshape(tuple(shape))
    return np.asarray(values, dtype=dtype).reshape(tuple(shape))


# --- requests and responses ------------------------------------------------------


def _has_contents(tensor) -> bool:
    return tensor.HasField("contents") and bool(tensor.contents.ListFields())


def _decode(tensors, raw: Sequence[bytes], what: str, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Every tensor, raw or typed, checked (sizes before allocation; ``max_elements``
    caps all of them together) and decoded; TensorError naming the tensor."""
    if raw and len(raw) != len(tensors):
        raise TensorError(f"raw_{what}_contents must hold one entry per {what}: {len(raw)} entries for {len(tensors)} {what}s")
    budget = MAX_ELEMENTS if max_elements is None else max_elements
    out: dict[str, np.ndarray] = {}
    for i, t in enumerate(tensors):
        name = t.name
        if name in out:
            raise TensorError(f"{what} {name!r} is given twice")
        try:
            if raw:
                if _has_contents(t):
                    raise TensorError(f"typed contents and raw_{what}_contents cannot be mixed: send one or the other")
                array = from_raw(raw[i], t.datatype, t.shape, budget)
            else:
                array = from_contents(t.contents, t.datatype, t.shape, budget)
        except TensorError as exc:
            raise TensorError(f"{what} {name!r}: {exc}") from None
        budget -= array.size
        out[name] = array
    return out


def request_inputs(request: pb.ModelInferRequest, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Decode every input of a ModelInferRequest, raw or typed, into arrays.

    Hostile input (a shape that overflows or is huge, a negative dimension, an
    unknown datatype, contents of the wrong length, lying BYTES lengths, raw and typed
    contents mixed) raises TensorError before anything is allocated from it;
    ``max_elements`` (default MAX_ELEMENTS) caps the elements of all inputs together."""
    return _decode(request.inputs, request.raw_input_contents, "input", max_elements)


def response_outputs(response: pb.ModelInferResponse, max_elements: int | None = None) -> dict[str, np.ndarray]:
    """Decode every output of a ModelInferResponse, raw or typed, into arrays."""
    return _decode(response.outputs, response.raw_output_contents, "output", max_elements)


def fill_response(
    response: pb.ModelInferResponse,
    outputs: Mapping[str, np.ndarray],
    specs: Mapping[str, TensorSpec] | None = None,
) -> pb.ModelInferResponse:
    """Append ``outputs`` to a response as raw contents (datatype from spec or array)."""
    for name, array in outputs.items():
        spec = specs.get(name) if specs else None
        datatype, raw = to_raw(array, spec.datatype if spec else None)
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(raw)
    return response


def raw_outputs(response: pb.ModelInferResponse) -> dict[str, tuple[str, list[int], bytes]]:
    """Each output as (datatype, shape, raw bytes), converting typed contents if needed.

    This is the gateway's pass-through between stages: raw bytes are forwarded as
    they came, without decoding them into arrays.
    """
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise TensorError("raw_output_contents must hold one entry per output")
    out: dict[str, tuple[str, list[int], bytes]] = {}
    for i, tensor in enumerate(response.outputs):
        shape = list(tensor.shape)
        if raw:
            out[tensor.name] = (tensor.datatype, shape, raw[i])
        else:
            array = from_contents(tensor.contents, tensor.datatype, shape)
            out[tensor.name] = (tensor.datatype, shape, to_raw(array, tensor.datatype)[1])
    return out


# --- JSON records <-> columns ---------------------------------------------------


def records_to_arrays(records: Sequence[Mapping[str, Any]], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Columns named by ``specs`` taken from JSON records, typed by each spec.

    A spec of shape ``[-1]`` takes a scalar per record; ``[-1, k]`` a list of k per
    record. A missing field or a value of the wrong type raises TensorError naming it.
    """
    if not records:
        raise TensorError("no records: send a non-empty list of JSON objects")
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        try:
            column = [record[spec.name] for record in records]
        except KeyError:
            raise TensorError(f"field {spec.name!r} is missing from a record") from None
        except TypeError:
            raise TensorError("each record must be a JSON object") from None
        arrays[spec.name] = _column_array(column, spec)
    return arrays


def _column_array(column: list[Any], spec: TensorSpec) -> np.ndarray:
    if spec.datatype == "BYTES":
        arr = np.empty(len(column), dtype=object)
        for i, value in enumerate(column):
            if isinstance(value, (dict, list)):
                raise TensorError(f"field {spec.name!r} must be a string, got {type(value).__name__}")
            arr[i] = _as_bytes(value)
        return arr
    dtype = DATATYPE_TO_DTYPE[spec.datatype]
    try:
        arr = np.asarray(column, dtype=dtype)
    except (TypeError, ValueError, OverflowError):
        raise TensorError(f"field {spec.name!r} must hold {spec.datatype} values") from None
    if _leaf_types(column) <= _PLAIN_TYPES.get(dtype.kind, _NUMBERS):
        pass  # the common case, checked at C speed: every value (of a scalar or one-list column) is plain
    elif _has_text(column):
        raise TensorError(f"field {spec.name!r} must hold {spec.datatype} values, got strings")
    elif not _leaves_are(column, _JSON_KIND.get(dtype.kind, _is_number)):
        # NumPy would read true as 1.0, null as NaN and 0 as False: refused, not guessed
        raise TensorError(f"field {spec.name!r} must hold {spec.datatype} values" + {"b": ", got a non-boolean", "f": ", got null or a boolean"}.get(dtype.kind, ", got null, a boolean or a fraction"))
    expected_rank = max(len(spec.shape), 1)
    if arr.ndim != expected_rank:
        raise TensorError(f"field {spec.name!r} must have shape {list(spec.shape)}, got rank {arr.ndim}")
    for got, want in zip(arr.shape[1:], spec.shape[1:]):
        if want != -1 and got != want:
            raise TensorError(f"field {spec.name!r} must have shape {list(spec.shape)}, got {list(arr.shape)}")
    return arr


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_integer(value: Any) -> bool:
    """An integer as JSON Schema counts them: 2 and 2.0, not 2.5 (NumPy would truncate it)."""
    return _is_number(value) and (isinstance(value, int) or value.is_integer())


#: what a JSON value must be for a tensor of each NumPy kind (others: any number)
_JSON_KIND = {"b": lambda v: isinstance(v, bool), "i": _is_integer, "u": _is_integer}


_NUMBERS = frozenset({int, float})
#: value types that always pass a NumPy kind's checks below (``bool`` is not an ``int`` here)
_PLAIN_TYPES = {"b": frozenset({bool}), "i": frozenset({int}), "u": frozenset({int})}


def _leaf_types(column: list[Any]) -> set[type] | frozenset[type]:
    """The exact types of a column's values, for a column of scalars or of flat lists; a
    set holding ``list`` when nested deeper (the slow checks then decide)."""
    types = set(map(type, column))
    if list in types and len(types) == 1:
        types = set(map(type, itertools.chain.from_iterable(column)))
    return types


def _leaves_are(values: list[Any], test) -> bool:
    """Whether ``test`` holds for every value, at any list depth."""
    return all(_leaves_are(v, test) if isinstance(v, list) else test(v) for v in values)


def _has_text(values: list[Any]) -> bool:
    """Whether any value, at any list depth, is a string (NumPy would parse it as a number)."""
    return any(isinstance(v, (str, bytes)) or (isinstance(v, list) and _has_text(v)) for v in values)


def arrays_to_records(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Row-wise records from batch-major arrays; BYTES become UTF-8 strings."""
    columns: dict[str, list[Any]] = {}
    n = None
    for name, array in arrays.items():
        if array.ndim == 0:
            array = array.reshape(1)
        if array.dtype == object:
            values = [_to_text(v) for v in array.reshape(-1)]
            if array.ndim > 1:
                values = np.asarray(values, dtype=object).reshape(array.shape).tolist()
        else:
            values = array.tolist()
        columns[name] = values
        n = len(values) if n is None else min(n, len(values))
    names = list(columns)
    return [{name: columns[name][i] for name in names} for i in range(n or 0)]


def _to_text(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    return value
