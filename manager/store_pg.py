"""PostgreSQL persistence, for a control plane of several managers sharing one database
(``SLUICE_MANAGER_DB_URL=postgresql://user@host:port/db``); the embedded SQLite store
(``manager.store``) stays the default.

The same queries as ``manager.store.Store`` (both are ``manager.store_sql.SqlStore``), the
same row types and tables (``plan`` as BYTEA, times as DOUBLE PRECISION), the same
change intent (``pipeline_changes``, ``begin_change`` / ``finish_change`` /
``abort_change`` / ``pending_change``).

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
import functools
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

from manager.store_rows import PipelineRow
from manager.store_sql import SqlStore

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


class PgStore(SqlStore):
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

    def health(self) -> str | None:
        try:
            self._query("SELECT count(*) FROM pipelines")
            return None
        except psycopg.Error as exc:
            return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self._db.close()

    # --- what SqlStore runs its queries with (written with ``?``: psycopg's placeholder is ``%s``)
    def _query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        with self._mutex:
            return self._db.execute(_pg(sql), params).fetchall()

    def _execute(self, sql: str, params: tuple | list = ()) -> int:
        return self._db.execute(_pg(sql), params).rowcount

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._db.cursor() as cur:
            cur.executemany(_pg(sql), rows)

    # --- the hooks of SqlStore: what several managers sharing the database need
    def _lock_begin(self) -> None:
        self._db.execute("SELECT pg_advisory_xact_lock(%s)", (BEGIN_LOCK,))  # one change at a time, across managers

    def _began(self) -> None:
        # in the same transaction as the new state: no manager sees one without the other
        self._db.execute(
            f"INSERT INTO change_phases (id, driver, phase, updated_at) VALUES (%s, %s, %s, {_DB_NOW})",
            (uuid.uuid4().hex, self.manager_id, PHASES[0]),
        )

    def _ended(self) -> None:
        """(In a change's finishing transaction) the change's phase row and acks go with it."""
        self._db.execute("DELETE FROM change_acks")
        self._db.execute("DELETE FROM change_phases")

    def _lock_digests(self, model: str, version: str) -> None:
        self._db.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (DIGESTS_LOCK, f"{model}/{version}"))

    # --- several managers: liveness, and each change's phases confirmed by every live manager
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


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """``manager.store_sql``'s SQL with psycopg's placeholders (its SQL has no other ``?``)."""
    return sql.replace("?", "%s")
