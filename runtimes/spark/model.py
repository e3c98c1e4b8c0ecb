"""Spark ML models for the runtime SDK: ``load(artifact) -> Model``.

An artifact is a directory with ``model.json`` and the saved PipelineModel in
``pipeline/``. The manifest::

    {"framework": "spark",
     "inputs": [...TensorSpec dicts], "outputs": [...],     # optional: derived if absent
     "execution": "auto" | "native" | "spark",             # optional, default "auto"
     "batching": {"max_batch_rows": 1024, "max_batch_delay_ms": 2}}   # optional, JVM path

Each model runs on one of two paths, chosen at load time, logged, and reported as
``platform``:

* ``spark-native``: every stage has a native NumPy implementation; ``predict`` is a
  direct, synchronous computation (microseconds for a small pipeline).
* ``spark-jvm``: real pyspark on the process's one local SparkSession; concurrent
  ``predict`` calls are micro-batched into one DataFrame per Spark job.

``auto`` takes the native path whenever it can; ``native`` refuses to load otherwise;
``spark`` always uses the JVM (e.g. to benchmark both on one model).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from runtimes.sdk.model import Model, ModelArtifact, ModelLoadError
from runtimes.spark import session
from runtimes.spark.batching import MicroBatcher
from runtimes.spark.columns import ROW_INDEX, empty_arrays, to_columns, to_tensors
from runtimes.spark.jvm import JvmPipeline
from runtimes.spark.native import NativePipeline, UnsupportedStage
from runtimes.spark.native.base import StageMeta
from runtimes.spark.native.persist import pipeline_stages
from runtimes.spark.native.registry import build_stage
from runtimes.spark.settings import SparkSettings
from runtimes.spark.signature import (
    ROW_INDEX_SPEC,
    final_columns,
    may_drop_rows,
    native_signature,
    raw_input_types,
    tensor_spec,
)
from sluice.tensors import TensorSpec

log = logging.getLogger(__name__)

PIPELINE_DIR = "pipeline"
NATIVE, JVM = "spark-native", "spark-jvm"
_EXECUTIONS = ("auto", "native", "spark")


def _check_signature(
    artifact: ModelArtifact, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], reads: Sequence[str], available: set[str]
) -> None:
    declared = {s.name for s in inputs}
    missing = [c for c in reads if c not in declared]
    if missing:
        raise ModelLoadError(f"{artifact.name}: the pipeline reads {missing}, which model.json inputs do not declare")
    unknown = [s.name for s in outputs if s.name not in available]
    if unknown:
        raise ModelLoadError(f"{artifact.name}: outputs {unknown} are not columns the pipeline produces")
    if not outputs:
        raise ModelLoadError(f"{artifact.name}: the model has no outputs")


class NativeSparkModel(Model):
    """A pipeline evaluated by the native NumPy evaluator."""

    platform = NATIVE

    def __init__(self, artifact: ModelArtifact, pipeline: NativePipeline):
        derived_inputs, derived_outputs = native_signature(pipeline)
        inputs = artifact.specs("inputs") or derived_inputs
        outputs = artifact.specs("outputs") or derived_outputs
        _check_signature(artifact, inputs, outputs, pipeline.input_columns, {*pipeline.output_columns, ROW_INDEX})
        super().__init__(artifact, inputs, outputs)
        self.pipeline = pipeline

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns, _ = to_columns(inputs, self.inputs)
        result = self.pipeline.transform(columns)
        return to_tensors(result, result.rows, self.outputs)


class JvmSparkModel(Model):
    """A pipeline run by real Spark, with concurrent requests micro-batched."""

    platform = JVM
    runs_on_loop = True  # its micro-batcher lives on the loop and runs jobs in threads

    def __init__(self, artifact: ModelArtifact, stages: Sequence[StageMeta]):
        inputs = artifact.specs("inputs") or self._derive_inputs(artifact, stages)
        self.jvm = JvmPipeline(artifact.path / PIPELINE_DIR, inputs)
        try:
            outputs = artifact.specs("outputs") or self._derive_outputs(stages)
            _check_signature(artifact, inputs, outputs, [], {*self.jvm.column_types, ROW_INDEX})
        except Exception:
            self.jvm.close()
            raise
        super().__init__(artifact, inputs, outputs)
        self._columns = [s.name for s in outputs if s.name in self.jvm.column_types]
        settings, batching = SparkSettings(), artifact.manifest.get("batching") or {}
        self.batcher = MicroBatcher(
            lambda payloads: self.jvm.run_batch(payloads, self._columns),
            executor=session.jobs,
            max_rows=int(batching.get("max_batch_rows", settings.max_batch_rows)),
            max_delay_s=float(batching.get("max_batch_delay_ms", settings.max_batch_delay_ms)) / 1000.0,
        )

    @staticmethod
    def _derive_inputs(artifact: ModelArtifact, stages: Sequence[StageMeta]) -> list[TensorSpec]:
        types = raw_input_types(stages)
        if types is None or any(t is None for t in types.values()):
            raise ModelLoadError(
                f"{artifact.name}: cannot tell which columns (or types) the pipeline reads; declare inputs in model.json"
            )
        return [tensor_spec(c, t) for c, t in types.items()]

    def _derive_outputs(self, stages: Sequence[StageMeta]) -> list[TensorSpec]:
        names = [c for c in final_columns(self.jvm.added, stages) if c in self.jvm.column_types]
        specs = [tensor_spec(c, self.jvm.column_types[c]) for c in names]
        return specs + ([ROW_INDEX_SPEC] if may_drop_rows(stages) else [])

    async def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns, n = to_columns(inputs, self.inputs)
        if n == 0:
            return empty_arrays(self.outputs)
        result, rows = await self.batcher.submit((columns, n), n)
        return to_tensors(result, rows, self.outputs)

    async def close(self) -> None:
        await self.batcher.close()
        self.jvm.close()


def load(artifact: ModelArtifact) -> Model:
    """Load a Spark ML model artifact on the native path when possible, else on Spark."""
    manifest = artifact.manifest
    if manifest.get("framework", "spark") != "spark":
        raise ModelLoadError(f"{artifact.name}: framework {manifest.get('framework')!r} is not spark")
    execution = manifest.get("execution", "auto")
    if execution not in _EXECUTIONS:
        raise ModelLoadError(f"{artifact.name}: execution must be one of {_EXECUTIONS}, got {execution!r}")
    path = artifact.path / PIPELINE_DIR
    try:
        stages = pipeline_stages(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{artifact.name}: no readable Spark pipeline under {path}: {exc}") from exc

    reason = "model.json asks for execution on spark"
    if execution != "spark":
        try:
            model = NativeSparkModel(artifact, NativePipeline([build_stage(meta) for meta in stages]))
        except UnsupportedStage as exc:
            if execution == "native":
                raise ModelLoadError(f"{artifact.name}: cannot run natively: {exc}") from exc
            reason = f"not native: {exc}"
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise ModelLoadError(f"{artifact.name}: cannot read the saved pipeline: {exc}") from exc
        else:
            log.info("model %s:%s runs on %s (%d stages)", artifact.name, artifact.version, NATIVE, len(stages))
            return model
    try:
        model = JvmSparkModel(artifact, stages)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{artifact.name}: Spark cannot load the pipeline: {exc}") from exc
    log.info("model %s:%s runs on %s (%s)", artifact.name, artifact.version, JVM, reason)
    return model


__all__ = ["JVM", "NATIVE", "JvmSparkModel", "NativeSparkModel", "load"]
