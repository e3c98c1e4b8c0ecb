"""Trains the iris example: ``iris_scaler`` (StandardScaler) and ``iris_classifier``.

Deterministic: the data ships with scikit-learn and both estimators are fitted
without randomness, so every build produces the same predictions. The scaler reads
the four measurements as named columns and outputs one ``features`` tensor; the
classifier reads ``features`` and outputs the class name (``label``) and the class
``probabilities``, so the two chain as a pipeline with no glue.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from models.manifest import tensor, version_dir, write_manifest

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_data() -> tuple[np.ndarray, np.ndarray]:
    """The iris measurements (columns in FEATURES order) and class names."""
    data = load_iris()
    return data.data.astype(np.float64), data.target_names[data.target]


def train(root: Path) -> None:
    X, y = iris_data()
    scaler = StandardScaler().fit(X)
    classifier = LogisticRegression(max_iter=1000).fit(scaler.transform(X), y)

    path = version_dir(root, "iris_scaler")
    joblib.dump(scaler, path / "model.joblib")
    write_manifest(
        path,
        "sklearn",
        inputs=[tensor(name, "FP64", [-1]) for name in FEATURES],
        outputs=[tensor("features", "FP64", [-1, 4], method="transform")],
        artifact="model.joblib",
    )

    path = version_dir(root, "iris_classifier")
    joblib.dump(classifier, path / "model.joblib")
    write_manifest(
        path,
        "sklearn",
        inputs=[tensor("features", "FP64", [-1, 4])],
        outputs=[
            tensor("label", "BYTES", [-1], method="predict"),
            tensor("probabilities", "FP64", [-1, 3], method="predict_proba"),
        ],
        artifact="model.joblib",
        classes=[str(c) for c in classifier.classes_],
    )
