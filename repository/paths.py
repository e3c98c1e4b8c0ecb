"""Checks a relative path that a client hands the repository (an upload's member name,
a manifest's ``artifact``) and says exactly what is wrong with a bad one.

A path is refused when it is empty, absolute, has a ``..`` segment, a backslash or a
NUL byte, is not UTF-8, or has a segment longer than a file name may be. ``.`` and
empty segments (``./model.json``, ``sub//x``, ``sub/``) are dropped, so the names
``tar -C dir .`` writes are accepted.
"""

from __future__ import annotations

import re

#: the names a model may have (upload, and therefore a directory name in a root)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: a version directory the repository numbers (ASCII digits only)
NUMERIC = re.compile(r"[0-9]+")

_MAX_SEGMENT_BYTES = 255


class BadPath(ValueError):
    """A path that cannot name a file inside a model version; ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path!r}: {reason}")
        self.path = path
        self.reason = reason


def relative_parts(path: str, *, allow_empty: bool = False) -> tuple[str, ...]:
    """The segments of a safe relative POSIX path; raises ``BadPath`` otherwise.

    ``allow_empty``: a path that names the version directory itself (``.``, ``./``)
    gives ``()`` instead of being refused (a tar's top directory entry).
    """
    if "\x00" in path:
        raise BadPath(path, "contains a NUL byte")
    if "\\" in path:
        raise BadPath(path, "contains a backslash")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise BadPath(path, "is not valid UTF-8") from None
    if not encoded:
        raise BadPath(path, "is an empty name")
    if path.startswith("/"):
        raise BadPath(path, "is an absolute path")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise BadPath(path, "has a '..' segment")
    if not parts and not allow_empty:
        raise BadPath(path, "is an empty name")
    for part in parts:
        if len(part.encode("utf-8")) > _MAX_SEGMENT_BYTES:
            raise BadPath(path, f"has a segment longer than {_MAX_SEGMENT_BYTES} bytes")
    return parts


def is_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def is_numeric(name: str) -> bool:
    return NUMERIC.fullmatch(name) is not None
