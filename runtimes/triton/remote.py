"""Read the models a real Triton server serves, as Sluice signatures.

A real Triton (or any OIP v2 server with Triton's repository extension) is a runtime
Sluice does not run: the manager/CLI registers it by address, and this module says
what it serves. For each READY model version in the repository index it asks the
server for the model's metadata (names, OIP datatypes, shapes with -1 for the
batch dimension, exactly what ModelInfer expects) and its config (max_batch_size,
dynamic batching), and returns them as ``RemoteModel``s.

The calls are blocking (``tritonclient.grpc.InferenceServerClient``); async callers
run ``discover`` with ``asyncio.to_thread``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from tritonclient.grpc import InferenceServerClient, InferenceServerException
from tritonclient.grpc import service_pb2 as pb

from sluice.tensors import TensorSpec


class RemoteTritonError(RuntimeError):
    """The Triton server could not be reached or answered with an error."""


class TritonClient(Protocol):
    """The part of ``tritonclient.grpc.InferenceServerClient`` this module calls."""

    def get_model_repository_index(self, *, client_timeout: float | None = ...) -> pb.RepositoryIndexResponse: ...
    def get_model_metadata(self, model_name: str, model_version: str = ..., *, client_timeout: float | None = ...) -> pb.ModelMetadataResponse: ...
    def get_model_config(self, model_name: str, model_version: str = ..., *, client_timeout: float | None = ...) -> pb.ModelConfigResponse: ...


@dataclass(frozen=True)
class RemoteModel:
    """One model version served by a Triton server, and its signature."""

    name: str
    version: str
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    max_queue_delay_us: int | None  # None: no dynamic batching

    def as_dict(self) -> dict[str, Any]:
        """The shape a runtime announces its models in (name, version, signature)."""
        return {
            "name": self.name,
            "version": self.version,
            "platform": self.platform,
            "inputs": [s.as_dict() for s in self.inputs],
            "outputs": [s.as_dict() for s in self.outputs],
            "max_batch_size": self.max_batch_size,
        }


def tensor_specs(tensors) -> tuple[TensorSpec, ...]:
    """``ModelMetadataResponse.TensorMetadata`` entries -> TensorSpecs (shapes as sent)."""
    return tuple(TensorSpec(t.name, t.datatype.upper(), tuple(int(d) for d in t.shape)) for t in tensors)


def remote_model(metadata: pb.ModelMetadataResponse, config: pb.ModelConfigResponse, version: str = "") -> RemoteModel:
    """Translate the server's answers about one model into a ``RemoteModel``.

    ``version`` is the one the repository index named; without it, the highest of
    the versions the metadata lists.
    """
    if not version and metadata.versions:
        version = max(metadata.versions, key=lambda v: int(v) if v.isdigit() else -1)
    cfg = config.config
    return RemoteModel(
        name=metadata.name,
        version=version,
        platform=metadata.platform or cfg.platform or cfg.backend,
        inputs=tensor_specs(metadata.inputs),
        outputs=tensor_specs(metadata.outputs),
        max_batch_size=cfg.max_batch_size,
        max_queue_delay_us=cfg.dynamic_batching.max_queue_delay_microseconds if cfg.HasField("dynamic_batching") else None,
    )


def describe(client: TritonClient, name: str, version: str = "", timeout_s: float | None = None) -> RemoteModel:
    """Ask the server for one model's metadata and config."""
    metadata = client.get_model_metadata(name, version, client_timeout=timeout_s)
    config = client.get_model_config(name, version, client_timeout=timeout_s)
    return remote_model(metadata, config, version)


def list_models(client: TritonClient, timeout_s: float | None = None) -> list[RemoteModel]:
    """Every READY model version in the server's repository index, described."""
    index = client.get_model_repository_index(client_timeout=timeout_s)
    ready = sorted({(m.name, m.version) for m in index.models if m.state == "READY"})
    return [describe(client, name, version, timeout_s) for name, version in ready]


def discover(address: str, timeout_s: float = 10.0) -> list[RemoteModel]:
    """Connect to the Triton gRPC endpoint at ``host:port`` and list its READY models."""
    client = InferenceServerClient(url=address)
    try:
        return list_models(client, timeout_s)
    except InferenceServerException as exc:
        raise RemoteTritonError(f"Triton at {address}: {exc.message()}") from None
    finally:
        client.close()
