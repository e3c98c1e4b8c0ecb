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
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manager.served_models import ServedModel, models_from_json, models_to_json
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.plan_proto import from_bytes, to_bytes
from sluice.tensors import TensorSpec

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


@dataclass(frozen=True)
class PipelineRow:
    definition: dict[str, Any]
    plan: PipelinePlan
    created_at: float
    updated_at: float

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def revision(self) -> int:
        return self.plan.revision


@dataclass(frozen=True)
class PendingPut:
    """A pipeline a change under way creates (``old`` None) or replaces."""

    old: PipelineRow | None
    new: PipelineRow


@dataclass(frozen=True)
class PendingChange:
    """The change a manager had begun and not finished (read on start-up)."""

    puts: tuple[PendingPut, ...]
    deletes: tuple[PipelineRow, ...]

    @property
    def names(self) -> set[str]:
        return {p.new.name for p in self.puts} | {r.name for r in self.deletes}


@dataclass(frozen=True)
class RuntimeRow:
    name: str
    kind: str
    models: dict[str, ServedModel]

    def versions_of(self, model: str) -> tuple[str, ...]:
        """The versions of ``model`` this runtime has loaded (none: it does not serve it)."""
        served = self.models.get(model)
        return served.versions if served is not None else ()


@dataclass(frozen=True, order=True)
class LoadedModel:
    """A model version loaded onto a runtime through the API (re-loaded on every new instance)."""

    runtime: str
    model: str
    version: str


@dataclass(frozen=True)
class RecordedFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class RecordedDigests:
    """A deployed model version's files as the manager recorded them (never changed afterwards)."""

    model: str
    version: str
    files: tuple[RecordedFile, ...]
    recorded_at: float

    def as_dict(self) -> dict[str, str]:
        """``{path: sha256}``, what a runtime checks each file against."""
        return {f.path: f.sha256 for f in self.files}


@dataclass(frozen=True)
class InstanceRow:
    id: str
    runtime: str
    host: str
    port: int
    last_seen: float
    #: the IP address ``host`` resolved to at registration (what Envoy and the manager dial)
    ip: str = ""
    #: the id of the token that registered the instance (secure mode); None in dev mode
    token_id: str | None = None

    @property
    def address(self) -> str:
        return self.ip or self.host


@dataclass(frozen=True)
class TokenRow:
    """An API token as the store keeps it: never the token itself."""

    id: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float
    revoked_at: float | None = None


class Store:
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

    # --- pipelines (rows a change under way deletes are hidden: they are gone in its new state)
    _LIVE = "NOT EXISTS (SELECT 1 FROM pipeline_changes c WHERE c.name = pipelines.name AND c.action = 'delete')"

    def pipelines(self) -> list[PipelineRow]:
        rows = self._db.execute(f"SELECT definition, plan, created_at, updated_at FROM pipelines WHERE {self._LIVE} ORDER BY name").fetchall()
        return [self._pipeline(r) for r in rows]

    def pipeline(self, name: str) -> PipelineRow | None:
        row = self._db.execute(
            f"SELECT definition, plan, created_at, updated_at FROM pipelines WHERE name = ? AND {self._LIVE}", (name,)
        ).fetchone()
        return self._pipeline(row) if row else None

    def put_pipeline(self, definition: dict, plan: PipelinePlan) -> PipelineRow:
        (row,) = self.put_pipelines([(definition, plan)])
        return row

    def put_pipelines(self, items: list[tuple[dict, PipelinePlan]]) -> list[PipelineRow]:
        """Create or replace pipelines, all in one transaction."""
        with self._transaction():
            return self._put(items)

    def _put(self, items: list[tuple[dict, PipelinePlan]]) -> list[PipelineRow]:
        now = time.time()
        self._db.executemany(
            """INSERT INTO pipelines (name, revision, definition, plan, created_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT(name) DO UPDATE SET revision=excluded.revision,
                 definition=excluded.definition, plan=excluded.plan, updated_at=excluded.updated_at""",
            [(plan.name, plan.revision, json.dumps(definition), to_bytes(plan), now, now) for definition, plan in items],
        )
        created = dict(
            self._db.execute(
                f"SELECT name, created_at FROM pipelines WHERE name IN ({','.join('?' * len(items))})",
                [plan.name for _, plan in items],
            ).fetchall()
        ) if items else {}
        return [PipelineRow(definition, plan, created[plan.name], now) for definition, plan in items]

    def delete_pipeline(self, name: str) -> bool:
        return self.delete_pipelines([name]) > 0

    def delete_pipelines(self, names: list[str]) -> int:
        """Delete pipelines in one transaction; how many existed."""
        with self._transaction():
            return sum(self._db.execute("DELETE FROM pipelines WHERE name = ?", (n,)).rowcount for n in names)

    # --- a pipeline change in steps: begin (intent + new state), then finish or abort
    def begin_change(self, puts: list[tuple[dict, PipelinePlan]], deletes: list[str]) -> list[PipelineRow]:
        """In one transaction: remember each touched pipeline's row as it is (the intent),
        write the created and replaced rows, hide the deleted ones. One change at a time:
        a change still pending (a crash before ``finish_change``) must be finished first."""
        with self._transaction():
            if self._db.execute("SELECT 1 FROM pipeline_changes LIMIT 1").fetchone() is not None:
                raise RuntimeError("a pipeline change is already under way: finish or abort it first")
            names = [plan.name for _, plan in puts]
            if set(names) & set(deletes):
                raise ValueError(f"pipelines both put and deleted: {sorted(set(names) & set(deletes))}")
            for action, name in [*(("put", n) for n in names), *(("delete", n) for n in deletes)]:
                self._db.execute(
                    """INSERT INTO pipeline_changes (name, action, old_definition, old_plan, old_created_at, old_updated_at)
                       SELECT ?, ?, p.definition, p.plan, p.created_at, p.updated_at
                       FROM (SELECT 1) LEFT JOIN pipelines p ON p.name = ?""",
                    (name, action, name),
                )
            return self._put(puts)

    def finish_change(self) -> None:
        """The change under way reached every step: drop the deleted rows and the intent."""
        with self._transaction():
            self._db.execute("DELETE FROM pipelines WHERE name IN (SELECT name FROM pipeline_changes WHERE action = 'delete')")
            self._db.execute("DELETE FROM pipeline_changes")

    def abort_change(self) -> None:
        """The change under way was rolled back: every touched pipeline's previous row again."""
        with self._transaction():
            changes = self._db.execute(
                "SELECT name, old_definition, old_plan, old_created_at, old_updated_at FROM pipeline_changes"
            ).fetchall()
            for name, definition, plan, created, updated in changes:
                if plan is None:  # created by the change
                    self._db.execute("DELETE FROM pipelines WHERE name = ?", (name,))
                else:
                    self._db.execute(
                        "UPDATE pipelines SET revision = ?, definition = ?, plan = ?, created_at = ?, updated_at = ? WHERE name = ?",
                        (from_bytes(plan).revision, definition, plan, created, updated, name),
                    )
            self._db.execute("DELETE FROM pipeline_changes")

    def pending_change(self) -> PendingChange | None:
        """The change begun and neither finished nor aborted (the manager was killed), if any."""
        rows = self._db.execute(
            """SELECT c.name, c.action, c.old_definition, c.old_plan, c.old_created_at, c.old_updated_at,
                      p.definition, p.plan, p.created_at, p.updated_at
               FROM pipeline_changes c LEFT JOIN pipelines p ON p.name = c.name ORDER BY c.name"""
        ).fetchall()
        if not rows:
            return None
        puts, deletes = [], []
        for name, action, *rest in rows:
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
        return PipelineRow(json.loads(definition), from_bytes(plan), created, updated)

    # --- runtimes and instances
    def runtimes(self) -> list[RuntimeRow]:
        rows = self._db.execute("SELECT name, kind, models FROM runtimes ORDER BY name").fetchall()
        return [RuntimeRow(n, k, models_from_json(json.loads(m))) for n, k, m in rows]

    def put_runtime(self, name: str, kind: str, models: dict[str, ServedModel]) -> None:
        with self._transaction():
            self._db.execute(
                """INSERT INTO runtimes (name, kind, models, updated_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT(name) DO UPDATE SET kind=excluded.kind, models=excluded.models,
                     updated_at=excluded.updated_at""",
                (name, kind, json.dumps(models_to_json(models)), time.time()),
            )

    def instances(self) -> list[InstanceRow]:
        rows = self._db.execute("SELECT id, runtime, host, port, last_seen, ip, token_id FROM instances").fetchall()
        return [InstanceRow(*r) for r in rows]

    def put_instance(self, inst: InstanceRow) -> None:
        with self._transaction():
            self._db.execute(
                """INSERT INTO instances (id, runtime, host, port, last_seen, ip, token_id) VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET runtime=excluded.runtime, host=excluded.host,
                     port=excluded.port, last_seen=excluded.last_seen, ip=excluded.ip, token_id=excluded.token_id""",
                (inst.id, inst.runtime, inst.host, inst.port, inst.last_seen, inst.ip, inst.token_id),
            )

    def delete_instance(self, instance_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    # --- API tokens (ids, scopes, expiry, revocation; never the tokens themselves)
    def tokens(self) -> list[TokenRow]:
        rows = self._db.execute("SELECT id, scopes, created_at, expires_at, revoked_at FROM tokens ORDER BY created_at, id").fetchall()
        return [TokenRow(i, tuple(json.loads(s)), c, e, r) for i, s, c, e, r in rows]

    def token(self, token_id: str) -> TokenRow | None:
        row = self._db.execute("SELECT id, scopes, created_at, expires_at, revoked_at FROM tokens WHERE id = ?", (token_id,)).fetchone()
        return TokenRow(row[0], tuple(json.loads(row[1])), row[2], row[3], row[4]) if row else None

    def put_token(self, row: TokenRow) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT INTO tokens (id, scopes, created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?)",
                (row.id, json.dumps(list(row.scopes)), row.created_at, row.expires_at, row.revoked_at),
            )

    def revoke_token(self, token_id: str, at: float) -> bool:
        """Mark a token revoked (the first time counts); False when there is no such token."""
        with self._transaction():
            cursor = self._db.execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (at, token_id))
        return cursor.rowcount > 0

    def revoked_token_ids(self, now: float) -> list[str]:
        """Revoked tokens that have not expired (an expired token fails on its own)."""
        rows = self._db.execute("SELECT id FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ? ORDER BY id", (now,))
        return [r[0] for r in rows.fetchall()]

    # --- model versions loaded onto runtimes through the API
    def loaded_models(self, runtime: str | None = None) -> list[LoadedModel]:
        if runtime is None:
            rows = self._db.execute("SELECT runtime, model, version FROM runtime_models ORDER BY runtime, model, version")
        else:
            rows = self._db.execute(
                "SELECT runtime, model, version FROM runtime_models WHERE runtime = ? ORDER BY model, version", (runtime,)
            )
        return [LoadedModel(*r) for r in rows.fetchall()]

    def put_loaded_model(self, loaded: LoadedModel) -> None:
        with self._transaction():
            self._db.execute(
                "INSERT OR IGNORE INTO runtime_models (runtime, model, version, loaded_at) VALUES (?, ?, ?, ?)",
                (loaded.runtime, loaded.model, loaded.version, time.time()),
            )

    def delete_loaded_model(self, loaded: LoadedModel) -> None:
        with self._transaction():
            self._db.execute(
                "DELETE FROM runtime_models WHERE runtime = ? AND model = ? AND version = ?",
                (loaded.runtime, loaded.model, loaded.version),
            )

    # --- SHA-256 digests of deployed model versions (immutable once recorded)
    def model_digests(self, model: str, version: str) -> RecordedDigests | None:
        rows = self._db.execute(
            "SELECT path, sha256, size, recorded_at FROM model_digests WHERE model = ? AND version = ? ORDER BY path",
            (model, version),
        ).fetchall()
        if not rows:
            return None
        return RecordedDigests(model, version, tuple(RecordedFile(p, d, n) for p, d, n, _ in rows), rows[0][3])

    def record_model_digests(self, model: str, version: str, files: list[RecordedFile]) -> RecordedDigests:
        """Record a version's files unless it has a record already; the record that holds
        (the first one: a recorded version's digests never change)."""
        if not files:
            raise ValueError(f"model {model!r} version {version}: no files to record")
        with self._transaction():
            if self._db.execute(
                "SELECT 1 FROM model_digests WHERE model = ? AND version = ? LIMIT 1", (model, version)
            ).fetchone() is None:
                now = time.time()
                self._db.executemany(
                    "INSERT INTO model_digests (model, version, path, sha256, size, recorded_at) VALUES (?, ?, ?, ?, ?, ?)",
                    [(model, version, f.path, f.sha256, f.size, now) for f in files],
                )
        recorded = self.model_digests(model, version)
        assert recorded is not None
        return recorded

    def forget_model_digests(self, model: str, version: str | None = None) -> None:
        """A version (or every version) deleted through the API: its number may be used again."""
        with self._transaction():
            if version is None:
                self._db.execute("DELETE FROM model_digests WHERE model = ?", (model,))
            else:
                self._db.execute("DELETE FROM model_digests WHERE model = ? AND version = ?", (model, version))


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
