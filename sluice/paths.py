"""Checks for the names and paths that cross a service boundary: a model's name, a
version, a file inside a model version (an upload's member, a manifest's
``artifact``, a path in a file listing or in a set of recorded digests), and a
SHA-256 digest. One rule for every service that reads them (the repository, the
manager, the runtimes), so a path one accepts is a path all accept.

A relative path is refused when it is empty, absolute, has a ``..`` segment, a
backslash or a NUL byte, is not UTF-8, or has a segment longer than a file name may
be. ``.`` and empty segments (``./model.json``, ``sub//x``) are dropped.
"""

from __future__ import annotations

import re

#: a version as one path segment (a URL segment, a cache directory); the manager's API pattern
VERSION = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: a SHA-256 digest as the repository lists it: 64 lowercase hex digits
SHA256 = re.compile(r"[0-9a-f]{64}")

_MAX_SEGMENT_BYTES = 255


class UnsafePath(ValueError):
    """A path or name that could leave the directory it is meant for; ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path!r} {reason}")
        self.path = path
        self.reason = reason


def relative_parts(path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    """The segments of a safe relative POSIX path; raises ``UnsafePath`` otherwise.

    ``allow_empty``: a path that names the directory itself (``.``, ``./``) gives ``()``
    instead of being refused (a tar's top directory entry)."""
    if not isinstance(path, str):
        raise UnsafePath(repr(path), "is not a string")
    if "\x00" in path:
        raise UnsafePath(path, "contains a NUL byte")
    if "\\" in path:
        raise UnsafePath(path, "contains a backslash")
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(path, "is not valid UTF-8") from None
    if not path:
        raise UnsafePath(path, "is an empty name")
    if path.startswith("/"):
        raise UnsafePath(path, "is an absolute path")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise UnsafePath(path, "has a '..' segment")
    if not parts and not allow_empty:
        raise UnsafePath(path, "is an empty name")
    for part in parts:
        if len(part.encode("utf-8")) > _MAX_SEGMENT_BYTES:
            raise UnsafePath(path, f"has a segment longer than {_MAX_SEGMENT_BYTES} bytes")
    return parts


def check_version(version: str) -> str:
    """``version`` when it is one safe path segment (``[A-Za-z0-9_.-]{1,64}``, not ``.`` or ``..``)."""
    if not isinstance(version, str) or not VERSION.fullmatch(version) or version in (".", ".."):
        raise UnsafePath(str(version), "is not a version (1 to 64 of A-Z a-z 0-9 _ . -, not '.' or '..')")
    return version


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and SHA256.fullmatch(value) is not None
