"""A model's version policy: which of its versions a runtime loads when it is asked
for the model without a version, and which version answers a request that names no
version. One rule for every service (the repository serves it, the runtimes load by
it, the manager shows it).

The policy is a file beside the model's version directories,
``<root>/<model>/versions.json`` (both layouts), modelled on Triton's
``ModelVersionPolicy`` (``version_policy`` in ``config.pbtxt``) plus a default, as
TF Serving's version labels give one::

    {"load": {"specific": {"versions": ["1", "2"]}}, "default": "1"}

* ``load``: exactly one of ``{"latest": {"num_versions": N}}`` (the N highest
  versions), ``{"all": {}}`` or ``{"specific": {"versions": [...]}}``; default
  ``{"latest": {"num_versions": 1}}``.
* ``default``: the version an unpinned request gets; it must be one that ``load``
  loads. Default: the highest version ``load`` loads.

A model with no policy file has the default policy: the latest version is loaded and
answers (what every service did before policies existed). Versions are strings
(Triton's integers are accepted and read as strings). A malformed policy, or one
that names a version the model does not have, is refused with ``PolicyError``, whose
message says what is wrong; never guessed around.

The repository answers a model's policy with every model and every version's metadata
(``ModelPolicy``: ``default_version``, ``load_versions``, ``version_policy`` and
``policy_error``, null unless the file is refused); the runtimes and the manager read it back
with ``ModelPolicy.from_json``.

A runtime that holds versions loaded by other means (pinned loads) answers an
unpinned request with the policy's default when it has it loaded, else with the
highest version it has loaded (``default_among``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sluice.paths import VERSION
from sluice.versions import version_key

#: the policy's file name, beside the model's version directories
POLICY_FILE = "versions.json"
#: a policy file larger than this is refused before it is parsed
MAX_POLICY_BYTES = 64 << 10
_KINDS = ("latest", "all", "specific")


class PolicyError(ValueError):
    """A version policy that is malformed, or names versions the model does not have."""


@dataclass(frozen=True)
class VersionPolicy:
    kind: Literal["latest", "all", "specific"] = "latest"
    #: ``latest``: how many of the highest versions are loaded
    num_versions: int = 1
    #: ``specific``: the versions loaded
    versions: tuple[str, ...] = ()
    #: the version an unpinned request gets; None: the highest one loaded
    default: str | None = None

    def loads(self, available: Iterable[str]) -> tuple[str, ...]:
        """The versions (of ``available``, lowest first) loaded for the unpinned model."""
        ordered = sorted(set(available), key=version_key)
        if self.kind == "all":
            return tuple(ordered)
        if self.kind == "latest":
            return tuple(ordered[-self.num_versions:])
        return tuple(v for v in ordered if v in self.versions)

    def default_of(self, available: Iterable[str]) -> str:
        """The default version among ``available`` (checked: ``PolicyError`` when the
        policy names a version that is not there)."""
        loaded = self.check(available)
        return self.default or loaded[-1]

    def check(self, available: Iterable[str]) -> tuple[str, ...]:
        """The versions loaded; ``PolicyError`` unless every version the policy names is
        among ``available`` and the default is one it loads."""
        available = set(available)
        missing = sorted(set(self.versions) - available, key=version_key)
        if missing:
            raise PolicyError(f"load.specific names version(s) {', '.join(missing)} that the model does not have "
                              f"(it has {_listed(available)})")
        loaded = self.loads(available)
        if not loaded:
            raise PolicyError(f"the policy loads no version (the model has {_listed(available)})")
        if self.default is not None and self.default not in loaded:
            why = "the model does not have it" if self.default not in available else f"the policy loads only {_listed(loaded)}"
            raise PolicyError(f"default version {self.default!r} is not one the policy loads: {why}")
        return loaded

    def to_json(self) -> dict[str, Any]:
        """The policy as its file says it (normalised)."""
        load: dict[str, Any] = {
            "latest": {"latest": {"num_versions": self.num_versions}},
            "all": {"all": {}},
            "specific": {"specific": {"versions": list(self.versions)}},
        }[self.kind]
        return {"load": load, **({"default": self.default} if self.default is not None else {})}


#: what a model with no policy file has: the latest version loaded and answering
DEFAULT_POLICY = VersionPolicy()


def parse_policy(raw: bytes | str) -> VersionPolicy:
    """A policy from its file's text; ``PolicyError`` saying what is wrong."""
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{POLICY_FILE} is {len(raw)} bytes; a version policy may have at most {MAX_POLICY_BYTES}")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PolicyError(f"{POLICY_FILE} is not valid JSON: {exc}") from None
    return policy_from_json(body)


def policy_from_json(body: Any) -> VersionPolicy:
    """A policy from its JSON object (a file's, or an API body's); ``PolicyError`` saying what is wrong."""
    if not isinstance(body, dict):
        raise PolicyError(f"a version policy is a JSON object with 'load' and/or 'default', not {_json_type(body)}")
    unknown = sorted(set(body) - {"load", "default"})
    if unknown:
        raise PolicyError(f"unknown key(s) {', '.join(map(repr, unknown))} in the version policy; it has 'load' and 'default'")
    kind, num_versions, versions = "latest", 1, ()
    if "load" in body:
        load = body["load"]
        if not isinstance(load, dict) or len(load) != 1 or next(iter(load)) not in _KINDS:
            raise PolicyError("'load' must be exactly one of {\"latest\": {\"num_versions\": N}}, {\"all\": {}} "
                              f"or {{\"specific\": {{\"versions\": [...]}}}}, not {json.dumps(load)[:200]}")
        kind, args = next(iter(load.items()))
        if not isinstance(args, dict):
            raise PolicyError(f"'load.{kind}' must be an object, not {_json_type(args)}")
        allowed = {"latest": {"num_versions"}, "all": set(), "specific": {"versions"}}[kind]
        extra = sorted(set(args) - allowed)
        if extra:
            raise PolicyError(f"unknown key(s) {', '.join(map(repr, extra))} in 'load.{kind}'"
                              + (f"; it has {', '.join(map(repr, sorted(allowed)))}" if allowed else "; it has none"))
        if kind == "latest":
            num_versions = args.get("num_versions", 1)
            if not isinstance(num_versions, int) or isinstance(num_versions, bool) or num_versions < 1:
                raise PolicyError(f"'load.latest.num_versions' must be an integer >= 1, not {json.dumps(num_versions)}")
        if kind == "specific":
            listed = args.get("versions")
            if not isinstance(listed, list) or not listed:
                raise PolicyError("'load.specific.versions' must be a non-empty list of versions")
            versions = tuple(_version(v, "a version in 'load.specific.versions'") for v in listed)
            if len(set(versions)) != len(versions):
                raise PolicyError(f"'load.specific.versions' lists a version twice: {list(versions)}")
    default = _version(body["default"], "'default'") if body.get("default") is not None else None
    policy = VersionPolicy(kind, num_versions, tuple(sorted(versions, key=version_key)), default)
    if default is not None and kind == "specific" and default not in versions:
        raise PolicyError(f"default version {default!r} is not one the policy loads ({_listed(versions)})")
    return policy


def read_policy(model_dir: Path) -> VersionPolicy | None:
    """The policy in ``<model_dir>/versions.json``; None when there is none (the default
    policy applies); ``PolicyError`` when it cannot be read or is malformed."""
    path = Path(model_dir) / POLICY_FILE
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyError(f"{POLICY_FILE} cannot be read: {exc.strerror or exc}") from None
    return parse_policy(raw)


@dataclass(frozen=True)
class ModelPolicy:
    """A model's policy as it applies to the versions it has now."""

    #: the version an unpinned request gets; None: the policy file is refused
    default_version: str | None
    #: the versions loaded for the unpinned model, lowest first
    load_versions: tuple[str, ...]
    #: the model's policy file; None: none (the default policy applies)
    policy: VersionPolicy | None = None
    #: why the policy file is refused, when it is
    error: str | None = None

    @classmethod
    def of(cls, model_dir: Path, versions: Iterable[str]) -> ModelPolicy:
        """The policy of the model in ``model_dir`` whose versions are ``versions``."""
        versions = tuple(versions)
        try:
            policy = read_policy(model_dir)
            chosen = policy or DEFAULT_POLICY
            return cls(chosen.default_of(versions), chosen.check(versions), policy)
        except PolicyError as exc:
            return cls(None, (), None, str(exc))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "default_version": self.default_version,
            "load_versions": list(self.load_versions),
            "version_policy": self.policy.to_json() if self.policy is not None else None,
            "policy_error": self.error,
        }
        return out

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ModelPolicy:
        """Read back from a repository answer; lenient: what is missing or malformed (a
        repository older than policies) reads as no policy and nothing listed."""
        default = body.get("default_version")
        listed = body.get("load_versions")
        loads = tuple(v for v in listed if isinstance(v, str)) if isinstance(listed, list) else ()
        try:
            policy = policy_from_json(body["version_policy"]) if isinstance(body.get("version_policy"), dict) else None
        except PolicyError:
            policy = None
        error = body.get("policy_error")
        return cls(default if isinstance(default, str) and default else None, loads, policy,
                   error if isinstance(error, str) else None)

    def unpinned(self, resolved: str) -> tuple[str, ...]:
        """The versions to load for the unpinned model whose answer resolved to ``resolved``
        (the default): ``load_versions``, with ``resolved`` always among them."""
        return self.load_versions if resolved in self.load_versions else (*self.load_versions, resolved)

    @property
    def preferred(self) -> str | None:
        """The default a policy file names (None: no file; the highest loaded answers)."""
        return self.default_version if self.policy is not None else None


def default_among(loaded: Iterable[str], preferred: str | None = None) -> str | None:
    """A runtime's default among the versions it has ``loaded``: ``preferred`` (the
    policy's default) when loaded, else the highest; None when none are loaded."""
    loaded = list(loaded)
    if preferred is not None and preferred in loaded:
        return preferred
    return max(loaded, key=version_key, default=None)


def _version(value: Any, what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if not isinstance(value, str) or not VERSION.fullmatch(value) or value in (".", ".."):
        raise PolicyError(f"{what} must be a version (a string of letters, digits, '_', '.', '-', or a number), "
                          f"not {json.dumps(value)[:100]}")
    return value


def _listed(versions: Iterable[str]) -> str:
    ordered = sorted(versions, key=version_key)
    return ", ".join(ordered) if ordered else "no versions"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
