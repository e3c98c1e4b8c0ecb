"""The manager's REST API for models: list what the repository holds and who serves
it, upload a new version (streamed through to the repository), set which version
answers unpinned requests (the model's version policy), delete, load or
unload a version on a runtime without restarting it, and the SHA-256 digests
recorded when a version was deployed (what runtimes check model files against).
"""

from __future__ import annotations

from fastapi import APIRouter, Path, Query, Request, Response, status

from manager.digests import ModelDigestsOut
from manager.models import ModelService
from manager.schemas import VERSION_PATTERN, LoadedModelOut, LoadModel, MeshInfo, ModelInfo, ModelPolicyOut, UploadedModel, VersionPolicyIn
from sluice.errors import ApiError, error_responses

router = APIRouter(prefix="/api/v1")

#: request bodies a model upload may have: a tar archive (optionally gzipped) or a multipart form
UPLOAD_TYPES = (
    "multipart/form-data",
    "application/gzip",
    "application/x-gzip",
    "application/x-tar",
    "application/x-gtar",
    "application/octet-stream",
)
UPLOAD_PATH = r"^/api/v1/models/[^/]+$"
MODEL_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"

_ERRORS = error_responses(
    404, 409, 502, 503,
    s404="no such model, version or runtime",
    s409="the model is used by pipelines (named in details)",
    s502="the repository answered with an error",
    s503="the repository or the runtime is unreachable",
)
#: what every route that calls the repository may answer
_UPSTREAM = {502: _ERRORS[502], 503: _ERRORS[503]}


def _models(request: Request) -> ModelService:
    return request.app.state.models


@router.get("/info", response_model=MeshInfo, tags=["mesh"])
async def info(request: Request) -> MeshInfo:
    """Where the mesh's public services are (the SDK sends predictions to the gateway)."""
    settings = request.app.state.control.settings
    return MeshInfo(gateway_url=settings.gateway_url, repository_url=settings.repository_url, version=request.app.version)


@router.get("/models", response_model=list[ModelInfo], tags=["models"], responses=_UPSTREAM)
async def list_models(request: Request) -> list[ModelInfo]:
    """Every model in the repository: versions, signatures, file digests, and which runtimes serve each version."""
    return await _models(request).list()


@router.get("/models/{name}", response_model=ModelInfo, tags=["models"],
            responses={404: _ERRORS[404], **_UPSTREAM, **error_responses(422, s422="not a model name")})
async def get_model(request: Request, name: str = Path(pattern=MODEL_NAME)) -> ModelInfo:
    return await _models(request).get(name)


@router.get(
    "/models/{name}/versions/{version}/digests",
    response_model=ModelDigestsOut,
    tags=["models"],
    responses={
        **error_responses(
            404, 422, 502,
            s404="no such model or version in the repository",
            s422="not a model name or not a version",
            s502="the repository's listing has an unsafe path or a malformed digest (nothing recorded)",
        ),
        503: _ERRORS[503],
    },
)
async def model_digests(
    request: Request,
    name: str = Path(pattern=MODEL_NAME),
    version: str = Path(pattern=VERSION_PATTERN),
) -> ModelDigestsOut:
    """The SHA-256 of every file of a deployed model version, recorded when it was deployed
    (uploaded or first loaded through the manager) and never changed afterwards; runtimes
    load a file only if it hashes to this. A version never deployed is recorded now, from
    the repository's listing (trust on first deployment)."""
    return ModelDigestsOut.of(await _models(request).digests.deployed(name, version))


@router.post(
    "/models/{name}",
    response_model=UploadedModel,
    status_code=status.HTTP_201_CREATED,
    tags=["models"],
    responses={
        **error_responses(
            400, 409, 413, 415, 422,
            s400="a malformed archive, a form part not named 'files', or a path that leaves the model's directory",
            s409="the upload's layout or config.pbtxt conflicts with the model's",
            s413="the upload is over the size limits",
            s415="not a tar, tar.gz or multipart body",
            s422="a broken model.json or config.pbtxt, or not a model name",
        ),
        **_UPSTREAM,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/gzip": {"schema": {"type": "string", "format": "binary"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                        "additionalProperties": False,  # every part is named 'files'
                    }
                },
            },
        }
    },
)
async def upload_model(request: Request, name: str = Path(pattern=MODEL_NAME)) -> UploadedModel:
    """Upload a new version of a model (versions are immutable and numbered by the repository):
    a tar.gz of the version's files, or a multipart form of `files` whose file names are
    their paths. `model.json` makes a Sluice-layout model, `config.pbtxt` a Triton-layout one."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() not in UPLOAD_TYPES:
        raise ApiError(415, f"a model upload is a tar.gz or multipart/form-data body, not {content_type or 'no content type'!r}", accepted=list(UPLOAD_TYPES))
    return await _models(request).upload(name, request.stream(), content_type, request.headers.get("authorization", ""))


_POLICY_ERRORS = {
    **error_responses(
        400, 404, 409, 422,
        s400="the body is not JSON",
        s404="no such model (or, to remove, it has no version policy)",
        s409="`read_only`: the model lives in a read-only root of the repository",
        s422="`bad_version_policy`: malformed, or names a version the model does not have (or not a model name)",
    ),
    **_UPSTREAM,
}


@router.put("/models/{name}/version-policy", response_model=ModelPolicyOut, tags=["models"], responses=_POLICY_ERRORS)
async def set_version_policy(request: Request, body: VersionPolicyIn, name: str = Path(pattern=MODEL_NAME)) -> ModelPolicyOut:
    """Set which versions a runtime loads when asked for the model without a version, and
    which version answers requests that name none (e.g. ship a version 2 while 1 stays the
    default): `{"load": {"specific": {"versions": ["1", "2"]}}, "default": "1"}`. Checked
    against the model's versions. Runtimes apply it when they next load a version of the
    model they do not have yet, or restart."""
    return await _models(request).set_policy(name, body.model_dump(exclude_none=True), request.headers.get("authorization", ""))


@router.delete("/models/{name}/version-policy", response_model=ModelPolicyOut, tags=["models"], responses=_POLICY_ERRORS)
async def remove_version_policy(request: Request, name: str = Path(pattern=MODEL_NAME)) -> ModelPolicyOut:
    """Remove the model's version policy: its latest version loads and answers again."""
    return await _models(request).remove_policy(name, request.headers.get("authorization", ""))


@router.delete("/models/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["models"], responses={**_ERRORS, **error_responses(422, s422="not a model name or not a version")})
async def delete_model(request: Request, name: str = Path(pattern=MODEL_NAME), version: str | None = Query(None, pattern=VERSION_PATTERN)) -> Response:
    """Delete a model (or one version), unloading it from runtimes first; refused while a pipeline uses it."""
    await _models(request).delete(name, version, request.headers.get("authorization", ""))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/runtimes/{name}/models", response_model=LoadedModelOut, tags=["runtimes"],
             responses={**_ERRORS, **error_responses(400, 422, s422="the body does not validate, or the runtime refused to load the model")})
async def load_model(name: str, body: LoadModel, request: Request) -> LoadedModelOut:
    """Load a model version onto every instance of a runtime, with no restart; recorded, so new instances load it too."""
    return await _models(request).load(name, body.model, body.version)


@router.delete("/runtimes/{name}/models/{model}", status_code=status.HTTP_204_NO_CONTENT, tags=["runtimes"], responses={**_ERRORS, **error_responses(422, s422="not a model name or not a version")})
async def unload_model(name: str, request: Request, model: str = Path(pattern=MODEL_NAME), version: str | None = Query(None, pattern=VERSION_PATTERN)) -> Response:
    """Unload a model (or one version) from every instance of a runtime; refused while a pipeline needs it."""
    await _models(request).unload(name, model, version)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
