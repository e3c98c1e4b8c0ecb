"""Writes a model version in the repository's layout: ``<root>/<name>/<version>/model.json``,
and a model's version policy: ``<root>/<name>/versions.json`` (``sluice.version_policy``).

``model.json`` is the manifest the repository serves as the model's metadata and the
runtimes load by: framework, artifact file(s), and the signature (inputs/outputs as
OIP tensor specs). Framework-specific keys ride along (e.g. sklearn's ``method``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sluice.version_policy import POLICY_FILE, policy_from_json


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


def write_version_policy(root: Path, name: str, policy: dict[str, Any]) -> Path:
    """``<root>/<name>/versions.json``: which versions an unpinned load loads and which one
    answers unpinned requests (checked as the repository checks it, against the versions
    on disk; the same bytes on every build)."""
    model = Path(root) / name
    checked = policy_from_json(policy)
    checked.check(p.name for p in model.iterdir() if (p / "model.json").is_file())
    target, partial = model / POLICY_FILE, model / f".{POLICY_FILE}.partial"
    partial.write_text(json.dumps(checked.to_json(), indent=2, sort_keys=True) + "\n")
    partial.replace(target)  # a running repository reads the old policy or the new one, never half
    return target
