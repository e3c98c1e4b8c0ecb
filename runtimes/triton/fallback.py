"""The Triton CPU fallback: serve a model directory in Triton's layout with onnxruntime.

``load(artifact)`` reads ``<model>/config.pbtxt`` and ``<model>/<version>/model.onnx``
(``artifact.path`` is the model directory, or one of its version directories) and
serves it as Triton would: the inputs, outputs, datatypes and dims of config.pbtxt
are the signature (inputs are cast to the declared datatype, shapes are checked,
``reshape`` is applied both ways), ``max_batch_size`` is enforced, and
``dynamic_batching`` batches concurrent requests (``batching.DynamicBatcher``);
without it each request runs on its own. Runs happen in worker threads, one per
``instance_group`` instance; onnxruntime releases the GIL while it computes.

The CUDA execution provider is used first when onnxruntime has it (and the config
does not pin every instance to KIND_CPU); ``platform`` says which one runs
("onnxruntime-cuda" / "onnxruntime-cpu"). Only ONNX models are served: for other
Triton backends run a real Triton server (see ``remote``).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tritonclient.grpc import model_config_pb2 as mc

from runtimes.sdk.model import Model, ModelArtifact, ModelLoadError
from runtimes.triton.batching import DynamicBatcher, batch_rows, check_batch_size
from runtimes.triton.config import ConfigError, TritonModelConfig, load_config
from runtimes.triton.settings import FallbackSettings
from sluice.tensors import DATATYPE_TO_DTYPE, TensorError

Arrays = dict[str, np.ndarray]

# onnxruntime's element type names that differ from OIP's upper-cased name
_ORT_DATATYPES = {"float": "FP32", "double": "FP64", "float16": "FP16", "bfloat16": "BF16", "string": "BYTES"}


def _ort_datatype(ort_type: str) -> str:
    element = ort_type.removeprefix("tensor(").removesuffix(")")
    return _ORT_DATATYPES.get(element, element.upper())


def _shape_str(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    """Whether a concrete shape matches a declared one (-1: any size)."""
    return len(shape) == len(declared) and all(d in (-1, s) for s, d in zip(shape, declared))


def _compatible(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two declared shapes can describe the same tensor."""
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b))


def _cast(array: np.ndarray, datatype: str) -> np.ndarray:
    if datatype != "BYTES":
        return array.astype(DATATYPE_TO_DTYPE[datatype], copy=False)
    # onnxruntime turns bytes objects into their repr ("b'...'"): hand it text
    text = [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
    return np.array(text, dtype=object).reshape(array.shape)


class TritonOnnxModel(Model):
    """One ONNX model version served the way Triton's onnxruntime backend serves it."""

    runs_on_loop = True  # its dynamic batcher lives on the loop; runs go to its own threads

    def __init__(self, artifact: ModelArtifact, config: TritonModelConfig, session: ort.InferenceSession, settings: FallbackSettings):
        super().__init__(artifact, config.input_specs, config.output_specs)
        self.config = config
        self.platform = "onnxruntime-cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "onnxruntime-cpu"
        self._session = session
        self._output_names = [t.spec.name for t in config.outputs]
        self._executor = ThreadPoolExecutor(config.instance_count, thread_name_prefix=f"triton-{config.name}")
        self._runs_unbatched = 0
        self.batcher: DynamicBatcher | None = None
        if config.dynamic_batching is not None and settings.dynamic_batching:
            delay_us = settings.max_queue_delay_us
            if delay_us is None:
                delay_us = config.dynamic_batching.max_queue_delay_us
            self.batcher = DynamicBatcher(
                self._run,
                max_batch_size=config.max_batch_size,
                max_queue_delay_s=delay_us / 1e6,
                preferred_batch_sizes=config.dynamic_batching.preferred_batch_sizes,
                instances=config.instance_count,
                executor=self._executor,
            )

    @property
    def batches_run(self) -> int:
        """How many times the model itself has run (one per batch)."""
        return self.batcher.batches_run if self.batcher else self._runs_unbatched

    async def predict(self, inputs: Arrays) -> Arrays:
        feed = self._prepare(inputs)
        if self.batcher is not None:
            outputs = await self.batcher.submit(feed)
        else:
            if self.config.max_batch_size > 0:
                check_batch_size(batch_rows(feed), self.config.max_batch_size)
            self._runs_unbatched += 1
            outputs = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, feed)
        return {t.spec.name: self._reshape(outputs[t.spec.name], t.model_shape, t.spec.shape) for t in self.config.outputs}

    def _run(self, feed: Arrays) -> Arrays:
        return dict(zip(self._output_names, self._session.run(self._output_names, feed)))

    def _prepare(self, inputs: Arrays) -> Arrays:
        """Check names and dims against config.pbtxt, cast, and reshape for the model."""
        expected = {t.spec.name for t in self.config.inputs}
        if missing := expected - inputs.keys():
            raise TensorError(f"model {self.name!r} needs input(s) {sorted(missing)}")
        if unknown := inputs.keys() - expected:
            raise TensorError(f"model {self.name!r} has no input(s) {sorted(unknown)}; it takes {sorted(expected)}")
        feed: Arrays = {}
        for t in self.config.inputs:
            spec = t.spec
            try:
                array = _cast(np.asarray(inputs[spec.name]), spec.datatype)
            except (TypeError, ValueError) as exc:
                raise TensorError(f"input {spec.name!r} cannot be read as {spec.datatype}: {exc}") from None
            if not _fits(array.shape, spec.shape):
                raise TensorError(f"input {spec.name!r} must have shape {_shape_str(spec.shape)}, got {_shape_str(array.shape)}")
            feed[spec.name] = self._reshape(array, spec.shape, t.model_shape)
        return feed

    def _reshape(self, array: np.ndarray, source: tuple[int, ...], target: tuple[int, ...]) -> np.ndarray:
        if source == target:
            return array
        if self.config.max_batch_size > 0:
            target = (array.shape[0], *target[1:])
        try:
            return array.reshape(target)
        except ValueError:
            raise TensorError(f"a tensor of shape {_shape_str(array.shape)} cannot be reshaped to {_shape_str(target)}") from None

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self._executor.shutdown(wait=False)


def load(artifact: ModelArtifact, settings: FallbackSettings | None = None) -> TritonOnnxModel:
    """Load one model version from a Triton-layout directory (see the module docstring)."""
    settings = settings or FallbackSettings.from_env()
    model_dir, version = _model_dir(Path(artifact.path), artifact.version)
    try:
        config = load_config(model_dir)
    except ConfigError as exc:
        raise ModelLoadError(f"model {artifact.name!r}: {exc}") from None
    if not _is_onnx(config):
        raise ModelLoadError(
            f"model {artifact.name!r} is a {config.platform or config.backend!r} model; the CPU fallback serves "
            "only onnxruntime_onnx models, so serve it from a real Triton server"
        )
    model_file = _version_dir(model_dir, version) / (config.default_model_filename or "model.onnx")
    if not model_file.is_file():
        raise ModelLoadError(f"model {artifact.name!r}: {model_file} does not exist")
    session = _session(model_file, config, settings)
    _check_signature(artifact.name, config, session)
    return TritonOnnxModel(artifact, config, session, settings)


def _model_dir(path: Path, version: str) -> tuple[Path, str]:
    if (path / "config.pbtxt").is_file():
        return path, version
    if (path.parent / "config.pbtxt").is_file() and path.name.isdigit():
        return path.parent, path.name
    raise ModelLoadError(f"{path} is not a Triton model directory: it has no config.pbtxt")


def _version_dir(model_dir: Path, version: str) -> Path:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise ModelLoadError(f"{model_dir} has no numbered version directory")
    if version.isdigit():
        if int(version) not in versions:
            raise ModelLoadError(f"{model_dir} has no version {version}; it has {versions}")
        return model_dir / str(int(version))
    # no version asked for: Triton's default policy, the latest one
    return model_dir / str(versions[-1])


def _is_onnx(config: TritonModelConfig) -> bool:
    if config.platform or config.backend:
        return config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime"
    return config.default_model_filename in ("", "model.onnx")


def _session(model_file: Path, config: TritonModelConfig, settings: FallbackSettings) -> ort.InferenceSession:
    providers = ["CPUExecutionProvider"]
    groups = config.proto.instance_group
    cpu_only = bool(groups) and all(g.kind == mc.ModelInstanceGroup.KIND_CPU for g in groups)
    if "CUDAExecutionProvider" in ort.get_available_providers() and not cpu_only:
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    try:
        return ort.InferenceSession(str(model_file), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelLoadError(f"onnxruntime cannot load {model_file}: {exc}") from None


def _check_signature(name: str, config: TritonModelConfig, session: ort.InferenceSession) -> None:
    """Refuse a config.pbtxt that does not describe the ONNX graph, as Triton does."""
    if not config.inputs or not config.outputs:
        raise ModelLoadError(f"model {name!r}: config.pbtxt must list the inputs and outputs (auto-complete is not supported)")
    graph = {"input": {a.name: a for a in session.get_inputs()}, "output": {a.name: a for a in session.get_outputs()}}
    for kind, tensors in (("input", config.inputs), ("output", config.outputs)):
        for t in tensors:
            arg = graph[kind].get(t.spec.name)
            if arg is None:
                raise ModelLoadError(f"model {name!r}: the ONNX graph has no {kind} {t.spec.name!r}; it has {sorted(graph[kind])}")
            if t.spec.datatype not in DATATYPE_TO_DTYPE:
                raise ModelLoadError(f"model {name!r}: {kind} {t.spec.name!r} has datatype {t.spec.datatype}, which the fallback cannot serve")
            if _ort_datatype(arg.type) != t.spec.datatype:
                raise ModelLoadError(
                    f"model {name!r}: {kind} {t.spec.name!r} is {t.spec.datatype} in config.pbtxt but {_ort_datatype(arg.type)} in the ONNX graph"
                )
            graph_shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
            if not _compatible(graph_shape, t.model_shape):
                raise ModelLoadError(
                    f"model {name!r}: {kind} {t.spec.name!r} has shape {_shape_str(t.model_shape)} in config.pbtxt "
                    f"but {_shape_str(graph_shape)} in the ONNX graph"
                )
    if missing := graph["input"].keys() - {t.spec.name for t in config.inputs}:
        raise ModelLoadError(f"model {name!r}: config.pbtxt does not list the ONNX input(s) {sorted(missing)}")
