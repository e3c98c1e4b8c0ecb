"""Trains every example model (``python -m models.build [store] [triton_root]``): the
Sluice-layout store (scikit-learn) and the Triton-layout repository (ONNX)."""

from __future__ import annotations

import sys
from pathlib import Path

from models import train_iris, train_triton

DEFAULT_STORE = Path(__file__).resolve().parent / "store"


def build(root: Path = DEFAULT_STORE, triton_root: Path = train_triton.DEFAULT_ROOT) -> Path:
    train_iris.train(root)
    train_triton.build_repository(triton_root)
    return root


if __name__ == "__main__":
    args = [Path(a) for a in sys.argv[1:3]]
    target = build(*args)
    print(f"models written to {target} and {args[1] if len(args) > 1 else train_triton.DEFAULT_ROOT}")
