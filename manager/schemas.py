"""The manager's REST contract: typed request and response bodies.

A pipeline comes in the seed's form, ``{"name", "transportType", "chain": ["runtime/model[:version]"]}``,
or the richer ``stages`` form (per-stage timeout and explicit input bindings); both
resolve to the same list of stages.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.json_schema import SkipJsonSchema, WithJsonSchema

from manager.json_types import json_int
from manager.traffic_spec import RateLimitSpec, StageTrafficFields
from sluice import paths
from sluice.plan import StagePlan

NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
#: a stage id: no dots (``<stage-id>.<output>`` names an output)
STAGE_ID = r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$"
_CHAIN_ENTRY = re.compile(r"^(?P<runtime>[A-Za-z0-9][A-Za-z0-9_.-]*)/(?P<model>[A-Za-z0-9][A-Za-z0-9_.-]*)(?::(?P<version>[A-Za-z0-9_.-]+))?$")


class TensorSpecModel(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class StageSpec(StageTrafficFields):  # traffic, mirror, sticky, retries, rate_limit, ... (manager.traffic_spec)
    model_config = ConfigDict(strict=True, extra="forbid")

    runtime: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$")
    name: str | None = None
    timeout_ms: json_int(gt=0, le=600_000) | None = None
    #: input tensor -> output tensor of the previous stage (default: same name, or the only one);
    #: in a graph, "<stage-id>.<output>" or a request field
    inputs: dict[str, str] | None = None
    #: the stage's id in a graph (default: its index), as ``after``, ``inputs`` and ``when`` name it
    id: str | None = Field(None, pattern=STAGE_ID)
    #: the stages this one runs after; given on any stage, the definition is a graph
    #: (a stage without it is a root, or waits for what its inputs and condition read)
    after: Annotated[list[Annotated[str, Field(pattern=STAGE_ID)]], Field(max_length=64)] | None = None
    #: per-record condition over earlier outputs (``sluice.conditions``): other records skip this stage
    when: str | None = Field(None, min_length=1, max_length=1000)
    #: takes the records that no sibling's (same ``after``) condition took
    default: bool = False

    @property
    def label(self) -> str:
        return self.name or f"{self.runtime}/{self.model}" + (f":{self.version}" if self.version else "")


def parse_chain_entry(entry: str) -> StageSpec:
    match = _CHAIN_ENTRY.match(entry)
    if not match:
        raise ValueError(f"chain entry {entry!r} must look like '<runtime>/<model>[:<version>]'")
    return StageSpec(runtime=match["runtime"], model=match["model"], version=match["version"])


#: a chain entry, as JSON Schema states it (the same rule as ``_CHAIN_ENTRY``, without group names)
CHAIN_ENTRY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(?::[A-Za-z0-9_.-]+)?$"


class PipelineSpec(BaseModel):
    """A pipeline definition as users POST it: exactly one of ``chain`` or ``stages``
    (stated in the OpenAPI as a ``oneOf`` of the two required sets, neither nullable)."""

    model_config = ConfigDict(
        strict=True,  # JSON types as the schema states them: no "1" for 1, no 0 for false
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={"oneOf": [{"required": ["chain"]}, {"required": ["stages"]}]},
    )

    name: str = Field(pattern=NAME)
    transportType: Literal["http", "grpc"] = "http"
    #: entries are checked by ``parse_chain_entry`` (its message shows the expected form); the schema states the same rule
    chain: Annotated[list[Annotated[str, WithJsonSchema({"type": "string", "pattern": CHAIN_ENTRY_PATTERN})]], Field(min_length=1, max_length=64)] | SkipJsonSchema[None] = None
    stages: Annotated[list[StageSpec], Field(min_length=1, max_length=64)] | SkipJsonSchema[None] = None
    #: the pipeline's own rate limit (Envoy's local rate limit, on its first stage's call)
    rate_limit: RateLimitSpec | None = None

    @field_validator("chain", "stages", mode="before")
    @classmethod
    def _not_null(cls, value):
        if value is None:  # only a value sent is checked: null is not a way to leave one out
            raise ValueError("must be a list, not null (leave the field out instead)")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> "PipelineSpec":
        if (self.chain is None) == (self.stages is None):
            raise ValueError("give exactly one of 'chain' or 'stages'")
        for entry in self.chain or []:
            parse_chain_entry(entry)  # a malformed entry is a 422 now, not at resolve time
        return self

    def stage_list(self) -> list[StageSpec]:
        return list(self.stages) if self.stages is not None else [parse_chain_entry(e) for e in self.chain or []]


class StageOut(BaseModel):
    #: the stage's id in a graph; null in a chain
    id: str | None = None
    #: the stages it waits for (a graph's edges)
    after: list[str] = []
    when: str | None = None
    default: bool = False
    name: str
    runtime: str
    model: str
    version: str | None
    route: str
    timeout_ms: int
    inputs: list[TensorSpecModel]
    outputs: list[TensorSpecModel]
    bindings: dict[str, str]

    @classmethod
    def of(cls, stage: StagePlan) -> "StageOut":
        return cls(
            name=stage.name, runtime=stage.runtime, model=stage.model, version=stage.version or None,
            route=stage.route, timeout_ms=stage.timeout_ms,
            inputs=[TensorSpecModel(**t.as_dict()) for t in stage.inputs],
            outputs=[TensorSpecModel(**t.as_dict()) for t in stage.outputs],
            bindings={b.input: f"{b.stage}.{b.source}" if b.stage else b.source for b in stage.bindings},
            id=stage.id or None, after=list(stage.after), when=stage.when or None, default=stage.default,
        )


class PipelineOut(BaseModel):
    name: str
    transportType: str
    revision: int
    definition: dict
    stages: list[StageOut]
    created_at: float
    updated_at: float


class ApplyRequest(BaseModel):
    """A declarative set of pipelines, applied as one change."""

    model_config = ConfigDict(strict=True, extra="forbid")

    pipelines: list[PipelineSpec] = Field(max_length=100_000)
    #: also delete every pipeline not listed
    prune: bool = False


class ApplyOut(BaseModel):
    created: list[str]
    replaced: list[str]
    unchanged: list[str]
    deleted: list[str]
    dry_run: bool


class RuntimeRegistration(BaseModel):
    """What a runtime instance says about itself when it registers. The instance's id is
    the manager's to give (``Registered.instance_id``): a client cannot choose one."""

    model_config = ConfigDict(strict=True, extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    kind: str = Field("oip", max_length=64)
    host: str = Field(min_length=1, max_length=253)
    port: json_int(gt=0, lt=65536)
    #: model names (optionally ``name:version``); empty: ask the server's repository index
    models: list[str] = Field(default_factory=list, max_length=1024)


class Registered(BaseModel):
    instance_id: str
    heartbeat_interval_s: float
    ttl_s: float


class TokenRequest(BaseModel):
    """``POST /api/v1/tokens``: the scopes of a new token and its lifetime."""

    model_config = ConfigDict(strict=True, extra="forbid")

    #: admin, deploy, runtime:<runtime>, serve:<pipeline>, serve:*
    scopes: list[str] = Field(min_length=1, max_length=256)
    #: seconds until it expires (default: SLUICE_MANAGER_TOKEN_TTL_S)
    ttl_s: float | None = Field(None, gt=0)


class TokenIssued(BaseModel):
    """A new token: the only time the token itself is shown."""

    token: str
    id: str
    scopes: list[str]
    expires_at: float


class TokenInfo(BaseModel):
    """A token as listed: never the token itself."""

    id: str
    scopes: list[str]
    created_at: float
    expires_at: float
    revoked_at: float | None
    #: "active", "expired" or "revoked"
    status: str


class ModelOut(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpecModel]
    outputs: list[TensorSpecModel]


class InstanceOut(BaseModel):
    id: str
    host: str
    port: int
    #: a live gRPC health check of the instance (through its sidecar), made when listed
    healthy: bool = Field(description="SERVING on a gRPC health check made when this was listed")
    last_seen: float


class RuntimeOut(BaseModel):
    name: str
    kind: str
    models: list[ModelOut]
    instances: list[InstanceOut]


# --- models (the repository's, and the versions runtimes serve)
class ModelFileOut(BaseModel):
    path: str
    size: int
    sha256: str


class ServedBy(BaseModel):
    runtime: str
    instances: int


class ModelVersionOut(BaseModel):
    version: str
    framework: str
    inputs: list[TensorSpecModel]
    outputs: list[TensorSpecModel]
    files: list[ModelFileOut]
    #: runtimes that have this version loaded
    served_by: list[ServedBy]


class VersionPolicyModel(BaseModel):
    """A model's version policy (``versions.json``, ``sluice.version_policy``): ``load`` is one
    of ``{"latest": {"num_versions": N}}``, ``{"all": {}}``, ``{"specific": {"versions": [...]}}``;
    ``default`` is the version an unpinned request gets (default: the highest one loaded)."""

    load: dict[str, Any]
    default: str | None = None


#: a model version as the API takes it: one safe path segment (``sluice.paths.VERSION``)
VERSION_PATTERN = rf"^{paths.VERSION.pattern}$"


class LatestLoad(BaseModel):
    """Load the ``num_versions`` highest versions."""

    model_config = ConfigDict(strict=True, extra="forbid")

    num_versions: json_int(ge=1, le=1_000_000) = 1


class AllLoad(BaseModel):
    """Load every version."""

    model_config = ConfigDict(strict=True, extra="forbid")


class SpecificLoad(BaseModel):
    """Load exactly these versions."""

    model_config = ConfigDict(strict=True, extra="forbid")

    versions: list[Annotated[str, Field(pattern=VERSION_PATTERN)]] = Field(min_length=1, json_schema_extra={"uniqueItems": True})

    @field_validator("versions")
    @classmethod
    def _unique(cls, versions: list[str]) -> list[str]:
        if len(set(versions)) != len(versions):
            raise ValueError("a version is listed twice")
        return versions


class LoadPolicyIn(BaseModel):
    """Exactly one of ``latest``, ``all``, ``specific`` (Triton's ``ModelVersionPolicy``)."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={"minProperties": 1, "maxProperties": 1})

    # absent, never null (a None default is not validated; an explicit null is refused)
    latest: LatestLoad = None  # type: ignore[assignment]
    all: AllLoad = None  # type: ignore[assignment]
    specific: SpecificLoad = None  # type: ignore[assignment]

    @model_validator(mode="after")
    def _exactly_one(self) -> "LoadPolicyIn":
        if sum(x is not None for x in (self.latest, self.all, self.specific)) != 1:
            raise ValueError("'load' names exactly one of 'latest', 'all', 'specific'")
        return self


class VersionPolicyIn(BaseModel):
    """A model's new version policy (``PUT /api/v1/models/<m>/version-policy``); the
    repository checks it against the model's versions (a version it does not have: 422)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    #: which versions a runtime loads for the unpinned model; default: the latest one
    load: LoadPolicyIn = None  # type: ignore[assignment]  # absent, never null
    #: the version an unpinned request gets; default: the highest one loaded
    default: Annotated[str, Field(pattern=VERSION_PATTERN)] = None  # type: ignore[assignment]  # absent, never null


class ModelPolicyOut(BaseModel):
    """How a model's versions are chosen when none is named."""

    #: the version an unpinned request gets (the policy's default, else the latest); null: the policy is refused
    default_version: str | None = None
    #: the versions a runtime loads when asked for the model without a version
    load_versions: list[str] = []
    #: the model's policy; null: none (the latest version loads and answers)
    version_policy: VersionPolicyModel | None = None
    #: why the model's policy file is refused, when it is
    policy_error: str | None = None


class ModelInfo(ModelPolicyOut):
    name: str
    layout: str
    framework: str
    #: the highest version (``default_version`` answers unpinned requests)
    latest: str
    versions: list[ModelVersionOut]


class UploadedModel(BaseModel):
    """A new model version, as the repository numbered it."""

    name: str
    version: str
    layout: str
    framework: str
    files: list[ModelFileOut]


class LoadModel(BaseModel):
    """Load a model version from the repository onto every instance of a runtime."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    #: default: every version the model's version policy loads (no policy: the latest)
    version: str | None = Field(None, pattern=VERSION_PATTERN)


class LoadedModelOut(BaseModel):
    runtime: str
    model: str
    version: str
    #: every version of the model the runtime now serves (its default answers unpinned stages: the
    #: model's version-policy default when loaded, else the highest)
    versions: list[str]
    platform: str
    inputs: list[TensorSpecModel]
    outputs: list[TensorSpecModel]
    instances: int


class MeshInfo(BaseModel):
    """Where the mesh's public services are, for clients such as the SDK."""

    gateway_url: str
    repository_url: str
    version: str
