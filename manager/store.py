"""SQLite persistence for pipelines, runtimes (with their model signatures), runtime
instances and the model versions loaded onto runtimes through the API, so a
restarted manager serves the same mesh.

One connection, WAL journal, every write in a transaction. Calls are synchronous and
sub-millisecond; the manager is not on the request path.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipelines (
    name TEXT PRIMARY KEY,
    revision INTEGER NOT NULL,
    definition TEXT NOT NULL,
    stages TEXT NOT NULL,
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
    name: str
    revision: int
    definition: dict[str, Any]
    stages: list[dict[str, Any]]
    created_at: float
    updated_at: float


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
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    # --- pipelines
    def pipelines(self) -> list[PipelineRow]:
        rows = self._db.execute("SELECT * FROM pipelines ORDER BY name").fetchall()
        return [self._pipeline(r) for r in rows]

    def pipeline(self, name: str) -> PipelineRow | None:
        row = self._db.execute("SELECT * FROM pipelines WHERE name = ?", (name,)).fetchone()
        return self._pipeline(row) if row else None

    def put_pipeline(self, name: str, revision: int, definition: dict, stages: list[dict]) -> PipelineRow:
        now = time.time()
        with self._db:
            self._db.execute(
                """INSERT INTO pipelines (name, revision, definition, stages, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT(name) DO UPDATE SET revision=excluded.revision,
                     definition=excluded.definition, stages=excluded.stages, updated_at=excluded.updated_at""",
                (name, revision, json.dumps(definition), json.dumps(stages), now, now),
            )
        row = self.pipeline(name)
        assert row is not None
        return row

    def delete_pipeline(self, name: str) -> bool:
        with self._db:
            return self._db.execute("DELETE FROM pipelines WHERE name = ?", (name,)).rowcount > 0

    @staticmethod
    def _pipeline(row: tuple) -> PipelineRow:
        name, revision, definition, stages, created, updated = row
        return PipelineRow(name, revision, json.loads(definition), json.loads(stages), created, updated)

    # --- runtimes and instances
    def runtimes(self) -> list[RuntimeRow]:
        rows = self._db.execute("SELECT name, kind, models FROM runtimes ORDER BY name").fetchall()
        return [RuntimeRow(n, k, json.loads(m)) for n, k, m in rows]

    def put_runtime(self, name: str, kind: str, models: dict[str, dict]) -> None:
        with self._db:
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
        with self._db:
            self._db.execute(
                """INSERT INTO instances (id, runtime, host, port, last_seen) VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT(id) DO UPDATE SET runtime=excluded.runtime, host=excluded.host,
                     port=excluded.port, last_seen=excluded.last_seen""",
                (inst.id, inst.runtime, inst.host, inst.port, inst.last_seen),
            )

    def delete_instance(self, instance_id: str) -> None:
        with self._db:
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
        with self._db:
            self._db.execute(
                "INSERT OR IGNORE INTO runtime_models (runtime, model, version, loaded_at) VALUES (?, ?, ?, ?)",
                (loaded.runtime, loaded.model, loaded.version, time.time()),
            )

    def delete_loaded_model(self, loaded: LoadedModel) -> None:
        with self._db:
            self._db.execute(
                "DELETE FROM runtime_models WHERE runtime = ? AND model = ? AND version = ?",
                (loaded.runtime, loaded.model, loaded.version),
            )
