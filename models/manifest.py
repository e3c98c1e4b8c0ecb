"""Writes a model version in the repository's layout: ``<root>/<name>/<version>/model.json``.

``model.json`` is the manifest the repository serves as the model's metadata and the
runtimes load by: framework, artifact file(s), and the signature (inputs/outputs as
OIP tensor specs). Framework-specific keys ride along (e.g. sklearn's ``method``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def tensor(name: str, datatype: str, shape: list[int], **extra: Any) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape, **extra}


def version_dir(root: Path, name: str, version: str = "1") -> Path:
    path = Path(root) / name / version
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_manifest(path: Path, framework: str, inputs: list[dict], outputs: list[dict], **extra: Any) -> Path:
    manifest = {"framework": framework, "inputs": inputs, "outputs": outputs, **extra}
    target = Path(path) / "model.json"
    target.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return target
