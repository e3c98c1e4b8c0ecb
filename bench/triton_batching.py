"""Benchmark the Triton CPU fallback's dynamic batching on the ``mlp`` model.

For 1, 8 and 32 concurrent async clients, each sending one-row requests back to
back, measures throughput (requests/s) and p50/p99 latency of ``Model.predict``
with dynamic batching (config.pbtxt's queue delay, or ``--delay-us``) and without
it. Each run lasts ``--seconds`` or ``--max-requests``, whichever ends first. The
model repository is trained into a temporary folder unless ``--repo`` names one.

Run: ``python bench/triton_batching.py [--seconds 2] [--repo models/triton]``.
"""

from __future__ import annotations

import argparse
import asyncio
import runpy
import tempfile
import time
from pathlib import Path

import numpy as np

from runtimes.sdk.model import ModelArtifact
from runtimes.triton.fallback import TritonOnnxModel, load
from runtimes.triton.settings import FallbackSettings

REPO = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)


async def measure(model: TritonOnnxModel, clients: int, seconds: float, max_requests: int) -> dict[str, float]:
    rows = np.random.default_rng(0).uniform(0.1, 8.0, (256, 4)).astype(np.float32)
    latencies: list[float] = []
    issued = 0
    batches_before = model.batches_run
    deadline = time.perf_counter() + seconds

    async def client(offset: int) -> None:
        nonlocal issued
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            x = rows[(offset + issued) % len(rows)][None, :]
            start = time.perf_counter()
            await model.predict({"input": x})
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    batches = model.batches_run - batches_before
    p50, p99 = np.percentile(latencies, [50, 99]) * 1e3
    return {"requests": len(latencies), "rps": len(latencies) / elapsed, "p50": p50, "p99": p99, "batch": len(latencies) / batches}


async def bench(root: Path, seconds: float, max_requests: int, delay_us: int | None) -> None:
    modes = {
        "dynamic": FallbackSettings(dynamic_batching=True, max_queue_delay_us=delay_us),
        "none": FallbackSettings(dynamic_batching=False),
    }
    print(f"{'batching':<15} {'clients':>7} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'rows/run':>8}")
    for mode, settings in modes.items():
        model = load(ModelArtifact("mlp", "1", root / "mlp"), settings)
        if model.batcher is not None:
            mode = f"{mode}/{model.batcher.max_queue_delay_s * 1e6:.0f}us"
        try:
            await measure(model, 4, 0.2, 200)  # warm-up: threads, onnxruntime allocations
            for clients in CONCURRENCY:
                r = await measure(model, clients, seconds, max_requests)
                print(
                    f"{mode:<15} {clients:>7} {r['requests']:>9} {r['rps']:>9.0f} {r['p50']:>8.3f} {r['p99']:>8.3f} {r['batch']:>8.1f}",
                    flush=True,
                )
        finally:
            await model.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="duration of each run (default %(default)s)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="request bound of each run")
    parser.add_argument("--delay-us", type=int, default=None, help="max queue delay (default: config.pbtxt's)")
    parser.add_argument("--repo", type=Path, help="an existing Triton model repository (default: train one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sluice-triton-") as tmp:
        root = args.repo
        if root is None:
            root = runpy.run_path(str(REPO / "models" / "train_triton.py"))["build_repository"](Path(tmp)).root
        asyncio.run(bench(root, args.seconds, args.max_requests, args.delay_us))


if __name__ == "__main__":
    main()
