"""What a runtime serves, as the manager knows it: each model's loaded versions, platform
and signature (``ServedModel``), read over OIP by ``manager.signatures``, kept in
``RuntimeRow.models`` and stored as JSON (``to_json`` / ``from_json``).

A model's ``signature`` is the one the runtime answers unpinned, i.e. its default
version's (``sluice.version_policy``); a model with several versions loaded has each
version's too (``by_version``), so a pinned stage or a split between versions is checked
against the version that serves it (``signature_of``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sluice.tensors import TensorSpec


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Signature":
        return cls(tuple(_tensor(t) for t in d.get("inputs", ())), tuple(_tensor(t) for t in d.get("outputs", ())))


@dataclass(frozen=True, slots=True)
class ServedModel:
    versions: tuple[str, ...]
    platform: str
    signature: Signature  # the unpinned answer's: the default version's
    by_version: Mapping[str, Signature] = field(default_factory=dict)  # only with several versions loaded

    def signature_of(self, version: str) -> Signature:
        """``version``'s signature ("" or a version not read alone: the unpinned one's)."""
        return self.by_version.get(version, self.signature) if version else self.signature

    def to_json(self) -> dict[str, Any]:
        out = {"versions": list(self.versions), "platform": self.platform, **self.signature.to_json()}
        if self.by_version:
            out["by_version"] = {v: s.to_json() for v, s in self.by_version.items()}
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "ServedModel":
        return cls(
            tuple(d.get("versions", ())),
            d.get("platform", ""),
            Signature.from_json(d),
            {v: Signature.from_json(s) for v, s in (d.get("by_version") or {}).items()},
        )


def models_to_json(models: Mapping[str, ServedModel]) -> dict[str, dict[str, Any]]:
    return {name: m.to_json() for name, m in models.items()}


def models_from_json(d: Mapping[str, Mapping[str, Any]]) -> dict[str, ServedModel]:
    return {name: ServedModel.from_json(m) for name, m in d.items()}


def _tensor(d: Mapping[str, Any]) -> TensorSpec:
    # as the runtime reported it: no datatype check here (``TensorSpec.from_dict`` has one)
    return TensorSpec(str(d["name"]), str(d["datatype"]), tuple(int(x) for x in d["shape"]))
