"""``DELETE /models/<name>[?version=V]``: remove a model, or one of its versions.

Under the model's lock (so an upload never numbers against a half-deleted model) the
directory is renamed out of the model, into ``<root>/.staging/`` (one atomic step:
no reader ever sees a partly deleted version), and only then removed from disk.
Deleting a model's last version removes the model's directory (and so, in the Triton
layout, its ``config.pbtxt``, and its version policy). A version the model's version
policy names is not deleted alone (409 ``named_by_version_policy``). Only versions the catalog lists can be deleted, so a
``version`` can never name a path of its own choosing, and a model in a read-only
root (``read_only_roots``) is never deleted (409 ``read_only``). Whether a pipeline still uses
the model is the manager's check, not the repository's.
"""

from __future__ import annotations

import os

from repository.catalog import Catalog
from repository.policy import check_not_named
from repository.staging import ModelLocks, Staging, storage_error
from sluice.errors import ApiError


def delete(catalog: Catalog, locks: ModelLocks, name: str, version: str | None = None) -> None:
    """Blocking (run it in a thread): 404 ``not_found`` for an unknown model or version."""
    with locks(name):
        entry = catalog.found(name)
        if version is not None and version not in entry.versions:
            raise ApiError(404, f"model {name!r} has no version {version!r}", "not_found", versions=list(entry.versions))
        catalog.check_writable(entry, "be deleted")
        whole = version is None or entry.versions == (version,)
        if not whole:
            check_not_named(entry, version)
        target = entry.directory if whole else entry.directory / version
        staging = Staging.create(entry.directory.parent)
        try:
            os.rename(target, staging.path / "deleted")
        except OSError as exc:
            raise storage_error(exc, f"delete model {name!r}" + ("" if whole else f" version {version}")) from exc
        finally:
            staging.remove()
        catalog.refresh(name)
