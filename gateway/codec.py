"""The gateway's edge codec: every conversion between what clients send and the raw
tensors that travel between stages, in one place.

* Records (``/serve/<p>``): a body is a list of records (flat JSON objects) or one
  record. The first stage's signature says which fields become which tensors; the
  last stage's outputs become the answer's fields, one record per input row.
* OIP tensors at the front door (``/v2/models/<p>/infer`` and gRPC ``ModelInfer``):
  JSON ``data``, Triton's binary tensor extension, raw or typed gRPC contents, all
  checked against what the request claims before anything is allocated, and
  against the pipeline's signature, then turned into raw tensors; outputs back to
  JSON ``data`` or binary. The array conversions themselves are ``sluice.tensors``',
  the ones the runtimes use.
* Protobuf answers (ModelConfig, ModelStatistics, ...) as Triton's HTTP API writes
  them (``message_json``).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb

from gateway.executor import RawTensor
from gateway.graph import Answer
from gateway.pipelines import CompiledPipeline
from sluice.tensors import (
    DATATYPE_TO_DTYPE,
    TensorError,
    arrays_to_records,
    encode_bytes,
    from_contents,
    from_raw,
    records_to_arrays,
    to_raw,
)


def parse_records(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """Records from a request body, and whether it was a single record."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise TensorError(f"body is not valid JSON: {exc}") from None
    if isinstance(data, dict):
        return [data], True
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data, False
    raise TensorError("body must be a JSON object (one record) or a list of objects")


def encode_inputs(pipeline: CompiledPipeline, records: list[dict[str, Any]]) -> dict[str, RawTensor]:
    arrays = records_to_arrays(records, pipeline.inputs)
    out: dict[str, RawTensor] = {}
    for spec in pipeline.inputs:
        array = arrays[spec.name]
        datatype, raw = to_raw(array, spec.datatype)
        out[spec.name] = (datatype, list(array.shape), raw)
    return out


def decode_outputs(outputs: dict[str, RawTensor], single: bool) -> bytes:
    arrays = {name: from_raw(raw, datatype, shape) for name, (datatype, shape, raw) in outputs.items()}
    records = arrays_to_records(arrays)
    if isinstance(outputs, Answer):
        for name, rows in outputs.absent.items():  # a graph's field that no stage gave these records
            for row in rows:
                records[row].pop(name, None)
    return orjson.dumps(records[0] if single and records else records)


# --- OIP tensors at the front door: REST JSON, REST binary, gRPC -> RawTensor and back
#
# Every check here runs before anything is allocated from what a request claims: a
# shape's element count is a Python int compared with the bytes (or values) actually
# sent, so a shape of 10**12 costs nothing and a lying length is refused.

#: the rank a front-door tensor may have (OIP sets none; this bounds the work on a shape)
MAX_RANK = 64
_INT_KINDS = "iu"
_FLOAT_KINDS = "iuf"


def tensor_count(name: str, shape: Sequence[Any]) -> int:
    """Elements in ``shape`` (a list of non-negative ints), or TensorError naming ``name``."""
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_RANK:
        raise TensorError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise TensorError(f"tensor {name!r}: shape {list(shape)} must hold non-negative integers")
    return math.prod(shape)


def _datatype(name: str, datatype: Any) -> str:
    if not isinstance(datatype, str) or datatype not in DATATYPE_TO_DTYPE:
        raise TensorError(f"tensor {name!r}: unknown datatype {datatype!r} (one of {', '.join(DATATYPE_TO_DTYPE)})")
    return datatype


def check_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> None:
    """``raw`` holds exactly one ``datatype`` tensor of ``shape`` (Triton's layout for BYTES)."""
    count = tensor_count(name, shape)
    _datatype(name, datatype)
    if datatype != "BYTES":
        need = count * DATATYPE_TO_DTYPE[datatype].itemsize
        if len(raw) != need:
            raise TensorError(f"tensor {name!r}: {datatype} of shape {list(shape)} needs {need} bytes, got {len(raw)}")
        return
    size = len(raw)
    if count * 4 > size:
        raise TensorError(f"tensor {name!r}: BYTES of shape {list(shape)} needs at least {count * 4} bytes, got {size}")
    pos = 0
    for _ in range(count):
        if pos + 4 > size:
            raise TensorError(f"tensor {name!r}: BYTES data is shorter than its shape {list(shape)} says")
        (length,) = struct.unpack_from("<I", raw, pos)
        pos += 4 + length
        if pos > size:
            raise TensorError(f"tensor {name!r}: a BYTES element runs past the end of the data")
    if pos != size:
        raise TensorError(f"tensor {name!r}: BYTES data is longer than its shape {list(shape)} says")


def grpc_inputs(request: pb.ModelInferRequest) -> dict[str, RawTensor]:
    """A ModelInferRequest's inputs as raw tensors, raw or typed contents, checked.

    Typed contents are converted exactly as the runtimes convert them
    (``sluice.tensors.from_contents`` then ``to_raw``), so typed ``BYTES`` become
    Triton's length-prefixed layout."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs")
    out: dict[str, RawTensor] = {}
    for i, tensor in enumerate(request.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, list(tensor.shape)
        if name in out:
            raise TensorError(f"input {name!r} is given twice")
        if raw:
            if tensor.HasField("contents") and tensor.contents.ListFields():  # OIP: one or the other, as the runtimes refuse it
                raise TensorError(f"input {name!r}: typed contents and raw_input_contents cannot be mixed: send one or the other")
            check_raw(name, datatype, shape, raw[i])
            data = raw[i]
        else:
            tensor_count(name, shape)
            _datatype(name, datatype)
            try:
                data = to_raw(from_contents(tensor.contents, datatype, shape), datatype)[1]
            except TensorError as exc:
                raise TensorError(f"input {name!r}: {exc}") from None
        out[name] = (datatype, shape, data)
    return out


def check_inputs(pipeline: CompiledPipeline, inputs: Mapping[str, RawTensor]) -> int:
    """``inputs`` are exactly the pipeline's, each of its datatype and shape; returns
    the rows (the first input's leading dimension)."""
    specs = pipeline.inputs
    for spec in specs:
        tensor = inputs.get(spec.name)
        if tensor is None:
            takes = ", ".join(f"{s.name} ({s.datatype} {list(s.shape)})" for s in specs)
            raise TensorError(f"missing input {spec.name!r}: pipeline {pipeline.name!r} takes {takes}")
        datatype, shape, _ = tensor
        if datatype != spec.datatype:
            raise TensorError(f"input {spec.name!r} must be {spec.datatype}, got {datatype}")
        if len(shape) != len(spec.shape) or any(want != -1 and got != want for got, want in zip(shape, spec.shape)):
            raise TensorError(f"input {spec.name!r} must have shape {list(spec.shape)}, got {list(shape)}")
    if len(inputs) != len(specs):
        known = {s.name for s in specs}
        unknown = sorted(n for n in inputs if n not in known)
        raise TensorError(f"pipeline {pipeline.name!r} has no input {unknown[0]!r}; it takes {sorted(known)}")
    first = inputs[specs[0].name][1]
    return first[0] if first else 1


def check_outputs(pipeline: CompiledPipeline, wanted: Iterable[str]) -> None:
    names = {s.name for s in pipeline.outputs}
    for name in wanted:
        if name not in names:
            raise TensorError(f"pipeline {pipeline.name!r} has no output {name!r}; it answers {sorted(names)}")


@dataclass(slots=True)
class InferRequest:
    """An OIP REST inference request, read: raw input tensors and what to answer."""

    id: str | None
    inputs: dict[str, RawTensor]
    #: the requested outputs, each with whether it goes binary; None: all outputs
    outputs: dict[str, bool] | None
    binary_output: bool  # the request's ``binary_data_output`` parameter


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorError(f"{what} must be a JSON object")
    return value


def _flag(parameters: dict[str, Any], key: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise TensorError(f"parameter {key!r} must be true or false")
    return value


def parse_infer_request(body: bytes, header_length: int | None) -> InferRequest:
    """Read an OIP REST ``infer`` body: JSON, or (Triton's binary tensor extension) a
    JSON header of ``header_length`` bytes followed by the inputs' binary data, each
    input taking ``parameters.binary_data_size`` bytes in order."""
    if header_length is None:
        header, blobs = body, memoryview(b"")
    else:
        if header_length > len(body):
            raise TensorError(
                f"Inference-Header-Content-Length is {header_length} but the body holds only {len(body)} bytes"
            )
        header, blobs = body[:header_length], memoryview(body)[header_length:]
    try:
        request = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise TensorError(f"the inference request is not valid JSON: {exc}") from None
    request = _object(request, "the inference request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise TensorError("'id' must be a string")
    parameters = _object(request.get("parameters"), "'parameters'")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise TensorError("'inputs' must be a non-empty list of tensors")
    out: dict[str, RawTensor] = {}
    offset = 0
    for tensor in inputs:
        tensor = _object(tensor, "each input")
        name = tensor.get("name")
        if not isinstance(name, str) or not name:
            raise TensorError("each input needs a 'name' (a string)")
        if name in out:
            raise TensorError(f"input {name!r} is given twice")
        datatype = _datatype(name, tensor.get("datatype"))
        shape = tensor.get("shape")
        tensor_count(name, shape)
        size = _object(tensor.get("parameters"), f"input {name!r}: 'parameters'").get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise TensorError(f"input {name!r}: binary_data_size must be a non-negative integer")
            if "data" in tensor:
                raise TensorError(f"input {name!r} has both 'data' and binary_data_size")
            if offset + size > len(blobs):
                raise TensorError(
                    f"input {name!r}: binary_data_size {size} runs past the end of the body "
                    f"({len(blobs) - offset} binary bytes left)"
                )
            raw = blobs[offset : offset + size]
            offset += size
            check_raw(name, datatype, shape, raw)
            out[name] = (datatype, list(shape), bytes(raw))
        elif "data" in tensor:
            out[name] = (datatype, list(shape), json_data_to_raw(name, datatype, shape, tensor["data"]))
        else:
            raise TensorError(f"input {name!r} has no 'data' (nor binary_data_size)")
    if offset != len(blobs):
        raise TensorError(f"{len(blobs) - offset} bytes of binary data after the header belong to no input")
    wanted = None
    if "outputs" in request:
        outputs = request["outputs"]
        if not isinstance(outputs, list):
            raise TensorError("'outputs' must be a list")
        wanted = {}
        for output in outputs:
            output = _object(output, "each output")
            name = output.get("name")
            if not isinstance(name, str):
                raise TensorError("each output needs a 'name' (a string)")
            output_parameters = _object(output.get("parameters"), f"output {name!r}: 'parameters'")
            if output_parameters.get("classification"):
                raise TensorError(f"output {name!r}: the classification extension is not supported")
            wanted[name] = _flag(output_parameters, "binary_data")
    return InferRequest(request_id, out, wanted, _flag(parameters, "binary_data_output"))


def json_data_to_raw(name: str, datatype: str, shape: Sequence[int], data: Any) -> bytes:
    """OIP JSON ``data`` (flat row-major, or nested) -> raw bytes of ``datatype``."""
    count = tensor_count(name, shape)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        items = _flatten(data)
        if len(items) != count:
            raise TensorError(f"input {name!r}: {len(items)} values do not fill shape {list(shape)} ({count} elements)")
        if not all(isinstance(v, str) for v in items):
            raise TensorError(f"input {name!r}: BYTES data must be strings")
        array = np.empty(count, dtype=object)
        array[:] = items
        return encode_bytes(array)
    try:
        array = np.asarray(data)
    except (ValueError, OverflowError):
        raise TensorError(f"input {name!r}: data must be a list of numbers (nested lists of one length)") from None
    if array.size != count:
        raise TensorError(f"input {name!r}: {array.size} values do not fill shape {list(shape)} ({count} elements)")
    dtype = DATATYPE_TO_DTYPE[datatype]
    kind = array.dtype.kind
    if count and not (
        (datatype == "BOOL" and kind == "b")
        or (dtype.kind in "iu" and kind in _INT_KINDS)
        or (dtype.kind == "f" and kind in _FLOAT_KINDS)
    ):
        want = {"b": "true/false", "f": "numbers"}.get(dtype.kind, "integers")
        raise TensorError(f"input {name!r}: {datatype} data must be {want}")
    if count and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise TensorError(f"input {name!r}: a value is out of {datatype}'s range")
    return np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()


def _flatten(data: list[Any]) -> list[Any]:
    if not any(isinstance(v, list) for v in data):
        return data
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            out.append(value)
        else:
            stack.pop()
    return out


def infer_response(
    pipeline: CompiledPipeline, request: InferRequest, outputs: Mapping[str, RawTensor]
) -> tuple[bytes, int | None]:
    """An OIP REST inference response: (body, its JSON header's length when binary
    outputs follow it, else None). An output goes binary when asked (the output's
    ``binary_data``, else the request's ``binary_data_output``), or when it is
    ``BYTES`` that is not UTF-8 text (JSON cannot carry it)."""
    answer: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, (datatype, shape, raw) in outputs.items():
        binary = request.outputs.get(name, request.binary_output) if request.outputs else request.binary_output
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if not binary:
            try:
                tensor["data"] = _json_data(raw, datatype, shape)
            except UnicodeDecodeError:
                binary = True
        if binary:
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        answer.append(tensor)
    response: dict[str, Any] = {"model_name": pipeline.name, "model_version": pipeline.version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = answer
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _json_data(raw: bytes, datatype: str, shape: list[int]) -> list[Any]:
    array = from_raw(raw, datatype, shape).reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8") for v in array]
    return array.tolist()


def message_json(message: Message) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: field names as in the proto,
    int64s as numbers (not strings), enums by name, every scalar and list present
    (zero values too, e.g. ``max_batch_size: 0``), sub-messages only when set."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {k: _field_json(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_field_json(field, v) for v in value]
        elif field.message_type is not None or field.containing_oneof is not None:
            if message.HasField(field.name):
                out[field.name] = _field_json(field, value)
        else:
            out[field.name] = _field_json(field, value)
    return out


def _field_json(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_json(value)
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
