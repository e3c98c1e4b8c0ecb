"""A scikit-learn estimator as an OIP model.

The manifest (``model.json``) names the joblib artifact and the signature. Inputs are
either one 2-D tensor or several tensors (1-D columns or 2-D blocks of columns),
stacked side by side in signature order into the feature matrix. Each output names the estimator method that produces it
(``transform``, ``predict``, ``predict_proba``, ``decision_function``); a method used
by several outputs runs once.
"""

from __future__ import annotations

import warnings

import joblib
import numpy as np
import sklearn

from runtimes.sdk.model import Model, ModelArtifact, ModelLoadError
from sluice.tensors import DATATYPE_TO_DTYPE, TensorError

# Input validation that costs more than a small model's arithmetic; the signature
# already fixed the shapes and the gateway the dtypes.
sklearn.set_config(assume_finite=True)
# An estimator fitted on a DataFrame gets its columns as a matrix stacked in signature
# order, which is its feature_names_in_ order (the SDK derives one from the other);
# sklearn would warn on every request.
warnings.filterwarnings("ignore", message="X does not have valid feature names", category=UserWarning)

_METHODS = {"transform", "predict", "predict_proba", "predict_log_proba", "decision_function"}


class SklearnModel(Model):
    platform = "sklearn"

    def __init__(self, artifact: ModelArtifact):
        inputs, outputs = artifact.specs("inputs"), artifact.specs("outputs")
        if not inputs or not outputs:
            raise ModelLoadError(f"{artifact.name}: model.json must list inputs and outputs")
        super().__init__(artifact, inputs, outputs)
        path = artifact.path / artifact.manifest.get("artifact", "model.joblib")
        try:
            self.estimator = joblib.load(path)
        except Exception as exc:  # missing file, truncated or corrupt pickle (KeyError, EOFError...), missing class
            raise ModelLoadError(f"{artifact.name}: cannot load {path.name}: {type(exc).__name__}: {exc}") from exc
        self.methods: dict[str, str] = {}
        for spec in artifact.manifest["outputs"]:
            method = spec.get("method", "predict")
            if method not in _METHODS or not hasattr(self.estimator, method):
                raise ModelLoadError(f"{artifact.name}: output {spec['name']!r} needs method {method!r}, which the estimator lacks")
            self.methods[spec["name"]] = method

    def features(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        if len(self.inputs) == 1 and self.inputs[0].shape and len(self.inputs[0].shape) == 2:
            return _decoded(inputs[self.inputs[0].name])
        # several inputs: each a block of columns (a 1-D input one column, a [-1, k] input k), side by side
        columns = [_decoded(inputs[s.name]) for s in self.inputs]
        if len({len(c) for c in columns}) > 1:
            raise TensorError("input columns have different lengths")
        return np.column_stack([c.reshape(len(c), -1) for c in columns])

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        X = self.features(inputs)
        if X.shape[0] == 0:  # an empty batch: empty answers (estimators refuse 0 samples)
            return {
                spec.name: np.empty((0, *(max(d, 0) for d in spec.shape[1:])), dtype=DATATYPE_TO_DTYPE[spec.datatype])
                for spec in self.outputs
            }
        results: dict[str, np.ndarray] = {}
        out: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            method = self.methods[spec.name]
            if method not in results:
                try:
                    results[method] = np.asarray(getattr(self.estimator, method)(X))
                except ValueError as exc:  # scikit-learn's way of refusing input (infinity, NaN...): INVALID_ARGUMENT
                    raise TensorError(f"{method} refused the input: {exc}") from None
            value = results[method]
            if spec.datatype != "BYTES":
                value = value.astype(DATATYPE_TO_DTYPE[spec.datatype], copy=False)
            out[spec.name] = value
        return out


def _decoded(array: np.ndarray) -> np.ndarray:
    """BYTES arrive as bytes objects; estimators want str."""
    if array.dtype == object:
        return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(array)
    return array


def load(artifact: ModelArtifact) -> Model:
    return SklearnModel(artifact)
