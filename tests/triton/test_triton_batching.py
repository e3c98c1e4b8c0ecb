"""The generic dynamic batcher: batches, splits per caller, bounds, errors."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from runtimes.triton.batching import BatchTooLargeError, DynamicBatcher
from sluice.tensors import TensorError

WAIT = 5.0  # bound on every await in these tests


class Recorder:
    """A model run: y = 10 x, remembering batch sizes and the threads it ran on."""

    def __init__(self):
        self.sizes: list[int] = []
        self.threads: set[int] = set()
        self.fail: Exception | None = None

    def __call__(self, inputs):
        self.threads.add(threading.get_ident())
        self.sizes.append(len(inputs["x"]))
        if self.fail:
            raise self.fail
        return {"y": inputs["x"] * 10, "rows": np.full(len(inputs["x"]), len(inputs["x"]))}


def rows(start: int, n: int, width: int = 2) -> np.ndarray:
    return np.arange(start, start + n * width, dtype=np.float32).reshape(n, width)


async def gather(*aws, return_exceptions=False):
    return await asyncio.wait_for(asyncio.gather(*aws, return_exceptions=return_exceptions), WAIT)


async def test_concurrent_requests_run_as_one_batch_and_get_their_own_rows():
    run = Recorder()
    # a long delay: the batch must close because it is full, not because time ran out
    batcher = DynamicBatcher(run, max_batch_size=16, max_queue_delay_s=60)
    inputs = [rows(100 * i, 1) for i in range(16)]
    results = await gather(*(batcher.submit({"x": x}) for x in inputs))
    assert run.sizes == [16] and batcher.batches_run == 1
    for x, result in zip(inputs, results):
        np.testing.assert_array_equal(result["y"], x * 10)
        assert result["rows"].tolist() == [16]
    assert threading.get_ident() not in run.threads
    await batcher.close()


async def test_requests_of_several_rows_are_split_back_by_size():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=32, max_queue_delay_s=0.05)
    inputs = [rows(100 * i, i + 1) for i in range(5)]
    results = await gather(*(batcher.submit({"x": x}) for x in inputs))
    assert run.sizes == [15]
    for x, result in zip(inputs, results):
        np.testing.assert_array_equal(result["y"], x * 10)
    await batcher.close()


async def test_a_lone_request_waits_the_queue_delay_for_company():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=0.2)
    start = time.monotonic()
    await gather(batcher.submit({"x": rows(0, 1)}))
    assert time.monotonic() - start >= 0.19
    await batcher.close()


async def test_preferred_batch_size_closes_the_batch_early():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=64, max_queue_delay_s=60, preferred_batch_sizes=[4, 8])
    await gather(*(batcher.submit({"x": rows(i, 1)}) for i in range(16)))
    assert run.sizes == [8, 8]
    await batcher.close()


async def test_arrivals_during_a_run_form_the_next_batch():
    started, release = threading.Event(), threading.Event()
    run = Recorder()

    def blocking(inputs):
        started.set()
        assert release.wait(WAIT)
        return run(inputs)

    batcher = DynamicBatcher(blocking, max_batch_size=16, max_queue_delay_s=0)
    first = asyncio.ensure_future(batcher.submit({"x": rows(0, 1)}))
    assert await asyncio.to_thread(started.wait, WAIT)
    later = [asyncio.ensure_future(batcher.submit({"x": rows(10 * i, 1)})) for i in range(1, 6)]
    await asyncio.sleep(0)  # let the five enqueue while the only instance is busy
    release.set()
    await gather(first, *later)
    assert run.sizes == [1, 5]
    await batcher.close()


async def test_max_batch_size_bounds_batches_and_refuses_larger_requests():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=16, max_queue_delay_s=60)
    with pytest.raises(BatchTooLargeError, match="17 rows, more than max_batch_size 16"):
        await batcher.submit({"x": rows(0, 17)})
    assert batcher.batches_run == 0
    # two requests of 10 do not fit one batch of 16
    await gather(batcher.submit({"x": rows(0, 10)}), batcher.submit({"x": rows(50, 10)}), batcher.submit({"x": rows(99, 6)}))
    assert run.sizes == [10, 16]
    await batcher.close()


async def test_requests_with_other_trailing_dims_are_not_mixed():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=16, max_queue_delay_s=0)
    narrow, wide = rows(0, 2, width=2), rows(0, 3, width=5)
    a, b = await gather(batcher.submit({"x": narrow}), batcher.submit({"x": wide}))
    np.testing.assert_array_equal(a["y"], narrow * 10)
    np.testing.assert_array_equal(b["y"], wide * 10)
    assert run.sizes == [2, 3]
    await batcher.close()


async def test_a_failing_run_fails_every_request_of_its_batch_only():
    run = Recorder()
    run.fail = ValueError("boom")
    batcher = DynamicBatcher(run, max_batch_size=16, max_queue_delay_s=0.01)
    results = await gather(*(batcher.submit({"x": rows(i, 1)}) for i in range(5)), return_exceptions=True)
    assert [type(r) for r in results] == [ValueError] * 5
    assert all(str(r) == "boom" for r in results)
    assert batcher.batches_run == 1
    run.fail = None
    result = await gather(batcher.submit({"x": rows(7, 1)}))
    np.testing.assert_array_equal(result[0]["y"], rows(7, 1) * 10)
    await batcher.close()


async def test_outputs_without_one_row_per_input_row_are_an_error():
    batcher = DynamicBatcher(lambda inputs: {"y": np.zeros(1)}, max_batch_size=8, max_queue_delay_s=0.01)
    results = await gather(batcher.submit({"x": rows(0, 2)}), batcher.submit({"x": rows(5, 2)}), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "not 4 rows" in str(r) for r in results)
    await batcher.close()


async def test_inputs_must_agree_on_the_batch_size():
    batcher = DynamicBatcher(Recorder(), max_batch_size=8, max_queue_delay_s=0)
    with pytest.raises(TensorError, match="disagree"):
        await batcher.submit({"x": rows(0, 2), "z": rows(0, 3)})
    with pytest.raises(TensorError, match="no inputs"):
        await batcher.submit({})


async def test_close_fails_requests_still_queued():
    run = Recorder()
    batcher = DynamicBatcher(run, max_batch_size=8, max_queue_delay_s=60)
    pending = asyncio.ensure_future(batcher.submit({"x": rows(0, 1)}))
    await asyncio.sleep(0)  # the request enqueues on its first step
    await asyncio.wait_for(batcher.close(), WAIT)
    with pytest.raises(RuntimeError, match="unloaded"):
        await asyncio.wait_for(pending, WAIT)
    assert run.sizes == []


async def test_instances_run_batches_side_by_side():
    both_running = threading.Barrier(2, timeout=WAIT)

    def run(inputs):
        both_running.wait()  # breaks, failing both runs, unless two run at once
        return {"y": inputs["x"]}

    batcher = DynamicBatcher(run, max_batch_size=1, max_queue_delay_s=0, instances=2)
    await gather(batcher.submit({"x": rows(0, 1)}), batcher.submit({"x": rows(1, 1)}))
    assert batcher.batch_sizes == [1, 1]
    await batcher.close()
