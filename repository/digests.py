"""SHA-256 of the repository's files, computed once per (path, mtime, size).

Listings repeat and files rarely change, so a digest is cached under the file's
identity. An upload hashes its files while writing them and ``remember``s the
digests, so answering the upload (and the next ``/files``) reads nothing twice.
Thread-safe: listings and uploads run in worker threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from sluice.files import sha256_file

_MAX_ENTRIES = 4096
_cache: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_lock = threading.Lock()


def _key(path: Path) -> tuple[tuple[str, int, int], int]:
    stat = path.stat()
    return (str(path), stat.st_mtime_ns, stat.st_size), stat.st_size


def _store(key: tuple[str, int, int], digest: str) -> None:
    with _lock:
        _cache[key] = digest
        _cache.move_to_end(key)
        while len(_cache) > _MAX_ENTRIES:
            _cache.popitem(last=False)


def remember(path: Path, sha256: str) -> None:
    """Record a digest computed elsewhere (while the file was written) for ``path`` as it is now."""
    _store(_key(path)[0], sha256)


def describe(path: Path, relative: Path) -> dict:
    """``{"path", "size", "sha256"}`` of one file, ``path`` shown as ``relative``."""
    key, size = _key(path)
    with _lock:
        digest = _cache.get(key)
        if digest is not None:
            _cache.move_to_end(key)
    if digest is None:
        digest = sha256_file(path)
        _store(key, digest)
    return {"path": relative.as_posix(), "size": size, "sha256": digest}
