"""PostgreSQL persistence, for a control plane of several managers sharing one database
(``SLUICE_MANAGER_DB_URL=postgresql://user@host:port/db``); the embedded SQLite store
(``manager.store``) stays the default.

The same methods and row types as ``manager.store.Store``, the same tables (``plan`` as
BYTEA, times as DOUBLE PRECISION), the same change intent (``pipeline_changes``,
``begin_change`` / ``finish_change`` / ``abort_change`` / ``pending_change``).

Migrations are versioned: ``schema_migrations`` lists the versions applied; on open,
the missing ones of ``MIGRATIONS`` run in one transaction under an advisory lock, so
managers starting together migrate once. Every write is one transaction (READ
COMMITTED); the writes that must not interleave across managers (``begin_change``'s
"one change at a time", ``record_model_digests``'s "the first record holds") take a
transaction-scoped advisory lock first.

Propagation: a statement trigger on every table sends ``NOTIFY sluice_changes, '<table>'``
when its transaction commits; ``watch()`` yields the tables changed (every table after a
reconnect, since notifications sent while disconnected are lost). ``change_lock()`` is a
session advisory lock that serialises pipeline changes across managers (released by
PostgreSQL when the holder's connection dies, e.g. the manager was SIGKILLed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass

import psycopg

from manager.store import (
    InstanceRow, LoadedModel, PendingChange, PendingPut, PipelineRow, RecordedDigests, RecordedFile, RuntimeRow, TokenRow,
)
from manager.served_models import ServedModel, models_from_json, models_to_json
from sluice.plan import PipelinePlan
from sluice.plan_proto import from_bytes

log = logging.getLogger(__name__)

CHANNEL = "sluice_changes"
#: advisory lock keys (one namespace for Sluice: 0x5100...)
MIGRATION_LOCK = 0x51000001
CHANGE_LOCK = 0x51000002
BEGIN_LOCK = 0x51000003
DIGESTS_LOCK = 0x51000004

TABLES = ("pipelines", "runtimes", "instances", "runtime_models", "model_digests", "pipeline_changes", "tokens")

#: version -> statements; append only (a released version is never edited)
MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE pipelines (
    name TEXT PRIMARY KEY, revision INTEGER NOT NULL, definition TEXT NOT NULL, plan BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
CREATE TABLE runtimes (name TEXT PRIMARY KEY, kind TEXT NOT NULL, models TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
CREATE TABLE instances (
    id TEXT PRIMARY KEY, runtime TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL,
    last_seen DOUBLE PRECISION NOT NULL, ip TEXT NOT NULL DEFAULT '', token_id TEXT);
CREATE TABLE runtime_models (
    runtime TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, loaded_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (runtime, model, version));
CREATE TABLE model_digests (
    model TEXT NOT NULL, version TEXT NOT NULL, path TEXT NOT NULL, sha256 TEXT NOT NULL, size BIGINT NOT NULL,
    recorded_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (model, version, path));
CREATE TABLE tokens (
    id TEXT PRIMARY KEY, scopes TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    expires_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION);
""",
    # the change intent, and NOTIFY on commit of any write (what other managers LISTEN to)
    2: """
CREATE TABLE pipeline_changes (
    name TEXT PRIMARY KEY, action TEXT NOT NULL, old_definition TEXT, old_plan BYTEA,
    old_created_at DOUBLE PRECISION, old_updated_at DOUBLE PRECISION);
CREATE FUNCTION sluice_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_notify('sluice_changes', TG_TABLE_NAME); RETURN NULL; END $$;
"""
    + "".join(
        f"CREATE TRIGGER {t}_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {t} "
        "FOR EACH STATEMENT EXECUTE FUNCTION sluice_notify();\n"
        for t in TABLES
    ),
}
# several managers confirming each change: who is alive (a heartbeat row with an expiry on
# the database's clock), the change in progress and its global phase, each manager's ack
MIGRATIONS[3] = """
CREATE TABLE managers (id TEXT PRIMARY KEY, started_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL);
CREATE TABLE change_phases (
    id TEXT PRIMARY KEY, driver TEXT NOT NULL, phase TEXT NOT NULL, updated_at DOUBLE PRECISION NOT NULL);
CREATE TABLE change_acks (
    change_id TEXT NOT NULL, manager TEXT NOT NULL, phase TEXT NOT NULL, failure TEXT,
    acked_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (change_id, manager, phase));
CREATE TRIGGER change_phases_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON change_phases
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_notify();
CREATE TRIGGER change_acks_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON change_acks
    FOR EACH STATEMENT EXECUTE FUNCTION sluice_notify();
"""
#: tables whose writes are notified, beyond ``TABLES`` (added by migration 3)
PHASE_TABLES = ("change_phases", "change_acks")
SCHEMA_VERSION = max(MIGRATIONS)

#: the phases of a change every live manager confirms in turn, and those of its roll-back
PHASES = ("routes_added", "gateways_switched", "routes_withdrawn")
ROLLBACK_PHASES = ("gateways_reverted", "routes_reverted")
_DB_NOW = "extract(epoch from clock_timestamp())::double precision"


@dataclass(frozen=True)
class ChangePhase:
    """The pipeline change in progress: its id, the manager driving it, its phase."""

    id: str
    driver: str
    phase: str


@dataclass(frozen=True)
class PhaseFailure:
    """Why a manager refused a phase: the ``ApiError`` it would answer (stored as JSON)."""

    status: int
    code: str
    message: str
    details: dict

    @classmethod
    def of(cls, error) -> "PhaseFailure":
        return cls(error.status, error.code, error.message, dict(error.details))


@dataclass(frozen=True)
class PhaseAck:
    """One manager's answer for one phase: ``failure`` is None when its nodes converged (or
    it has none)."""

    manager: str
    failure: PhaseFailure | None

    @property
    def ok(self) -> bool:
        return self.failure is None


def default_manager_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"

_ROW = "definition, plan, created_at, updated_at"
_LIVE = "NOT EXISTS (SELECT 1 FROM pipeline_changes c WHERE c.name = pipelines.name AND c.action = 'delete')"


def migrate(conn: psycopg.Connection, target: int = SCHEMA_VERSION) -> list[int]:
    """Apply the missing migrations up to ``target`` in one transaction; the versions applied."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        if done and max(done) > SCHEMA_VERSION:
            raise RuntimeError(f"the database is at schema version {max(done)}, newer than this manager's {SCHEMA_VERSION}")
        for version in sorted(v for v in MIGRATIONS if v not in done and v <= target):
            conn.execute(MIGRATIONS[version])
            conn.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (%s, %s)", (version, time.time()))
            applied.append(version)
    if applied:
        log.info("store: schema migrated to version %d (applied %s)", max(applied), applied)
    return applied


def schema_version(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return row[0] or 0


class PgStore:
    """``manager.store.Store``'s interface on PostgreSQL; ``shared`` marks a store other
    managers write too (the control plane then follows ``watch()``)."""

    shared = True

    def __init__(self, url: str, manager_id: str | None = None):
        self.url = url
        #: this manager's name in ``managers``, ``change_phases.driver`` and ``change_acks``
        self.manager_id = manager_id or default_manager_id()
        self._db = psycopg.connect(url, autocommit=True)
        self._mutex = threading.RLock()
        migrate(self._db)
        self._lock_conn: psycopg.AsyncConnection | None = None

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        with self._mutex, self._db.transaction():
            yield self._db

    def _query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self._mutex:
            return self._db.execute(sql, params).fetchall()

    def health(self) -> str | None:
        try:
            self._query("SELECT count(*) FROM pipelines")
            return None
        except psycopg.Error as exc:
            return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self._db.close()

    # --- pipelines
    def pipelines(self) -> list[PipelineRow]:
        return [self._pipeline(r) for r in self._query(f"SELECT {_ROW} FROM pipelines WHERE {_LIVE} ORDER BY name")]

    def pipeline(self, name: str) -> PipelineRow | None:
        rows = self._query(f"SELECT {_ROW} FROM pipelines WHERE name = %s AND {_LIVE}", (name,))
        return self._pipeline(rows[0]) if rows else None

    def put_pipeline(self, definition: dict, plan: PipelinePlan) -> PipelineRow:
        (row,) = self.put_pipelines([(definition, plan)])
        return row

    def put_pipelines(self, items: list[tuple[dict, PipelinePlan]]) -> list[PipelineRow]:
        with self._transaction():
            return self._put(items)

    def _put(self, items: list[tuple[dict, PipelinePlan]]) -> list[PipelineRow]:
        now = _now()
        encode = _to_bytes()
        with self._db.cursor() as cur:
            cur.executemany(
                """INSERT INTO pipelines (name, revision, definition, plan, created_at, updated_at)
                   VALUES (%s, %s, %s, %s, %s, %s)
                   ON CONFLICT (name) DO UPDATE SET revision=excluded.revision, definition=excluded.definition,
                     plan=excluded.plan, updated_at=excluded.updated_at""",
                [(plan.name, plan.revision, json.dumps(definition), encode(plan), now, now) for definition, plan in items],
            )
        if not items:
            return []
        created = dict(self._db.execute(
            "SELECT name, created_at FROM pipelines WHERE name = ANY(%s)", ([plan.name for _, plan in items],)
        ).fetchall())
        return [PipelineRow(definition, plan, created[plan.name], now) for definition, plan in items]

    def delete_pipeline(self, name: str) -> bool:
        return self.delete_pipelines([name]) > 0

    def delete_pipelines(self, names: list[str]) -> int:
        with self._transaction():
            return sum(self._db.execute("DELETE FROM pipelines WHERE name = %s", (n,)).rowcount for n in names)

    # --- a pipeline change in steps
    def begin_change(self, puts: list[tuple[dict, PipelinePlan]], deletes: list[str]) -> list[PipelineRow]:
        with self._transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (BEGIN_LOCK,))  # one change at a time, across managers
            if self._db.execute("SELECT 1 FROM pipeline_changes LIMIT 1").fetchone() is not None:
                raise RuntimeError("a pipeline change is already under way: finish or abort it first")
            names = [plan.name for _, plan in puts]
            if set(names) & set(deletes):
                raise ValueError(f"pipelines both put and deleted: {sorted(set(names) & set(deletes))}")
            for action, name in [*(("put", n) for n in names), *(("delete", n) for n in deletes)]:
                self._db.execute(
                    """INSERT INTO pipeline_changes (name, action, old_definition, old_plan, old_created_at, old_updated_at)
                       SELECT %s, %s, p.definition, p.plan, p.created_at, p.updated_at
                       FROM (SELECT 1) AS one LEFT JOIN pipelines p ON p.name = %s""",
                    (name, action, name),
                )
            # in the same transaction as the new state: no manager sees one without the other
            self._db.execute(
                f"INSERT INTO change_phases (id, driver, phase, updated_at) VALUES (%s, %s, %s, {_DB_NOW})",
                (uuid.uuid4().hex, self.manager_id, PHASES[0]),
            )
            return self._put(puts)

    def finish_change(self) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM pipelines WHERE name IN (SELECT name FROM pipeline_changes WHERE action = 'delete')")
            self._db.execute("DELETE FROM pipeline_changes")
            self._end_phases()

    def abort_change(self) -> None:
        with self._transaction():
            changes = self._db.execute(
                "SELECT name, old_definition, old_plan, old_created_at, old_updated_at FROM pipeline_changes"
            ).fetchall()
            for name, definition, plan, created, updated in changes:
                if plan is None:
                    self._db.execute("DELETE FROM pipelines WHERE name = %s", (name,))
                else:
                    self._db.execute(
                        "UPDATE pipelines SET revision = %s, definition = %s, plan = %s, created_at = %s, updated_at = %s WHERE name = %s",
                        (from_bytes(bytes(plan)).revision, definition, plan, created, updated, name),
                    )
            self._db.execute("DELETE FROM pipeline_changes")
            self._end_phases()

    def pending_change(self) -> PendingChange | None:
        rows = self._query(
            """SELECT c.name, c.action, c.old_definition, c.old_plan, c.old_created_at, c.old_updated_at,
                      p.definition, p.plan, p.created_at, p.updated_at
               FROM pipeline_changes c LEFT JOIN pipelines p ON p.name = c.name ORDER BY c.name"""
        )
        if not rows:
            return None
        puts, deletes = [], []
        for _name, action, *rest in rows:
            old = self._pipeline(tuple(rest[:4])) if rest[1] is not None else None
            new = self._pipeline(tuple(rest[4:])) if rest[5] is not None else None
            if action == "delete":
                if old is not None:
                    deletes.append(old)
            elif new is not None:
                puts.append(PendingPut(old, new))
        return PendingChange(tuple(puts), tuple(deletes))

    @staticmethod
    def _pipeline(row: tuple) -> PipelineRow:
        definition, plan, created, updated = row
        return PipelineRow(json.loads(definition), from_bytes(bytes(plan)), created, updated)

    # --- runtimes and instances
    def runtimes(self) -> list[RuntimeRow]:
        return [RuntimeRow(n, k, models_from_json(json.loads(m))) for n, k, m in self._query("SELECT name, kind, models FROM runtimes ORDER BY name")]

    def put_runtime(self, name: str, kind: str, models: dict[str, ServedModel]) -> None:
        with self._transaction():
            self._db.execute(
                """INSERT INTO runtimes (name, kind, models, updated_at) VALUES (%s, %s, %s, %s)
                   ON CONFLICT (name) DO UPDATE SET kind=excluded.kind, models=excluded.models, updated_at=excluded.updated_at""",
                (name, kind, json.dumps(models_to_json(models)), _now()),
            )

    def instances(self) -> list[InstanceRow]:
        return [InstanceRow(*r) for r in self._query("SELECT id, runtime, host, port, last_seen, ip, token_id FROM instances ORDER BY id")]

    def put_instance(self, inst: InstanceRow) -> None:
        with self._transaction():
            self._db.execute(
                """INSERT INTO instances (id, runtime, host, port, last_seen, ip, token_id) VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (id) DO UPDATE SET runtime=excluded.runtime, host=excluded.host, port=excluded.port,
                     last_seen=excluded.last_seen, ip=excluded.ip, token_id=excluded.token_id""",
                (inst.id, inst.runtime, inst.host, inst.port, inst.last_seen, inst.ip, inst.token_id),
            )

    def delete_instance(self, instance_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM instances WHERE id = %s", (instance_id,))

    # --- API tokens
    def tokens(self) -> list[TokenRow]:
        rows = self._query("SELECT id, scopes, created_at, expires_at, revoked_at FROM tokens ORDER BY created_at, id")
        return [TokenRow(i, tuple(json.loads(s)), c, e, r) for i, s, c, e, r in rows]

    def token(self, token_id: str) -> TokenRow | None:
        rows = self._query("SELECT id, scopes, created_at, expires_at, revoked_at FROM tokens WHERE id = %s", (token_id,))
        return TokenRow(rows[0][0], tuple(json.loads(rows[0][1])), *rows[0][2:]) if rows else None

    def put_token(self, row: TokenRow) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO tokens (id, scopes, created_at, expires_at, revoked_at) VALUES (%s, %s, %s, %s, %s)",
                (row.id, json.dumps(list(row.scopes)), row.created_at, row.expires_at, row.revoked_at),
            )

    def revoke_token(self, token_id: str, at: float) -> bool:
        with self._transaction():
            cursor = self._db.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, %s) WHERE id = %s", (at, token_id))
        return cursor.rowcount > 0

    def revoked_token_ids(self, now: float) -> list[str]:
        return [r[0] for r in self._query("SELECT id FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > %s ORDER BY id", (now,))]

    # --- model versions loaded onto runtimes through the API
    def loaded_models(self, runtime: str | None = None) -> list[LoadedModel]:
        if runtime is None:
            rows = self._query("SELECT runtime, model, version FROM runtime_models ORDER BY runtime, model, version")
        else:
            rows = self._query("SELECT runtime, model, version FROM runtime_models WHERE runtime = %s ORDER BY model, version", (runtime,))
        return [LoadedModel(*r) for r in rows]

    def put_loaded_model(self, loaded: LoadedModel) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO runtime_models (runtime, model, version, loaded_at) VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (loaded.runtime, loaded.model, loaded.version, _now()),
            )

    def delete_loaded_model(self, loaded: LoadedModel) -> None:
        with self._transaction():
            self._db.execute(
                "DELETE FROM runtime_models WHERE runtime = %s AND model = %s AND version = %s",
                (loaded.runtime, loaded.model, loaded.version),
            )

    # --- SHA-256 digests of deployed model versions
    def model_digests(self, model: str, version: str) -> RecordedDigests | None:
        rows = self._query(
            "SELECT path, sha256, size, recorded_at FROM model_digests WHERE model = %s AND version = %s ORDER BY path", (model, version)
        )
        if not rows:
            return None
        return RecordedDigests(model, version, tuple(RecordedFile(p, d, n) for p, d, n, _ in rows), rows[0][3])

    def record_model_digests(self, model: str, version: str, files: list[RecordedFile]) -> RecordedDigests:
        if not files:
            raise ValueError(f"model {model!r} version {version}: no files to record")
        with self._transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (DIGESTS_LOCK, f"{model}/{version}"))
            if self._db.execute("SELECT 1 FROM model_digests WHERE model = %s AND version = %s LIMIT 1", (model, version)).fetchone() is None:
                now = _now()
                with self._db.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO model_digests (model, version, path, sha256, size, recorded_at) VALUES (%s, %s, %s, %s, %s, %s)",
                        [(model, version, f.path, f.sha256, f.size, now) for f in files],
                    )
        recorded = self.model_digests(model, version)
        assert recorded is not None
        return recorded

    def forget_model_digests(self, model: str, version: str | None = None) -> None:
        with self._transaction():
            if version is None:
                self._db.execute("DELETE FROM model_digests WHERE model = %s", (model,))
            else:
                self._db.execute("DELETE FROM model_digests WHERE model = %s AND version = %s", (model, version))

    # --- several managers: liveness, and each change's phases confirmed by every live manager
    def _end_phases(self) -> None:
        """(In a change's finishing transaction) the change's phase row and acks go with it."""
        self._db.execute("DELETE FROM change_acks")
        self._db.execute("DELETE FROM change_phases")

    def heartbeat(self, ttl_s: float) -> None:
        """This manager is alive for ``ttl_s`` more seconds (the database's clock); rows
        expired for over a minute are deleted."""
        with self._transaction():
            self._db.execute(
                f"""INSERT INTO managers (id, started_at, expires_at) VALUES (%s, {_DB_NOW}, {_DB_NOW} + %s)
                    ON CONFLICT (id) DO UPDATE SET expires_at = excluded.expires_at""",
                (self.manager_id, ttl_s),
            )
            self._db.execute(f"DELETE FROM managers WHERE expires_at < {_DB_NOW} - 60")

    def leave(self) -> None:
        """This manager stops (cleanly): no change waits for it any more."""
        with self._transaction():
            self._db.execute("DELETE FROM managers WHERE id = %s", (self.manager_id,))

    def live_managers(self) -> list[str]:
        """The managers whose heartbeat has not expired, by id."""
        return [r[0] for r in self._query(f"SELECT id FROM managers WHERE expires_at > {_DB_NOW} ORDER BY id")]

    def current_change(self) -> ChangePhase | None:
        """The change in progress (``begin_change`` to ``finish_change``/``abort_change``)."""
        rows = self._query("SELECT id, driver, phase FROM change_phases")
        return ChangePhase(*rows[0]) if rows else None

    def set_phase(self, change_id: str, phase: str) -> None:
        """The driving manager moves the change to ``phase`` (every manager is notified)."""
        if phase not in PHASES + ROLLBACK_PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        with self._transaction():
            self._db.execute(f"UPDATE change_phases SET phase = %s, updated_at = {_DB_NOW} WHERE id = %s", (phase, change_id))

    def ack_phase(self, change_id: str, phase: str, failure: PhaseFailure | None = None) -> None:
        """This manager's answer for ``phase`` of change ``change_id`` (None: its nodes converged)."""
        with self._transaction():
            self._db.execute(
                f"""INSERT INTO change_acks (change_id, manager, phase, failure, acked_at)
                    SELECT %s, %s, %s, %s, {_DB_NOW} WHERE EXISTS (SELECT 1 FROM change_phases WHERE id = %s)
                    ON CONFLICT (change_id, manager, phase) DO UPDATE SET failure = excluded.failure, acked_at = excluded.acked_at""",
                (change_id, self.manager_id, phase, None if failure is None else json.dumps(asdict(failure)), change_id),
            )

    def phase_acks(self, change_id: str, phase: str) -> dict[str, PhaseAck]:
        """Every manager's answer for ``phase`` of change ``change_id`` so far, by manager."""
        rows = self._query("SELECT manager, failure FROM change_acks WHERE change_id = %s AND phase = %s", (change_id, phase))
        return {m: PhaseAck(m, None if f is None else PhaseFailure(**json.loads(f))) for m, f in rows}

    def settled_pipelines(self) -> list[PipelineRow] | None:
        """The pipelines, or None while a change is in progress (its phases say what to do).
        Read before the change row: ``begin_change`` writes both in one transaction, so a
        read that saw its new state sees its row next."""
        rows = self.pipelines()
        return None if self.current_change() is not None else rows

    # --- several managers: notifications and the change lock
    async def watch(self, retry_s: float = 0.5) -> AsyncIterator[set[str]]:
        """The tables written (by any manager), as their transactions commit; after a
        (re)connection, every table once (what was sent meanwhile is lost)."""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    yield set(TABLES) | set(PHASE_TABLES)
                    async for note in conn.notifies():
                        yield {note.payload}
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                log.warning("store: LISTEN connection lost (%s); reconnecting in %.1fs", exc, retry_s)
                await asyncio.sleep(retry_s)

    @asynccontextmanager
    async def change_lock(self, wait: bool = True) -> AsyncIterator[bool]:
        """Held while this manager drives a pipeline change: one at a time across managers.
        A session lock on a connection of its own: PostgreSQL releases it if that dies.
        Yields True once held; with ``wait=False``, False at once when another holds it."""
        if self._lock_conn is None or self._lock_conn.closed:
            self._lock_conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
        if wait:
            await self._lock_conn.execute("SELECT pg_advisory_lock(%s)", (CHANGE_LOCK,))
        else:
            row = await (await self._lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (CHANGE_LOCK,))).fetchone()
            if not row[0]:
                yield False
                return
        try:
            yield True
        finally:
            try:
                await self._lock_conn.execute("SELECT pg_advisory_unlock(%s)", (CHANGE_LOCK,))
            except psycopg.Error:  # the connection died: the lock went with it
                self._lock_conn = None


def _now() -> float:
    """``manager.store``'s clock (tests move it for both backends)."""
    from manager import store

    return store.time.time()


def _to_bytes():
    from manager import store

    return store.to_bytes
