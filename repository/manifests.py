"""What a model's manifest says, and whether an uploaded one is valid.

* Sluice layout: ``model.json``, a JSON object with a string ``framework``, optional
  ``inputs``/``outputs`` (OIP tensor specs ``{name, datatype, shape}``; extra keys such
  as sklearn's ``method`` ride along) and an optional ``artifact`` (a relative path
  that names one of the version's files or directories).
* Triton layout: ``config.pbtxt``, Triton's ``ModelConfig`` in protobuf text format
  (parsed with the ``tritonclient`` messages, not with any runtime's code). Its
  signature is the one Triton reports: ``TYPE_FP32`` is ``FP32``, ``TYPE_STRING`` is
  ``BYTES``, and the dims get a leading ``-1`` when ``max_batch_size > 0``.

``check_*`` functions validate an upload and raise ``ManifestError`` with a message
that says exactly what is wrong; ``*_signature`` functions read what is on disk and
are lenient (a malformed tensor spec in an old manifest is left out, not an error).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from sluice.paths import UnsafePath, relative_parts

#: the Open Inference Protocol's tensor datatypes
OIP_DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "FP32", "FP64", "BYTES", "BF16")
#: a manifest larger than this is refused before it is parsed
MAX_MANIFEST_BYTES = 8 << 20

TensorSpec = dict[str, Any]


class ManifestError(ValueError):
    """An uploaded ``model.json`` or ``config.pbtxt`` that is not valid; the message says why."""


def check_sluice_manifest(raw: bytes, present: Callable[[str], bool]) -> dict[str, Any]:
    """Parse and validate ``model.json``; ``present(path)`` says whether the upload has that file or directory."""
    _check_size("model.json", raw)
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ManifestError(f"model.json is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"model.json must be a JSON object, not {_json_type(manifest)}")
    framework = manifest.get("framework")
    if not isinstance(framework, str) or not framework:
        raise ManifestError("model.json: 'framework' must be a non-empty string")
    for key in ("inputs", "outputs"):
        if key in manifest:
            _check_tensors(key, manifest[key])
    if "artifact" in manifest:
        artifact = manifest["artifact"]
        if not isinstance(artifact, str):
            raise ManifestError(f"model.json: 'artifact' must be a string path, not {_json_type(artifact)}")
        try:
            parts = relative_parts(artifact)
        except UnsafePath as exc:
            raise ManifestError(f"model.json: artifact {artifact!r} {exc.reason}") from None
        if not present("/".join(parts)):
            raise ManifestError(f"model.json: artifact {artifact!r} is not among the uploaded files")
    return manifest


def _check_tensors(key: str, specs: Any) -> None:
    if not isinstance(specs, list):
        raise ManifestError(f"model.json: '{key}' must be a list of tensor specs, not {_json_type(specs)}")
    for i, spec in enumerate(specs):
        where = f"model.json: {key}[{i}]"
        if not isinstance(spec, dict):
            raise ManifestError(f"{where} must be an object with name, datatype and shape, not {_json_type(spec)}")
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"{where}.name must be a non-empty string")
        datatype = spec.get("datatype")
        if datatype not in OIP_DATATYPES:
            raise ManifestError(f"{where}.datatype {datatype!r} is not an OIP datatype (one of {', '.join(OIP_DATATYPES)})")
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(_is_dim(d) for d in shape):
            raise ManifestError(f"{where}.shape {shape!r} must be a list of integers >= -1")


def _is_dim(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= -1


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _check_size(what: str, raw: bytes) -> None:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{what} is {len(raw)} bytes; a manifest may have at most {MAX_MANIFEST_BYTES}")


def parse_triton_config(raw: bytes) -> model_config_pb2.ModelConfig:
    """Triton's ``ModelConfig`` from ``config.pbtxt`` text; ``ManifestError`` when it does not parse."""
    _check_size("config.pbtxt", raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestError(f"config.pbtxt is not UTF-8 text: {exc}") from None
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ManifestError(f"config.pbtxt is not a Triton ModelConfig: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise ManifestError(f"config.pbtxt is not a Triton ModelConfig: {type(exc).__name__}: {exc}") from None
    return config


def check_triton_config(raw: bytes, model: str) -> model_config_pb2.ModelConfig:
    config = parse_triton_config(raw)
    if config.name and config.name != model:
        raise ManifestError(f"config.pbtxt names model {config.name!r}, but the upload is for model {model!r}")
    return config


def sluice_signature(manifest: dict[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """``(inputs, outputs)`` of a ``model.json`` as plain ``{name, datatype, shape}`` specs."""
    return _plain(manifest.get("inputs")), _plain(manifest.get("outputs"))


def _plain(specs: Any) -> list[TensorSpec]:
    if not isinstance(specs, list):
        return []
    return [
        {"name": s["name"], "datatype": s["datatype"], "shape": list(s["shape"])}
        for s in specs
        if isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("datatype"), str)
        and isinstance(s.get("shape"), list) and all(_is_dim(d) for d in s["shape"])
    ]


def triton_signature(config: model_config_pb2.ModelConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """``(inputs, outputs)`` as Triton reports them in its model metadata."""
    batch = [-1] if config.max_batch_size > 0 else []

    def spec(tensor: Any) -> TensorSpec:
        return {"name": tensor.name, "datatype": triton_datatype(tensor.data_type), "shape": batch + list(tensor.dims)}

    return [spec(t) for t in config.input], [spec(t) for t in config.output]


def triton_datatype(data_type: int) -> str:
    name = model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def read_triton_signature(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The signature in a model's ``config.pbtxt`` on disk; empty when it is missing or does not parse."""
    try:
        stat = path.stat()
    except OSError:
        return [], []
    inputs, outputs = _cached_triton_signature(path, stat.st_mtime_ns, stat.st_size)
    return [{**s, "shape": list(s["shape"])} for s in inputs], [{**s, "shape": list(s["shape"])} for s in outputs]


@lru_cache(maxsize=1024)
def _cached_triton_signature(path: Path, mtime_ns: int, size: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    try:
        return triton_signature(parse_triton_config(path.read_bytes()))
    except (OSError, ManifestError):
        return [], []
