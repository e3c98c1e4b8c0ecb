"""``PUT /models/<name>/version-policy`` and ``DELETE /models/<name>/version-policy``:
set or remove a model's version policy (``sluice.version_policy``: ``versions.json``
beside its version directories), and the guard that keeps a policy whole when a
version is deleted.

A new policy is checked against the model's versions before it is written (a
version it names must exist; the default must be one it loads): a bad one is a 422
``bad_version_policy`` saying what is wrong, and the file on disk is unchanged. The
file is written to the model's staging directory and renamed into place under the
model's lock, so a reader sees the old policy or the new one, never half of one.
Removing it restores the default policy (the latest version loads and answers).

Runtimes read the policy when they load the model: a changed policy reaches a
runtime at its next load of the model (or its next start), not at once.
"""

from __future__ import annotations

import json
import os
from typing import Any

from repository import views
from repository.catalog import Catalog, ModelEntry
from repository.staging import ModelLocks, Staging, storage_error
from sluice.errors import ApiError
from sluice.version_policy import POLICY_FILE, PolicyError, policy_from_json


def _model(catalog: Catalog, name: str, action: str) -> ModelEntry:
    entry = catalog.found(name)
    catalog.check_writable(entry, action)
    return entry


def put_policy(catalog: Catalog, locks: ModelLocks, name: str, body: Any) -> dict[str, Any]:
    """Blocking (run it in a thread): write ``body`` as the model's policy; the model's policy fields."""
    with locks(name):
        entry = _model(catalog, name, "change its version policy")
        try:
            policy = policy_from_json(body)
            policy.check(entry.versions)
        except PolicyError as exc:
            raise ApiError(422, f"model {name!r}: version policy refused: {exc}", "bad_version_policy",
                           model=name, versions=list(entry.versions)) from None
        staging = Staging.create(entry.directory.parent)
        try:
            written = staging.path / POLICY_FILE
            written.write_text(json.dumps(policy.to_json(), indent=2, sort_keys=True) + "\n")
            os.replace(written, entry.directory / POLICY_FILE)
        except OSError as exc:
            raise storage_error(exc, f"write the version policy of model {name!r}") from exc
        finally:
            staging.remove()
        return views.policy(catalog.refresh(name) or entry)


def remove_policy(catalog: Catalog, locks: ModelLocks, name: str) -> dict[str, Any]:
    """Blocking: remove the model's policy file (404 when it has none); the model's policy fields now."""
    with locks(name):
        entry = _model(catalog, name, "change its version policy")
        try:
            os.remove(entry.directory / POLICY_FILE)
        except FileNotFoundError:
            raise ApiError(404, f"model {name!r} has no version policy", "not_found", model=name) from None
        except OSError as exc:
            raise storage_error(exc, f"remove the version policy of model {name!r}") from exc
        return views.policy(catalog.refresh(name) or entry)


def check_not_named(entry: ModelEntry, version: str) -> None:
    """409 ``named_by_version_policy`` when the model's policy names ``version`` (in
    ``load.specific`` or as its ``default``): deleting it would leave a policy that
    names a version the model does not have."""
    policy = entry.policy.policy
    if policy is not None and (version in policy.versions or version == policy.default):
        raise ApiError(409, f"version {version} of model {entry.name!r} is named by the model's version policy "
                       f"({POLICY_FILE}: {json.dumps(policy.to_json(), sort_keys=True)}); change the policy first",
                       "named_by_version_policy", model=entry.name, version=version, version_policy=policy.to_json())
