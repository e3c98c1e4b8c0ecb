"""Turns a user's model into a model-repository upload: the version's files with
their manifest, packed as one tar.gz.

Three kinds, each in the layout its runtime loads:

* a fitted scikit-learn estimator or Pipeline -> ``model.joblib`` + ``model.json``
  (runtime kind ``scikit``). The signature comes from the estimator: one FP64 column
  per name in ``feature_names_in_`` (fitted on a DataFrame) or one FP64
  ``[-1, n_features_in_]`` tensor ``input``; outputs ``label`` (``predict``, typed by
  ``classes_``) and ``probabilities`` (``predict_proba``) for a classifier,
  ``prediction`` for a regressor, ``features`` (``transform``) for a transformer.
* a saved Spark ML PipelineModel directory (or the PipelineModel itself) ->
  ``pipeline/`` + ``model.json`` (runtime kind ``spark``, which derives the signature).
* an ONNX model (file or ``onnx.ModelProto``) -> Triton layout, ``config.pbtxt`` written
  from the graph's inputs and outputs + ``model.onnx`` (runtime kind ``triton``).

Any derived signature can be overridden with ``inputs=`` / ``outputs=`` (lists of
``{"name", "datatype", "shape"}``). A directory that already holds ``model.json`` or
``config.pbtxt`` is uploaded as it is.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TensorDicts = list[dict[str, Any]]

#: ONNX TensorProto element type -> Triton config data type
_ONNX_TO_TRITON = {
    1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
    7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
    13: "TYPE_UINT64", 16: "TYPE_BF16",
}
#: the batch size a Triton config allows when an ONNX model's first dimension is free
ONNX_MAX_BATCH_SIZE = 64


class PackagingError(ValueError):
    """The model cannot be packaged as given (say what to pass instead)."""


@dataclass
class Package:
    """A model version's files in a temporary directory, ready to upload."""

    kind: str  # "sklearn", "spark", "onnx" or "prepared"
    directory: Path
    _tmp: tempfile.TemporaryDirectory | None = None

    def archive(self, target: Path) -> Path:
        """Pack the version's files, paths relative to the version, as tar.gz."""
        with tarfile.open(target, "w:gz", compresslevel=1) as tar:  # artifacts are mostly incompressible
            for path in sorted(self.directory.rglob("*")):
                if path.is_file():
                    tar.add(path, arcname=path.relative_to(self.directory).as_posix(), recursive=False)
        return target

    def cleanup(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "Package":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def package(model: Any, name: str, inputs: TensorDicts | None = None, outputs: TensorDicts | None = None) -> Package:
    """Package ``model`` (an estimator, a PipelineModel, an ONNX model, or a path to one)."""
    tmp = tempfile.TemporaryDirectory(prefix="sluice-package-")
    directory = Path(tmp.name) / "version"
    directory.mkdir()
    try:
        kind = _write(model, name, directory, inputs, outputs)
    except BaseException:
        tmp.cleanup()
        raise
    return Package(kind, directory, tmp)


def _write(model: Any, name: str, out: Path, inputs: TensorDicts | None, outputs: TensorDicts | None) -> str:
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.exists():
            raise PackagingError(f"{path} does not exist")
        if path.is_dir() and ((path / "model.json").is_file() or (path / "config.pbtxt").is_file()):
            shutil.copytree(path, out, dirs_exist_ok=True)
            return "prepared"
        if path.is_dir() and (path / "metadata").is_dir():
            shutil.copytree(path, out / "pipeline")
            _manifest(out, "spark", inputs, outputs)
            return "spark"
        if path.suffix == ".onnx":
            import onnx

            return _onnx(onnx.load(str(path)), name, out, inputs, outputs)
        if path.suffix in (".joblib", ".pkl", ".pickle"):
            import joblib

            return _sklearn(joblib.load(path), out, inputs, outputs)
        raise PackagingError(f"{path}: not a .joblib/.pkl estimator, an .onnx file, a saved Spark PipelineModel or a model directory")
    kind = type(model).__module__.split(".")[0]
    if kind == "onnx":
        return _onnx(model, name, out, inputs, outputs)
    if kind == "pyspark":
        model.write().overwrite().save(str(out / "pipeline"))
        _manifest(out, "spark", inputs, outputs)
        return "spark"
    if hasattr(model, "fit") and (hasattr(model, "predict") or hasattr(model, "transform")):
        return _sklearn(model, out, inputs, outputs)
    raise PackagingError(f"cannot package a {type(model).__name__}: give a fitted scikit-learn estimator, a Spark PipelineModel or an ONNX model")


def _manifest(out: Path, framework: str, inputs: TensorDicts | None, outputs: TensorDicts | None, **extra: Any) -> None:
    manifest: dict[str, Any] = {"framework": framework, **extra}
    if inputs is not None:
        manifest["inputs"] = inputs
    if outputs is not None:
        manifest["outputs"] = outputs
    (out / "model.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


# --- scikit-learn
def _sklearn(estimator: Any, out: Path, inputs: TensorDicts | None, outputs: TensorDicts | None) -> str:
    import joblib

    inputs = inputs if inputs is not None else sklearn_inputs(estimator)
    outputs = outputs if outputs is not None else sklearn_outputs(estimator)
    joblib.dump(estimator, out / "model.joblib")
    _manifest(out, "sklearn", inputs, outputs, artifact="model.joblib")
    return "sklearn"


def sklearn_inputs(estimator: Any) -> TensorDicts:
    names = getattr(estimator, "feature_names_in_", None)
    if names is not None:
        return [{"name": str(n), "datatype": "FP64", "shape": [-1]} for n in names]
    width = getattr(estimator, "n_features_in_", None)
    if width is None:
        raise PackagingError(f"{type(estimator).__name__} says nothing of its inputs (not fitted?): pass inputs=[...]")
    return [{"name": "input", "datatype": "FP64", "shape": [-1, int(width)]}]


def sklearn_outputs(estimator: Any) -> TensorDicts:
    final = estimator.steps[-1][1] if hasattr(estimator, "steps") else estimator
    classes = getattr(final, "classes_", None)
    outputs: TensorDicts = []
    if hasattr(estimator, "predict"):
        if classes is None:
            outputs.append({"name": "prediction", "datatype": "FP64", "shape": [-1], "method": "predict"})
        else:
            outputs.append({"name": "label", "datatype": _label_datatype(classes), "shape": [-1], "method": "predict"})
    if classes is not None and hasattr(estimator, "predict_proba"):
        outputs.append({"name": "probabilities", "datatype": "FP64", "shape": [-1, len(classes)], "method": "predict_proba"})
    if not outputs and hasattr(estimator, "transform"):
        try:
            width = len(estimator.get_feature_names_out())
        except (AttributeError, ValueError, TypeError):
            width = -1
        outputs.append({"name": "features", "datatype": "FP64", "shape": [-1, width], "method": "transform"})
    if not outputs:
        raise PackagingError(f"{type(estimator).__name__} has no predict, predict_proba or transform: pass outputs=[...]")
    return outputs


def _label_datatype(classes: Any) -> str:
    kind = getattr(getattr(classes, "dtype", None), "kind", "O")
    return {"i": "INT64", "u": "INT64", "f": "FP64", "b": "BOOL"}.get(kind, "BYTES")


# --- ONNX, in Triton's layout
def _onnx(model: Any, name: str, out: Path, inputs: TensorDicts | None, outputs: TensorDicts | None) -> str:
    import onnx

    if inputs is not None or outputs is not None:
        raise PackagingError("an ONNX model's signature is its graph's; inputs/outputs cannot be overridden")
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = [i for i in model.graph.input if i.name not in initializers]
    tensors = [("input", t) for t in graph_inputs] + [("output", t) for t in model.graph.output]
    shapes = {t.name: [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in t.type.tensor_type.shape.dim] for _, t in tensors}
    batched = all(shapes[t.name] and shapes[t.name][0] == -1 for _, t in tensors)
    lines = [
        f"# {name}: written by sluice.packaging from the ONNX graph",
        f'name: "{name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {ONNX_MAX_BATCH_SIZE if batched else 0}",
    ]
    for role, tensor in tensors:
        elem = tensor.type.tensor_type.elem_type
        if elem not in _ONNX_TO_TRITON:
            raise PackagingError(f"ONNX tensor {tensor.name!r} has element type {elem}, which Triton cannot serve")
        dims = shapes[tensor.name][1:] if batched else shapes[tensor.name]
        lines += [f"{role} {{", f'  name: "{tensor.name}"', f"  data_type: {_ONNX_TO_TRITON[elem]}"]
        lines += [f"  dims: {d}" for d in dims] or ["  dims: 1"]
        lines.append("}")
    (out / "config.pbtxt").write_text("\n".join(lines) + "\n")
    onnx.save(model, str(out / "model.onnx"))
    return "onnx"
