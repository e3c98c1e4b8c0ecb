"""SQLite persistence for pipelines, runtimes (with their model signatures), runtime
instances, the model versions loaded onto runtimes through the API, and the SHA-256
digests recorded for each deployed model version, and API tokens (ids, scopes, expiry,
revocation; never the tokens themselves), so a restarted manager serves the same mesh.

One connection, WAL journal, every write in a transaction (a bulk apply is one).
Calls are synchronous and sub-millisecond; the manager is not on the request path.

Durability: ``synchronous=FULL``: every commit is fsync'd (the WAL) before it returns,
so a change the API confirmed survives a power loss too, not only a killed process
(``NORMAL`` in WAL mode may lose the last commits on power loss). Config writes are
rare (a pipeline change waits on Envoy acknowledgements anyway), so the fsync is free.

Crash ordering of pipeline changes: ``begin_change`` writes, in one transaction, the
new state (rows created or replaced; rows to delete stay but are hidden) and a
``pipeline_changes`` row per touched pipeline holding its previous row (the intent).
The steps that follow (routes, gateways, withdrawal) are finished by
``finish_change`` (deletes the hidden rows and the intent, one transaction) or undone
by ``abort_change`` (restores the previous rows). A manager killed at any step finds
the intent on start-up (``pending_change``) and finishes the change (``manager.control``),
so the store, Envoy and gateways end in the new state, or, after an abort, the old one.
A pipeline is stored as its definition (what the user sent) and its resolved plan
(``sluice.plan``, in its wire form). ``PRAGMA user_version`` numbers the schema;
older files are migrated on open.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from manager.store_rows import (
    InstanceRow, LoadedModel, PendingChange, PendingPut, PipelineRow, RecordedDigests, RecordedFile, RuntimeRow, TokenRow,
)
from manager.store_sql import SqlStore
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.plan_proto import to_bytes
from sluice.tensors import TensorSpec

# the rows are imported from here too
__all__ = [
    "SCHEMA_VERSION", "Store", "InstanceRow", "LoadedModel", "PendingChange", "PendingPut", "PipelineRow",
    "RecordedDigests", "RecordedFile", "RuntimeRow", "TokenRow",
]

#: the schema this code writes; see _migrate for the older ones it reads
SCHEMA_VERSION = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    definition TEXT NOT NULL,
    plan BLOB NOT NULL,  -- the resolved PipelinePlan as sluice.v1.Pipeline bytes
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runtimes (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    models TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    runtime TEXT NOT NULL,
    host TEXT NOT NULL,
    port INTEGER NOT NULL,
    last_seen REAL NOT NULL,
    ip TEXT NOT NULL DEFAULT '',  -- schema version 3: the address resolved at registration
    token_id TEXT  -- schema version 3: the token that registered the instance (secure mode)
);
CREATE TABLE IF NOT EXISTS runtime_models (
    runtime TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    loaded_at REAL NOT NULL,
    PRIMARY KEY (runtime, model, version)
);
CREATE TABLE IF NOT EXISTS model_digests (  -- schema version 2
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    recorded_at REAL NOT NULL,
    PRIMARY KEY (model, version, path)
);
CREATE TABLE IF NOT EXISTS pipeline_changes (  -- schema version 4: the change under way (intent)
    name TEXT PRIMARY KEY,
    action TEXT NOT NULL,  -- 'put' (created or replaced) or 'delete'
    old_definition TEXT,  -- the previous row (NULL: the change creates the pipeline)
    old_plan BLOB,
    old_created_at REAL,
    old_updated_at REAL
);
CREATE TABLE IF NOT EXISTS tokens (  -- schema version 3: API tokens, never their secrets
    id TEXT PRIMARY KEY,
    scopes TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL
);
"""


class Store(SqlStore):
    """The embedded store: one SQLite file (the queries are ``manager.store_sql``'s)."""

    def __init__(self, path: str | Path):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # see the module docstring
        with self._transaction():
            self._migrate()
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)  # execute(), not executescript(): that would commit
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One SQLite transaction: all of the block's writes, or none of them. (The
        connection is in autocommit mode, where ``with connection:`` would not begin one.)"""
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        """Older files, in the open transaction. Version 1 -> 2 adds ``model_digests``
        (created with the rest of _SCHEMA: nothing to convert; versions loaded before
        have their digests recorded on first use). Version 2 -> 3 adds ``tokens`` (created
        with _SCHEMA) and each instance's resolved ``ip`` and registering ``token_id``
        (empty for instances registered before: restored only when the host is an IP).
        Version 3 -> 4 adds ``pipeline_changes`` (created with _SCHEMA: nothing to convert)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(pipelines)")}
        if "stages" in columns:  # version 0: stages as JSON dicts -> plans, in the open transaction
            rows = self._db.execute("SELECT name, revision, definition, stages, created_at, updated_at FROM pipelines").fetchall()
            converted = [
                (name, revision, definition, to_bytes(_plan_from_v0(name, revision, json.loads(definition), json.loads(stages))), created, updated)
                for name, revision, definition, stages, created, updated in rows
            ]
            self._db.execute("DROP TABLE pipelines")
            self._db.execute(_SCHEMA.split(";")[0])
            self._db.executemany("INSERT INTO pipelines VALUES (?, ?, ?, ?, ?, ?)", converted)
        instance_columns = {r[1] for r in self._db.execute("PRAGMA table_info(instances)")}
        if instance_columns and "ip" not in instance_columns:  # version 2 -> 3: resolved address, registering token
            self._db.execute("ALTER TABLE instances ADD COLUMN ip TEXT NOT NULL DEFAULT ''")
            self._db.execute("ALTER TABLE instances ADD COLUMN token_id TEXT")

    def health(self) -> str | None:
        """None while the database answers; else its error."""
        try:
            self._db.execute("SELECT count(*) FROM pipelines").fetchone()
            return None
        except sqlite3.Error as exc:
            return f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        self._db.close()

    # --- what SqlStore runs its queries with
    def _query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        return self._db.execute(sql, params).fetchall()

    def _execute(self, sql: str, params: tuple | list = ()) -> int:
        return self._db.execute(sql, params).rowcount

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        self._db.executemany(sql, rows)


def _plan_from_v0(name: str, revision: int, definition: dict, stages: list[dict]) -> PipelinePlan:
    """A plan from schema version 0's stage dicts."""

    def tensors(items: list[dict]) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["datatype"], tuple(t["shape"])) for t in items)

    return PipelinePlan(
        name=name,
        revision=revision,
        transport=definition.get("transportType", "http"),
        stages=tuple(
            StagePlan(
                name=s["name"], runtime=s["runtime"], model=s["model"], version=s.get("version") or "",
                route=s["route"], timeout_ms=s["timeout_ms"], inputs=tensors(s["inputs"]), outputs=tensors(s["outputs"]),
                bindings=tuple(Binding(k, v) for k, v in s.get("bindings", {}).items()),
            )
            for s in stages
        ),
    )
