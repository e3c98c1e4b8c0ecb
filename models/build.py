"""Trains every example model into the model store (``python -m models.build [root]``)."""

from __future__ import annotations

import sys
from pathlib import Path

from models import train_iris

DEFAULT_STORE = Path(__file__).resolve().parent / "store"


def build(root: Path = DEFAULT_STORE) -> Path:
    train_iris.train(root)
    return root


if __name__ == "__main__":
    target = build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_STORE)
    print(f"models written to {target}")
