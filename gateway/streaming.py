"""Streams of requests at the gateway: run them concurrently, answer in order, bounded.

Both streaming front doors use it: OIP gRPC ``ModelStreamInfer`` (``gateway.oip``) and
``POST /serve/<p>`` with an ``application/x-ndjson`` body (``gateway.api``).

* ``ordered`` runs ``work`` on each item of a stream as it arrives, at most
  ``max_in_flight`` at once, and yields the results in the items' order. Backpressure:
  when ``max_in_flight`` items are started and not yet answered (the oldest may still
  run while later ones are done), the next item is not read, so a sender faster than
  the pipeline is slowed by the transport's flow control (HTTP/2 window, TCP) instead
  of queued in the gateway; a reader slower than the pipeline likewise stops the
  reading, since an answer leaves the window only once it is taken.
* ``ndjson_lines`` cuts a body arriving in chunks into its lines (NDJSON), each at
  most ``max_line_bytes``: a longer one is skipped to its end and reported as
  ``LineTooLong`` in its place, so one bad line costs that line only.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

#: the media type of a streamed records body and of its answer (newline-delimited JSON)
NDJSON = "application/x-ndjson"

T = TypeVar("T")
R = TypeVar("R")


async def ordered(
    source: AsyncIterable[T], work: Callable[[T], Awaitable[R]], max_in_flight: int
) -> AsyncIterator[R]:
    """``work(item)`` for each item of ``source``, at most ``max_in_flight`` started and
    not yet yielded, results yielded in ``source``'s order. ``work`` should answer its
    own failures as results; an exception it raises ends the stream (the other
    items' work is cancelled) and is raised here. Closing the generator (the caller
    went away) cancels the work still running."""
    if max_in_flight < 1:
        raise ValueError("max_in_flight must be at least 1")
    items = aiter(source)
    window: deque[asyncio.Future[R]] = deque()
    reading: asyncio.Future[T] | None = None
    exhausted = False
    try:
        while True:
            if reading is None and not exhausted and len(window) < max_in_flight:
                reading = asyncio.ensure_future(anext(items))
            if reading is None and not window:
                return
            waiting = {f for f in (reading, window[0] if window else None) if f is not None}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if reading is not None and reading.done():
                try:
                    item = reading.result()
                except StopAsyncIteration:
                    exhausted = True
                else:
                    window.append(asyncio.ensure_future(work(item)))
                reading = None
            while window and window[0].done():
                yield window.popleft().result()
    finally:
        for future in (reading, *window):
            if future is not None:
                future.cancel()
        pending = [f for f in (reading, *window) if f is not None]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class Line:
    """One line of an NDJSON body: its number (from 1) and its bytes (no newline)."""

    number: int
    data: bytes


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A line longer than the limit, skipped; its number and the limit."""

    number: int
    limit: int


async def ndjson_lines(chunks: AsyncIterable[bytes], max_line_bytes: int) -> AsyncIterator[Line | LineTooLong]:
    """The non-blank lines of a body arriving in ``chunks`` (``\\n`` or ``\\r\\n``
    ends a line; the last may lack it). A line over ``max_line_bytes`` is never held
    whole: it is dropped as it arrives and yielded as ``LineTooLong``."""
    buffer = bytearray()
    number = 1
    skipping = False  # inside a line over the limit, dropping it up to its newline
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                if not skipping:
                    buffer += chunk[start:]
                    if len(buffer) > max_line_bytes:
                        buffer.clear()
                        skipping = True
                break
            if skipping:
                yield LineTooLong(number, max_line_bytes)
                skipping = False
            else:
                buffer += chunk[start:end]
                if len(buffer) > max_line_bytes:
                    yield LineTooLong(number, max_line_bytes)
                elif buffer.strip():
                    yield Line(number, bytes(buffer))
                buffer.clear()
            number += 1
            start = end + 1
    if skipping:
        yield LineTooLong(number, max_line_bytes)
    elif buffer.strip():
        yield Line(number, bytes(buffer))
