"""The control plane's state and the order in which changes reach the mesh.

Holds what Envoy routes (``routed``: every live revision of every pipeline, as typed
plans) and what gateways serve (``served``: one revision per pipeline), and applies
each change (one pipeline, or a whole bulk apply) in make-before-break order,
waiting for acknowledgements between steps:

1. the new revisions' routes go to Envoy beside the old ones -> every gateway
   sidecar ACKs;
2. gateways switch to the new revisions and drop deleted pipelines (they answer 404)
   -> every gateway ACKs (after draining requests on what it dropped);
3. the replaced revisions' and deleted pipelines' routes are withdrawn.

A revision's routes carry the revision in their key, so an in-flight request always
finishes on the routes of the revision it started with. Only what a change touches is
rebuilt and sent: one route scope per pipeline to Envoy (``xds.layers``), one delta to
gateways (``feed``); finished snapshots are pushed into the passive cache and the
streams report back through the ``NodeTracker`` callbacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

from manager import runtime_models
from manager.auth.networks import RuntimeNetworks
from manager.auth.scopes import Caller, runtime_scope
from manager.ca import CertificateAuthority
from manager.feed import PipelineFeed
from manager.registry.base import Endpoint, Registry
from manager.resolve import resolve
from manager.schemas import PipelineSpec, Registered, RuntimeRegistration
from manager.settings import ManagerSettings
from manager.signatures import SignatureError, read_signatures
from manager.store import PipelineRow, RuntimeRow, Store
from manager.xds.layers import MeshLayers
from manager.xds.ingress_auth import IngressAuth
from manager.xds.resources import PUSH_ORDER, ROUTE, MeshSettings, NodeInfo
from manager.xds.snapshot import SnapshotCache
from manager.xds.status import NodeTracker
from sluice.errors import ApiError
from sluice.plan import PipelinePlan

log = logging.getLogger(__name__)


@dataclass
class ChangeResult:
    """What one change did, by pipeline name."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    rows: dict[str, PipelineRow] = field(default_factory=dict)


class ControlPlane:
    def __init__(
        self,
        settings: ManagerSettings,
        store: Store,
        registry: Registry,
        zipkin: tuple[str, int] | None = None,
        trace_sample_percent: float = 100.0,
        ca: CertificateAuthority | None = None,
        plaintext_health: bool = False,
    ):
        """``ca``: the mesh CA that signs sidecar certificates (SDS); ``plaintext_health``:
        runtime sidecars also answer plaintext gRPC health checks (Consul's)."""
        self.settings = settings
        self.store = store
        self.registry = registry
        self.runtimes: dict[str, RuntimeRow] = {r.name: r for r in store.runtimes()}
        self.served: dict[str, PipelineRow] = {row.name: row for row in store.pipelines()}
        self.routed: dict[str, list[PipelinePlan]] = {name: [row.plan] for name, row in self.served.items()}
        self.layers = MeshLayers(
            MeshSettings(
                settings.listener_address, settings.stage_retries, zipkin, trace_sample_percent,
                plaintext_health=plaintext_health,
                # dev mode (no tokens): the manager's and the gateway's ingress on loopback only
                public_address="" if settings.auth else "127.0.0.1",
            ),
            ca,
            settings.cert_ttl_s,
        )
        #: where runtimes may register (and be discovered): SLUICE_MANAGER_RUNTIME_NETWORKS
        self.networks = RuntimeNetworks(settings.runtime_networks)
        self.layers.add_runtimes(set(self.runtimes))
        self.layers.set_endpoints(self._endpoints())
        self.layers.set_pipelines(self.routed)
        self.cache = SnapshotCache()
        self.xds = NodeTracker(self.cache, self._provide, self.layers.forget)
        self.feed = PipelineFeed([row.plan for row in self.served.values()])
        self._lock = asyncio.Lock()
        self._rotation: asyncio.Task | None = None
        registry.on_change(self._endpoints_changed)
        registry.on_runtime(self._learn_discovered)

    async def start(self) -> None:
        await self.registry.start()
        self._rotation = asyncio.create_task(self._rotate_certificates())

    async def stop(self) -> None:
        if self._rotation is not None:
            self._rotation.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotation
        await self.registry.stop()

    async def _rotate_certificates(self) -> None:
        """Re-issue sidecar certificates at two thirds of their life and push the new SDS
        secrets: new connections use the new certificate, open ones are left alone."""
        while True:
            due = self.layers.next_renewal()
            wait = self.settings.cert_ttl_s / 10 if due is None else due - time.time()
            await asyncio.sleep(min(max(wait, 0.05), self.settings.cert_ttl_s / 10))
            try:
                rotated = self.layers.rotate_due()
                if rotated:
                    self._push()
                    log.info("certificates renewed: %s", ", ".join(sorted(n.id for n in rotated)))
            except Exception:  # never let a bad issue stop renewals for everyone
                log.exception("certificate renewal failed; retrying")

    # --- what Envoy is told
    def _provide(self, node: NodeInfo) -> None:
        self.cache.set_snapshot(node.id, self.layers.snapshot_for(node))

    def _push(self) -> None:
        """Every connected node's snapshot, from the current layers (references, not copies)."""
        for node_id, status in self.xds.nodes().items():
            self.cache.set_snapshot(node_id, self.layers.snapshot_for(status.info))

    def _endpoints(self) -> dict[str, tuple[tuple[str, int], ...]]:
        return {runtime: tuple((e.host, e.port) for e in eps) for runtime, eps in self.registry.endpoints().items()}

    def _endpoints_changed(self) -> None:
        self.layers.set_endpoints(self._endpoints())
        self._push()

    async def _routes_step(self, names: set[str], wait: bool = True) -> None:
        self.layers.set_pipelines({name: self.routed.get(name, []) for name in names})
        self._push()
        if wait:
            await self.xds.wait_converged("gateway", PUSH_ORDER, self.settings.ack_timeout_s)

    async def _gateway_step(self, upserts: list[PipelinePlan], removed: list[str], dropped: list[PipelinePlan]) -> None:
        # gateways drain requests still running on what they drop (``dropped``) before
        # acknowledging: that may take those revisions' stage timeouts, longer than an ACK timeout
        drain_s = max((sum(s.timeout_ms for s in plan.stages) / 1000 for plan in dropped), default=0.0)
        version = await self.feed.publish(upserts, removed)
        await self.feed.wait_acked(version, self.settings.ack_timeout_s, drain_s + self.settings.ack_timeout_s)

    # --- pipelines
    def _resolve(self, spec: PipelineSpec, revision: int) -> PipelinePlan:
        return resolve(spec, revision, self.runtimes, self.settings.stage_timeout_ms)

    async def create_pipeline(self, spec: PipelineSpec) -> PipelineRow:
        async with self._lock:
            if spec.name in self.served:
                raise ApiError(409, f"pipeline {spec.name!r} already exists", "exists", pipeline=spec.name)
            result = await self._commit([(spec, self._resolve(spec, 1))], [])
            return result.rows[spec.name]

    async def replace_pipeline(self, name: str, spec: PipelineSpec) -> PipelineRow:
        if spec.name != name:
            raise ApiError(422, f"body names pipeline {spec.name!r}, path names {name!r}", "name_mismatch")
        async with self._lock:
            old = self.served.get(name)
            if old is None:
                raise ApiError(404, f"no pipeline {name!r}", "not_found", pipeline=name)
            result = await self._commit([(spec, self._resolve(spec, old.revision + 1))], [])
            return result.rows[name]

    async def delete_pipeline(self, name: str) -> None:
        async with self._lock:
            if name not in self.served:
                raise ApiError(404, f"no pipeline {name!r}", "not_found", pipeline=name)
            await self._commit([], [name])

    async def apply(self, specs: list[PipelineSpec], prune: bool, dry_run: bool = False) -> ChangeResult:
        """Create or replace every listed pipeline (and with ``prune`` delete the others) in
        one change, validated as a whole: one bad definition refuses all of it."""
        async with self._lock:
            problems: list[dict] = []
            seen: set[str] = set()
            resolved: list[tuple[PipelineSpec, PipelinePlan]] = []
            result = ChangeResult()
            for index, spec in enumerate(specs):
                if spec.name in seen:
                    problems.append({"index": index, "pipeline": spec.name, "code": "duplicate", "message": f"pipeline {spec.name!r} is listed twice", "details": {}})
                    continue
                seen.add(spec.name)
                old = self.served.get(spec.name)
                try:
                    plan = self._resolve(spec, old.revision + 1 if old else 1)
                except ApiError as exc:
                    problems.append({"index": index, "pipeline": spec.name, "code": exc.code, "message": exc.message, "details": exc.details})
                    continue
                if old is not None and old.definition == spec.model_dump(exclude_none=True) and plan.at_revision(old.revision) == old.plan:
                    result.unchanged.append(spec.name)
                    result.rows[spec.name] = old
                else:
                    resolved.append((spec, plan))
            if problems:
                raise ApiError(
                    422, f"{len(problems)} of {len(specs)} definitions are invalid; nothing was changed",
                    "invalid_apply", problems=problems,
                )
            deleted = sorted(set(self.served) - seen) if prune else []
            if dry_run:
                for spec, plan in resolved:
                    (result.replaced if spec.name in self.served else result.created).append(spec.name)
                result.deleted = deleted
                return result
            changed = await self._commit(resolved, deleted)
            changed.unchanged, changed.rows = result.unchanged, {**result.rows, **changed.rows}
            return changed

    async def _commit(self, upserts: list[tuple[PipelineSpec, PipelinePlan]], deleted: list[str]) -> ChangeResult:
        """Make before break, for any mix of creates, replaces and deletes (lock held)."""
        result = ChangeResult(deleted=list(deleted))
        plans = [plan for _, plan in upserts]
        rows = self.store.put_pipelines([(spec.model_dump(exclude_none=True), plan) for spec, plan in upserts])
        for row in rows:
            old = self.served.get(row.name)
            (result.replaced if old else result.created).append(row.name)
            self.routed[row.name] = [old.plan, row.plan] if old else [row.plan]
            result.rows[row.name] = row
        if upserts:
            await self._routes_step({plan.name for plan in plans})
        dropped = [self.served[name].plan for name in [*result.replaced, *deleted]]
        for row in rows:
            self.served[row.name] = row
        for name in deleted:
            del self.served[name]
        await self._gateway_step(plans, deleted, dropped)
        withdrawn = set(result.replaced) | set(deleted)
        for name in result.replaced:
            self.routed[name] = [result.rows[name].plan]
        for name in deleted:
            del self.routed[name]
        if withdrawn:
            await self._routes_step(withdrawn, wait=bool(deleted))
        if deleted:
            self.store.delete_pipelines(deleted)
        if len(plans) + len(deleted) == 1:
            log.info("pipeline %s %s", (plans[0].name if plans else deleted[0]), "deleted" if deleted else f"at revision {plans[0].revision}")
        else:
            log.info("applied: %d created, %d replaced, %d deleted", len(result.created), len(result.replaced), len(deleted))
        return result

    # --- runtimes
    @property
    def lock(self) -> asyncio.Lock:
        """Held while a change to pipelines (or to the models they use) is under way."""
        return self._lock

    # --- tokens (secure mode)
    def set_ingress_auth(self, auth: IngressAuth) -> None:
        """What the public ingresses check (the key, the revoked token ids); pushed now."""
        self.layers.set_auth(auth)
        self._push()

    async def wait_routes_live(self, timeout_s: float = 1.0) -> bool:
        """Wait until every connected sidecar has acknowledged its current routes."""
        return await self.xds.wait_converged(None, (ROUTE,), timeout_s)

    # --- runtime registration
    def check_runtime_caller(self, runtime: str, caller: Caller | None) -> None:
        """Secure mode: the verified token must grant ``runtime:<runtime>`` (or ``admin``)."""
        if not self.settings.auth:
            return
        if caller is None:
            raise ApiError(401, "no verified token: send a runtime:<name> token as 'Authorization: Bearer <token>'", "unauthorized")
        if not caller.has(runtime_scope(runtime)):
            raise ApiError(
                403, f"the token grants {', '.join(sorted(caller.scopes))}, not {runtime_scope(runtime)}", "scope_mismatch",
                runtime=runtime, needed=runtime_scope(runtime),
            )

    async def register_runtime(self, reg: RuntimeRegistration, caller: Caller | None = None) -> Registered:
        """Register an instance of runtime ``reg.name`` and answer the id the manager gave it.

        In order, before any connection is made: the caller's token must grant
        ``runtime:<name>`` (secure mode); the host must resolve (off the loop) inside the
        runtime networks; an instance of the runtime already at that address must have
        been registered with the same token (then the new one takes over from it). Then
        the instance loads its recorded models and its signatures are read, at the
        resolved address, which is what Envoy gets too."""
        if not self.registry.accepts_registrations:
            raise ApiError(409, "runtimes register with Consul in this deployment", "registry_external")
        self.check_runtime_caller(reg.name, caller)
        ip = await self.networks.admit(reg.host)
        token_id = caller.token_id if caller is not None else None
        self._holder_at(reg.name, ip, reg.port, token_id)
        loaded = await self._load_recorded(reg.name, ip, reg.port)
        if loaded is None:
            raise ApiError(503, f"runtime {reg.name!r} instance at {reg.host}:{reg.port} could not load its recorded models", "models_not_loaded")
        try:
            models = await read_signatures(ip, reg.port, sorted({*reg.models, *loaded}), self.settings.metadata_timeout_s, runtime=reg.name)
        except SignatureError as exc:
            raise ApiError(503, f"cannot read the models of runtime {reg.name!r}: {exc}", "runtime_unreachable") from exc
        await self.learn_runtime(reg.name, reg.kind, models)
        held = self._holder_at(reg.name, ip, reg.port, token_id)  # again: others may have registered meanwhile
        instance_id = f"{reg.name}-{secrets.token_hex(6)}"
        self.registry.register(
            instance_id, reg.name, reg.host, reg.port, ip=ip, token_id=token_id,
            replaces=held.instance_id if held is not None else None,
        )
        return Registered(
            instance_id=instance_id,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            ttl_s=self.settings.heartbeat_ttl_s,
        )

    def _holder_at(self, runtime: str, ip: str, port: int, token_id: str | None):
        held = self.registry.holder_at(runtime, ip, port)
        if held is not None and held.token_id != token_id:
            raise ApiError(
                409, f"runtime {runtime!r} already has instance {held.instance_id} at {ip}:{port}, registered with "
                "another token: it must expire or be deregistered first", "instance_exists",
                runtime=runtime, instance=held.instance_id,
            )
        return held

    def check_instance_caller(self, runtime: str, instance_id: str, caller: Caller | None, deregister: bool = False) -> None:
        """A heartbeat or deregistration of ``instance_id`` under runtime ``runtime``: the
        instance must be of that runtime (else 404, as for an unknown one), and in secure
        mode the token must be the one that registered it (``admin`` may also deregister)."""
        self.check_runtime_caller(runtime, caller)
        held = self.registry.holder(instance_id)
        if held is None or held.runtime != runtime:
            hint = "" if deregister else ": register again"
            raise ApiError(404, f"no instance {instance_id!r} of runtime {runtime!r}{hint}", "not_registered" if not deregister else "not_found",
                           runtime=runtime, instance=instance_id)
        if caller is not None and caller.token_id != held.token_id and not (deregister and caller.admin):
            raise ApiError(
                403, f"instance {instance_id!r} was registered with another token", "not_owner",
                runtime=runtime, instance=instance_id,
            )

    async def _load_recorded(self, runtime: str, host: str, port: int) -> list[str] | None:
        """Load every model version recorded for ``runtime`` onto a new instance, before it
        takes traffic, each with the digests recorded when the version was deployed (a
        version loaded before digests were kept has none here: the runtime asks the
        manager's digests API, which records them on that first use); the model names,
        or None when the instance refused one (a file that is not what was recorded)."""
        recorded = self.store.loaded_models(runtime)
        endpoint = [Endpoint(runtime, host, port, f"{host}:{port}")]
        for loaded in recorded:
            digests = self.store.model_digests(loaded.model, loaded.version)
            failures = await runtime_models.load(
                endpoint, loaded.model, loaded.version, self.settings.model_load_timeout_s,
                digests.as_dict() if digests is not None else None,
            )
            if failures:
                log.warning("runtime %s at %s:%d did not load %s version %s: %s: %s", runtime, host, port,
                            loaded.model, loaded.version, failures[0].code, failures[0].message)
                return None
        return sorted({loaded.model for loaded in recorded})

    async def _learn_discovered(self, name: str, kind: str, host: str, port: int, models: list[str]) -> None:
        """A runtime instance found by discovery (Consul): load its recorded models onto it,
        then read its signatures unless known. ``host`` is the address the registry resolved
        and admitted; one outside the runtime networks is never dialled."""
        if not self.networks.allows(host):
            log.warning("runtime %s at %s:%d: outside SLUICE_MANAGER_RUNTIME_NETWORKS (%s); not dialled", name, host, port, self.networks)
            return
        loaded = await self._load_recorded(name, host, port)
        models = sorted({*models, *(loaded or [])})
        known = self.runtimes.get(name)
        if known is not None and known.kind == kind and (not models or {m.partition(":")[0] for m in models} == set(known.models)):
            return
        try:
            signatures = await read_signatures(host, port, models, self.settings.metadata_timeout_s, runtime=name)
        except SignatureError as exc:
            log.warning("runtime %s at %s:%d: cannot read its models (retried when an instance appears): %s", name, host, port, exc)
            return
        await self.learn_runtime(name, kind, signatures)

    def forget_model(self, runtime: str, model: str) -> None:
        """A model that ``runtime`` no longer serves (every version unloaded)."""
        row = self.runtimes[runtime]
        models = {k: v for k, v in row.models.items() if k != model}
        self.store.put_runtime(runtime, row.kind, models)
        self.runtimes[runtime] = RuntimeRow(runtime, row.kind, models)

    async def learn_runtime(self, name: str, kind: str, models: dict[str, dict]) -> None:
        """Record a runtime's models and signatures (from registration or discovery)."""
        known = self.runtimes.get(name)
        if known is not None and known.kind == kind and known.models == models:
            return
        self.store.put_runtime(name, kind, models)
        self.runtimes[name] = RuntimeRow(name, kind, models)
        log.info("runtime %s (%s) serves %s", name, kind, ", ".join(sorted(models)) or "no models")
        self.layers.add_runtimes({name})
        self._push()

