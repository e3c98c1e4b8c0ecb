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

A model's version policy (``sluice.version_policy``: ``<model>/versions.json``, either
layout) says which versions an unpinned load loads and which one answers an unpinned
request (``ModelEntry.policy``); with no policy file, the latest. A policy that is
malformed or names a version the model lacks is kept with its error (the model is
still listed; its unpinned lookups are refused).

Dot-directories (``.staging``, where uploads and deletes are prepared, and any other)
are never models and never versions. ``get(name)`` looks at the disk every time, so
an upload or a delete (or a model trained after start-up) shows at once; ``scan()``
walks every root (``/models``) and ``models()`` is the last scan's list.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from sluice.errors import ApiError
from sluice.version_policy import POLICY_FILE, ModelPolicy
from sluice.versions import version_key


class PathRefused(ValueError):
    """A path that would leave the model's directory."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    layout: str  # "sluice" or "triton"
    directory: Path
    versions: tuple[str, ...]
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)
    #: its version policy as it applies to ``versions`` (read with the entry)
    policy: ModelPolicy = field(default=ModelPolicy(None, ()), compare=False)

    @property
    def latest(self) -> str:
        """The highest version (not necessarily the default: see ``unpinned``)."""
        return self.versions[-1]

    def unpinned(self) -> str:
        """The version an unpinned request gets; ``ApiError`` 422 when the policy is refused."""
        if self.policy.default_version is None:
            raise ApiError(422, f"model {self.name!r}: its version policy ({POLICY_FILE}) is refused: {self.policy.error}; "
                           "name a version, or fix the policy", "bad_version_policy", model=self.name, versions=list(self.versions))
        return self.policy.default_version

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


def _numeric(name: str) -> bool:
    return name.isascii() and name.isdigit()




def _visible_dirs(directory: Path) -> list[Path]:
    """Subdirectories, dot-directories (``.staging``) left out."""
    return sorted(p for p in directory.iterdir() if not p.name.startswith(".") and p.is_dir())


class Catalog:
    def __init__(self, roots: list[Path], read_only: frozenset[Path] = frozenset()):
        self.roots = roots
        #: roots whose models the API never changes (``check_writable``)
        self.read_only = read_only
        self._models: dict[str, ModelEntry] = {}
        self._lock = threading.Lock()
        self.scan()

    def scan(self) -> dict[str, ModelEntry]:
        found: dict[str, ModelEntry] = {}
        for root in self.roots:
            try:
                directories = _visible_dirs(root) if root.is_dir() else []
            except OSError:
                continue
            for directory in directories:
                entry = _read_entry(directory)
                if entry is not None and entry.name not in found:
                    found[entry.name] = entry
        with self._lock:
            self._models = found
        return found

    def check_writable(self, entry: ModelEntry, action: str) -> None:
        """409 ``read_only`` when ``entry`` lives in a read-only root."""
        if entry.directory.parent in self.read_only:
            raise ApiError(409, f"model {entry.name!r} lives in a read-only root of the repository ({entry.directory.parent}): "
                           f"it cannot {action}; upload your own model under another name", "read_only", model=entry.name)

    def models(self) -> list[ModelEntry]:
        return list(self._models.values())

    def get(self, name: str) -> ModelEntry | None:
        """The model as it is on disk now (the first root that has it), or None."""
        if not name or name.startswith(".") or "/" in name or "\\" in name or "\x00" in name:
            return None
        for root in self.roots:
            entry = _read_entry(root / name)
            if entry is not None:
                return entry
        return None

    def found(self, name: str) -> ModelEntry:
        """``get``, or a 404 ``not_found`` naming the model."""
        entry = self.get(name)
        if entry is None:
            raise ApiError(404, f"no model {name!r}", "not_found", model=name)
        return entry

    def refresh(self, name: str) -> ModelEntry | None:
        """Re-read one model after a change to it, so ``models()`` agrees with the disk."""
        entry = self.get(name)
        with self._lock:
            models = dict(self._models)
            if entry is None:
                models.pop(name, None)
            else:
                models[name] = entry
            self._models = models
        return entry


def _read_entry(directory: Path) -> ModelEntry | None:
    try:
        return _entry(directory) if directory.is_dir() else None
    except OSError:  # renamed away (deleted) while it was read, or a name the filesystem refuses
        return None


def _entry(directory: Path) -> ModelEntry | None:
    if (directory / "config.pbtxt").is_file():
        versions = sorted((p.name for p in _visible_dirs(directory) if _numeric(p.name)), key=version_key)
        return _with_policy(ModelEntry(directory.name, "triton", directory, tuple(versions))) if versions else None
    manifests: dict[str, dict[str, Any]] = {}
    for version_dir in _visible_dirs(directory):
        manifest = version_dir / "model.json"
        if manifest.is_file():
            try:
                loaded = json.loads(manifest.read_text())
            except (OSError, ValueError, RecursionError):
                continue  # a half-written or broken manifest is not a model yet
            if isinstance(loaded, dict):
                manifests[version_dir.name] = loaded
    if not manifests:
        return None
    versions = tuple(sorted(manifests, key=version_key))
    return _with_policy(ModelEntry(directory.name, "sluice", directory, versions, manifests))


def _with_policy(entry: ModelEntry) -> ModelEntry:
    """``entry`` with its version policy read and checked against its versions."""
    return replace(entry, policy=ModelPolicy.of(entry.directory, entry.versions))
