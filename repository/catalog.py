"""Knows every model in the repository's directories: type, versions, signature, files.

Two layouts are recognised:

* Sluice layout: ``<root>/<model>/<version>/model.json`` (the manifest: framework,
  signature, framework-specific keys) beside the model's files. A version's files
  are listed relative to its version directory.
* Triton layout: ``<root>/<model>/config.pbtxt`` and ``<root>/<model>/<version>/...``.
  A version's files are ``config.pbtxt`` plus ``<version>/...``, relative to the
  model directory, so a runtime recreates a one-model Triton repository.

Every file path handed out or accepted is checked to stay inside its model's
directory: ``..`` segments, absolute paths and symlinks that lead outside are refused.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any


class PathRefused(ValueError):
    """A path that would leave the model's directory."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    layout: str  # "sluice" or "triton"
    directory: Path
    versions: tuple[str, ...]
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)

    @property
    def latest(self) -> str:
        return self.versions[-1]

    @property
    def framework(self) -> str:
        if self.layout == "triton":
            return "triton"
        return str(self.manifests.get(self.latest, {}).get("framework", "unknown"))

    def base(self, version: str) -> Path:
        return self.directory / version if self.layout == "sluice" else self.directory

    def files(self, version: str) -> list[Path]:
        """A version's files, relative to ``base(version)``."""
        base = self.base(version)
        roots = [base] if self.layout == "sluice" else [base / "config.pbtxt", base / version]
        out: list[Path] = []
        for root in roots:
            candidates = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
            out.extend(p.relative_to(base) for p in candidates if _inside(p, base))
        return out

    def resolve_file(self, version: str, relative: str) -> Path:
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts or not pure.parts or "\\" in relative:
            raise PathRefused(relative)
        if Path(*pure.parts) not in self.files(version):
            raise FileNotFoundError(relative)
        return self.base(version) / Path(*pure.parts)


def _inside(path: Path, base: Path) -> bool:
    try:
        return path.resolve().is_relative_to(base.resolve())
    except OSError:
        return False


def _version_key(v: str) -> tuple[int, int | str]:
    return (0, int(v)) if v.isdigit() else (1, v)


class Catalog:
    def __init__(self, roots: list[Path]):
        self.roots = roots
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, ModelEntry]:
        found: dict[str, ModelEntry] = {}
        for root in self.roots:
            if not root.is_dir():
                continue
            for directory in sorted(p for p in root.iterdir() if p.is_dir()):
                entry = _entry(directory)
                if entry is not None and entry.name not in found:
                    found[entry.name] = entry
        with self._lock:
            self._models = found
        return found

    def models(self) -> list[ModelEntry]:
        return list(self._models.values())

    def get(self, name: str) -> ModelEntry | None:
        entry = self._models.get(name)
        if entry is None:  # a model trained after start-up
            entry = self.scan().get(name)
        return entry


def _entry(directory: Path) -> ModelEntry | None:
    if (directory / "config.pbtxt").is_file():
        versions = sorted((p.name for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), key=_version_key)
        return ModelEntry(directory.name, "triton", directory, tuple(versions)) if versions else None
    manifests: dict[str, dict[str, Any]] = {}
    for version_dir in directory.iterdir():
        manifest = version_dir / "model.json"
        if version_dir.is_dir() and manifest.is_file():
            try:
                manifests[version_dir.name] = json.loads(manifest.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a half-written or broken manifest is not a model yet
    if not manifests:
        return None
    versions = tuple(sorted(manifests, key=_version_key))
    return ModelEntry(directory.name, "sluice", directory, versions, manifests)
