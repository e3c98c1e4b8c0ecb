"""The repository's HTTP API: ``/models``, ``/metadata/<m>``, ``/files/<m>``, ``/download/<m>/<file>``.

Every endpoint takes ``?version=`` (default: the latest version).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.responses import FileResponse

from repository.catalog import Catalog, ModelEntry, PathRefused
from sluice.files import sha256_file
from repository.settings import RepositorySettings
from sluice.errors import ApiError, install_error_handlers
from sluice.metrics import mount_metrics


@lru_cache(maxsize=4096)
def _digest(path: Path, mtime_ns: int, size: int) -> str:
    """SHA-256 of a file, computed once per (path, mtime, size): listings repeat, files rarely change."""
    return sha256_file(path)


def _describe(path: Path, relative: Path) -> dict:
    stat = path.stat()
    return {"path": relative.as_posix(), "size": stat.st_size, "sha256": _digest(path, stat.st_mtime_ns, stat.st_size)}


def _entry(catalog: Catalog, model: str, version: str | None) -> tuple[ModelEntry, str]:
    entry = catalog.get(model)
    if entry is None:
        raise ApiError(404, f"no model {model!r}", "not_found", model=model)
    version = version or entry.latest
    if version not in entry.versions:
        raise ApiError(404, f"model {model!r} has no version {version!r}", "not_found", versions=list(entry.versions))
    return entry, version


def create(settings: RepositorySettings, base_dir: Path | None = None) -> FastAPI:
    base = base_dir or Path.cwd()
    roots = [(base / r).resolve() for r in settings.roots.split(":") if r]
    catalog = Catalog(roots)
    app = FastAPI(title="Sluice model repository", version="0.1.0")
    app.state.catalog = catalog
    install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok", "models": len(catalog.models())}

    @app.get("/models", tags=["models"])
    async def models() -> list[dict]:
        return [
            {"name": e.name, "framework": e.framework, "versions": list(e.versions), "latest": e.latest}
            for e in sorted(catalog.scan().values(), key=lambda e: e.name)
        ]

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
            "version": version,
            "inputs": manifest.get("inputs", []),
            "outputs": manifest.get("outputs", []),
            "manifest": manifest,
        }

    @app.get("/files/{model}", tags=["models"])
    async def files(model: str, version: str | None = Query(None)) -> dict:
        entry, version = _entry(catalog, model, version)
        base = entry.base(version)
        return {
            "name": entry.name,
            "version": version,
            "files": [_describe(base / p, p) for p in entry.files(version)],
        }

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
