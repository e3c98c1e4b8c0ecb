"""The gateway's OpenAPI, live: one records operation per pipeline it serves now.

``/serve/<p>`` takes JSON records whose fields are the first stage's inputs and answers
records of the last stage's outputs; so the document describes, per pipeline, the exact
records that pipeline takes (``POST /serve/<p>`` and ``POST /api/v1/serve/<p>``), built
from the signatures in the pipeline table each time ``/openapi.json`` is asked for.
The generic ``/serve/{pipeline}`` routes stay out of the document: what a pipeline takes
cannot be stated without knowing which pipeline it is.

A record is an object with every input as a field (other fields are ignored); a body is
one record (answered with one record) or a non-empty list of them (answered with a list).
A field's JSON type follows the input's datatype (``FP*``: number; ``INT*``/``UINT*``:
integer within the type's range; ``BOOL``: boolean; ``BYTES``: a string or another scalar,
sent as its text, null as empty) and its shape after the batch dimension (``[-1]``: a scalar per
record; ``[-1, k]``: a list of k; ``-1`` inside: a list of any length).

An ``application/x-ndjson`` body is a stream of such bodies, one per line, answered by an
NDJSON stream with one line per line sent, in order: the answer, or an error line
(``gateway.api``). OpenAPI cannot state a schema per line; the description says it.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from fastapi import FastAPI

from gateway.streaming import NDJSON
from sluice.tensors import DATATYPE_TO_DTYPE, TensorSpec

#: a streamed records body and its answer: lines of JSON (each line's shape is in the description)
_NDJSON_SCHEMA = {"type": "string", "description": "newline-delimited JSON: one records body (or answer) per line"}

#: records paths per pipeline, in the order the routes are declared
SERVE_PREFIXES = ("/serve/", "/api/v1/serve/")

_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_SERVE_ERRORS = {
    "404": "the pipeline is no longer served (removed since this document was read)",
    "413": "request body over the limit",
    "422": "the records do not fit the pipeline's inputs, or a stage refused them (details name the stage)",
    "429": "a stage is overloaded",
    "502": "a stage failed or answered unreadable tensors (details name the stage)",
    "503": "a stage's runtime is unavailable or overloaded (details name the stage)",
    "504": "a stage timed out (details name the stage)",
}


def scalar_schema(datatype: str) -> dict[str, Any]:
    """The JSON Schema of one element of an OIP ``datatype`` in a record."""
    if datatype == "BYTES":
        return {"type": ["string", "number", "boolean", "null"]}
    if datatype == "BOOL":
        return {"type": "boolean"}
    dtype = DATATYPE_TO_DTYPE[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return {"type": "integer", "minimum": int(info.min), "maximum": int(info.max)}
    return {"type": "number"}


def field_schema(spec: TensorSpec) -> dict[str, Any]:
    """One input as a record's field: its element type nested by the dims after the batch one."""
    schema = scalar_schema(spec.datatype)
    for dim in reversed(spec.shape[1:]):
        schema = {"type": "array", "items": schema, **({"minItems": dim, "maxItems": dim} if dim >= 0 else {})}
    return schema


def record_schema(specs: tuple[TensorSpec, ...], closed: bool = False) -> dict[str, Any]:
    """A record with a field per tensor; ``closed``: no other fields (an answer)."""
    return {
        "type": "object",
        "required": [s.name for s in specs],
        "properties": {s.name: field_schema(s) for s in specs},
        **({"additionalProperties": False} if closed else {}),
    }


def records_schema(record: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [record, {"type": "array", "minItems": 1, "items": record}]}


def _answer_record(specs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    """An answer's record: floats may come back as null (NaN is not JSON)."""
    record = record_schema(specs, closed=True)
    for name, schema in record["properties"].items():
        record["properties"][name] = _nullable_numbers(schema)
    return record


def _nullable_numbers(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") == "array":
        return {**schema, "items": _nullable_numbers(schema["items"])}
    if schema.get("type") == "number":
        return {"type": ["number", "null"]}
    return schema


def serve_operation(pipeline) -> dict[str, Any]:
    """The OpenAPI operation of ``POST /serve/<pipeline>`` (a ``gateway.pipelines.CompiledPipeline``)."""
    return {
        "tags": ["serve"],
        "summary": f"Run pipeline {pipeline.name!r} (revision {pipeline.revision}) on JSON records",
        "description": (
            "Fields of a record: the inputs of the first stage ("
            + ", ".join(f"`{s.name}` {s.datatype} {list(s.shape)}" for s in pipeline.inputs)
            + "). Answers the last stage's outputs as records (one record for one record sent). "
            "With `Content-Type: application/x-ndjson` the body is a stream of such bodies, one per line; "
            "each is answered as soon as it and every line before it are done, by one NDJSON line in "
            "the lines' order: its answer, or `{\"error\": {\"code\", \"message\", \"details\": "
            "{\"status\", \"line\", ...}}}` for a bad line, and the stream goes on."
        ),
        "operationId": f"serve_{pipeline.name}",
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": records_schema(record_schema(pipeline.inputs))},
                NDJSON: {"schema": _NDJSON_SCHEMA},
            },
        },
        "responses": {
            "200": {
                "description": "the last stage's outputs, as records (an NDJSON stream for an NDJSON body)",
                "content": {
                    "application/json": {"schema": records_schema(_answer_record(pipeline.outputs))},
                    NDJSON: {"schema": _NDJSON_SCHEMA},
                },
            },
            **{
                status: {"description": what, "content": {"application/json": {"schema": _ERROR_REF}}}
                for status, what in _SERVE_ERRORS.items()
            },
        },
    }


def install(app: FastAPI, table) -> None:
    """Make ``app.openapi()`` add the serving operations of ``table``'s pipelines to the
    framework's document (built once; the pipelines' part on every call)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        document = copy.deepcopy(build())
        paths = document.setdefault("paths", {})
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, model in _error_models().items():
            schemas.setdefault(name, model)
        for pipeline in sorted(table.pipelines.values(), key=lambda p: p.name):
            operation = serve_operation(pipeline)
            for prefix in SERVE_PREFIXES:
                op = dict(operation, operationId=f"{operation['operationId']}{'' if prefix == '/serve/' else '_v1'}")
                paths[f"{prefix}{pipeline.name}"] = {"post": op}
        return document

    app.openapi = openapi


def _error_models() -> dict[str, Any]:
    """The JSON Schemas the error responses refer to (``#/components/schemas/...``)."""
    from pydantic.json_schema import models_json_schema

    from sluice.errors import ErrorBody

    _, top = models_json_schema([(ErrorBody, "serialization")], ref_template="#/components/schemas/{model}")
    return top.get("$defs", {})
