"""Trains every example model (``python -m models.build [store] [triton_root]``): the
Sluice-layout store (scikit-learn, Spark ML) and the Triton-layout repository (ONNX).

Everything is deterministic. ``iris_classifier`` ships versions 1 and 2 with a version
policy (``versions.json``: both load, version 1 answers unpinned requests). ``pm_spark`` needs a JVM (about 15 s to start), so it is
trained only when its training data changed: its ``model.json`` records the
``training_fingerprint`` of the features and labels it was fitted on, and the build
retrains when that differs from the featurizer's current output (a new feature, new
synthetic listings) or when the model is missing. Delete ``<store>/pm_spark`` to
force it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from models import train_iris, train_iris_v2, train_pm_scikit, train_triton
from models.manifest import version_dir
from models.train_product_matching import PIPELINE_DIR, train_pm_spark, training_fingerprint

DEFAULT_STORE = Path(__file__).resolve().parent / "store"


def _trained_on(manifest: Path) -> str | None:
    """The training fingerprint a saved model records, or None (missing, unreadable, older build)."""
    try:
        return json.loads(manifest.read_text()).get("training_fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def build(root: Path = DEFAULT_STORE, triton_root: Path = train_triton.DEFAULT_ROOT) -> Path:
    train_iris.train(root)
    train_iris_v2.ship(root)  # iris_classifier 2, and the policy that keeps 1 the default
    train_triton.build_repository(triton_root)
    features, labels = train_pm_scikit.train(root)
    pm_spark = root / "pm_spark" / "1"
    if not (pm_spark / PIPELINE_DIR).is_dir() or _trained_on(pm_spark / "model.json") != training_fingerprint(features, labels):
        train_pm_spark(features, labels, version_dir(root, "pm_spark"))
    return root


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    target = build(*args)
    print(f"models written to {target} and {args[1] if len(args) > 1 else train_triton.DEFAULT_ROOT}")
