"""Trains ``iris_classifier`` version 2: a k-nearest-neighbours classifier (version 1 is
a logistic regression) with the same signature (``features`` in; ``label`` and
``probabilities`` out), so a stage can split traffic between the two versions, mirror
one to the other, or pin either (``traffic``, ``mirror``, ``x-sluice-variant``).

Deterministic: fitted on the iris data scaled by ``iris_scaler`` version 1's recipe
(a StandardScaler fitted on the same data), with no randomness. Its answers differ
from version 1's on some records and in every probability vector, so which version
answered can be told from the answer.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from models.manifest import version_dir
from models.train_iris import iris_data, write_classifier

VERSION = "2"


def fit() -> KNeighborsClassifier:
    X, y = iris_data()
    return KNeighborsClassifier(n_neighbors=15, weights="uniform").fit(StandardScaler().fit_transform(X), y)


def train(root: Path) -> Path:
    """Write ``<root>/iris_classifier/2``; the directory."""
    classifier = fit()
    path = version_dir(root, "iris_classifier", VERSION)
    write_classifier(path, classifier)
    return path


if __name__ == "__main__":
    print(train(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "store"))
