"""Benchmark the Spark runtime's two paths on the same saved model.

Trains two product-matching-like pipelines on synthetic pair features (six FP64
columns -> VectorAssembler -> StandardScaler -> LogisticRegression, and the same
features into a 20-tree RandomForest), saves each once, loads it twice through
``runtimes.spark.model.load`` (``execution`` "native" and "spark"), and measures
``Model.predict`` latency, p50 and p99, for 1 record and for a batch of 100, with
the speedup of the native path. The JVM path runs on a local[1] SparkSession.

Run: ``python bench/spark_stage.py [--repeats 200] [--jvm-repeats 30]``.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from runtimes.sdk.model import Model, ModelArtifact
from runtimes.spark import session
from runtimes.spark.model import load

FEATURES = ["title_sim", "brand_match", "price_ratio", "spec_overlap", "color_match", "length_diff"]


def train(root: Path) -> dict[str, Path]:
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import LogisticRegression, RandomForestClassifier
    from pyspark.ml.feature import StandardScaler, VectorAssembler

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, len(FEATURES)))
    y = (x @ np.array([1.5, 1.0, -0.7, 0.8, 0.3, -0.2]) + 0.5 * rng.normal(size=400) > 0).astype(float)
    spark = session.acquire()
    try:
        df = spark.createDataFrame([(*row, label) for row, label in zip(x.tolist(), y.tolist())], [*FEATURES, "label"])
        assemble = VectorAssembler(inputCols=FEATURES, outputCol="raw")
        heads = {
            "va_ss_lr": [StandardScaler(inputCol="raw", outputCol="features"), LogisticRegression(maxIter=50)],
            "va_rf20": [RandomForestClassifier(featuresCol="raw", numTrees=20, maxDepth=6, seed=1)],
        }
        paths = {}
        for name, head in heads.items():
            paths[name] = root / name
            Pipeline(stages=[assemble, *head]).fit(df).write().save(str(paths[name] / "pipeline"))
        return paths
    finally:
        session.release()


async def latencies(model: Model, batch: dict[str, np.ndarray], repeats: int) -> tuple[float, float]:
    for _ in range(3):  # warm-up
        await model.predict(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        await model.predict(batch)
        times.append(time.perf_counter() - start)
    p50, p99 = np.percentile(times, [50, 99]) * 1e3
    return float(p50), float(p99)


def batch_of(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(n)
    return {name: rng.normal(size=n) for name in FEATURES}


async def bench(repeats: int, jvm_repeats: int) -> None:
    session.acquire()  # one session for training and the JVM path alike
    try:
        with tempfile.TemporaryDirectory() as tmp:
            await compare(train(Path(tmp)), repeats, jvm_repeats)
    finally:
        session.release()


async def compare(paths: dict[str, Path], repeats: int, jvm_repeats: int) -> None:
    header = ("model", "rows", "native p50 ms", "native p99 ms", "spark p50 ms", "spark p99 ms", "speedup p50")
    print(f"{header[0]:<10} {header[1]:>5} " + " ".join(f"{h:>14}" for h in header[2:]))
    for name, path in paths.items():
        native = load(ModelArtifact(name, "1", path, {"framework": "spark", "execution": "native"}))
        jvm = load(ModelArtifact(name, "1", path, {"framework": "spark", "execution": "spark"}))
        try:
            for rows in (1, 100):
                batch = batch_of(rows)
                n50, n99 = await latencies(native, batch, repeats)
                j50, j99 = await latencies(jvm, batch, jvm_repeats)
                print(f"{name:<10} {rows:>5} {n50:>14.4f} {n99:>14.4f} {j50:>14.1f} {j99:>14.1f} {j50 / n50:>13.0f}x")
        finally:
            await jvm.close()
            await native.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed predicts per case on the native path")
    parser.add_argument("--jvm-repeats", type=int, default=30, help="timed predicts per case on the Spark path")
    args = parser.parse_args()
    asyncio.run(bench(args.repeats, args.jvm_repeats))


if __name__ == "__main__":
    main()
