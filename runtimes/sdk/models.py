"""The set of model versions a runtime serves, changed at run time.

``ModelSet`` maps name -> {version -> Model}. The default version of a name (what a
request with an empty version gets) follows the model's version policy
(``sluice.version_policy``, as the repository answers it with every load): its
default when that version is loaded, else the highest loaded one (numeric versions
in numeric order, non-numeric ones after them: the repository's own order). A model
with no policy: the highest loaded one.

Models come in through ``load(name, version)`` (no version: every version the model's
policy loads, by default only the latest): each version's files are fetched from
the model repository (``repository.ModelRepository``) and the runtime kind's loader
builds the ``Model`` off the event loop (a sync loader in a worker thread, an async
one awaited), then the model joins the set in one step, so requests keep being
served throughout and the previous default answers until the new version is in.
The versions of one unpinned load join together, with the policy's default, once all
are built. Loads of one name are serialised (a lock per name); loading a version that
is already loaded does nothing. A failed load leaves the set as it was (a version
built for it is closed). A load that
has started runs to its end even if its caller goes away (the gRPC call is
cancelled): what was built is then either added or, at shutdown, closed.

Models go out through ``remove(name, version)``: new requests no longer find them,
requests already running on them finish, and each removed model is closed once
its last in-flight call (``use``) has returned.

Every file is checked before the loader sees it (``repository.fetch_model``): against
the digests the manager recorded for the version, given with the load (a hot load
from the manager) or asked of the manager (``digests.ManagerDigests``: start-up
models, other callers). A set with no manager to ask checks the repository's own
listing and logs a warning, or, with ``require_digests``, refuses the load. A file
that fails its check fails the load before any loader runs: the set stays as it was.

Startup loading (``SLUICE_RUNTIME_MODELS``), the repository extension's
``RepositoryModelLoad``/``RepositoryModelUnload``, registration (``names``) and
metrics labels (``__contains__``) all read or change this one set.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

from runtimes.sdk.digests import ManagerDigests
from runtimes.sdk.model import Model, ModelArtifact, ModelLoadError
from runtimes.sdk.repository import Digests, ModelRepository, check_digests, safe_version
from sluice.version_policy import ModelPolicy, default_among
from sluice.versions import version_key

log = logging.getLogger(__name__)

#: a runtime kind's loader: ``load(artifact) -> Model``, sync (run in a thread) or async
Loader = Callable[[ModelArtifact], Model | Awaitable[Model]]


class ModelNotFound(LookupError):
    """No such model (or version) is loaded; the message names what is."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ModelLoadFailed(ModelLoadError):
    """The runtime kind's loader refused a model version (or raised while building it)."""


class NoRepository(ModelLoadError):
    """This set has no repository or loader to load models from at run time."""


class UnverifiedRefused(ModelLoadError):
    """No recorded digests to check a version's files against, and the set requires them."""


@dataclass(eq=False)
class _Slot:
    """A loaded model and the calls now running on it."""

    model: Model
    inflight: int = 0
    retired: bool = False
    closed: bool = False


class ModelSet:
    def __init__(
        self,
        models: dict[str, Model] | list[Model] | tuple[Model, ...] = (),
        *,
        loader: Loader | None = None,
        repository: ModelRepository | None = None,
        digests: ManagerDigests | None = None,
        require_digests: bool = False,
    ):
        self.loader = loader
        self.repository = repository
        #: where recorded digests come from when a load does not bring them; None: no manager
        self.digests = digests
        #: refuse a load that has no recorded digests (instead of a warning)
        self.require_digests = require_digests
        self._slots: dict[str, dict[str, _Slot]] = {}
        #: name -> the default version its version policy names (absent: no policy, the highest loaded)
        self._preferred: dict[str, str] = {}
        self._locks: dict[str, list] = {}  # name -> [lock, users]
        self._loads: set[asyncio.Task] = set()
        self._closing: set[asyncio.Task] = set()
        for model in models.values() if isinstance(models, dict) else models:
            self.add(model)

    # --- reading

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def names(self) -> list[str]:
        """The names with at least one version loaded, sorted."""
        return sorted(self._slots)

    def versions(self, name: str) -> list[str]:
        """The loaded versions of ``name``, lowest first (``default_version`` says which one
        answers an unpinned request)."""
        return sorted(self._slots.get(name, {}), key=version_key)

    def default_version(self, name: str) -> str:
        """The version of ``name`` an empty version gets: its policy's default when loaded,
        else the highest loaded; ``ModelNotFound`` when none is loaded."""
        version = default_among(self._slots.get(name, {}), self._preferred.get(name))
        if version is None:
            raise ModelNotFound(f"no model {name!r} is loaded")
        return version

    def models(self) -> list[Model]:
        """Every loaded model version, by name then version."""
        return [self._slots[n][v].model for n in self.names() for v in self.versions(n)]

    def loaded(self, name: str, version: str) -> bool:
        return version in self._slots.get(name, {})

    def get(self, name: str, version: str = "") -> Model:
        """``version`` of ``name``, or its default version when ``version`` is empty."""
        return self._slot(name, version).model

    def _slot(self, name: str, version: str) -> _Slot:
        versions = self._slots.get(name)
        if not versions:
            raise ModelNotFound(f"no model {name!r} is loaded")
        if not version:
            return versions[default_among(versions, self._preferred.get(name))]
        slot = versions.get(version)
        if slot is None:
            raise ModelNotFound(f"model {name!r} has no version {version!r} loaded; loaded: {', '.join(self.versions(name))}")
        return slot

    @contextlib.contextmanager
    def use(self, name: str, version: str = "") -> Iterator[Model]:
        """The model for one call; it is not closed (if removed meanwhile) until the call ends."""
        slot = self._slot(name, version)
        slot.inflight += 1
        try:
            yield slot.model
        finally:
            slot.inflight -= 1
            if slot.retired and slot.inflight == 0:
                self._close_later(slot)

    # --- changing

    def add(self, model: Model) -> None:
        """Put a built model into the set (at once: the next request may use it)."""
        versions = self._slots.setdefault(model.name, {})
        if model.version in versions:
            raise ValueError(f"model {model.name!r} version {model.version!r} is already loaded")
        versions[model.version] = _Slot(model)

    async def remove(self, name: str, version: str = "") -> list[str]:
        """Take ``version`` of ``name`` (every version when empty) out of the set; the
        removed versions. Idle ones are closed now, busy ones when their last call ends."""
        versions = self._slots.get(name)
        if not versions:
            raise ModelNotFound(f"no model {name!r} is loaded")
        if version and version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r} loaded; loaded: {', '.join(self.versions(name))}")
        removed = [version] if version else self.versions(name)
        slots = [versions.pop(v) for v in removed]
        if not versions:
            del self._slots[name]
            self._preferred.pop(name, None)
        for slot in slots:
            slot.retired = True
            log.info("unloaded %s version %s%s", name, slot.model.version,
                     f" ({slot.inflight} call(s) still running on it)" if slot.inflight else "")
        await asyncio.gather(*(self._close(s) for s in slots if s.inflight == 0))
        return removed

    async def load(self, name: str, version: str = "", digests: Digests | None = None) -> tuple[Model, bool]:
        """Fetch ``name`` at ``version``, check its files, and add it; no ``version``: every
        version the model's version policy loads (the repository's ``load_versions``; with
        no policy, the latest). ``digests``: the ``{path: sha256}`` the manager recorded
        for that version (needs an explicit ``version``); None: ask the manager.

        Returns the model (no ``version``: the policy's default) and whether anything
        was loaded now (False: it was all loaded already). A refused version policy is
        the repository's refusal of the unpinned model (``ModelLoadError``, its message kept).
        Raises ``repository.ModelNotInRepository``, ``repository.RepositoryUnavailable``,
        ``repository.DigestMismatch`` (a file is not what was recorded: nothing was
        loaded), ``repository.UnsafeArtifact``, ``UnverifiedRefused``, ``ModelLoadFailed``
        (the loader refused it) or ``NoRepository``.
        """
        if self.repository is None or self.loader is None:
            raise NoRepository("this runtime has no model repository to load models from")
        if version:
            safe_version(version)
        if digests is not None:
            if not version:
                raise ModelLoadError("expected digests are for one version: name the version too")
            digests = check_digests(digests)
        if version and self.loaded(name, version):  # already there: no lock, no fetch
            return self.get(name, version), False
        task = asyncio.create_task(self._load(name, version, digests), name=f"load {name}:{version or 'latest'}")
        self._loads.add(task)
        task.add_done_callback(self._load_done)
        return await asyncio.shield(task)  # a cancelled caller does not cancel the load

    async def _load(self, name: str, version: str, digests: Digests | None) -> tuple[Model, bool]:
        try:
            return await self._load_locked(name, version, digests)
        except ModelLoadError as exc:
            log.warning("load %s%s: %s", name, f" version {version}" if version else "", exc)
            raise
        except Exception:
            log.exception("load %s%s failed", name, f" version {version}" if version else "")
            raise

    async def _load_locked(self, name: str, version: str, digests: Digests | None) -> tuple[Model, bool]:
        async with self._lock(name):
            if version and self.loaded(name, version):
                return self.get(name, version), False
            metadata = await self.repository.metadata(name, version)
            resolved = safe_version(str(metadata["version"]))
            policy = ModelPolicy.from_json(metadata)
            wanted = [resolved] if version else [safe_version(v) for v in policy.unpinned(resolved)]
            built: list[Model] = []
            try:
                for want in (v for v in wanted if not self.loaded(name, v)):
                    meta = metadata if want == resolved else await self.repository.metadata(name, want)
                    expected = digests if digests is not None else await self._recorded(name, want)
                    built.append(await self._build(name, await self.repository.fetch(name, want, meta, expected)))
            except BaseException:
                await asyncio.gather(*(m.close() for m in built), return_exceptions=True)
                raise
            for model in built:  # every version at once, with the policy's default
                self.add(model)
            if policy.preferred is None:  # no policy: the highest loaded answers
                self._preferred.pop(name, None)
            else:
                self._preferred[name] = policy.preferred
            for model in built:
                log.info("loaded %s version %s (%s)", model.name, model.version, model.platform)
            return self.get(name, resolved), bool(built)

    async def _build(self, name: str, artifact: ModelArtifact) -> Model:
        try:
            model = await build(self.loader, artifact)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ModelLoadError) else f"{type(exc).__name__}: {exc}"
            raise ModelLoadFailed(f"failed to load {name!r} version {artifact.version}: {reason}") from exc
        if (model.name, model.version) != (name, artifact.version):
            await model.close()
            raise ModelLoadFailed(
                f"failed to load {name!r} version {artifact.version}: the loader built "
                f"{model.name!r} version {model.version!r} instead"
            )
        return model

    async def _recorded(self, name: str, version: str) -> Digests | None:
        """The manager's digests of the version; None (checked against the repository's
        own listing) only when there is no manager to ask and none are required."""
        if self.digests is not None:
            return await self.digests.expected(name, version)
        if self.require_digests:
            raise UnverifiedRefused(
                f"refusing to load {name!r} version {version}: no manager to check its files against "
                "(SLUICE_RUNTIME_REQUIRE_DIGESTS is set and SLUICE_RUNTIME_MANAGER_URL is empty)"
            )
        log.warning(
            "loading %s version %s checked against the repository's own digests only: no manager "
            "recorded them for this runtime (SLUICE_RUNTIME_MANAGER_URL is empty)", name, version,
        )
        return None

    def _load_done(self, task: asyncio.Task) -> None:
        self._loads.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved (and logged by _load) even when the caller went away

    @contextlib.asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        """One lock per name, dropped when nobody holds or waits for it (names are not kept)."""
        entry = self._locks.setdefault(name, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[name]

    # --- closing

    def _close_later(self, slot: _Slot) -> None:
        task = asyncio.create_task(self._close(slot))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close(self, slot: _Slot) -> None:
        if slot.closed:
            return
        slot.closed = True
        try:
            await slot.model.close()
        except Exception:
            log.exception("closing %s version %s failed", slot.model.name, slot.model.version)

    async def close(self) -> None:
        """Shutdown: let started loads end, then close every model (loaded or removed)."""
        if self._loads:
            await asyncio.gather(*self._loads, return_exceptions=True)
        slots = [s for versions in self._slots.values() for s in versions.values()]
        self._slots.clear()
        for slot in slots:
            slot.retired = True
        await asyncio.gather(*(self._close(s) for s in slots))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


async def build(loader: Loader, artifact: ModelArtifact) -> Model:
    """Run a kind's loader off the event loop: a sync one in a thread, an async one awaited."""
    if inspect.iscoroutinefunction(loader):
        model = await loader(artifact)
    else:
        model = await asyncio.to_thread(loader, artifact)
        if inspect.isawaitable(model):  # a sync callable that hands back a coroutine
            model = await model
    return model
