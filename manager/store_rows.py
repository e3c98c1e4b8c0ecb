"""The rows the manager's store reads and writes, the same for both backends (SQLite,
``manager.store``; PostgreSQL, ``manager.store_pg``; their shared queries in
``manager.store_sql``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from manager.served_models import ServedModel
from sluice.plan import PipelinePlan


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
