"""The names the repository accepts: model names and numbered version directories.
Relative paths (an upload's member names, a manifest's ``artifact``) follow the rule
every service shares, ``sluice.paths``."""

from __future__ import annotations

import re

#: the names a model may have (upload, and therefore a directory name in a root)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
#: a version directory the repository numbers (ASCII digits only)
NUMERIC = re.compile(r"[0-9]+")

def is_model_name(name: str) -> bool:
    return MODEL_NAME.fullmatch(name) is not None


def is_numeric(name: str) -> bool:
    return NUMERIC.fullmatch(name) is not None
