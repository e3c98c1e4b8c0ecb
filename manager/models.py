"""Models as users manage them: what the repository holds and which runtimes serve
which version; uploads; loading a version onto a runtime (hot, no restart) and
unloading it; deleting a model nobody uses.

Rules that keep pipelines whole:

* A load goes to every instance of the runtime at once; if any instance refuses,
  the version is unloaded again where it had been newly loaded, and the call fails
  naming the instance and its reason. A loaded version is recorded, so every
  instance that registers later loads it before it takes traffic.
* A load that names no version loads every version the model's version policy loads
  (``sluice.version_policy``, as the repository answers it; no policy: the latest),
  each with its recorded digests; it answers the policy's default version.
* An unpinned stage runs its runtime's default version of the model: the one the
  model's version policy names when the runtime has it loaded, else the highest
  version it serves (the runtime decides; the manager reads the stage's signature
  from it unpinned, so the signature is the default's). Unloading (or
  deleting) a version is refused with a 409 naming the pipelines while a pipeline
  pins that version on that runtime, or while it is the only version left for an
  unpinned stage. Deleting a whole model is refused while any pipeline names it.
* A version is deployed when it is uploaded through the manager or first loaded: its
  files' SHA-256 digests are recorded then (``manager.digests``) and sent with every
  load of it, and a runtime refuses a file whose bytes hash to anything else.
  Deleting a version forgets its digests.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable
from typing import Any

from manager.control import ControlPlane
from manager.digests import DigestBook
from manager.registry.base import Endpoint
from manager.repository import RepositoryClient
from manager import runtime_models
from manager.runtime_models import LoadFailure
from manager.schemas import LoadedModelOut, ModelInfo, ModelPolicyOut, ServedBy, UploadedModel
from manager.served_models import ServedModel
from manager.signatures import SignatureError, read_signatures
from manager.store import LoadedModel
from sluice.errors import ApiError
from sluice.paths import UnsafePath, check_version
from sluice.version_policy import ModelPolicy

log = logging.getLogger(__name__)


class ModelService:
    def __init__(self, control: ControlPlane, repository: RepositoryClient):
        self.control = control
        self.repository = repository
        self.digests = DigestBook(control.store, repository)

    # --- the repository's models, annotated with who serves them
    async def list(self) -> list[ModelInfo]:
        return [self._info(m) for m in await self.repository.models()]

    async def get(self, name: str) -> ModelInfo:
        return self._info(await self.repository.model(name))

    def _info(self, model: dict[str, Any]) -> ModelInfo:
        endpoints = self.control.registry.endpoints()
        versions = []
        for v in model["versions"]:
            served_by = [
                ServedBy(runtime=r.name, instances=len(endpoints.get(r.name, [])))
                for r in sorted(self.control.runtimes.values(), key=lambda r: r.name)
                if v["version"] in r.versions_of(model["name"])
            ]
            versions.append({**v, "served_by": served_by})
        return ModelInfo(**{**model, "versions": versions})

    async def upload(self, name: str, body: AsyncIterable[bytes], content_type: str, authorization: str = "") -> UploadedModel:
        uploaded = UploadedModel(**await self.repository.upload(name, body, content_type, authorization))
        log.info("model %s version %s uploaded (%d files)", uploaded.name, uploaded.version, len(uploaded.files))
        try:
            self.digests.uploaded(uploaded.name, uploaded.version, [f.model_dump() for f in uploaded.files])
        except (ApiError, ValueError) as exc:  # recorded from the repository's listing on first use instead
            log.warning("model %s version %s: digests not recorded at upload: %s", uploaded.name, uploaded.version, exc)
        return uploaded

    async def delete(self, name: str, version: str | None, authorization: str = "") -> None:
        version = _checked_version(version)
        async with self.control.lock:
            users = self._users(name, version)
            if users:
                what = f"version {version} of model {name!r}" if version else f"model {name!r}"
                raise ApiError(409, f"{what} is used by pipelines {', '.join(users)}", "model_in_use", model=name, version=version, pipelines=users)
            for runtime in sorted(self.control.runtimes.values(), key=lambda r: r.name):
                loaded = runtime.versions_of(name)
                if (version is None and loaded) or version in loaded:
                    await self._unload(runtime.name, name, version)
            await self.repository.delete(name, version, authorization)
            self.digests.forget(name, version)
        log.info("model %s %s deleted", name, f"version {version}" if version else "(every version)")

    # --- versions on runtimes
    async def load(self, runtime: str, model: str, version: str | None) -> LoadedModelOut:
        """Load ``version`` of ``model`` on every instance of ``runtime``; no version: every
        version the model's policy loads (answered: the policy's default)."""
        pinned = _checked_version(version)
        endpoints = self._endpoints(runtime)
        # an unknown model or version (or a refused version policy) is an error before any runtime is asked
        metadata = await self.repository.metadata(model, pinned)
        version = _checked_version(str(metadata["version"]))
        wanted = [version] if pinned else [_checked_version(v) for v in ModelPolicy.from_json(metadata).unpinned(version)]
        served = set(self.control.runtimes[runtime].versions_of(model))
        loaded: list[str] = []
        for each in wanted:
            digests = (await self.digests.deployed(model, each)).as_dict()
            failures = await runtime_models.load(endpoints, model, each, self.control.settings.model_load_timeout_s, digests)
            if failures:
                for newly in [*loaded, each]:  # leave no instance serving a version the mesh does not know of
                    if newly not in served:
                        await runtime_models.unload(endpoints, model, newly, self.control.settings.model_load_timeout_s)
                raise _load_error(runtime, model, each, failures)
            loaded.append(each)
        for each in loaded:
            self.control.store.put_loaded_model(LoadedModel(runtime, model, each))
        signature = await self._learn(runtime, model, endpoints)
        log.info("model %s version(s) %s loaded on runtime %s (%d instances)", model, ", ".join(loaded), runtime, len(endpoints))
        return LoadedModelOut(runtime=runtime, model=model, version=version, instances=len(endpoints), **signature.to_json())

    async def set_policy(self, name: str, body: Any, authorization: str = "") -> ModelPolicyOut:
        """Set the model's version policy in the repository (checked there); it reaches a
        runtime when the runtime next loads a version of the model it does not have yet,
        or restarts."""
        answer = ModelPolicyOut(**await self.repository.put_policy(name, body, authorization))
        log.info("model %s: version policy set: %s", name, answer.version_policy)
        return answer

    async def remove_policy(self, name: str, authorization: str = "") -> ModelPolicyOut:
        answer = ModelPolicyOut(**await self.repository.delete_policy(name, authorization))
        log.info("model %s: version policy removed (the latest version answers)", name)
        return answer

    async def unload(self, runtime: str, model: str, version: str | None) -> None:
        version = _checked_version(version)
        async with self.control.lock:
            known = self.control.runtimes.get(runtime)
            versions = (known.versions_of(model) if known else ())
            if not versions or (version is not None and version not in versions):
                what = f"version {version} of model {model!r}" if version else f"model {model!r}"
                raise ApiError(404, f"runtime {runtime!r} does not serve {what}", "not_found", runtime=runtime, model=model, versions=list(versions))
            users = self._users(model, version, runtime)
            if users:
                raise ApiError(409, f"model {model!r} on runtime {runtime!r} is used by pipelines {', '.join(users)}", "model_in_use", runtime=runtime, model=model, version=version, pipelines=users)
            await self._unload(runtime, model, version)

    async def _unload(self, runtime: str, model: str, version: str | None) -> None:
        endpoints = self.control.registry.endpoints().get(runtime, [])
        failures = await runtime_models.unload(endpoints, model, version, self.control.settings.model_load_timeout_s)
        if failures:
            raise _load_error(runtime, model, version, failures, verb="unload")
        for loaded in self.control.store.loaded_models(runtime):
            if loaded.model == model and version in (None, loaded.version):
                self.control.store.delete_loaded_model(loaded)
        versions = self.control.runtimes[runtime].versions_of(model)
        if version is None or set(versions) <= {version}:
            self.control.forget_model(runtime, model)
        else:
            await self._learn(runtime, model, endpoints)

    def _endpoints(self, runtime: str) -> list[Endpoint]:
        if runtime not in self.control.runtimes:
            raise ApiError(404, f"no runtime {runtime!r}", "not_found", runtime=runtime, known=sorted(self.control.runtimes))
        endpoints = self.control.registry.endpoints().get(runtime, [])
        if not endpoints:
            raise ApiError(503, f"runtime {runtime!r} has no live instance to load onto", "no_instances", runtime=runtime)
        return endpoints

    async def _learn(self, runtime: str, model: str, endpoints: list[Endpoint]) -> ServedModel:
        """Read the model's signature from an instance and record it with the runtime."""
        first = endpoints[0]
        try:
            signatures = await read_signatures(first.host, first.port, [model], self.control.settings.metadata_timeout_s, runtime=first.runtime)
        except SignatureError as exc:
            raise ApiError(503, f"cannot read model {model!r} from runtime {runtime!r}: {exc}", "runtime_unreachable") from exc
        row = self.control.runtimes[runtime]
        await self.control.learn_runtime(runtime, row.kind, {**row.models, **signatures})
        return signatures[model]

    def _users(self, model: str, version: str | None, runtime: str | None = None) -> list[str]:
        """Pipelines (any live revision) that would break without ``model`` (at ``version``)."""
        users = set()
        for name, revisions in self.control.routed.items():
            for plan in revisions:
                for stage in plan.stages:
                    if stage.model != model or (runtime and stage.runtime != runtime):
                        continue
                    served = self.control.runtimes.get(stage.runtime)
                    loaded = served.versions_of(model) if served else ()
                    if version is None or stage.version == version or (not stage.version and set(loaded) <= {version}):
                        users.add(name)
        return sorted(users)


def _checked_version(version: str | None) -> str | None:
    """A requested version as one safe path segment (not ``.`` or ``..``), else a 422."""
    if version is None:
        return None
    try:
        return check_version(version)
    except UnsafePath as exc:
        raise ApiError(422, f"version {exc}", "bad_version", version=version) from None


def _load_error(runtime: str, model: str, version: str | None, failures: list[LoadFailure], verb: str = "load") -> ApiError:
    first = failures[0]
    refused = all(f.refused for f in failures)
    return ApiError(
        422 if refused else 503,
        f"runtime {runtime!r} could not {verb} model {model!r} version {version or '(all)'}: "
        f"instance {first.instance_id}: {first.code}: {first.message}",
        "model_load_failed" if verb == "load" else "model_unload_failed",
        runtime=runtime,
        model=model,
        version=version,
        instances=[{"instance": f.instance_id, "code": f.code, "message": f.message} for f in failures],
    )
