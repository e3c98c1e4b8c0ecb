"""Micro-batching: concurrent requests to one model become one job.

Requests wait in an asyncio queue; one worker task per model takes the first, then
everything that arrived meanwhile (requests pile up while a job runs) and whatever
comes within ``max_delay_s``, up to ``max_rows`` rows, and runs them as one job in a
thread. If a batch fails, its requests are retried one by one, so one bad request
fails alone.

The queue is bounded: with ``max_queue`` requests waiting, one more is refused at once
with ``sluice.limits.Overloaded`` (the runtime answers RESOURCE_EXHAUSTED), never
queued without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from sluice.limits import Overloaded

In = TypeVar("In")
Out = TypeVar("Out")

#: requests waiting for a batch, unless the batcher is given another bound
DEFAULT_MAX_QUEUE = 1024
#: how many recent batch sizes ``batch_sizes`` keeps
RECENT_BATCHES = 1000


@dataclass
class _Request(Generic[In]):
    payload: In
    rows: int
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[In, Out]):
    """Runs ``run_batch(payloads) -> results`` (same order) over batches of concurrent requests."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[In]], Sequence[Out]],
        *,
        executor: Executor,
        max_rows: int,
        max_delay_s: float,
        max_queue: int = DEFAULT_MAX_QUEUE,
    ):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self._run_batch = run_batch
        self.max_queue = max_queue
        self._executor = executor
        self._max_rows = max_rows
        self._max_delay_s = max_delay_s
        self._queue: asyncio.Queue[_Request[In]] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: sizes (in requests) of the most recent batches (at least RECENT_BATCHES of them)
        self.batch_sizes: list[int] = []

    async def submit(self, payload: In, rows: int) -> Out:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._work(), name="spark-micro-batcher")
        if self._queue.qsize() >= self.max_queue:
            raise Overloaded(f"{self._queue.qsize()} requests are waiting for a batch, the limit; retry later")
        future = loop.create_future()
        self._queue.put_nowait(_Request(payload, rows, future))
        return await future

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        # a worker of another (finished) event loop went away with its loop
        if worker is None or worker.done() or worker.get_loop() is not asyncio.get_running_loop():
            return
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker

    async def _work(self) -> None:
        queue, loop = self._queue, asyncio.get_running_loop()
        carry: _Request[In] | None = None
        while True:
            first = carry or await queue.get()
            carry = None
            batch, rows = [first], first.rows
            deadline = loop.time() + self._max_delay_s
            while rows < self._max_rows:
                try:
                    request = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        request = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                if rows + request.rows > self._max_rows:
                    carry = request  # it starts the next batch
                    break
                batch.append(request)
                rows += request.rows
            await self._run(batch)

    async def _run(self, batch: list[_Request[In]]) -> None:
        live = [r for r in batch if not r.future.done()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        self.batch_sizes.append(len(live))
        if len(self.batch_sizes) > 2 * RECENT_BATCHES:
            del self.batch_sizes[:-RECENT_BATCHES]
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [r.payload for r in live])
        except Exception as exc:
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            for request in live:
                await self._run([request])
            return
        for request, result in zip(live, results):
            if not request.future.done():
                request.future.set_result(result)
