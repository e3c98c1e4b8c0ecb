"""A generic asyncio dynamic batcher, in the manner of Triton's dynamic batching.

Concurrent requests are queued; a collector takes the oldest one and adds the
requests behind it while the batch is below its target size (the largest preferred
batch size, else ``max_batch_size``) and the oldest request has waited less than
the max queue delay. The batch is concatenated along the first (batch) dimension,
run once in a worker thread (never on the event loop), and each caller gets back
exactly its own rows. Only requests whose inputs have the same names, dtypes and
non-batch dimensions share a batch. If the run fails, every request of that batch
gets the error; the batcher itself carries on. A request with more rows than
``max_batch_size`` is refused before it is queued.

``instances`` batches may run at once (Triton's instance_group count); while all
are busy, arrivals keep queueing and form the next batch, so the batch size grows
with the load, up to a bound: with ``max_queue_size`` requests waiting (Triton's
``default_queue_policy.max_queue_size``; here never unbounded), one more is refused
at once with ``sluice.limits.Overloaded`` (the runtime answers RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from sluice.limits import Overloaded
from sluice.tensors import TensorError

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


# how late an event-loop timer may fire: selectors wait in whole milliseconds
_TIMER_SLACK_S = 0.001
#: requests waiting for a batch, unless the batcher is given another bound
DEFAULT_MAX_QUEUE_SIZE = 1024
#: how many recent batch sizes ``batch_sizes`` keeps
RECENT_BATCHES = 1000


class BatchTooLargeError(TensorError):
    """A request with more rows than the model's max_batch_size."""


def batch_rows(inputs: Arrays) -> int:
    """The batch size shared by every input (its first dimension)."""
    if not inputs:
        raise TensorError("the request has no inputs")
    sizes = {name: (a.shape[0] if a.ndim else None) for name, a in inputs.items()}
    if None in sizes.values():
        raise TensorError(f"inputs need a batch dimension, got scalars for {[n for n, s in sizes.items() if s is None]}")
    if len(set(sizes.values())) > 1:
        raise TensorError(f"inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))


def check_batch_size(rows: int, max_batch_size: int) -> None:
    if rows > max_batch_size:
        raise BatchTooLargeError(f"the request has {rows} rows, more than max_batch_size {max_batch_size}")


def run_batch(run: RunFn, requests: Sequence[Arrays]) -> list[Arrays]:
    """Concatenate, run once, and split the outputs back per request (worker thread)."""
    sizes = [batch_rows(r) for r in requests]
    if len(requests) == 1:
        joined = requests[0]
    else:
        joined = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
    outputs = run(joined)
    total = sum(sizes)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise RuntimeError(f"output {name!r} has shape {list(array.shape)}, not {total} rows for a batch of {total}")
    bounds = np.cumsum(sizes)[:-1]
    per_output = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: parts[i] for name, parts in per_output.items()} for i in range(len(requests))]


@dataclass(eq=False)
class _Pending:
    inputs: Arrays
    rows: int
    key: tuple
    enqueued: float
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Batch concurrent ``submit`` calls into runs of ``run`` (a blocking function)."""

    def __init__(
        self,
        run: RunFn,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        preferred_batch_sizes: Sequence[int] = (),
        instances: int = 1,
        executor: Executor | None = None,
        max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE,
    ):
        if max_batch_size < 1:
            raise ValueError("dynamic batching needs max_batch_size >= 1")
        if max_queue_delay_s < 0:
            raise ValueError("max_queue_delay_s must be >= 0")
        if max_queue_size < 1:
            raise ValueError("max_queue_size must be at least 1")
        self.max_queue_size = max_queue_size
        self._run = run
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        preferred = [p for p in preferred_batch_sizes if 0 < p <= max_batch_size]
        self.target_batch_size = max(preferred, default=max_batch_size)
        self._instances = max(1, instances)
        self._executor = executor
        #: model runs so far, and the rows each of the most recent ones (at least
        #: RECENT_BATCHES) carried, most recent last
        self.batches_run = 0
        self.batch_sizes: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Pending]
        self._slots: asyncio.Semaphore
        self._collector: asyncio.Task | None = None
        self._held: list[_Pending] = []
        self._running: set[asyncio.Task] = set()

    async def submit(self, inputs: Arrays) -> Arrays:
        """Queue one request and wait for its own rows of the batch's outputs."""
        rows = batch_rows(inputs)
        check_batch_size(rows, self.max_batch_size)
        loop = asyncio.get_running_loop()
        self._start(loop)
        waiting = self._queue.qsize() + len(self._held)
        if waiting >= self.max_queue_size:
            raise Overloaded(f"{waiting} requests are waiting for a batch, the limit; retry later")
        key = tuple(sorted((n, a.dtype.str, a.shape[1:]) for n, a in inputs.items()))
        pending = _Pending(inputs, rows, key, loop.time(), loop.create_future())
        self._queue.put_nowait(pending)
        return await pending.future

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        # (re)start on the caller's loop: a model may outlive the loop that first used it
        if self._loop is loop and self._collector is not None and not self._collector.done():
            return
        self._loop = loop
        self._queue = asyncio.Queue()
        self._slots = asyncio.Semaphore(self._instances)
        self._held = []
        self._collector = loop.create_task(self._collect(), name="dynamic-batcher")

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        # taken from the queue, not yet dispatched: close() fails these
        held = self._held
        while True:
            if not held:
                held.append(await self._queue.get())
            first = held[0]
            if first.future.done():  # its caller gave up
                held.clear()
                continue
            await self._slots.acquire()
            rows, carry = first.rows, None
            deadline = first.enqueued + self.max_queue_delay_s
            while rows < self.target_batch_size:
                item = await self._next_before(deadline)
                if item is None:
                    break
                if item.future.done():
                    continue
                if item.key != first.key or rows + item.rows > self.max_batch_size:
                    carry = item
                    break
                held.append(item)
                rows += item.rows
            task = loop.create_task(self._execute(list(held), rows))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            held[:] = [carry] if carry else []

    async def _next_before(self, deadline: float) -> _Pending | None:
        """The next queued request, waiting for one until ``deadline`` (loop time)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            if remaining > _TIMER_SLACK_S:
                try:
                    return await asyncio.wait_for(self._queue.get(), remaining - _TIMER_SLACK_S)
                except TimeoutError:
                    continue
            # the loop's timers round up to whole milliseconds (epoll), which would
            # stretch a 100 us delay tenfold: poll through the last millisecond instead
            await asyncio.sleep(0)

    async def _execute(self, batch: list[_Pending], rows: int) -> None:
        self.batches_run += 1
        self.batch_sizes.append(rows)
        if len(self.batch_sizes) > 2 * RECENT_BATCHES:
            del self.batch_sizes[:-RECENT_BATCHES]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, run_batch, self._run, [p.inputs for p in batch]
            )
        except Exception as exc:
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        else:
            for p, result in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(result)
        finally:
            self._slots.release()

    async def close(self) -> None:
        """Stop collecting, let running batches finish, fail what is still queued."""
        if self._collector is None or self._loop is not asyncio.get_running_loop():
            self._collector = None
            return
        self._collector.cancel()
        await asyncio.gather(self._collector, *self._running, return_exceptions=True)
        self._collector = None
        while not self._queue.empty():
            self._held.append(self._queue.get_nowait())
        for pending in self._held:
            if not pending.future.done():
                pending.future.set_exception(RuntimeError("the model was unloaded before this request ran"))
        self._held = []
