"""Reading what ``PipelineModel.write().save(dir)`` wrote, without a JVM.

Layout: ``<dir>/metadata/part-00000*`` is one JSON line (class, uid, sparkVersion,
paramMap, defaultParamMap, ...); ``<dir>/stages/<i>_<uid>/`` holds each stage the same
way, with model data as Parquet under ``data/`` (and ``treesMetadata/`` for ensembles).
Vectors and matrices are Spark's UDT structs: ``type`` 0 sparse, 1 dense.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from runtimes.spark.native.base import StageMeta, UnsupportedStage

PIPELINE_CLASS = "org.apache.spark.ml.PipelineModel"


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata JSON of a saved stage or pipeline directory."""
    parts = sorted(p for p in (path / "metadata").glob("part-00000*") if not p.name.endswith(".crc"))
    if not parts:
        raise FileNotFoundError(f"no Spark ML metadata under {path}")
    with parts[0].open(encoding="utf-8") as fh:
        return json.loads(fh.readline())


def stage_meta(path: Path) -> StageMeta:
    raw = read_metadata(path)
    explicit = raw.get("paramMap") or {}
    params = {**(raw.get("defaultParamMap") or {}), **explicit}
    known = {"class", "uid", "sparkVersion", "paramMap", "defaultParamMap", "timestamp"}
    return StageMeta(
        class_name=raw["class"],
        uid=raw.get("uid", path.name),
        spark_version=raw.get("sparkVersion", "0.0"),
        params=params,
        explicit=frozenset(explicit),
        path=path,
        extra={k: v for k, v in raw.items() if k not in known},
    )


def pipeline_stages(path: Path) -> list[StageMeta]:
    """Every stage of a saved PipelineModel in order, nested PipelineModels flattened."""
    path = Path(path)
    raw = read_metadata(path)
    if raw.get("class") != PIPELINE_CLASS:
        return [stage_meta(path)]
    uids = raw["paramMap"]["stageUids"]
    # stage directories are "<position>_<uid>", the position zero-padded
    by_position: dict[int, Path] = {}
    for child in (path / "stages").iterdir():
        position, _, uid = child.name.partition("_")
        if position.isdigit():
            by_position[int(position)] = child
    stages: list[StageMeta] = []
    for position, uid in enumerate(uids):
        child = by_position.get(position)
        if child is None or not child.name.endswith(uid):
            raise FileNotFoundError(f"stage {position} ({uid}) of {path} has no directory")
        if read_metadata(child).get("class") == PIPELINE_CLASS:
            stages.extend(pipeline_stages(child))
        else:
            stages.append(stage_meta(child))
    return stages


def spark_major(meta: StageMeta) -> int:
    try:
        return int(meta.spark_version.split(".")[0])
    except ValueError:
        return 0


def require_spark3(meta: StageMeta) -> None:
    # Spark 2 wrote other data layouts (StringIndexer labels, HashingTF's old hash).
    if spark_major(meta) < 3:
        raise UnsupportedStage(f"{meta.short_name}: saved by Spark {meta.spark_version}; only 3.x and later")


def read_data(meta: StageMeta, folder: str = "data") -> list[dict[str, Any]]:
    """The rows of a stage's Parquet data, as Python dicts."""
    return pq.read_table(meta.path / folder).to_pylist()


def read_data_row(meta: StageMeta) -> dict[str, Any]:
    rows = read_data(meta)
    if len(rows) != 1:
        raise UnsupportedStage(f"{meta.short_name}: expected one data row, found {len(rows)}")
    return rows[0]


def to_vector(udt: dict[str, Any]) -> np.ndarray:
    """A Spark vector struct as a dense float64 array."""
    values = np.asarray(udt["values"], dtype=np.float64)
    if udt["type"] == 1:
        return values
    out = np.zeros(int(udt["size"]), dtype=np.float64)
    out[np.asarray(udt["indices"], dtype=np.int64)] = values
    return out


def to_matrix(udt: dict[str, Any]) -> np.ndarray:
    """A Spark matrix struct as a dense (numRows, numCols) float64 array."""
    rows, cols = int(udt["numRows"]), int(udt["numCols"])
    values = np.asarray(udt["values"], dtype=np.float64)
    transposed = bool(udt["isTransposed"])
    if udt["type"] == 1:
        # dense values are column-major unless transposed (then row-major)
        return values.reshape(rows, cols) if transposed else values.reshape(cols, rows).T.copy()
    # sparse: CSC; a transposed one stores its transpose as CSC, i.e. CSR of itself
    ptrs = np.asarray(udt["colPtrs"], dtype=np.int64)
    inner = np.asarray(udt["rowIndices"], dtype=np.int64)
    outer = np.repeat(np.arange(len(ptrs) - 1), np.diff(ptrs))
    out = np.zeros((rows, cols), dtype=np.float64)
    if transposed:
        out[outer, inner] = values
    else:
        out[inner, outer] = values
    return out
