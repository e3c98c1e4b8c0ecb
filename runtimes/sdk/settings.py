"""Settings every runtime reads (``SLUICE_RUNTIME_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_RUNTIME_", extra="ignore")

    #: the runtime's name in pipelines (``<runtime>/<model>``)
    name: str = "scikit"
    host: str = "127.0.0.1"
    #: the gRPC port of this process (its sidecar's ingress listens on public_port)
    port: int = 19000
    #: the address announced to the registry (the sidecar's ingress); default host/port
    public_host: str = ""
    public_port: int = 0
    #: models to serve, comma-separated, each ``name`` or ``name:version``
    models: str = ""
    repository_url: str = "http://127.0.0.1:8087"
    #: the manager's REST URL for the embedded registry; empty: do not register there
    manager_url: str = "http://127.0.0.1:8080"
    cache_dir: str = ".sluice/cache"
    max_message_bytes: int = Field(64 << 20, gt=0)
    #: Prometheus /metrics over HTTP on this port; 0: off
    metrics_port: int = 0

    def model_refs(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def announce(self) -> tuple[str, int]:
        return self.public_host or self.host, self.public_port or self.port
