"""Manager settings (``SLUICE_MANAGER_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ManagerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_MANAGER_", extra="ignore")

    host: str = "127.0.0.1"
    #: the REST API's own port (behind the manager's sidecar, which listens on the public 8080)
    port: int = 18080
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    db_path: str = ".sluice/manager.db"
    #: a runtime instance that misses heartbeats for this long is removed
    heartbeat_ttl_s: float = Field(6.0, gt=0)
    heartbeat_interval_s: float = Field(2.0, gt=0)
    #: how long an update waits for Envoys/gateways to acknowledge a step before going on
    ack_timeout_s: float = Field(5.0, gt=0)
    #: default per-stage timeout when a pipeline does not set one
    stage_timeout_ms: int = Field(10_000, gt=0)
    #: retries Envoy makes on a failed stage call (connect failures, resets, UNAVAILABLE)
    stage_retries: int = Field(2, ge=0)
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
