"""The repository's HTTP API.

Reading (every endpoint takes ``?version=``, default: the model's default version,
which its version policy names, else the latest; a refused policy makes an unpinned
lookup a 422 ``bad_version_policy``, a pinned one still answers):
``/models`` (``?detail=true``: every model in full), ``/models/<m>`` (one model in
full: versions, signatures, files with digests), ``/metadata/<m>``, ``/files/<m>``,
``/download/<m>/<file>``.

Writing: ``POST /models/<m>`` uploads a new, immutable version (``repository.upload``);
``DELETE /models/<m>[?version=V]`` removes the model or one version
(``repository.delete``); ``PUT``/``DELETE /models/<m>/version-policy`` set or remove
the model's version policy (``repository.policy``). File work (unpacking, hashing, removing) runs in worker
threads, never on the event loop. Every error is the project's JSON error shape.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import FileResponse

from repository import views
from repository.catalog import Catalog, ModelEntry, PathRefused
from repository.delete import delete
from repository.policy import put_policy, remove_policy
from repository.schemas import ModelOut, PolicyOut, UploadedOut, errors
from repository.settings import RepositorySettings
from repository.staging import ModelLocks
from repository.upload import MULTIPART, TAR_TYPES, Uploader
from sluice.errors import ApiError, install_error_handlers
from sluice.version_policy import MAX_POLICY_BYTES
from sluice.metrics import mount_metrics

_BINARY = {"schema": {"type": "string", "format": "binary"}}
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "the version's files: a tar archive (gzip-compressed or not) whose members are paths relative "
        "to the version, or a multipart form of `files` parts whose filenames are those paths",
        "content": {
            MULTIPART: {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            **{t: _BINARY for t in TAR_TYPES},
        },
    }
}


_POLICY_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "load": {"type": "object", "description": 'one of {"latest": {"num_versions": N}}, {"all": {}}, '
                         '{"specific": {"versions": [...]}}; default: {"latest": {"num_versions": 1}}'},
                "default": {"type": "string", "description": "the version an unpinned request gets; default: the highest one loaded"},
            },
        }}},
    }
}


def _entry(catalog: Catalog, model: str, version: str | None) -> tuple[ModelEntry, str]:
    entry = catalog.found(model)
    version = version or entry.unpinned()
    if version not in entry.versions:
        raise ApiError(404, f"model {model!r} has no version {version!r}", "not_found", versions=list(entry.versions))
    return entry, version


def create(settings: RepositorySettings, base_dir: Path | None = None) -> FastAPI:
    base = base_dir or Path.cwd()
    roots = [(base / r).resolve() for r in settings.roots.split(":") if r]
    upload_root = (base / settings.upload_root).resolve() if settings.upload_root else (roots[0] if roots else None)
    if upload_root is not None and upload_root not in roots:
        roots.append(upload_root)  # what is uploaded must be served
    read_only = frozenset((base / r).resolve() for r in settings.read_only_roots.split(":") if r)
    catalog = Catalog(roots, read_only)
    locks = ModelLocks()
    uploader = Uploader(catalog, upload_root, settings, locks)
    app = FastAPI(title="Sluice model repository", version="0.1.0")
    app.state.catalog = catalog
    install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok", "models": len(catalog.models())}

    @app.get("/models", tags=["models"])
    async def models(
        detail: bool = Query(False, description="every model in full (versions, signatures, file digests), as GET /models/{name}"),
    ) -> list[dict]:
        def listing() -> list[dict]:
            entries = sorted(catalog.scan().values(), key=lambda e: e.name)
            return [views.detail(e) if detail else views.summary(e) for e in entries]

        return await asyncio.to_thread(listing)

    @app.get("/models/{name}", tags=["models"], response_model=ModelOut, responses=errors(e404="no such model"))
    async def model(name: str) -> dict:
        """One model in full: every version's framework, inputs, outputs and files (with SHA-256), and its version policy."""
        return await asyncio.to_thread(views.detail, catalog.found(name))

    @app.post(
        "/models/{name}",
        tags=["models"],
        status_code=201,
        response_model=UploadedOut,
        openapi_extra=_UPLOAD_BODY,
        responses=errors(
            e400="`bad_archive`: not a valid tar/tar.gz/multipart body; `bad_path`: a member path that is absolute, "
            "has `..`, a backslash or NUL, is empty or a duplicate, or a tar member that is not a regular file or directory",
            e409="`layout_conflict`: the model exists in the other layout; `config_conflict`: a Triton model's "
            "config.pbtxt differs from the upload's; `read_only`: the model lives in a read-only root",
            e413="`too_large`: the body, the number of files or the unpacked size is over the repository's limits",
            e415="the body is neither a tar (application/gzip, application/x-gzip, application/x-tar, application/x-gtar, "
            "application/octet-stream) nor multipart/form-data",
            e422="`bad_name`: not a model name; `bad_manifest`: no (or both) model.json / config.pbtxt, or a broken one",
        ),
    )
    async def upload(name: str, request: Request) -> dict:
        """Upload a new version of a model (a new model, or a new version of one).

        Versions are immutable and numbered by the repository: 1 + the highest version
        present. `model.json` at the top makes a Sluice-layout model; `config.pbtxt` a
        Triton-layout one (the config is the model's; every other file is the version's)."""
        return await uploader.upload(name, request)

    @app.delete("/models/{name}", tags=["models"], status_code=204, response_class=Response,
                responses=errors(e404="no such model or version", e409="`read_only`: the model lives in a read-only root"))
    async def remove(name: str, version: str | None = Query(None, description="one version; all versions when absent")) -> Response:
        """Delete a model (every version) or one version; deleting the last version removes the model."""
        await asyncio.to_thread(delete, catalog, locks, name, version)
        return Response(status_code=204)

    @app.put("/models/{name}/version-policy", tags=["models"], response_model=PolicyOut,
             responses=errors(e404="no such model", e409="`read_only`: the model lives in a read-only root",
                              e422="`bad_version_policy`: malformed, or names a version the model does not have"),
             openapi_extra=_POLICY_BODY)
    async def set_policy(name: str, request: Request) -> dict:
        """Set the model's version policy: which versions an unpinned load loads, and which one
        answers an unpinned request (`{"load": {"specific": {"versions": ["1", "2"]}}, "default": "1"}`)."""
        raw = await request.body()
        try:
            body = json.loads(raw) if len(raw) <= MAX_POLICY_BYTES else None
        except (ValueError, RecursionError) as exc:
            raise ApiError(422, f"model {name!r}: version policy refused: the body is not valid JSON: {exc}", "bad_version_policy") from None
        if body is None:
            raise ApiError(413, f"a version policy may have at most {MAX_POLICY_BYTES} bytes", "too_large")
        return await asyncio.to_thread(put_policy, catalog, locks, name, body)

    @app.delete("/models/{name}/version-policy", tags=["models"], response_model=PolicyOut,
                responses=errors(e404="no such model, or it has no version policy", e409="`read_only`: the model lives in a read-only root"))
    async def delete_policy(name: str) -> dict:
        """Remove the model's version policy: its latest version loads and answers again."""
        return await asyncio.to_thread(remove_policy, catalog, locks, name)

    @app.get("/metadata/{model}", tags=["models"])
    async def metadata(model: str, version: str | None = Query(None)) -> dict:
        entry, version = _entry(catalog, model, version)
        manifest = entry.manifests.get(version, {})
        return {
            "name": entry.name,
            "framework": entry.framework,
            "layout": entry.layout,
            "versions": list(entry.versions),
            "latest": entry.latest,
            **views.policy(entry),
            "version": version,
            "inputs": manifest.get("inputs", []),
            "outputs": manifest.get("outputs", []),
            "manifest": manifest,
        }

    @app.get("/files/{model}", tags=["models"])
    async def files(model: str, version: str | None = Query(None)) -> dict:
        entry, version = _entry(catalog, model, version)
        return {"name": entry.name, "version": version, "files": await asyncio.to_thread(views.files, entry, version)}

    @app.get("/download/{model}/{file:path}", tags=["models"])
    async def download(model: str, file: str, request: Request, version: str | None = Query(None)) -> FileResponse:
        entry, version = _entry(catalog, model, version)
        try:
            path = entry.resolve_file(version, file)
        except PathRefused:
            raise ApiError(400, f"file path {file!r} is not allowed", "bad_path", model=model) from None
        except FileNotFoundError:
            raise ApiError(404, f"model {model!r} version {version} has no file {file!r}", "not_found") from None
        return FileResponse(path, media_type="application/octet-stream")

    mount_metrics(app)
    return app
