"""Trains ``pm_scikit``: the product-matching featurizer (scikit-learn, custom transformer).

Inputs are the seed demo's record fields, ``Title1, ItemSpecifics1, Title2,
ItemSpecifics2`` (BYTES [-1] each; item specifics as ``'Key': ' value'; ...``); the
output ``features`` (FP64 [-1, len(FEATURE_NAMES)]) feeds the Spark classifier
``pm_spark``. Fitting learns the TF-IDF vocabulary from the synthetic listings of
``models.listings``.
"""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np

from models.listings import listing_pairs
from models.manifest import tensor, version_dir, write_manifest
from runtimes.scikit.transformers import COLUMNS, FEATURE_NAMES, ListingPairFeatures


def train(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fit and save pm_scikit; returns the training pairs' features and labels."""
    pairs, labels = listing_pairs()
    featurizer = ListingPairFeatures().fit(pairs)
    path = version_dir(root, "pm_scikit")
    joblib.dump(featurizer, path / "model.joblib")
    write_manifest(
        path,
        "sklearn",
        inputs=[tensor(c, "BYTES", [-1]) for c in COLUMNS],
        outputs=[tensor("features", "FP64", [-1, len(FEATURE_NAMES)], method="transform")],
        artifact="model.joblib",
        feature_names=list(FEATURE_NAMES),
    )
    return featurizer.transform(pairs), labels
