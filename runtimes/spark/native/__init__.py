"""A JVM-free evaluator of saved Spark ML PipelineModels, vectorised in NumPy.

``load_native_pipeline(path)`` reads each stage's metadata and Parquet data and builds a
native stage for it (see ``registry.supported_classes()``), or raises
``UnsupportedStage`` so the caller can use real Spark instead. The result's
``transform(columns)`` takes and returns whole columns (vectors as 2-D float64 arrays,
sparse ones densified; strings as object arrays of ``str``).
"""

from runtimes.spark.native.base import ColumnType, InvalidInput, UnsupportedStage
from runtimes.spark.native.pipeline import NativePipeline, TransformResult, load_native_pipeline
from runtimes.spark.native.registry import supported_classes

__all__ = [
    "ColumnType",
    "InvalidInput",
    "NativePipeline",
    "TransformResult",
    "UnsupportedStage",
    "load_native_pipeline",
    "supported_classes",
]
