"""SQLite persistence for pipelines, runtimes (with their model signatures), runtime
instances and the model versions loaded onto runtimes through the API, so a
restarted manager serves the same mesh.

One connection, WAL journal, every write in a transaction (a bulk apply is one).
Calls are synchronous and sub-millisecond; the manager is not on the request path.
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

from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.plan_proto import from_bytes, to_bytes
from sluice.tensors import TensorSpec

#: the schema this code writes; see _migrate for the older ones it reads
SCHEMA_VERSION = 1

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
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runtime_models (
    runtime TEXT NOT NULL,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    loaded_at REAL NOT NULL,
    PRIMARY KEY (runtime, model, version)
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
class RuntimeRow:
    name: str
    kind: str
    models: dict[str, dict[str, Any]]


@dataclass(frozen=True, order=True)
class LoadedModel:
    """A model version loaded onto a runtime through the API (re-loaded on every new instance)."""

    runtime: str
    model: str
    version: str


@dataclass(frozen=True)
class InstanceRow:
    id: str
    runtime: str
    host: str
    port: int
    last_seen: float


class Store:
    def __init__(self, path: str | Path):
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
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

    def close(self) -> None:
        self._db.close()

    # --- pipelines
    def pipelines(self) -> list[PipelineRow]:
        rows = self._db.execute("SELECT definition, plan, created_at, updated_at FROM pipelines ORDER BY name").fetchall()
        return [self._pipeline(r) for r in rows]

    def pipeline(self, name: str) -> PipelineRow | None:
        row = self._db.execute("SELECT definition, plan, created_at, updated_at FROM pipelines WHERE name = ?", (name,)).fetchone()
        return self._pipeline(row) if row else None

    def put_pipeline(self, definition: dict, plan: PipelinePlan) -> PipelineRow:
        (row,) = self.put_pipelines([(definition, plan)])
        return row

    def put_pipelines(self, items: list[tuple[dict, PipelinePlan]]) -> list[PipelineRow]:
        """Create or replace pipelines, all in one transaction."""
        now = time.time()
        with self._transaction():
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

    @staticmethod
    def _pipeline(row: tuple) -> PipelineRow:
        definition, plan, created, updated = row
        return PipelineRow(json.loads(definition), from_bytes(plan), created, updated)

    # --- runtimes and instances
    def runtimes(self) -> list[RuntimeRow]:
        rows = self._db.execute("SELECT name, kind, models FROM runtimes ORDER BY name").fetchall()
        return [RuntimeRow(n, k, json.loads(m)) for n, k, m in rows]

    def put_runtime(self, name: str, kind: str, models: dict[str, dict]) -> None:
        with self._transaction():
            self._db.execute(
                """INSERT INTO runtimes (name, kind, models, updated_at) VALUES (?, ?, ?, ?)
                   ON CONFLICT(name) DO UPDATE SET kind=excluded.kind, models=excluded.models,
                     updated_at=excluded.updated_at""",
                (name, kind, json.dumps(models), time.time()),
            )

    def instances(self) -> list[InstanceRow]:
        rows = self._db.execute("SELECT id, runtime, host, port, last_seen FROM instances").fetchall()
        return [InstanceRow(*r) for r in rows]

    def put_instance(self, inst: InstanceRow) -> None:
        with self._transaction():
            self._db.execute(
                """INSERT INTO instances (id, runtime, host, port, last_seen) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET runtime=excluded.runtime, host=excluded.host,
                     port=excluded.port, last_seen=excluded.last_seen""",
                (inst.id, inst.runtime, inst.host, inst.port, inst.last_seen),
            )

    def delete_instance(self, instance_id: str) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

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
