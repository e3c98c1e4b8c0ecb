"""The manager's gateway feed never swallows the failure of a stream's acknowledgement
reader: the stream ends and the log says which stream and why (it used to be dropped
by a ``suppress(Exception)``)."""

from __future__ import annotations

import asyncio
import logging

from manager.feed import PipelineFeed
from sluice.v1 import pipeline_pb2
from tests.unit.test_feed import plan


class _Context:
    def __init__(self) -> None:
        self.written: list[pipeline_pb2.PipelineSet] = []

    def peer(self) -> str:
        return "ipv4:192.0.2.7:5000"

    async def write(self, message) -> None:
        self.written.append(message)


async def test_a_failing_acknowledgement_reader_ends_the_stream_and_is_logged(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="manager.feed")
    feed = PipelineFeed([plan("a")])
    context = _Context()

    async def requests():
        yield pipeline_pb2.WatchRequest(node_id="gateway")
        await asyncio.sleep(0.05)  # the full set goes out first
        raise RuntimeError("decoder blew up")

    await asyncio.wait_for(feed.Watch(requests(), context), 5)
    assert [m.full for m in context.written] == [True]
    assert "reading its acknowledgements failed: RuntimeError: decoder blew up" in caplog.text
    assert "192.0.2.7" in caplog.text
    assert feed.gateways == 0  # the stream is gone
