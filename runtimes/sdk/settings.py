"""Settings every runtime reads (``SLUICE_RUNTIME_*``)."""

from __future__ import annotations

from pydantic import Field, model_validator
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
    #: bearer token for the manager's API (secure mode): registration, recorded digests
    #: (a ``runtime:<name>`` token)
    token: str = ""
    #: a file holding that token (read at start when ``token`` is empty; compose mounts one)
    token_file: str = ""
    #: refuse to load a model whose digests no manager recorded (a runtime with no
    #: manager_url); off: such a load is checked against the repository's listing, with a warning
    require_digests: bool = False
    #: how long a load keeps asking an unreachable (or starting) manager for recorded digests
    manager_wait_s: float = Field(60.0, ge=0)
    max_message_bytes: int = Field(64 << 20, gt=0)
    #: the most elements the inputs of one inference request may hold together (a
    #: bigger shape is INVALID_ARGUMENT before anything is allocated); 0: max_message_bytes
    #: (every element costs at least a byte on the wire)
    max_tensor_elements: int = Field(0, ge=0)
    #: Prometheus /metrics over HTTP on this port; 0: off
    metrics_port: int = 0
    #: ModelInfer calls served at once; one more is refused at once with RESOURCE_EXHAUSTED
    #: (health checks and metadata are not counted)
    max_in_flight: int = Field(64, ge=1)
    #: threads that run models' predict off the event loop (models that compute on the
    #: calling thread; batching models run their own)
    predict_threads: int = Field(4, ge=1)
    #: a model whose calls compute in less than this on average runs on the event loop,
    #: not on a predict thread (the hand-off costs more); 0: always on a thread
    inline_below_ms: float = Field(1.0, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _token_from_file(self) -> "RuntimeSettings":
        if not self.token and self.token_file:
            from pathlib import Path

            try:
                self.token = Path(self.token_file).read_text().strip()
            except OSError as exc:  # the manager's calls will say 401: say why here
                import logging

                logging.getLogger(__name__).error("SLUICE_RUNTIME_TOKEN_FILE %s: %s; no token", self.token_file, exc)
        return self

    def model_refs(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def announce(self) -> tuple[str, int]:
        return self.public_host or self.host, self.public_port or self.port
