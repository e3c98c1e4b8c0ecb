"""``POST /models/<name>``: a new, immutable version of a model, numbered by the repository.

The steps, each a separate guarantee:

1. Refuse early: a bad model name (422 ``bad_name``), a body that is neither a tar
   (``application/gzip``, ``application/x-gzip``, ``application/x-tar``,
   ``application/x-gtar``, ``application/octet-stream``) nor ``multipart/form-data``
   (415), a ``Content-Length`` above ``max_upload_bytes`` (413 ``too_large``, before
   a byte is read).
2. Stream the body into ``<root>/.staging/<uuid>/`` (the root the model will live in:
   the existing model's, else ``upload_root``), counting bytes: the moment the count
   passes ``max_upload_bytes`` the request is answered 413. The body never sits in
   memory; disk writes go through a worker thread.
3. In a worker thread: unpack (``repository.unpack``: path checks, file and byte
   limits), decide the layout from the files (``model.json`` at the top: Sluice;
   ``config.pbtxt`` at the top: Triton; neither or both: 422 ``bad_manifest``) and
   validate the manifest (``repository.manifests``).
4. Under the model's lock: look at the model as it is now (409 ``layout_conflict``
   when it has the other layout, 409 ``read_only`` when it lives in a read-only root
   (checked first before the body is read, again here); 409 ``config_conflict`` when a Triton model's
   ``config.pbtxt`` differs from the upload's, since Triton keeps one config per model
   and existing versions are immutable), number the version (1 + the highest numeric
   version directory present, 1 for a new model) and ``os.rename`` it into place. A
   new model appears whole: its directory (with ``config.pbtxt`` for Triton) is
   renamed in at once. A Triton model directory that has a config but no version yet
   gets the upload's config (temp file + rename) before the version directory appears.
5. Whatever happened, the staging directory is removed: a refused upload leaves the
   tree exactly as it was.

The answer (201) is ``{"name", "version", "layout", "framework", "files"}``, files as
``/files/<name>?version=<v>`` lists them, digests computed while the files were written.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import ClientDisconnect, Request

from repository import digests
from repository.catalog import Catalog
from repository.manifests import MAX_MANIFEST_BYTES, ManifestError, check_sluice_manifest, check_triton_config
from repository.paths import is_model_name, is_numeric
from repository.settings import RepositorySettings
from repository.staging import ModelLocks, Staging, storage_error
from repository.unpack import Unpacked, parse_options_header, unpack_multipart, unpack_tar
from sluice.errors import ApiError

#: declared types of a tar body (gzip or not is told by its magic bytes)
TAR_TYPES = ("application/gzip", "application/x-gzip", "application/x-tar", "application/x-gtar", "application/octet-stream")
MULTIPART = "multipart/form-data"
UPLOAD_TYPES = (MULTIPART, *TAR_TYPES)

_WRITE_BATCH = 1 << 20
_BODY = "body"
_INCOMING = "incoming"


def bad_manifest(message: str) -> ApiError:
    return ApiError(422, message, "bad_manifest")


@dataclass(frozen=True)
class _Checked:
    """An unpacked, validated upload: its layout, framework and (Triton) config bytes."""

    layout: str
    framework: str
    files: Unpacked
    config: bytes | None = None


class Uploader:
    def __init__(self, catalog: Catalog, upload_root: Path | None, settings: RepositorySettings, locks: ModelLocks):
        self.catalog = catalog
        self.upload_root = upload_root
        self.settings = settings
        self.locks = locks

    async def upload(self, name: str, request: Request) -> dict[str, Any]:
        if not is_model_name(name):
            raise ApiError(
                422, f"{name!r} is not a model name (1 to 63 letters, digits, '_', '.', '-', starting with a letter or digit)",
                "bad_name", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
            )
        kind, boundary = _body_kind(request.headers.get("content-type"))
        limit = self.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _too_large(limit)
        root = self._root_for(name)
        staging = await asyncio.to_thread(Staging.create, root)
        try:
            await _receive(request, staging.path / _BODY, limit)
        except BaseException:
            staging.remove()  # synchronously: a cancelled request must not leave its body behind
            raise
        # the thread owns the staging directory from here on and removes it itself, even if this request is cancelled
        return await asyncio.to_thread(self._install, name, kind, boundary, staging)

    def _root_for(self, name: str) -> Path:
        entry = self.catalog.get(name)
        if entry is not None:
            self.catalog.check_writable(entry, "get a new version")  # before a byte of the body is read
            return entry.directory.parent
        if self.upload_root is None:
            raise ApiError(503, "this repository has no root to upload to (SLUICE_REPOSITORY_ROOTS is empty)", "no_upload_root")
        return self.upload_root

    def _install(self, name: str, kind: str, boundary: bytes, staging: Staging) -> dict[str, Any]:
        try:
            checked = self._unpack_and_check(name, kind, boundary, staging)
            with self.locks(name):  # answered under the lock too: a delete cannot slip in between
                return self._answer(name, self._commit(name, checked, staging), checked)
        finally:
            staging.remove()

    def _unpack_and_check(self, name: str, kind: str, boundary: bytes, staging: Staging) -> _Checked:
        body, incoming = staging.path / _BODY, staging.path / _INCOMING
        incoming.mkdir()
        limits = (self.settings.max_upload_files, self.settings.max_unpacked_bytes)
        if kind == "tar":
            files = unpack_tar(body, incoming, *limits)
        else:
            files = unpack_multipart(body, boundary, incoming, *limits)
        body.unlink()
        has_manifest, has_config = "model.json" in files.files, "config.pbtxt" in files.files
        if has_manifest == has_config:
            which = "both model.json and config.pbtxt" if has_manifest else "neither model.json nor config.pbtxt"
            raise bad_manifest(f"the upload has {which} at its top level: "
                               "model.json makes a Sluice-layout model, config.pbtxt a Triton-layout one")
        try:
            if has_manifest:
                manifest = check_sluice_manifest(_read_manifest(files, "model.json"), files.has)
                return _Checked("sluice", manifest["framework"], files)
            config = _read_manifest(files, "config.pbtxt")
            check_triton_config(config, name)
        except ManifestError as exc:
            raise bad_manifest(str(exc)) from None
        # the version directory holds everything but the config, which is the model's
        os.rename(incoming / "config.pbtxt", staging.path / "config.pbtxt")
        del files.files["config.pbtxt"]
        return _Checked("triton", "triton", files, config)

    def _commit(self, name: str, checked: _Checked, staging: Staging) -> str:
        """Number the version and move it into place; the caller holds the model's lock."""
        entry = self.catalog.get(name)
        if entry is not None:
            self.catalog.check_writable(entry, "get a new version")
            model_dir = entry.directory
        elif self.upload_root is not None:
            model_dir = self.upload_root / name
        else:  # roots emptied under us: nowhere to go
            raise ApiError(503, "this repository has no root to upload to", "no_upload_root")
        if model_dir.parent == staging.root:
            return self._move_in(name, model_dir, checked, staging)
        moved = _relocate(staging, model_dir.parent)  # the model moved roots while the body streamed in (rare)
        try:
            return self._move_in(name, model_dir, checked, moved)
        finally:
            moved.remove()

    def _move_in(self, name: str, model_dir: Path, checked: _Checked, staging: Staging) -> str:
        incoming = staging.path / _INCOMING
        try:
            exists = model_dir.is_dir()
            if model_dir.exists() and not exists:
                raise ApiError(409, f"{model_dir.name!r} in the repository is a file, not a model directory", "conflict")
            version = _next_version(model_dir) if exists else 1
            if exists:
                _check_existing(name, model_dir, version, checked)
                config = model_dir / "config.pbtxt"
                if checked.layout == "triton" and (not config.is_file() or config.read_bytes() != checked.config):
                    # a model directory without a version yet: the upload's config goes in first
                    os.replace(staging.path / "config.pbtxt", config)
                os.rename(incoming, model_dir / str(version))
            else:
                staged_model = staging.path / "model"
                staged_model.mkdir()
                if checked.layout == "triton":
                    os.rename(staging.path / "config.pbtxt", staged_model / "config.pbtxt")
                os.rename(incoming, staged_model / str(version))
                os.rename(staged_model, model_dir)  # a new model appears whole, config and version at once
        except OSError as exc:
            raise storage_error(exc, f"install model {name!r}") from exc
        self.catalog.refresh(name)
        return str(version)

    def _answer(self, name: str, version: str, checked: _Checked) -> dict[str, Any]:
        entry = self.catalog.get(name)
        if entry is None or version not in entry.versions:  # not readable back: never expected
            raise ApiError(500, f"model {name!r} version {version} was installed but cannot be read back", "storage_error")
        base = entry.base(version)
        prefix = f"{version}/" if checked.layout == "triton" else ""
        files = []
        for relative in entry.files(version):
            path = base / relative
            record = checked.files.files.get(relative.as_posix().removeprefix(prefix))
            if relative.as_posix() == "config.pbtxt" and checked.layout == "triton":
                record = None  # hashed from disk (identical to the upload's when it existed already)
            try:
                if record is not None:
                    digests.remember(path, record.sha256)
                files.append(digests.describe(path, relative))
            except OSError:
                continue
        return {"name": name, "version": version, "layout": checked.layout, "framework": checked.framework, "files": files}


def _read_manifest(files: Unpacked, name: str) -> bytes:
    size = files.files[name].size
    if size > MAX_MANIFEST_BYTES:  # checked before it is read into memory
        raise ManifestError(f"{name} is {size} bytes; a manifest may have at most {MAX_MANIFEST_BYTES}")
    return (files.root / name).read_bytes()


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the upload is larger than {limit} bytes", "too_large", limit=limit)


def _body_kind(content_type: str | None) -> tuple[str, bytes]:
    """``("tar", b"")`` or ``("multipart", boundary)``; 415 for any other body, 400 for a form without a boundary."""
    mime, options = parse_options_header(content_type or "")
    mime_text = mime.decode("latin-1")
    if mime_text in TAR_TYPES:
        return "tar", b""
    if mime_text == MULTIPART:
        boundary = options.get(b"boundary", b"")
        if not boundary:
            raise ApiError(400, "a multipart/form-data body needs a boundary parameter", "bad_archive")
        return "multipart", boundary
    raise ApiError(
        415, f"a model upload is a tar (optionally gzipped) or multipart/form-data body, not {content_type or 'no content type'!r}",
        "unsupported_media_type", accepted=list(UPLOAD_TYPES),
    )


async def _receive(request: Request, target: Path, limit: int) -> int:
    """Stream the request body into ``target``; 413 the moment it passes ``limit`` bytes."""
    seen = 0
    batch = bytearray()
    try:
        with open(target, "xb") as out:
            async for chunk in request.stream():
                seen += len(chunk)
                if seen > limit:
                    raise _too_large(limit)
                batch += chunk
                if len(batch) >= _WRITE_BATCH:
                    await asyncio.to_thread(out.write, bytes(batch))
                    batch.clear()
            if batch:
                await asyncio.to_thread(out.write, bytes(batch))
    except ClientDisconnect:
        raise ApiError(400, "the client went away before the upload was complete", "bad_archive") from None
    except OSError as exc:
        raise storage_error(exc, "store the upload") from exc
    return seen


def _check_existing(name: str, model_dir: Path, version: int, checked: _Checked) -> None:
    """409 when an upload does not fit the model already there: the other layout, or another Triton config."""
    existing = _layout_on_disk(model_dir)
    if existing is not None and existing != checked.layout:
        ours = "Sluice layout (model.json)" if checked.layout == "sluice" else "Triton layout (config.pbtxt)"
        theirs = "Triton layout (config.pbtxt)" if existing == "triton" else "Sluice layout (model.json)"
        raise ApiError(409, f"model {name!r} is in the {theirs}; this upload is in the {ours}", "layout_conflict",
                       layout=existing)
    if checked.layout == "triton" and existing == "triton" and version > 1:
        if (model_dir / "config.pbtxt").read_bytes() != checked.config:
            raise ApiError(
                409,
                f"the upload's config.pbtxt differs from model {name!r}'s: Triton keeps one config per model "
                "and existing versions are immutable (upload it as a new model, or delete the old versions first)",
                "config_conflict",
            )


def _layout_on_disk(model_dir: Path) -> str | None:
    """The layout a model directory already has, valid model or not: a config makes it Triton, a manifest Sluice."""
    if (model_dir / "config.pbtxt").is_file():
        return "triton"
    if any((p / "model.json").is_file() for p in model_dir.iterdir() if not p.name.startswith(".")):
        return "sluice"
    return None


def _next_version(model_dir: Path) -> int:
    numbers = [int(p.name) for p in model_dir.iterdir() if is_numeric(p.name) and p.is_dir()]
    return max(numbers, default=0) + 1


def _relocate(staging: Staging, root: Path) -> Staging:
    """Move a staged upload to another root's staging area (possibly another filesystem)."""
    moved = Staging.create(root)
    try:
        for child in staging.path.iterdir():
            shutil.move(str(child), str(moved.path / child.name))
    except OSError as exc:
        moved.remove()
        raise storage_error(exc, f"move the upload to {root}") from exc
    staging.remove()
    return moved
