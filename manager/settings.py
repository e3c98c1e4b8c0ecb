"""Manager settings (``SLUICE_MANAGER_*``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ManagerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_MANAGER_", extra="ignore")

    host: str = "127.0.0.1"
    #: the REST API's own port (behind the manager's sidecar, which listens on the public 8080)
    port: int = 18080
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    db_path: str = ".sluice/manager.db"
    #: a PostgreSQL database several managers share (``postgresql://user@host:port/db``;
    #: ``manager.store_pg``, ``manager.follow``); empty: the embedded SQLite file at db_path
    db_url: str = ""

    @field_validator("db_url")
    @classmethod
    def _db_url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("SLUICE_MANAGER_DB_URL must be a postgresql:// URL (empty: SQLite at SLUICE_MANAGER_DB_PATH)")
        return value
    #: several managers on PostgreSQL: a manager whose own heartbeat (``managers`` table) is
    #: this old is dead, and changes stop waiting for its confirmation
    peer_ttl_s: float = Field(3.0, gt=0)
    #: a runtime instance that misses heartbeats for this long is removed
    heartbeat_ttl_s: float = Field(6.0, gt=0)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    #: how long an update waits for Envoys/gateways to acknowledge a step before going on
    ack_timeout_s: float = Field(5.0, gt=0)
    #: a restarted manager waits this long (per step) for a gateway's sidecar and a gateway to
    #: reconnect and confirm before the next change, and before finishing a change a killed
    #: manager left; then it goes on without them
    recovery_timeout_s: float = Field(10.0, gt=0)
    #: TEST-ONLY fault hook, off when empty: revisions (``name@revision``, comma-separated)
    #: whose routes the manager makes invalid so that Envoy rejects them (``xds.layers``)
    fault_nack_revisions: str = ""
    #: default per-stage timeout when a pipeline does not set one
    stage_timeout_ms: int = Field(10_000, gt=0)
    #: retries Envoy makes on a failed stage call (connect failures, resets, UNAVAILABLE)
    stage_retries: int = Field(2, ge=0)
    #: circuit breakers on each runtime's cluster (all its instances together, per gateway
    #: sidecar; ``manager.xds.limits``): concurrent stage calls, calls waiting for a connection,
    #: connections, concurrent retries; more is answered 503 at once (the gateway names the stage)
    runtime_max_requests: int = Field(512, ge=1)
    runtime_max_pending: int = Field(128, ge=1)
    runtime_max_connections: int = Field(128, ge=1)
    runtime_max_retries: int = Field(64, ge=1)
    #: per-runtime ``max_requests``: ``"<runtime>=<n>,..."`` (the others get runtime_max_requests)
    runtime_limits: str = ""
    #: circuit breakers on the gateway sidecar's local cluster: concurrent requests (and
    #: connections) to the gateway process, and requests waiting for one; beyond: 503
    gateway_max_requests: int = Field(512, ge=1)
    gateway_max_pending: int = Field(128, ge=1)
    #: the ``Retry-After`` (seconds) of an overflow's 503
    retry_after_s: int = Field(1, ge=1)

    @field_validator("runtime_limits")
    @classmethod
    def _runtime_limits(cls, value: str) -> str:
        from manager.xds.limits import parse_overrides

        parse_overrides(value)
        return value
    #: deadline for reading a runtime's model signatures over OIP when it registers
    metadata_timeout_s: float = Field(3.0, gt=0)
    #: bind address of the listeners the manager pushes to sidecars
    listener_address: str = "127.0.0.1"
    max_body_bytes: int = Field(1 << 20, gt=0)
    #: a bulk apply's body (about 120 bytes a chain pipeline: 32 MiB is some 250,000)
    max_apply_bytes: int = Field(32 << 20, gt=0)
    #: the model repository, for model listings, uploads (streamed through) and deletes
    repository_url: str = "http://127.0.0.1:8087"
    #: where clients send requests (``GET /api/v1/info``; the SDK's ``predict`` goes there)
    gateway_url: str = "http://127.0.0.1:8083"
    #: largest model upload streamed through to the repository (which has its own limit)
    max_upload_bytes: int = Field(1 << 30, gt=0)
    #: deadline for a runtime instance to load (or unload) one model version
    model_load_timeout_s: float = Field(120.0, gt=0)
    #: secure mode: tokens with scopes on the REST API and the gateway (checked by their
    #: sidecars), runtime registration with a ``runtime:<name>`` token. Off (dev mode):
    #: no tokens, and the manager's and the gateway's ingress listen on 127.0.0.1 only
    auth: bool = False
    #: secure mode: write an admin token here (mode 0600) at start unless it holds a valid
    #: one (``sluice up --secure``: ``$SLUICE_HOME/admin.token``); empty: none
    admin_token_path: str = ""
    #: lifetime of that admin token (and of the runtime tokens below)
    admin_token_ttl_s: float = Field(30 * 86400.0, gt=0)
    #: secure mode: runtimes (comma-separated) whose ``runtime:<name>`` token the manager
    #: writes at start to ``<runtime_token_dir>/<name>/token`` (mode 0600; kept while valid),
    #: for deployments that hand files to containers (compose); empty: none
    runtime_tokens: str = ""
    runtime_token_dir: str = ""
    #: lifetime of a token when ``POST /api/v1/tokens`` gives no ``ttl_s``
    token_ttl_s: float = Field(86400.0, gt=0)
    #: the networks (CIDRs, comma-separated) runtimes may register at: the manager dials
    #: only hosts that resolve inside them, and refuses the others with a 422
    runtime_networks: str = "127.0.0.0/8,::1/128"

    @field_validator("runtime_networks")
    @classmethod
    def _networks(cls, value: str) -> str:
        from manager.auth.networks import parse_networks

        if not parse_networks(value):
            raise ValueError("name at least one network (CIDR)")
        return value
    #: where the mesh CA (ca.key, mode 0600; ca.crt) and the xDS join secret (xds-join.key)
    #: live, created on first start and reused after; empty: the database's folder
    data_dir: str = ""
    #: lifetime of the certificates the manager issues (sidecars over SDS, its own);
    #: each is renewed at two thirds of it
    cert_ttl_s: float = Field(3600.0, ge=2)
    #: runtime discovery: "kubernetes" watches the EndpointSlices of Services labelled
    #: sluice.io/runtime (``manager.registry.kubernetes``); empty: Consul when
    #: SLUICE_CONSUL_ADDR is set, else the embedded registry
    registry: Literal["", "kubernetes"] = ""
    #: the namespace of the runtime Services (kubernetes registry); empty: the manager pod's own
    kubernetes_namespace: str = ""

    @property
    def fault_nack(self) -> frozenset[tuple[str, int]]:
        """``fault_nack_revisions`` parsed: {(name, revision)}."""
        pairs = (item.strip().rpartition("@") for item in self.fault_nack_revisions.split(","))
        return frozenset((name, int(rev)) for name, _, rev in pairs if name and rev.isdigit())

    @property
    def data_path(self) -> str:
        from pathlib import Path

        return self.data_dir or str(Path(self.db_path).parent)
