"""Several managers on one shared store (PostgreSQL): how each follows the others' writes,
and confirms each phase of another manager's change.

Every manager LISTENs (``PgStore.watch``), renews its heartbeat row (``managers``, expiry
``peer_ttl_s`` on the database's clock) and, for each table written by any manager:

- ``change_phases`` (a change in progress, driven by another manager): does the change's
  phases on *its own* nodes as the driving manager announces them, and acks each one
  (``change_acks``: converged, or the 502/504 it would answer, naming its node):
  1. ``routes_added``: the new revisions routed beside the old ones -> its gateway
     sidecars ACK;
  2. ``gateways_switched``: its gateways switch (and drop deleted pipelines) -> they ACK
     after draining;
  3. ``routes_withdrawn``: the old routes withdrawn;
  and on a roll-back ``gateways_reverted`` (its gateways back to the old revisions, if
  they had switched) then ``routes_reverted`` (the new routes withdrawn once they did).
  The driving manager goes on to a phase only once every live manager acked the one
  before (``ControlPlane._everywhere``), so the phases are global;
- ``pipelines`` with no change in progress (a restart, a change finished by someone
  else): brings its nodes to the store's pipelines, make before break, locally;
- ``runtimes``: the runtimes (and their clusters) other managers learnt;
- ``instances``: runtime instances registered, renewed or expired through another
  manager (``EmbeddedRegistry.reload``);
- ``tokens``: the revoked token ids the public ingresses refuse (secure mode).

Why the ordering holds across managers: make-before-break is an ordering between the
gateway sidecars' routes and the gateways' pipelines. With the phases global, *no*
gateway anywhere switches before *every* gateway sidecar, whichever manager it is
connected to, has the new routes; and no route is withdrawn anywhere before every
gateway confirmed the switch. So a gateway and its sidecar may be connected to
different managers (a Kubernetes Service in front of several managers does not keep
them together). A manager killed mid-change stops being waited for once its heartbeat
expires (its Envoys keep their last config and reconnect to another manager, which
serves them the store's state).

Changes are serialised across managers by the store's change lock (``_changing``). A
change left half-way by a manager that died (its rows stay, its session lock is gone) is
finished by the next manager that takes the lock: each manager does the phases it had
not done yet on its own nodes (or the roll-back's, if one had begun) and the store is
finished (or aborted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from manager.control import _drain_s, _gateways_failure, _routes_failure
from manager.store import PendingChange, PipelineRow
from manager.store_pg import PHASES, ROLLBACK_PHASES, ChangePhase, PhaseFailure

log = logging.getLogger(__name__)

#: how often a manager looks for a change whose manager died (no NOTIFY says so)
ORPHAN_CHECK_S = 2.0
_PIPELINE_TABLES = {"pipelines", "pipeline_changes", "change_phases"}


@dataclass
class _Followed:
    """What this manager did for one change of another manager's."""

    id: str
    pending: PendingChange
    done: list[str] = field(default_factory=list)
    #: roll-back: whether this manager's gateways confirmed the old revisions
    reverted: bool = True

    @property
    def before(self) -> dict[str, PipelineRow]:
        return {p.old.name: p.old for p in self.pending.puts if p.old is not None} | {r.name: r for r in self.pending.deletes}

    @property
    def names(self) -> set[str]:
        return set(self.pending.names)


class Follower:
    def __init__(self, control) -> None:
        self.control = control
        self.store = control.store
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        #: when the last sync of pipelines finished (monotonic), for tests and benches
        self.synced_at = 0.0
        self._orphans_checked = time.monotonic()
        self._followed: _Followed | None = None

    def start(self) -> list[asyncio.Task]:
        self.store.heartbeat(self.control.settings.peer_ttl_s)
        return [asyncio.create_task(self._watch()), asyncio.create_task(self._work()), asyncio.create_task(self._heartbeats())]

    async def _heartbeats(self) -> None:
        """Renew this manager's row three times per TTL; delete it when stopped."""
        ttl = self.control.settings.peer_ttl_s
        try:
            while True:
                await asyncio.sleep(ttl / 3)
                try:
                    self.store.heartbeat(ttl)
                except Exception:
                    log.exception("manager heartbeat failed; retrying")
        finally:
            with contextlib.suppress(Exception):
                self.store.leave()

    async def _watch(self) -> None:
        async for tables in self.store.watch():
            self._dirty |= tables
            self._wake.set()

    async def _work(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), ORPHAN_CHECK_S)
            except TimeoutError:
                pass
            self._wake.clear()
            tables, self._dirty = self._dirty, set()
            try:
                await self._apply(tables)
            except Exception:  # one bad sync must not stop following
                log.exception("following the shared store failed; retrying on the next write")

    async def _apply(self, tables: set[str]) -> None:
        control = self.control
        if "runtimes" in tables:
            self.sync_runtimes()
        if "instances" in tables:
            reload = getattr(control.registry, "reload", None)
            if reload is not None:
                reload()
        if "tokens" in tables and control.on_tokens_changed is not None:
            control.on_tokens_changed()
        if tables & _PIPELINE_TABLES:
            change = self.store.current_change()
            if change is not None and change.driver != self.store.manager_id:
                async with control.lock:
                    await self.follow_change(change)
            elif change is None:
                async with control.lock:
                    await self.sync_pipelines()
        # every ORPHAN_CHECK_S, whatever else is written meanwhile (heartbeats are, often)
        if time.monotonic() - self._orphans_checked >= ORPHAN_CHECK_S:
            self._orphans_checked = time.monotonic()
            # (not while an API call of this manager waits for the change lock: it finishes it)
            if self.store.pending_change() is not None and not control._change_gate.locked():
                async with control.lock, self.store.change_lock(wait=False) as held:
                    if held:  # nobody drives it: its manager died
                        await self.finish_orphaned()
                        await self.sync_pipelines()

    # --- another manager's change, phase by phase
    def _track(self, change: ChangePhase) -> _Followed | None:
        if self._followed is None or self._followed.id != change.id:
            pending = self.store.pending_change()
            if pending is None or self.store.current_change() != change:
                return None  # finished (or replaced) meanwhile: the next notification says what now
            self._followed = _Followed(change.id, pending)
        return self._followed

    async def follow_change(self, change: ChangePhase) -> None:
        """Do on this manager's nodes every phase of ``change`` up to its current one not done
        yet (in order), acking each (lock held)."""
        followed = self._track(change)
        if followed is None:
            return
        order = ROLLBACK_PHASES if change.phase in ROLLBACK_PHASES else PHASES
        for phase in order[: order.index(change.phase) + 1]:
            if phase in followed.done:
                continue
            failure = await self._step(followed, phase)
            followed.done.append(phase)
            self.store.ack_phase(change.id, phase, failure)
            if failure is not None:
                log.warning("following: %s of the change on %s refused here: %s", phase, sorted(followed.names), failure.message)

    async def _step(self, followed: _Followed, phase: str) -> PhaseFailure | None:
        control = self.control
        settings = control.settings
        pending, before = followed.pending, followed.before
        puts = [p.new for p in pending.puts]
        deleted = [row.name for row in pending.deletes]
        if phase == "routes_added":
            for row in puts:
                old = before.get(row.name)
                control.routed[row.name] = [old.plan, row.plan] if old else [row.plan]
            if puts:
                found = await control._routes_step({row.name for row in puts})
                if not found.ok:
                    return PhaseFailure.of(control._named(_routes_failure(found, settings.ack_timeout_s)))
        elif phase == "gateways_switched":
            for row in puts:
                control.served[row.name] = row
            for name in deleted:
                control.served.pop(name, None)
            dropped = [row.plan for row in before.values()]
            ack, drain_s = await control._gateway_step([row.plan for row in puts], deleted, dropped)
            if not ack.ok:
                return PhaseFailure.of(control._named(_gateways_failure(ack, settings.ack_timeout_s, drain_s)))
        elif phase == "routes_withdrawn":
            for row in puts:
                control.routed[row.name] = [row.plan]
            for name in deleted:
                control.routed[name] = []
            withdrawn = set(before)
            if withdrawn:
                found = await control._routes_step(withdrawn, wait=bool(deleted))
                if found is not None and not found.ok:
                    log.warning("following: old routes of %s withdrawn without confirmation: %s", sorted(withdrawn), found)
        elif phase == "gateways_reverted":
            for name in followed.names:
                if name in before:
                    control.served[name] = before[name]
                else:
                    control.served.pop(name, None)
            if "gateways_switched" in followed.done:
                drain_s = _drain_s([row.plan for row in puts]) + settings.ack_timeout_s
                followed.reverted = await control.revert_gateways(before, followed.names, drain_s)
        elif phase == "routes_reverted":
            if "routes_added" in followed.done:
                await control.revert_routes(before, followed.names, followed.reverted)
        return None

    def sync_runtimes(self) -> None:
        control = self.control
        rows = {r.name: r for r in self.store.runtimes()}
        changed = {name for name, row in rows.items() if control.runtimes.get(name) != row}
        if changed:
            control.runtimes.update({name: rows[name] for name in changed})
            control.layers.add_runtimes(changed)
            control._push()
            log.info("runtimes learnt through another manager: %s", ", ".join(sorted(changed)))

    async def sync_pipelines(self) -> None:
        """This manager's nodes to the store's pipelines, make before break, locally (lock
        held); nothing while a change is in progress (its phases say what to do)."""
        control = self.control
        stored = self.store.settled_pipelines()
        if stored is None:
            return
        target = {row.name: row for row in stored}
        served = control.served
        upserts = [row for name, row in target.items() if name not in served or served[name].plan != row.plan]
        removed = [name for name in served if name not in target]
        for name, row in target.items():
            if name in served and served[name].plan == row.plan:
                served[name] = row  # same plan, newer metadata
        if not upserts and not removed:
            return
        started = time.monotonic()
        names = {row.name for row in upserts}
        before = {name: served[name] for name in [*names, *removed] if name in served}
        for row in upserts:
            old = served.get(row.name)
            control.routed[row.name] = [old.plan, row.plan] if old else [row.plan]
        if names:
            found = await control._routes_step(names)
            if not found.ok:
                log.warning("following: gateway sidecars did not confirm the routes of %s (%s); gateways switch anyway", sorted(names), found)
        for row in upserts:
            served[row.name] = row
        for name in removed:
            del served[name]
        ack, _ = await control._gateway_step([row.plan for row in upserts], removed, [row.plan for row in before.values()])
        if not ack.ok:
            log.warning("following: gateways %s did not confirm %s: the old routes stay", [*ack.silent, *ack.behind], sorted({*names, *removed}))
            return
        for row in upserts:
            control.routed[row.name] = [row.plan]
        for name in removed:
            control.routed[name] = []
        withdrawn = set(before) | set(removed)
        if withdrawn:
            await control._routes_step(withdrawn, wait=False)
        self.synced_at = time.monotonic()
        log.info("following: %d pipeline(s) updated, %d removed in %.0f ms (%s)", len(upserts), len(removed),
                 (self.synced_at - started) * 1000, ", ".join(sorted({*names, *removed})))

    async def finish_orphaned(self) -> None:
        """With the change lock held: a change still pending has no live manager driving it.
        This manager does on its own nodes the phases it had not done (the roll-back's, if
        one had begun), then finishes (or aborts) the change in the store."""
        pending = self.store.pending_change()
        if pending is None:
            return
        change = self.store.current_change()
        rolling_back = change is not None and change.phase in ROLLBACK_PHASES
        log.warning("%s the change on %s that a manager left half-way (it died)",
                    "rolling back" if rolling_back else "finishing", sorted(pending.names))
        if change is not None:
            followed = self._track(change)
            if followed is not None:
                for phase in ROLLBACK_PHASES if rolling_back else PHASES:
                    if phase not in followed.done:
                        await self._step(followed, phase)
                        followed.done.append(phase)
        if rolling_back:
            self.store.abort_change()
        else:
            self.store.finish_change()
