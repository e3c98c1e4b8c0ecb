"""Where writes to a root are prepared, and the lock that orders them per model.

Every change to a root is made in ``<root>/.staging/<uuid>/`` (the same filesystem,
so the final step is one atomic ``os.rename``) and the staging directory is removed
afterwards, whatever happened: an upload's body, its unpacked files, a deleted
version on its way out. ``.staging`` itself is removed when it is empty again, so a
failed upload leaves the tree exactly as it was. The catalog never looks into a
dot-directory.

``ModelLocks`` gives one ``threading.Lock`` per model name: uploads and deletes do
their file work in worker threads and take the model's lock only to number the
version and move it into place.
"""

from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from pathlib import Path

from sluice.errors import ApiError

STAGING = ".staging"


def storage_error(exc: OSError, what: str) -> ApiError:
    """An ``OSError`` of the repository's own storage as an API error (not a bare 500)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(507, f"no space left to {what}", "insufficient_storage")
    return ApiError(500, f"cannot {what}: {exc.strerror or exc}", "storage_error")


class Staging:
    """A private directory under ``<root>/.staging/`` that goes away on ``remove()``."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / STAGING / uuid.uuid4().hex

    @classmethod
    def create(cls, root: Path) -> Staging:
        staging = cls(root)
        try:
            root.mkdir(parents=True, exist_ok=True)
            for _ in range(10):  # another request may remove an empty .staging between our two mkdirs
                (root / STAGING).mkdir(exist_ok=True)
                try:
                    staging.path.mkdir()
                    return staging
                except FileNotFoundError:
                    continue
            staging.path.mkdir()
        except OSError as exc:
            raise storage_error(exc, f"write to {root}") from exc
        return staging

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            os.rmdir(self.root / STAGING)  # only when empty: other requests' staging stays
        except OSError:
            pass


class ModelLocks:
    """One lock per model name (names are few and small; the map is never pruned)."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, name: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = self._locks[name] = threading.Lock()
            return lock
