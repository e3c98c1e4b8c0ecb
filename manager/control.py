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

Each step is confirmed (``NodeTracker.settle``, ``PipelineFeed.wait_acked``): a NACK or
an ACK timeout before the gateways confirmed rolls the change back in the same
make-before-break order (gateways back to the old revisions, then the new routes
withdrawn, then the store) and the API call gets a 502 ``change_rejected`` naming the
node and Envoy's reason, or a 504 ``change_timeout`` naming the silent nodes. Waiting
for gateways to drain is bounded by the dropped revisions' stage timeouts, not by the
ACK timeout.

Several managers (a shared PostgreSQL store, ``manager.store_pg``): a change takes the
store's change lock (``_changing``, one change at a time across managers) and each step
is a global phase (``routes_added`` -> ``gateways_switched`` -> ``routes_withdrawn``):
the driving manager writes the phase, does the step on its own nodes, and goes on only
once every live manager (a heartbeat row that has not expired) acked it, that is its
nodes converged or it has none (``_everywhere``; the other managers follow the phases,
``manager.follow``). A NACK or a timeout on any manager rolls the change back on all of
them (``gateways_reverted`` -> ``routes_reverted``, then the store), and the API call
answers the 502/504 above naming that manager and its node; a manager that neither
acks nor renews its heartbeat is waited for at most until its heartbeat expires.

Crashes: the store holds the change's intent from its first step to its last
(``Store.begin_change``/``finish_change``). A manager started on an unfinished change
routes both revisions, holds the gateway feed until the gateways' sidecars have those
routes, then lets gateways take the new state, withdraws the old routes and finishes
the change (``_recover``): a crash at any step ends in the new state (or in the old one
if it was being rolled back and the abort was written). Any restart with pipelines
also waits (bounded) for a gateway to reconnect and confirm the set before the next
change: a change confirmed while no gateway listens would withdraw routes that a
gateway still serving the older set needs.

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
import socket
import time
from dataclasses import dataclass, field

from manager import runtime_models
from manager.auth.networks import RuntimeNetworks
from manager.auth.scopes import Caller, runtime_scope
from manager.ca import CertificateAuthority
from manager.feed import FeedAck, PipelineFeed
from manager.registry.base import Endpoint, Registry
from manager.resolve import resolve
from manager.schemas import PipelineSpec, Registered, RuntimeRegistration
from manager.settings import ManagerSettings
from manager.served_models import ServedModel
from manager.signatures import SignatureError, read_signatures
from manager.store import PendingChange, PipelineRow, RuntimeRow, Store
from manager.xds.layers import MeshLayers
from manager.xds.ingress_auth import IngressAuth
from manager.xds.limits import MeshLimits
from manager.xds.resources import PUSH_ORDER, ROUTE, MeshSettings, NodeInfo
from manager.xds.snapshot import SnapshotCache
from manager.xds.status import Convergence, NodeTracker
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


class ChangeFailed(Exception):
    """A step of a change was not confirmed; ``error`` is what the API call answers."""

    def __init__(self, error: ApiError):
        super().__init__(error.message)
        self.error = error


def _routes_failure(found: Convergence, timeout_s: float) -> ApiError:
    if found.refused:
        first = found.refused[0]
        return ApiError(
            502, f"Envoy on node {first.node!r} rejected the change's {first.type}: {first.reason}; the change was rolled back",
            "change_rejected", step="routes", node=first.node, type=first.type, reason=first.reason,
            refused=[{"node": r.node, "type": r.type, "reason": r.reason} for r in found.refused],
            silent=list(found.silent),
        )
    return ApiError(
        504, f"Envoy on node(s) {', '.join(found.silent)} did not acknowledge the change's routes within {timeout_s:g}s; "
        "the change was rolled back", "change_timeout", step="routes", nodes=list(found.silent), timeout_s=timeout_s,
    )


def _gateways_failure(ack: FeedAck, timeout_s: float, drain_s: float) -> ApiError:
    nodes = [*ack.silent, *ack.behind]
    return ApiError(
        504, f"gateway(s) {', '.join(nodes)} did not confirm the change (silent: {list(ack.silent)}, still draining after "
        f"{drain_s:g}s: {list(ack.behind)}); the change was rolled back", "change_timeout",
        step="gateways", nodes=nodes, silent=list(ack.silent), behind=list(ack.behind), timeout_s=timeout_s, drain_timeout_s=drain_s,
    )


def _peer_failure(ack, phase: str) -> ApiError:
    """Another manager's refusal of ``phase`` (a ``store_pg.PhaseAck``), as this API call's answer."""
    failure = ack.failure
    details = {**failure.details, "manager": ack.manager, "phase": phase}
    return ApiError(failure.status, f"on manager {ack.manager}: {failure.message}", failure.code, **details)


def _drain_s(plans) -> float:
    """How long gateways may take to drain requests on these revisions: their stage timeouts."""
    return max((sum(s.timeout_ms for s in plan.stages) / 1000 for plan in plans), default=0.0)


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
        #: a store other managers write too (PostgreSQL, ``manager.store_pg``): this manager
        #: follows their writes (``manager.follow``) and changes take the store's change lock
        self.shared = bool(getattr(store, "shared", False))
        if self.shared:  # this manager's name in the store's liveness and ack rows
            store.manager_id = f"{socket.gethostname()}:{settings.port}"
        #: a change a killed manager left unfinished: both revisions routed until ``_recover``
        #: (shared store: the change may be another live manager's; ``Follower.finish_orphaned``)
        self._pending: PendingChange | None = None if self.shared else store.pending_change()
        if self._pending is not None:
            for put in self._pending.puts:
                if put.old is not None:
                    self.routed[put.new.name] = [put.old.plan, put.new.plan]
            for row in self._pending.deletes:
                self.routed[row.name] = [row.plan]
        self.layers = MeshLayers(
            MeshSettings(
                settings.listener_address, settings.stage_retries, zipkin, trace_sample_percent,
                plaintext_health=plaintext_health,
                limits=MeshLimits.from_settings(settings),
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
        self.layers.fault_nack = settings.fault_nack  # test-only, empty unless set
        self.layers.set_pipelines(self.routed)
        self.cache = SnapshotCache()
        self.xds = NodeTracker(self.cache, self._provide, self.layers.forget)
        self.feed = PipelineFeed([row.plan for row in self.served.values()], held=self._pending is not None)
        self._lock = asyncio.Lock()
        #: shared store: one API change of this manager at a time waits for the store's change
        #: lock, *before* ``_lock`` (the follower needs ``_lock`` meanwhile to follow others' phases)
        self._change_gate = asyncio.Lock()
        self._silent_peers: set[str] = set()
        self._rotation: asyncio.Task | None = None
        self._recovery: asyncio.Task | None = None
        self._follower = None  # shared store: a manager.follow.Follower once started
        self._following: list[asyncio.Task] = []
        #: shared store: called when another manager changed tokens (secure mode sets it)
        self.on_tokens_changed = None
        registry.on_change(self._endpoints_changed)
        registry.on_runtime(self._learn_discovered)

    async def start(self) -> None:
        await self.registry.start()
        self._rotation = asyncio.create_task(self._rotate_certificates())
        # (shared store: not waited for; the phases of the next change wait for every live
        # manager's gateways, and a follower needs the lock to follow them meanwhile)
        if self._pending is not None or (self.served and not self.shared):
            await self._lock.acquire()  # no change starts before the gateways are back in step
            self._recovery = asyncio.create_task(self._recover(self._pending))
        if self.shared:
            from manager.follow import Follower

            self._follower = Follower(self)
            self._following = self._follower.start()

    async def stop(self) -> None:
        for task in (self._rotation, self._recovery, *self._following):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
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

    async def _routes_step(self, names: set[str], wait: bool = True) -> Convergence | None:
        """Push the named pipelines' routes (``routed``); with ``wait``, what the gateway
        sidecars made of them (every one acknowledged, or who refused or was silent)."""
        self.layers.set_pipelines({name: self.routed.get(name, []) for name in names})
        for name in [n for n in names if not self.routed.get(n)]:
            self.routed.pop(name, None)
        self._push()
        if wait:
            return await self.xds.settle("gateway", PUSH_ORDER, self.settings.ack_timeout_s)
        return None

    async def _gateway_step(self, upserts: list[PipelinePlan], removed: list[str], dropped: list[PipelinePlan]) -> tuple[FeedAck, float]:
        # gateways drain requests still running on what they drop (``dropped``) before
        # acknowledging: that may take those revisions' stage timeouts, longer than an ACK timeout
        drain_s = _drain_s(dropped) + self.settings.ack_timeout_s
        version = await self.feed.publish(upserts, removed)
        return await self.feed.wait_acked(version, self.settings.ack_timeout_s, drain_s), drain_s

    # --- pipelines
    def _resolve(self, spec: PipelineSpec, revision: int) -> PipelinePlan:
        return resolve(spec, revision, self.runtimes, self.settings.stage_timeout_ms)

    async def create_pipeline(self, spec: PipelineSpec) -> PipelineRow:
        async with self._changing():
            if spec.name in self.served:
                raise ApiError(409, f"pipeline {spec.name!r} already exists", "exists", pipeline=spec.name)
            result = await self._commit([(spec, self._resolve(spec, 1))], [])
            return result.rows[spec.name]

    async def replace_pipeline(self, name: str, spec: PipelineSpec) -> PipelineRow:
        if spec.name != name:
            raise ApiError(422, f"body names pipeline {spec.name!r}, path names {name!r}", "name_mismatch")
        async with self._changing():
            old = self.served.get(name)
            if old is None:
                raise ApiError(404, f"no pipeline {name!r}", "not_found", pipeline=name)
            result = await self._commit([(spec, self._resolve(spec, old.revision + 1))], [])
            return result.rows[name]

    async def delete_pipeline(self, name: str) -> None:
        async with self._changing():
            if name not in self.served:
                raise ApiError(404, f"no pipeline {name!r}", "not_found", pipeline=name)
            await self._commit([], [name])

    async def apply(self, specs: list[PipelineSpec], prune: bool, dry_run: bool = False) -> ChangeResult:
        """Create or replace every listed pipeline (and with ``prune`` delete the others) in
        one change, validated as a whole: one bad definition refuses all of it."""
        async with self._changing():
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

    @contextlib.asynccontextmanager
    async def _changing(self):
        """Held while this manager drives a change. Shared store: the store's change lock
        too (one change at a time across managers), and this manager's state brought up to
        the store's first (another manager may have just changed it), finishing a change
        whose manager died half-way (``manager.follow``)."""
        if not self.shared:
            async with self._lock:
                yield
            return
        async with self._change_gate, self.store.change_lock(), self._lock:
            await self._follower.finish_orphaned()
            await self._follower.sync_pipelines()
            yield

    async def _commit(self, upserts: list[tuple[PipelineSpec, PipelinePlan]], deleted: list[str]) -> ChangeResult:
        """Make before break, for any mix of creates, replaces and deletes (lock held).

        Intent and new state first, durably (``Store.begin_change``); then new routes beside
        the old (confirmed by every gateway sidecar), then gateways (confirmed once they
        drained what they dropped), then the old routes withdrawn, then ``finish_change``.
        A step not confirmed before the gateways confirmed rolls the change back and
        raises the ``ApiError`` that says who refused; after it, the change stands."""
        result = ChangeResult(deleted=list(deleted))
        self._silent_peers: set[str] = set()  # managers that timed out this change: a roll-back does not wait for them
        plans = [plan for _, plan in upserts]
        before = {name: self.served[name] for name in [*(p.name for p in plans), *deleted] if name in self.served}
        rows = self.store.begin_change([(spec.model_dump(exclude_none=True), plan) for spec, plan in upserts], list(deleted))
        for row in rows:
            old = before.get(row.name)
            (result.replaced if old else result.created).append(row.name)
            self.routed[row.name] = [old.plan, row.plan] if old else [row.plan]
            result.rows[row.name] = row
        published = False
        try:
            if upserts:
                found = await self._routes_step({plan.name for plan in plans})
                if not found.ok:
                    raise ChangeFailed(self._named(_routes_failure(found, self.settings.ack_timeout_s)))
            await self._everywhere("routes_added", self.settings.ack_timeout_s)
            dropped = [before[name].plan for name in [*result.replaced, *deleted]]
            for row in rows:
                self.served[row.name] = row
            for name in deleted:
                del self.served[name]
            published = True
            self._set_phase("gateways_switched")
            ack, drain_s = await self._gateway_step(plans, deleted, dropped)
            if not ack.ok:
                raise ChangeFailed(self._named(_gateways_failure(ack, self.settings.ack_timeout_s, drain_s)))
            await self._everywhere("gateways_switched", drain_s)
        except Exception as exc:
            log.warning("change of %s not confirmed (%s): rolling back", sorted({*result.created, *result.replaced, *deleted}), exc)
            await self._roll_back(before, rows, deleted, published)
            if isinstance(exc, ChangeFailed):
                raise exc.error from None
            raise
        withdrawn = set(result.replaced) | set(deleted)
        for name in result.replaced:
            self.routed[name] = [result.rows[name].plan]
        for name in deleted:
            self.routed[name] = []
        try:
            self._set_phase("routes_withdrawn")
            if withdrawn:
                found = await self._routes_step(withdrawn, wait=bool(deleted))
                if found is not None and not found.ok:  # the gateways serve the new state: the change stands
                    log.warning("old routes of %s withdrawn without confirmation: %s", sorted(withdrawn), found)
            await self._everywhere("routes_withdrawn", self.settings.ack_timeout_s, must=False)
        finally:
            self.store.finish_change()
        if len(plans) + len(deleted) == 1:
            log.info("pipeline %s %s", (plans[0].name if plans else deleted[0]), "deleted" if deleted else f"at revision {plans[0].revision}")
        else:
            log.info("applied: %d created, %d replaced, %d deleted", len(result.created), len(result.replaced), len(deleted))
        return result

    async def _roll_back(self, before: dict[str, PipelineRow], rows: list[PipelineRow], deleted: list[str], published: bool) -> None:
        """Undo a change whose step failed, make before break again: gateways back to the old
        revisions (if they were told), then the new routes withdrawn (only once the gateways
        confirmed: one that may still serve a new revision keeps its routes), then the store."""
        names = {row.name for row in rows} | set(deleted)
        for name in names:
            if name in before:
                self.served[name] = before[name]
            else:
                self.served.pop(name, None)
        try:
            await self._roll_back_mesh(before, rows, names, published)
        finally:
            self.store.abort_change()  # the store holds the old state whatever the mesh confirmed
        log.info("rolled back: %s at their previous revisions", sorted(names))

    async def _roll_back_mesh(self, before: dict[str, PipelineRow], rows: list[PipelineRow], names: set[str], published: bool) -> None:
        """Gateways back first (on every manager), then routes (on every manager)."""
        drain_s = _drain_s([row.plan for row in rows]) + self.settings.ack_timeout_s
        confirmed = True
        if published:  # (else no gateway anywhere was told to switch: nothing to revert)
            self._set_phase("gateways_reverted")
            confirmed = await self.revert_gateways(before, names, drain_s)
            confirmed = await self._everywhere("gateways_reverted", drain_s, must=False) and confirmed
        self._set_phase("routes_reverted")
        await self.revert_routes(before, names, confirmed)
        await self._everywhere("routes_reverted", self.settings.ack_timeout_s, must=False)

    async def revert_gateways(self, before: dict[str, PipelineRow], names: set[str], drain_s: float) -> bool:
        """This manager's gateways back to the old revisions (``before``); whether they confirmed."""
        created = sorted(names - set(before))
        version = await self.feed.publish([row.plan for row in before.values()], created)
        ack = await self.feed.wait_acked(version, self.settings.ack_timeout_s, drain_s)
        if not ack.ok:
            log.warning("rollback: gateways %s did not confirm the old revisions: the new routes stay", [*ack.silent, *ack.behind])
        return ack.ok

    async def revert_routes(self, before: dict[str, PipelineRow], names: set[str], confirmed: bool) -> None:
        """This manager's routes back to the old revisions, once the gateways confirmed them
        (``confirmed``; else the new routes stay, for a gateway that may still use them)."""
        if confirmed:
            for name in names:
                self.routed[name] = [before[name].plan] if name in before else []
        await self._routes_step(names, wait=False)  # a silent sidecar gets it when it answers again

    # --- several managers: each phase of a change confirmed by every live manager
    def _named(self, error: ApiError) -> ApiError:
        """Shared store: the failure names this manager too (``details.manager``)."""
        if self.shared:
            error.details["manager"] = self.store.manager_id
        return error

    def _set_phase(self, phase: str) -> None:
        if self.shared:
            change = self.store.current_change()
            if change is not None:
                self.store.set_phase(change.id, phase)

    async def _everywhere(self, phase: str, step_s: float, must: bool = True) -> bool:
        """Shared store: ack ``phase`` for this manager, then wait until every other live
        manager acked it. A manager's refusal, or one still live but silent after the
        step's own bound (``step_s``) plus a heartbeat TTL, fails the change (``must``:
        raise ``ChangeFailed`` naming it; else log it and answer False). A manager whose
        heartbeat expires meanwhile (killed) is no longer waited for."""
        if not self.shared:
            return True
        change = self.store.current_change()
        if change is None:
            return True
        self.store.ack_phase(change.id, phase)
        me = self.store.manager_id
        bound = step_s + self.settings.peer_ttl_s + 1.0
        deadline = time.monotonic() + bound
        while True:
            acks = self.store.phase_acks(change.id, phase)
            refused = [a for m, a in sorted(acks.items()) if m != me and not a.ok]
            missing = sorted(set(self.store.live_managers()) - set(acks) - {me} - self._silent_peers)
            error = None
            if refused:
                error = _peer_failure(refused[0], phase)
            elif not missing:
                return True
            elif time.monotonic() > deadline:
                self._silent_peers |= set(missing)
                error = ApiError(
                    504, f"manager(s) {', '.join(missing)} did not confirm the change's {phase} within "
                    f"{bound:g}s; the change was rolled back",
                    "change_timeout", step=phase, phase=phase, manager=missing[0], managers=missing, nodes=[],
                )
            if error is not None:
                if must:
                    raise ChangeFailed(error)
                log.warning("%s not confirmed everywhere: %s", phase, error.message)
                return False
            await asyncio.sleep(0.01)

    async def _recover(self, pending: PendingChange | None) -> None:
        """After a restart, before any change (``start`` took the lock for this; released
        here): wait for a gateway to reconnect and confirm the pipeline set, so that no
        change is confirmed to a manager that no gateway hears (a gateway still serving
        an older set would meet withdrawn routes). With a change a killed manager left
        (``pending``): the gateways' sidecars get both revisions' routes first (the feed
        is held until then), and once the gateways confirmed the new state the old routes
        go and the change is finished. Each wait is bounded by ``recovery_timeout_s``;
        what is not confirmed keeps its routes."""
        bound = self.settings.recovery_timeout_s
        names = pending.names if pending is not None else set()
        try:
            try:
                if pending is not None:
                    log.info("finishing the change a previous manager began on %s", sorted(names))
                    started = time.monotonic()
                    routed = await self.xds.wait_connected("gateway", bound) and (await self.xds.settle("gateway", PUSH_ORDER, bound)).ok
                    if routed:
                        log.info("recovery: the gateway sidecars hold the routes (%.1fs)", time.monotonic() - started)
                    else:
                        log.warning("recovery: no gateway sidecar confirmed the routes within %.1fs; gateways get the pipelines anyway", bound)
                    await self.feed.release()
                drain_s = _drain_s([p.old.plan for p in pending.puts if p.old] + [row.plan for row in pending.deletes]) if pending else 0.0
                acked = await self.feed.wait_connected(bound) and (
                    await self.feed.wait_acked(self.feed.version, self.settings.ack_timeout_s, drain_s + bound)
                ).ok
                if not acked:
                    log.warning("start-up: no gateway confirmed the pipeline set within %.1fs; changes go on without", bound)
                if pending is not None:
                    if acked:
                        for name in names:
                            self.routed[name] = [self.served[name].plan] if name in self.served else []
                        await self._routes_step(names, wait=False)
                    else:
                        log.warning("recovery: the old routes of %s stay", sorted(names))
            except Exception:  # a bug must not leave the feed held or the change open forever
                log.exception("start-up sync failed; going on as things stand")
                await self.feed.release()
            if pending is not None:
                self.store.finish_change()  # (not when cancelled: the next start finishes it)
                self._pending = None
                log.info("finished the change on %s", sorted(names))
        finally:
            self._lock.release()

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

    async def learn_runtime(self, name: str, kind: str, models: dict[str, ServedModel]) -> None:
        """Record a runtime's models and signatures (from registration or discovery)."""
        known = self.runtimes.get(name)
        if known is not None and known.kind == kind and known.models == models:
            return
        self.store.put_runtime(name, kind, models)
        self.runtimes[name] = RuntimeRow(name, kind, models)
        log.info("runtime %s (%s) serves %s", name, kind, ", ".join(sorted(models)) or "no models")
        self.layers.add_runtimes({name})
        self._push()

