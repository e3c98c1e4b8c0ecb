"""Product matching, the Spark half: trains ``pm_spark`` on the featurizer's output.

``train_pm_spark(features, labels, out_dir)`` fits a Spark ML PipelineModel,
StandardScaler -> LogisticRegression, directly on the ``features`` vector (no
VectorAssembler: the input is already a vector), and writes it in the Spark runtime's
artifact layout: ``out_dir/model.json`` plus the saved pipeline in ``out_dir/pipeline/``.

The fit is deterministic: one partition, a fixed row order, L-BFGS with fixed
iterations and tolerance (logistic regression draws no random numbers), so the
same features and labels give the same coefficients.

``model.json`` also records ``training_fingerprint``, a hash of the training features,
labels and hyper-parameters (``training_fingerprint()``): ``models.build`` retrains
when the featurizer's output (or the training data) no longer matches it.

It uses the process's SparkSession if there is one, else starts a local one and stops
it when done.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from models.manifest import tensor, write_manifest

PIPELINE_DIR = "pipeline"
LOGISTIC_REGRESSION = {"maxIter": 100, "tol": 1e-9, "regParam": 0.01}


def training_fingerprint(features: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of what the fit sees: features (rounded to 1e-9, so last-bit float noise
    across machines does not count as a change), labels and hyper-parameters."""
    x = np.round(np.asarray(features, dtype=np.float64), 9) + 0.0  # + 0.0 turns -0.0 into 0.0
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    digest = hashlib.sha256(json.dumps({"shape": list(x.shape), "lr": LOGISTIC_REGRESSION}, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()


def train_pm_spark(features: np.ndarray, labels: np.ndarray, out_dir: Path) -> Path:
    """Fit and save ``pm_spark``; returns ``out_dir``.

    ``features``: float array (n, k), the featurizer's ``features`` output.
    ``labels``: n values, 1 for a matching pair and 0 otherwise.
    Signature: input ``features`` FP64 [-1, k]; outputs ``prediction`` FP64 [-1] and
    ``probability`` FP64 [-1, 2].
    """
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import StandardScaler
    from pyspark.ml.linalg import Vectors

    from runtimes.spark import session

    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y) or len(y) == 0:
        raise ValueError(f"features must be (n, k) and labels (n,), got {x.shape} and {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spark = session.acquire()
    try:
        rows = [(Vectors.dense(row), float(label)) for row, label in zip(x.tolist(), y.tolist())]
        df = spark.createDataFrame(rows, ["features", "label"]).coalesce(1)
        pipeline = Pipeline(
            stages=[
                StandardScaler(inputCol="features", outputCol="scaled", withMean=True, withStd=True),
                LogisticRegression(featuresCol="scaled", labelCol="label", **LOGISTIC_REGRESSION),
            ]
        )
        pipeline.fit(df).write().overwrite().save(str(out_dir / PIPELINE_DIR))
    finally:
        session.release()

    write_manifest(
        out_dir,
        "spark",
        inputs=[tensor("features", "FP64", [-1, x.shape[1]])],
        outputs=[tensor("prediction", "FP64", [-1]), tensor("probability", "FP64", [-1, 2])],
        training_fingerprint=training_fingerprint(x, y),
    )
    return out_dir
