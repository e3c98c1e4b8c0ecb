"""The JSON the repository answers about a model: its summary, its file listings, and
the full description (``GET /models/<name>``, ``GET /models?detail=true``), each with
the model's version policy (``policy``).

Signatures come from ``model.json`` (Sluice layout; plain ``{name, datatype, shape}``,
extra keys such as ``method`` dropped) or from ``config.pbtxt`` (Triton layout: one
config, so one signature, for every version). Hashing is blocking: call these from
a worker thread.
"""

from __future__ import annotations

from typing import Any

from repository import digests
from repository.catalog import ModelEntry
from repository.manifests import read_triton_signature, sluice_signature


def summary(entry: ModelEntry) -> dict[str, Any]:
    return {"name": entry.name, "framework": entry.framework, "versions": list(entry.versions), "latest": entry.latest,
            **policy(entry)}


def policy(entry: ModelEntry) -> dict[str, Any]:
    """The model's version policy as every answer about it carries it: ``default_version``
    (what an unpinned request gets), ``load_versions`` (what an unpinned load loads),
    ``version_policy`` (the file's policy, normalised; null: none, the latest answers)
    and ``policy_error`` (why the file is refused; null when it is not)."""
    return entry.policy.to_json()


def files(entry: ModelEntry, version: str) -> list[dict[str, Any]]:
    """A version's files as ``{"path", "size", "sha256"}``, paths as ``/download`` takes them."""
    base = entry.base(version)
    out = []
    try:
        listed = entry.files(version)
    except OSError:  # removed while it was listed (a concurrent delete)
        return out
    for relative in listed:
        try:
            out.append(digests.describe(base / relative, relative))
        except OSError:  # removed since it was listed (a concurrent delete)
            continue
    return out


def detail(entry: ModelEntry) -> dict[str, Any]:
    """Everything about one model: every version's framework, signature and files."""
    if entry.layout == "triton":
        signature = read_triton_signature(entry.directory / "config.pbtxt")
    versions = []
    for version in entry.versions:
        if entry.layout == "sluice":
            manifest = entry.manifests.get(version, {})
            framework = str(manifest.get("framework", "unknown"))
            inputs, outputs = sluice_signature(manifest)
        else:
            framework = "triton"
            inputs, outputs = signature
        versions.append({"version": version, "framework": framework, "inputs": inputs, "outputs": outputs,
                         "files": files(entry, version)})
    return {"name": entry.name, "layout": entry.layout, "framework": entry.framework, "latest": entry.latest,
            **policy(entry), "versions": versions}
