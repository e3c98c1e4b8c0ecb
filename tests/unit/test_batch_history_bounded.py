"""The batchers' record of recent batch sizes stays bounded however many batches run
(it was a list that grew by one entry per batch for the life of the runtime): Triton's
DynamicBatcher and Spark's MicroBatcher keep between RECENT_BATCHES and twice that,
the most recent last. RECENT_BATCHES is lowered for the test so it runs a few hundred
batches, not thousands."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from runtimes.spark import batching as spark_batching
from runtimes.triton import batching as triton_batching

RECENT = 20
BATCHES = 10 * RECENT + 7


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


async def test_dynamic_batcher_keeps_only_recent_batch_sizes(monkeypatch, executor) -> None:
    monkeypatch.setattr(triton_batching, "RECENT_BATCHES", RECENT)
    batcher = triton_batching.DynamicBatcher(lambda inputs: {"y": inputs["x"] * 2}, max_batch_size=8,
                                             max_queue_delay_s=0, executor=executor)
    try:
        for i in range(BATCHES):  # one request at a time: one batch each, of i % 3 + 1 rows
            rows = i % 3 + 1
            out = await batcher.submit({"x": np.full(rows, i, dtype=np.float32)})
            assert out["y"].tolist() == [2.0 * i] * rows
        assert batcher.batches_run == BATCHES
        assert RECENT <= len(batcher.batch_sizes) <= 2 * RECENT
        assert batcher.batch_sizes[-RECENT:] == [i % 3 + 1 for i in range(BATCHES - RECENT, BATCHES)]
    finally:
        await batcher.close()


async def test_micro_batcher_keeps_only_recent_batch_sizes(monkeypatch, executor) -> None:
    monkeypatch.setattr(spark_batching, "RECENT_BATCHES", RECENT)
    batcher = spark_batching.MicroBatcher(lambda payloads: [p * 2 for p in payloads], executor=executor,
                                          max_rows=8, max_delay_s=0)
    try:
        for i in range(BATCHES):
            assert await batcher.submit(i, rows=1) == 2 * i
        assert RECENT <= len(batcher.batch_sizes) <= 2 * RECENT
        assert batcher.batch_sizes[-RECENT:] == [1] * RECENT
    finally:
        await batcher.close()
