"""The store's queries, written once for both backends: the SQLite store
(``manager.store.Store``) and the PostgreSQL one (``manager.store_pg.PgStore``) run the
same SQL over the same tables (``?`` placeholders; PostgreSQL's adapter rewrites them).

A backend gives ``_transaction``, ``_query``, ``_execute`` and ``_executemany``; the
hooks (``_lock_begin``, ``_began``, ``_ended``, ``_lock_digests``) are where PostgreSQL
adds what several managers sharing one database need (advisory locks, the phase row
of the change in progress); they do nothing here.

``time`` and ``to_bytes`` are looked up in this module when called, so a test can move
the clock or make an encoding fail for both backends at once.
"""

from __future__ import annotations

import json
import time
from contextlib import AbstractContextManager

from manager.served_models import ServedModel, models_from_json, models_to_json
from manager.store_rows import (
    InstanceRow, LoadedModel, PendingChange, PendingPut, PipelineRow, RecordedDigests, RecordedFile, RuntimeRow, TokenRow,
)
from sluice.plan import PipelinePlan
from sluice.plan_proto import from_bytes, to_bytes

_ROW = "definition, plan, created_at, updated_at"
#: rows a change under way deletes are hidden: they are gone in its new state
_LIVE = "NOT EXISTS (SELECT 1 FROM pipeline_changes c WHERE c.name = pipelines.name AND c.action = 'delete')"


class SqlStore:
    # --- what a backend gives
    def _transaction(self) -> AbstractContextManager:
        """One transaction: all of the block's writes, or none of them."""
        raise NotImplementedError

    def _query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        raise NotImplementedError

    def _execute(self, sql: str, params: tuple | list = ()) -> int:
        """Run one statement (in a transaction); the rows it touched."""
        raise NotImplementedError

    def _executemany(self, sql: str, rows: list[tuple]) -> None:
        raise NotImplementedError

    # --- hooks for a database several managers share
    def _lock_begin(self) -> None:
        """Before ``begin_change`` looks for a change under way."""

    def _began(self) -> None:
        """In ``begin_change``'s transaction, after its intent rows."""

    def _ended(self) -> None:
        """In ``finish_change``'s and ``abort_change``'s transactions."""

    def _lock_digests(self, model: str, version: str) -> None:
        """Before ``record_model_digests`` looks for a record."""

    # --- pipelines
    def pipelines(self) -> list[PipelineRow]:
        return [_pipeline(r) for r in self._query(f"SELECT {_ROW} FROM pipelines WHERE {_LIVE} ORDER BY name")]

    def pipeline(self, name: str) -> PipelineRow | None:
        rows = self._query(f"SELECT {_ROW} FROM pipelines WHERE name = ? AND {_LIVE}", (name,))
        return _pipeline(rows[0]) if rows else None

    def put_pipeline(self, definition: dict, plan: PipelinePlan) -> PipelineRow:
        (row,) = self.put_pipelines([(definition, plan)])
        return row

    def put_pipelines(self, items: list[tuple[dict, PipelinePlan]]) -> list[PipelineRow]:
        """Create or replace pipelines, all in one transaction."""
        with self._transaction():
            return self._put(items)

    def _put(self, items: list[tuple[dict, PipelinePlan]]) -> list[PipelineRow]:
        if not items:
            return []
        now = time.time()
        self._executemany(
            """INSERT INTO pipelines (name, revision, definition, plan, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (name) DO UPDATE SET revision=excluded.revision, definition=excluded.definition,
                 plan=excluded.plan, updated_at=excluded.updated_at""",
            [(plan.name, plan.revision, json.dumps(definition), to_bytes(plan), now, now) for definition, plan in items],
        )
        names = [plan.name for _, plan in items]
        created = dict(self._query(f"SELECT name, created_at FROM pipelines WHERE name IN ({', '.join('?' * len(names))})", names))
        return [PipelineRow(definition, plan, created[plan.name], now) for definition, plan in items]

    def delete_pipeline(self, name: str) -> bool:
        return self.delete_pipelines([name]) > 0

    def delete_pipelines(self, names: list[str]) -> int:
        """Delete pipelines in one transaction; how many existed."""
        with self._transaction():
            return sum(self._execute("DELETE FROM pipelines WHERE name = ?", (n,)) for n in names)

    # --- a pipeline change in steps: begin (intent + new state), then finish or abort
    def begin_change(self, puts: list[tuple[dict, PipelinePlan]], deletes: list[str]) -> list[PipelineRow]:
        """In one transaction: remember each touched pipeline's row as it is (the intent),
        write the created and replaced rows, hide the deleted ones. One change at a time:
        a change still pending (a crash before ``finish_change``) must be finished first."""
        with self._transaction():
            self._lock_begin()
            if self._query("SELECT 1 FROM pipeline_changes LIMIT 1"):
                raise RuntimeError("a pipeline change is already under way: finish or abort it first")
            names = [plan.name for _, plan in puts]
            if set(names) & set(deletes):
                raise ValueError(f"pipelines both put and deleted: {sorted(set(names) & set(deletes))}")
            for action, name in [*(("put", n) for n in names), *(("delete", n) for n in deletes)]:
                self._execute(
                    """INSERT INTO pipeline_changes (name, action, old_definition, old_plan, old_created_at, old_updated_at)
                       SELECT ?, ?, p.definition, p.plan, p.created_at, p.updated_at
                       FROM (SELECT 1) AS one LEFT JOIN pipelines p ON p.name = ?""",
                    (name, action, name),
                )
            self._began()  # in the same transaction as the new state
            return self._put(puts)

    def finish_change(self) -> None:
        """The change under way reached every step: drop the deleted rows and the intent."""
        with self._transaction():
            self._execute("DELETE FROM pipelines WHERE name IN (SELECT name FROM pipeline_changes WHERE action = 'delete')")
            self._execute("DELETE FROM pipeline_changes")
            self._ended()

    def abort_change(self) -> None:
        """The change under way was rolled back: every touched pipeline's previous row again."""
        with self._transaction():
            changes = self._query("SELECT name, old_definition, old_plan, old_created_at, old_updated_at FROM pipeline_changes")
            for name, definition, plan, created, updated in changes:
                if plan is None:  # created by the change
                    self._execute("DELETE FROM pipelines WHERE name = ?", (name,))
                else:
                    self._execute(
                        "UPDATE pipelines SET revision = ?, definition = ?, plan = ?, created_at = ?, updated_at = ? WHERE name = ?",
                        (from_bytes(bytes(plan)).revision, definition, plan, created, updated, name),
                    )
            self._execute("DELETE FROM pipeline_changes")
            self._ended()

    def pending_change(self) -> PendingChange | None:
        """The change begun and neither finished nor aborted (the manager was killed), if any."""
        rows = self._query(
            """SELECT c.name, c.action, c.old_definition, c.old_plan, c.old_created_at, c.old_updated_at,
                      p.definition, p.plan, p.created_at, p.updated_at
               FROM pipeline_changes c LEFT JOIN pipelines p ON p.name = c.name ORDER BY c.name"""
        )
        if not rows:
            return None
        puts, deletes = [], []
        for _name, action, *rest in rows:
            old = _pipeline(tuple(rest[:4])) if rest[1] is not None else None
            new = _pipeline(tuple(rest[4:])) if rest[5] is not None else None
            if action == "delete":
                if old is not None:
                    deletes.append(old)
            elif new is not None:
                puts.append(PendingPut(old, new))
        return PendingChange(tuple(puts), tuple(deletes))

    # --- runtimes and instances
    def runtimes(self) -> list[RuntimeRow]:
        rows = self._query("SELECT name, kind, models FROM runtimes ORDER BY name")
        return [RuntimeRow(n, k, models_from_json(json.loads(m))) for n, k, m in rows]

    def put_runtime(self, name: str, kind: str, models: dict[str, ServedModel]) -> None:
        with self._transaction():
            self._execute(
                """INSERT INTO runtimes (name, kind, models, updated_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET kind=excluded.kind, models=excluded.models, updated_at=excluded.updated_at""",
                (name, kind, json.dumps(models_to_json(models)), time.time()),
            )

    def instances(self) -> list[InstanceRow]:
        return [InstanceRow(*r) for r in self._query("SELECT id, runtime, host, port, last_seen, ip, token_id FROM instances ORDER BY id")]

    def put_instance(self, inst: InstanceRow) -> None:
        with self._transaction():
            self._execute(
                """INSERT INTO instances (id, runtime, host, port, last_seen, ip, token_id) VALUES (?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET runtime=excluded.runtime, host=excluded.host, port=excluded.port,
                     last_seen=excluded.last_seen, ip=excluded.ip, token_id=excluded.token_id""",
                (inst.id, inst.runtime, inst.host, inst.port, inst.last_seen, inst.ip, inst.token_id),
            )

    def delete_instance(self, instance_id: str) -> None:
        with self._transaction():
            self._execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    # --- API tokens (ids, scopes, expiry, revocation; never the tokens themselves)
    def tokens(self) -> list[TokenRow]:
        rows = self._query("SELECT id, scopes, created_at, expires_at, revoked_at FROM tokens ORDER BY created_at, id")
        return [TokenRow(i, tuple(json.loads(s)), c, e, r) for i, s, c, e, r in rows]

    def token(self, token_id: str) -> TokenRow | None:
        rows = self._query("SELECT id, scopes, created_at, expires_at, revoked_at FROM tokens WHERE id = ?", (token_id,))
        return TokenRow(rows[0][0], tuple(json.loads(rows[0][1])), *rows[0][2:]) if rows else None

    def put_token(self, row: TokenRow) -> None:
        with self._transaction():
            self._execute(
                "INSERT INTO tokens (id, scopes, created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?)",
                (row.id, json.dumps(list(row.scopes)), row.created_at, row.expires_at, row.revoked_at),
            )

    def revoke_token(self, token_id: str, at: float) -> bool:
        """Mark a token revoked (the first time counts); False when there is no such token."""
        with self._transaction():
            return self._execute("UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (at, token_id)) > 0

    def revoked_token_ids(self, now: float) -> list[str]:
        """Revoked tokens that have not expired (an expired token fails on its own)."""
        return [r[0] for r in self._query("SELECT id FROM tokens WHERE revoked_at IS NOT NULL AND expires_at > ? ORDER BY id", (now,))]

    # --- model versions loaded onto runtimes through the API
    def loaded_models(self, runtime: str | None = None) -> list[LoadedModel]:
        if runtime is None:
            rows = self._query("SELECT runtime, model, version FROM runtime_models ORDER BY runtime, model, version")
        else:
            rows = self._query("SELECT runtime, model, version FROM runtime_models WHERE runtime = ? ORDER BY model, version", (runtime,))
        return [LoadedModel(*r) for r in rows]

    def put_loaded_model(self, loaded: LoadedModel) -> None:
        with self._transaction():
            self._execute(
                "INSERT INTO runtime_models (runtime, model, version, loaded_at) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (loaded.runtime, loaded.model, loaded.version, time.time()),
            )

    def delete_loaded_model(self, loaded: LoadedModel) -> None:
        with self._transaction():
            self._execute(
                "DELETE FROM runtime_models WHERE runtime = ? AND model = ? AND version = ?", (loaded.runtime, loaded.model, loaded.version)
            )

    # --- SHA-256 digests of deployed model versions (immutable once recorded)
    def model_digests(self, model: str, version: str) -> RecordedDigests | None:
        rows = self._query(
            "SELECT path, sha256, size, recorded_at FROM model_digests WHERE model = ? AND version = ? ORDER BY path", (model, version)
        )
        if not rows:
            return None
        return RecordedDigests(model, version, tuple(RecordedFile(p, d, n) for p, d, n, _ in rows), rows[0][3])

    def record_model_digests(self, model: str, version: str, files: list[RecordedFile]) -> RecordedDigests:
        """Record a version's files unless it has a record already; the record that holds
        (the first one: a recorded version's digests never change)."""
        if not files:
            raise ValueError(f"model {model!r} version {version}: no files to record")
        with self._transaction():
            self._lock_digests(model, version)
            if not self._query("SELECT 1 FROM model_digests WHERE model = ? AND version = ? LIMIT 1", (model, version)):
                now = time.time()
                self._executemany(
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
                self._execute("DELETE FROM model_digests WHERE model = ?", (model,))
            else:
                self._execute("DELETE FROM model_digests WHERE model = ? AND version = ?", (model, version))


def _pipeline(row: tuple) -> PipelineRow:
    definition, plan, created, updated = row
    return PipelineRow(json.loads(definition), from_bytes(bytes(plan)), created, updated)

