"""Trains the iris examples: ``iris_scaler`` (StandardScaler), ``iris_classifier``
(logistic regression), ``iris_tree`` (a decision tree) and ``iris_vote``.

Deterministic: the data ships with scikit-learn and both estimators are fitted
without randomness, so every build produces the same predictions. The scaler reads
the four measurements as named columns and outputs one ``features`` tensor; the
classifier reads ``features`` and outputs the class name (``label``) and the class
``probabilities``, so the two chain as a pipeline with no glue.

The ensemble example (``iris-ensemble``: scale, then ``iris_classifier`` and
``iris_tree`` side by side, then ``iris_vote``) needs two more: ``iris_tree`` reads
``features`` like the classifier and answers the same two outputs, and ``iris_vote``
reads two probability vectors ``p1`` and ``p2`` and answers their mean
(``probabilities``) and its most likely class (``label``). The vote is a linear
classifier with fixed weights, not a fitted one: its decision function on
``[p1, p2]`` is ``(p1 + p2) / 2`` and ``predict`` is that mean's arg-max, named by the
class; so it is plain scikit-learn, which the scikit runtime unpickles like any model.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from models.manifest import tensor, version_dir, write_manifest

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


def iris_data() -> tuple[np.ndarray, np.ndarray]:
    """The iris measurements (columns in FEATURES order) and class names."""
    data = load_iris()
    return data.data.astype(np.float64), data.target_names[data.target]


def write_classifier(path: Path, classifier) -> None:
    """An iris classifier's version directory: ``features`` in, ``label`` and
    ``probabilities`` out (iris_classifier's versions, iris_tree)."""
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

    write_classifier(version_dir(root, "iris_classifier"), classifier)

    tree = DecisionTreeClassifier(max_depth=3, random_state=0).fit(scaler.transform(X), y)
    write_classifier(version_dir(root, "iris_tree"), tree)

    vote = mean_vote(classifier.classes_)
    path = version_dir(root, "iris_vote")
    joblib.dump(vote, path / "model.joblib")
    write_manifest(
        path,
        "sklearn",
        inputs=[tensor("p1", "FP64", [-1, 3]), tensor("p2", "FP64", [-1, 3])],
        outputs=[
            tensor("label", "BYTES", [-1], method="predict"),
            tensor("probabilities", "FP64", [-1, 3], method="decision_function"),
        ],
        artifact="model.joblib",
        classes=[str(c) for c in vote.classes_],
    )


def mean_vote(classes: np.ndarray) -> LogisticRegression:
    """A linear classifier over ``[p1, p2]`` (two probability vectors side by side) whose
    decision function is their mean and whose ``predict`` is the mean's arg-max class."""
    k = len(classes)
    vote = LogisticRegression()
    vote.classes_ = np.asarray(classes, dtype=object)
    vote.coef_ = 0.5 * np.hstack([np.eye(k), np.eye(k)])
    vote.intercept_ = np.zeros(k)
    vote.n_features_in_ = 2 * k
    return vote
