"""Trains ``iris_classifier`` version 2: a k-nearest-neighbours classifier (version 1 is
a logistic regression) with the same signature (``features`` in; ``label`` and
``probabilities`` out), so a stage can split traffic between the two versions, mirror
one to the other, or pin either (``traffic``, ``mirror``, ``x-sluice-variant``).

The example store ships both versions with a version policy (``POLICY``, written by
``models.build``): a runtime asked for ``iris_classifier`` loads versions 1 and 2, and a
request that names no version gets version 1, so every unpinned reference answers as
it did before version 2 shipped; pin ``iris_classifier:2`` (or split traffic) to reach it.

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

from models.manifest import version_dir, write_version_policy
from models.train_iris import iris_data, write_classifier

VERSION = "2"
#: the example store's policy: load both versions, version 1 answers unpinned requests
POLICY = {"load": {"specific": {"versions": ["1", VERSION]}}, "default": "1"}


def fit() -> KNeighborsClassifier:
    X, y = iris_data()
    return KNeighborsClassifier(n_neighbors=15, weights="uniform").fit(StandardScaler().fit_transform(X), y)


def train(root: Path) -> Path:
    """Write ``<root>/iris_classifier/2``; the directory."""
    classifier = fit()
    path = version_dir(root, "iris_classifier", VERSION)
    write_classifier(path, classifier)
    return path


def ship(root: Path) -> Path:
    """Version 2 beside version 1 (which ``train_iris`` wrote) and ``POLICY``; the policy file."""
    train(root)
    return write_version_policy(root, "iris_classifier", POLICY)


if __name__ == "__main__":
    print(train(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "store"))
