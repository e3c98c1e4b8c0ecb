"""The SHA-256 digests of deployed model versions: what a runtime checks every model
file against before it unpickles (or otherwise opens) it.

A version's digests are recorded once, when the version is deployed, and never
change afterwards (versions are immutable):

* on upload through the manager (``POST /api/v1/models/<m>``): the digests the
  repository computed while it wrote the files, from its answer;
* otherwise on first use: the first load onto a runtime through the manager, or the
  first time a runtime asks for them (``GET /api/v1/models/<m>/versions/<v>/digests``:
  the models a runtime starts with); then from the repository's file listing at that
  moment. This is trust on first deployment: a version placed in the repository
  behind the manager's back is trusted as it is when first used.

Deleting a version (or a model) through the manager forgets its record, since the
repository may number a later upload with the same version.

Every recorded path is checked like every other path (relative, no ``..``, no
backslash or NUL) and every digest is 64 hex digits: a listing that breaks either is
refused (502) and nothing is recorded.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from manager.repository import RepositoryClient
from manager.store import RecordedDigests, RecordedFile, Store
from sluice.errors import ApiError
from sluice.paths import UnsafePath, check_version, is_sha256, relative_parts

log = logging.getLogger(__name__)


class DigestFileOut(BaseModel):
    path: str
    sha256: str
    size: int


class ModelDigestsOut(BaseModel):
    """A deployed version's files and their SHA-256, as recorded when it was deployed."""

    model: str
    version: str
    recorded_at: float
    files: list[DigestFileOut]

    @classmethod
    def of(cls, recorded: RecordedDigests) -> "ModelDigestsOut":
        return cls(
            model=recorded.model,
            version=recorded.version,
            recorded_at=recorded.recorded_at,
            files=[DigestFileOut(path=f.path, sha256=f.sha256, size=f.size) for f in recorded.files],
        )


def checked_files(model: str, version: str, listed: Any, source: str) -> list[RecordedFile]:
    """A repository listing (``[{path, sha256, size}]``) as files to record, or a 502
    naming what is wrong with it."""

    def refuse(problem: str) -> ApiError:
        return ApiError(502, f"{source} for model {model!r} version {version}: {problem}; nothing recorded",
                        "bad_listing", model=model, version=version)

    if not isinstance(listed, list) or not listed:
        raise refuse("no files listed")
    files: dict[str, RecordedFile] = {}
    for item in listed:
        try:
            path, digest, size = item["path"], item["sha256"], item["size"]
        except (KeyError, TypeError):
            raise refuse(f"a malformed entry {item!r}") from None
        try:
            relative = "/".join(relative_parts(path))
        except UnsafePath as exc:
            raise refuse(f"an unsafe path: {exc}") from None
        if not is_sha256(digest):
            raise refuse(f"file {path!r} has no SHA-256 digest ({digest!r})")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise refuse(f"file {path!r} has a bad size {size!r}")
        if relative in files:
            raise refuse(f"file {path!r} is listed twice")
        files[relative] = RecordedFile(relative, digest, size)
    return list(files.values())


class DigestBook:
    """Records and answers the digests of deployed model versions."""

    def __init__(self, store: Store, repository: RepositoryClient):
        self.store = store
        self.repository = repository

    def recorded(self, model: str, version: str) -> RecordedDigests | None:
        return self.store.model_digests(model, version)

    async def deployed(self, model: str, version: str) -> RecordedDigests:
        """The version's record, made now from the repository's listing if it has none
        (trust on first deployment). 404 when the repository has no such version."""
        try:
            check_version(version)
        except UnsafePath as exc:
            raise ApiError(422, f"version {exc}", "bad_version", model=model, version=version) from None
        recorded = self.store.model_digests(model, version)
        if recorded is not None:
            return recorded
        listing = await self.repository.files(model, version)
        if str(listing.get("version")) != version:
            raise ApiError(502, f"asked the repository for model {model!r} version {version}, it listed version "
                           f"{listing.get('version')!r}", "bad_listing", model=model, version=version)
        return self._record(model, version, checked_files(model, version, listing.get("files"), "the repository's listing"), "first use")

    def uploaded(self, model: str, version: str, files: list[dict[str, Any]]) -> RecordedDigests:
        """Record a version just uploaded through the manager, from the repository's answer."""
        check_version(version)
        return self._record(model, version, checked_files(model, version, files, "the repository's upload answer"), "upload")

    def forget(self, model: str, version: str | None) -> None:
        self.store.forget_model_digests(model, version)

    def _record(self, model: str, version: str, files: list[RecordedFile], when: str) -> RecordedDigests:
        recorded = self.store.record_model_digests(model, version, files)
        if {f.path: f.sha256 for f in files} == recorded.as_dict():
            log.info("model %s version %s deployed: digests of %d files recorded (%s)", model, version, len(files), when)
        else:  # recorded meanwhile by another call, with other bytes: the first record holds
            log.warning("model %s version %s: the repository now lists other digests than those recorded at %s; "
                        "the recorded ones hold", model, version, recorded.recorded_at)
        return recorded
