"""Read a Triton ``config.pbtxt`` into the signature and batching settings Sluice uses.

The text is parsed with the ``ModelConfig`` message tritonclient ships (the same
schema Triton itself parses), never by hand. Triton's conventions are kept: ``dims``
leave out the batch dimension when ``max_batch_size > 0``, so the ``TensorSpec``
gets a leading -1 there; ``TYPE_STRING`` is OIP ``BYTES``; a tensor's optional
``reshape`` is the shape the model file itself uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from sluice.tensors import TensorSpec


class ConfigError(ValueError):
    """A config.pbtxt that cannot be parsed or that Sluice cannot serve."""


@dataclass(frozen=True)
class TensorConfig:
    """One input or output: its spec as clients see it and the model file's own shape."""

    spec: TensorSpec
    # shape inside the model (batch dim included when batched); equals spec.shape
    # unless config.pbtxt gives a ``reshape``
    model_shape: tuple[int, ...]


@dataclass(frozen=True)
class DynamicBatching:
    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class TritonModelConfig:
    """What the fallback needs from one config.pbtxt."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    dynamic_batching: DynamicBatching | None
    default_model_filename: str
    instance_count: int
    proto: mc.ModelConfig

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [t.spec for t in self.inputs]

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [t.spec for t in self.outputs]


def oip_datatype(data_type: int) -> str:
    """Triton ``DataType`` enum value -> OIP datatype name (TYPE_FP32 -> FP32)."""
    try:
        name = mc.DataType.Name(data_type)
    except ValueError:
        raise ConfigError(f"unknown Triton data type {data_type}") from None
    if name == "TYPE_INVALID":
        raise ConfigError("tensor has no data_type")
    return "BYTES" if name == "TYPE_STRING" else name.removeprefix("TYPE_")


def parse_config(text: str) -> mc.ModelConfig:
    """config.pbtxt text -> ``ModelConfig`` message; ConfigError says where it is wrong."""
    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as exc:
        raise ConfigError(f"config.pbtxt: {exc}") from None


def _tensor(t: mc.ModelInput | mc.ModelOutput, batch: tuple[int, ...]) -> TensorConfig:
    if not t.name:
        raise ConfigError("a tensor in config.pbtxt has no name")
    spec = TensorSpec(t.name, oip_datatype(t.data_type), batch + tuple(t.dims))
    reshaped = t.HasField("reshape")
    return TensorConfig(spec, batch + tuple(t.reshape.shape) if reshaped else spec.shape)


def model_config(proto: mc.ModelConfig, name: str = "") -> TritonModelConfig:
    """Turn a parsed ModelConfig into specs and batching settings.

    ``name`` is the model directory's name, which Triton uses when the config
    leaves ``name`` out.
    """
    if proto.max_batch_size < 0:
        raise ConfigError(f"max_batch_size must be >= 0, got {proto.max_batch_size}")
    batch = (-1,) if proto.max_batch_size > 0 else ()
    if proto.HasField("dynamic_batching") and not batch:
        raise ConfigError("dynamic_batching needs max_batch_size > 0")
    batching = None
    if proto.HasField("dynamic_batching"):
        db = proto.dynamic_batching
        batching = DynamicBatching(db.max_queue_delay_microseconds, tuple(db.preferred_batch_size))
    return TritonModelConfig(
        name=proto.name or name,
        platform=proto.platform,
        backend=proto.backend,
        max_batch_size=proto.max_batch_size,
        inputs=tuple(_tensor(t, batch) for t in proto.input),
        outputs=tuple(_tensor(t, batch) for t in proto.output),
        dynamic_batching=batching,
        default_model_filename=proto.default_model_filename,
        instance_count=max(1, sum(g.count or 1 for g in proto.instance_group)),
        proto=proto,
    )


def load_config(model_dir: Path) -> TritonModelConfig:
    """Read ``<model_dir>/config.pbtxt``."""
    path = Path(model_dir) / "config.pbtxt"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return model_config(parse_config(text), name=Path(model_dir).name)
