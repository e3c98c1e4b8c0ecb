"""Fetches a model version's files from the model repository into a local cache.

Files whose size and SHA-256 already match are not downloaded again, so a restarted
runtime loads from disk.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import httpx

from sluice.files import sha256_file
from runtimes.sdk.model import ModelArtifact, ModelLoadError


async def fetch_model(client: httpx.AsyncClient, ref: str, cache_dir: Path) -> ModelArtifact:
    """Download ``name[:version]`` (default: latest) and return its local artifact."""
    name, _, version = ref.partition(":")
    params = {"version": version} if version else {}
    meta = await client.get(f"/metadata/{name}", params=params)
    if meta.status_code == 404:
        raise ModelLoadError(f"the repository has no model {ref!r}")
    meta.raise_for_status()
    metadata = meta.json()
    version = metadata["version"]
    listing = await client.get(f"/files/{name}", params={"version": version})
    listing.raise_for_status()
    target = cache_dir / name / version
    for item in listing.json()["files"]:
        relative = PurePosixPath(item["path"])
        if relative.is_absolute() or ".." in relative.parts:
            raise ModelLoadError(f"repository listed an unsafe path {item['path']!r}")
        local = target.joinpath(*relative.parts)
        if local.is_file() and local.stat().st_size == item["size"] and sha256_file(local) == item["sha256"]:
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(local.name + ".part")
        async with client.stream("GET", f"/download/{name}/{item['path']}", params={"version": version}) as response:
            response.raise_for_status()
            with open(partial, "wb") as f:
                async for chunk in response.aiter_bytes():
                    f.write(chunk)
        partial.replace(local)
    return ModelArtifact(name=name, version=version, path=target, manifest=metadata.get("manifest") or {})
