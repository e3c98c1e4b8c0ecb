"""Trains every example model (``python -m models.build [store] [triton_root]``): the
Sluice-layout store (scikit-learn, Spark ML) and the Triton-layout repository (ONNX).

Everything is deterministic. ``pm_spark`` needs a JVM (about 15 s to start), so it is
trained only when missing; delete ``<store>/pm_spark`` to train it again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from models import train_iris, train_pm_scikit, train_triton
from models.manifest import version_dir

DEFAULT_STORE = Path(__file__).resolve().parent / "store"


def build(root: Path = DEFAULT_STORE, triton_root: Path = train_triton.DEFAULT_ROOT) -> Path:
    train_iris.train(root)
    train_triton.build_repository(triton_root)
    features, labels = train_pm_scikit.train(root)
    if not (root / "pm_spark" / "1" / "model.json").is_file():
        from models.train_product_matching import train_pm_spark

        train_pm_spark(features, labels, version_dir(root, "pm_spark"))
    return root


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    target = build(*args)
    print(f"models written to {target} and {args[1] if len(args) > 1 else train_triton.DEFAULT_ROOT}")
