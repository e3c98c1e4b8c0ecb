"""Model version ordering, one rule for every service: numeric versions in number
order, then any other names in text order; the highest is a model's default."""

from __future__ import annotations

from collections.abc import Iterable


def version_key(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isascii() and version.isdigit() else (1, 0, version)


def latest(versions: Iterable[str]) -> str | None:
    """The default version among ``versions``; None when there are none."""
    return max(versions, key=version_key, default=None)
