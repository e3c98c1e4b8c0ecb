"""Gateway settings (``SLUICE_GATEWAY_*``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_GATEWAY_", extra="ignore")

    node_id: str = "gateway"
    host: str = "127.0.0.1"
    #: the HTTP API's own port (its sidecar's ingress is the public 8083)
    port: int = 18083
    #: the OIP gRPC API's own port (pipelines served as models); 0: off
    grpc_port: int = 18084
    #: the sidecar's egress listener that stage calls go through
    egress: str = "127.0.0.1:15001"
    #: the manager's gRPC address (PipelineDiscovery)
    manager_grpc: str = "127.0.0.1:18000"
    #: this gateway's node token for that channel (or a file holding it), and the mesh
    #: CA's certificate the manager's TLS certificate is checked against
    xds_token: str = ""
    xds_token_file: str = ""
    xds_ca_file: str = ""
    #: requests with a larger body get a 413
    max_body_bytes: int = Field(4 << 20, gt=0)
    #: largest tensor message between stages
    max_message_bytes: int = Field(64 << 20, gt=0)
    #: slack added to a stage's route timeout for the gRPC deadline, so Envoy times out first
    deadline_slack_ms: int = Field(1000, ge=0)
    #: at start-up, the HTTP API listens only once the manager's pipeline set is here, or
    #: after this long (a restarted gateway must not answer 404 for pipelines it has not
    #: received yet while its sidecar already sends it requests)
    first_set_timeout_s: float = Field(30.0, ge=0)
    #: requests served at once (HTTP and gRPC each); one more is answered at once: HTTP 503
    #: with ``Retry-After`` (``sluice.limits.InFlightLimit``), gRPC RESOURCE_EXHAUSTED
    max_in_flight: int = Field(256, ge=1)
    #: the ``Retry-After`` (seconds) of every 503 the gateway answers (shed, stage overloaded or down)
    retry_after_s: int = Field(1, ge=1)
    #: requests of one stream (gRPC ModelStreamInfer, or an NDJSON body's lines) run at once;
    #: the next is read only once the oldest is answered (``gateway.streaming``), so a fast
    #: sender is slowed by flow control, never queued without bound
    stream_max_in_flight: int = Field(16, ge=1)
    #: run consecutive plain stages on one runtime as one call (``sluice.fusion``)
    fuse_stages: bool = True
    #: adaptive batching (``gateway.batching``): concurrent requests to one pipeline revision
    #: with inputs of one signature, queued while ``batch_max_runs`` runs of them are in
    #: flight, run as one run of at most this many rows (0 or 1: off) ...
    batch_max_rows: int = Field(64, ge=0)
    #: ... and at most this many bytes of inputs
    batch_max_bytes: int = Field(1 << 20, ge=0)
    #: runs of one pipeline revision (and input signature) in flight before a request waits
    #: to be folded into the next one
    batch_max_runs: int = Field(2, ge=1)
