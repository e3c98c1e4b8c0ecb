"""JSON records in, JSON records out: the gateway's edge codec.

A body is a list of records (flat JSON objects) or one record. The first stage's
signature says which fields become which tensors; the last stage's outputs become
the answer's fields, one record per input row.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.executor import RawTensor
from gateway.pipelines import CompiledPipeline
from sluice.tensors import TensorError, arrays_to_records, from_raw, records_to_arrays, to_raw


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
    return orjson.dumps(records[0] if single and records else records)
