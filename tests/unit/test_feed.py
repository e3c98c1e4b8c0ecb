"""The incremental pipeline feed, end to end in one process: the manager's real
``PipelineFeed`` on a real ``grpc.aio`` server, and the gateway's real
``watch_pipelines`` + ``PipelineTable`` as its client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable

import grpc
import pytest

import gateway.pipelines as gateway_pipelines
from gateway.pipelines import PipelineTable, compile_pipeline, watch_pipelines
from manager.feed import PipelineFeed
from sluice.plan import Binding, PipelinePlan, StagePlan
from sluice.plan_proto import to_proto
from sluice.tensors import TensorSpec
from sluice.v1 import pipeline_pb2, pipeline_pb2_grpc
from sluice.wire import MODEL_HEADER, PIPELINE_HEADER, ROUTE_HEADER, STAGE_HEADER, route_key

LOGGER = "gateway.pipelines"


def plan(name: str, revision: int = 1) -> PipelinePlan:
    first = StagePlan(
        "scale", "rt-a", "scaler", "", "", 100,
        inputs=(TensorSpec("x", "FP64", (-1, 4)),), outputs=(TensorSpec("scaled", "FP64", (-1, 4)),),
    )
    second = StagePlan(
        "rt-b/classify:2", "rt-b", "classify", "2", "", 250,
        inputs=(TensorSpec("features", "FP64", (-1, 4)),), outputs=(TensorSpec("label", "BYTES", (-1,)),),
        bindings=(Binding("features", "scaled"),),
    )
    return PipelinePlan(name, 0, "http", (first, second)).at_revision(revision)


def plans(n: int) -> list[PipelinePlan]:
    return [plan(f"p{i}") for i in range(n)]


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.005)


class RecordingTable(PipelineTable):
    """The gateway's table, recording each message and what it dropped; can fail once."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[pipeline_pb2.PipelineSet] = []
        self.dropped: list[list[tuple[str, int]]] = []
        self.fail_next: Exception | None = None

    def apply(self, message, deadline_slack_ms):
        self.messages.append(message)
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        dropped = super().apply(message, deadline_slack_ms)
        self.dropped.append(sorted(p.key for p in dropped))
        return dropped

    def revisions(self) -> dict[str, int]:
        return {name: p.revision for name, p in self.pipelines.items()}


def revisions(feed: PipelineFeed) -> dict[str, int]:
    return {name: p.revision for name, p in feed.pipelines.items()}


class Manager:
    """The feed served over gRPC; stoppable and restartable on the same port."""

    def __init__(self, feed: PipelineFeed) -> None:
        self.feed = feed
        self.port = 0
        self.server: grpc.aio.Server | None = None

    async def start(self, feed: PipelineFeed | None = None) -> None:
        self.feed = feed or self.feed
        self.server = grpc.aio.server()
        pipeline_pb2_grpc.add_PipelineDiscoveryServicer_to_server(self.feed, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(None)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def mesh(feed: PipelineFeed):
    manager = Manager(feed)
    await manager.start()
    table = RecordingTable()
    watcher = asyncio.create_task(watch_pipelines(table, manager.address, "gw-1", 0))
    try:
        await synced(manager.feed, table, feed.version)
        yield manager, table
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await manager.stop()


async def synced(feed: PipelineFeed, table: RecordingTable, version: int) -> None:
    """The gateway serves ``version`` and the feed has its acknowledgement."""
    await until(lambda: feed.gateways >= 1 and table.version == str(version))
    assert await feed.wait_acked(version, 10)
    assert table.revisions() == revisions(feed)


# --- the table alone -----------------------------------------------------------------


def full(version: int, *ps: PipelinePlan) -> pipeline_pb2.PipelineSet:
    return pipeline_pb2.PipelineSet(version=str(version), pipelines=[to_proto(p) for p in ps], full=True)


def delta(version: int, *ps: PipelinePlan, removed: tuple[str, ...] = ()) -> pipeline_pb2.PipelineSet:
    return pipeline_pb2.PipelineSet(version=str(version), pipelines=[to_proto(p) for p in ps], removed=removed)


def keys(dropped) -> list[tuple[str, int]]:
    return sorted(p.key for p in dropped)


def test_compiled_from_the_plan_with_the_wire_headers() -> None:
    compiled = compile_pipeline(plan("a", 3), deadline_slack_ms=1000)
    assert compiled.key == ("a", 3)
    first, second = compiled.stages
    assert second.metadata == ((ROUTE_HEADER, route_key("a", 3, 1)), (PIPELINE_HEADER, "a"), (STAGE_HEADER, "1"), (MODEL_HEADER, "classify"))
    assert second.sources == ("scaled",) and first.sources == ("x",)
    assert (second.version, second.timeout_s, compiled.max_duration_s) == ("2", 1.25, 2.35)
    assert compiled.inputs == (TensorSpec("x", "FP64", (-1, 4)),)


def test_table_full_replaces_and_delta_touches_only_what_it_names() -> None:
    table = PipelineTable()
    assert keys(table.apply(full(1, plan("a"), plan("b"), plan("c")), 0)) == []
    a = table.get("a")
    assert keys(table.apply(delta(2, plan("b", 2), plan("d"), removed=("c", "unknown")), 0)) == [("b", 1), ("c", 1)]
    assert table.get("a") is a  # untouched, not recompiled
    assert {n: p.revision for n, p in table.pipelines.items()} == {"a": 1, "b": 2, "d": 1}
    # the same revision sent again drops nothing: requests on it stay valid
    assert keys(table.apply(delta(3, plan("a")), 0)) == []
    # a full set drops exactly the revisions it does not carry
    assert keys(table.apply(full(4, plan("a"), plan("b", 3)), 0)) == [("b", 2), ("d", 1)]
    assert table.version == "4" and table.ready.is_set()


def test_a_delta_that_fails_to_compile_changes_nothing(monkeypatch) -> None:
    table = PipelineTable()
    table.apply(full(1, plan("a"), plan("b")), 0)
    before = dict(table.pipelines)
    real = gateway_pipelines.compile_pipeline

    def compile_or_fail(p, *args):
        if p.name == "bad":
            raise ValueError("bad plan")
        return real(p, *args)

    monkeypatch.setattr(gateway_pipelines, "compile_pipeline", compile_or_fail)
    with pytest.raises(ValueError):
        table.apply(delta(2, plan("a", 2), plan("bad"), removed=("b",)), 0)
    assert table.pipelines == before and table.version == "1"


async def test_feed_validates_and_skips_empty_changes() -> None:
    feed = PipelineFeed([plan("a")])
    with pytest.raises(ValueError):
        await feed.publish([plan("a", 2)], ["a"])
    assert await feed.publish([plan("a")]) == 0  # equal to the current plan
    assert await feed.publish(removed=["nope"]) == 0
    assert await feed.publish([plan("b")]) == 1
    with pytest.raises(TypeError):
        feed.pipelines["c"] = plan("c")  # type: ignore[index]
    assert revisions(feed) == {"a": 1, "b": 1}


# --- feed and gateway over gRPC ------------------------------------------------------


async def test_new_gateway_gets_the_full_set() -> None:
    async with mesh(PipelineFeed(plans(2000))) as (manager, table):
        assert manager.feed.gateways == 1
        [first] = table.messages
        assert first.full and first.version == "0" and len(first.pipelines) == 2000 and not first.removed
        assert table.get("p7").stages[1].metadata[0] == (ROUTE_HEADER, "p7.r1.s1")
        assert table.ready.is_set()


async def test_each_change_is_a_delta_of_only_that_change() -> None:
    async with mesh(PipelineFeed(plans(2000))) as (manager, table):
        feed = manager.feed
        whole = table.messages[0].ByteSize()

        async def change(**kwargs) -> pipeline_pb2.PipelineSet:
            before = len(table.messages)
            version = await feed.publish(**kwargs)
            await synced(feed, table, version)
            assert len(table.messages) == before + 1
            message = table.messages[-1]
            assert not message.full and message.version == str(version)
            return message

        created = await change(upserts=[plan("new")])
        assert [p.name for p in created.pipelines] == ["new"] and not created.removed
        assert created.ByteSize() * 1000 < whole
        assert table.dropped[-1] == []

        replaced = await change(upserts=[plan("p5", 2)])
        assert [(p.name, p.revision) for p in replaced.pipelines] == [("p5", 2)] and not replaced.removed
        assert table.dropped[-1] == [("p5", 1)]

        deleted = await change(removed=["p6"])
        assert not deleted.pipelines and list(deleted.removed) == ["p6"]
        assert deleted.ByteSize() < 20
        assert table.dropped[-1] == [("p6", 1)]

        # a bulk apply: one version, one message
        bulk = await change(upserts=[plan(f"p{i}", 2) for i in range(1000, 1500)] + [plan(f"q{i}") for i in range(500)],
                            removed=[f"p{i}" for i in range(10, 20)])
        assert len(bulk.pipelines) == 1000 and len(bulk.removed) == 10
        assert len(table.dropped[-1]) == 510


async def test_a_slow_gateway_gets_one_coalesced_delta() -> None:
    async with mesh(PipelineFeed(plans(2000))) as (manager, table):
        feed = manager.feed
        running = table.get("p0")
        table.enter(running)  # a request still runs on p0 r1: the gateway drains before it acks
        draining = await feed.publish([plan("p0", 2)])
        await until(lambda: table.version == str(draining))
        sent = len(table.messages)

        await feed.publish([plan("x1")])
        await feed.publish([plan("p1", 2)])
        await feed.publish([plan("p1", 3)])
        await feed.publish(removed=["p2"])
        await feed.publish([plan("x2")])
        await feed.publish(removed=["x2"])
        await feed.publish(removed=["p3"])
        last = await feed.publish([plan("p3", 5)])
        assert last == draining + 8

        table.leave(running)
        await synced(feed, table, last)
        assert len(table.messages) == sent + 1
        coalesced = table.messages[-1]
        assert not coalesced.full and coalesced.version == str(last)
        assert sorted((p.name, p.revision) for p in coalesced.pipelines) == [("p1", 3), ("p3", 5), ("x1", 1)]
        assert sorted(coalesced.removed) == ["p2", "x2"]
        assert table.dropped[-1] == [("p1", 1), ("p2", 1), ("p3", 1)]


@pytest.mark.parametrize(("behind", "full_set"), [(4, False), (5, True)])
async def test_a_gateway_behind_the_history_gets_the_full_set(behind: int, full_set: bool) -> None:
    async with mesh(PipelineFeed(plans(50), history=4)) as (manager, table):
        feed = manager.feed
        running = table.get("p0")
        table.enter(running)
        draining = await feed.publish([plan("p0", 2)])
        await until(lambda: table.version == str(draining))
        for i in range(behind):
            last = await feed.publish([plan(f"p{i + 1}", 2)], removed=[f"p{i + 20}"])
        table.leave(running)
        await synced(feed, table, last)
        message = table.messages[-1]
        assert message.full == full_set
        assert len(message.pipelines) == (50 - behind if full_set else behind)
        assert table.dropped[-1] == sorted([(f"p{i + 1}", 1) for i in range(behind)] + [(f"p{i + 20}", 1) for i in range(behind)])


async def test_a_delta_larger_than_the_set_is_sent_as_the_set() -> None:
    async with mesh(PipelineFeed(plans(10))) as (manager, table):
        feed = manager.feed
        running = table.get("p0")
        table.enter(running)
        draining = await feed.publish([plan("p0", 2)])
        await until(lambda: table.version == str(draining))
        for revision in (2, 3):
            for i in range(1, 10):
                last = await feed.publish([plan(f"p{i}", revision)])
        table.leave(running)
        await synced(feed, table, last)
        assert table.messages[-1].full and len(table.messages[-1].pipelines) == 10


async def test_acknowledged_only_once_applied_and_drained() -> None:
    async with mesh(PipelineFeed(plans(10))) as (manager, table):
        feed = manager.feed
        running = [table.get("p0"), table.get("p1")]
        for p in running:
            table.enter(p)
        version = await feed.publish([plan("p0", 2)], removed=["p1"])
        await until(lambda: table.version == str(version))
        # new requests already get the new revision; the old one is still running
        assert table.get("p0").revision == 2 and table.get("p1") is None
        assert not await feed.wait_acked(version, 0.1)
        table.leave(running[0])
        assert not await feed.wait_acked(version, 0.1)
        table.leave(running[1])
        assert await feed.wait_acked(version, 10)
        assert table.dropped[-1] == [("p0", 1), ("p1", 1)]


async def test_a_stream_that_never_acknowledges_blocks_no_one() -> None:
    async with mesh(PipelineFeed(plans(100))) as (manager, table):
        feed = manager.feed
        silent = asyncio.Event()

        async def never_ack():
            yield pipeline_pb2.WatchRequest(node_id="silent")
            await silent.wait()
            yield pipeline_pb2.WatchRequest(node_id="silent", ack_version="0")
            await asyncio.Event().wait()

        received: list[pipeline_pb2.PipelineSet] = []
        async with grpc.aio.insecure_channel(manager.address) as channel:
            call = pipeline_pb2_grpc.PipelineDiscoveryStub(channel).Watch(never_ack())

            async def read():
                async for message in call:
                    received.append(message)

            reader = asyncio.create_task(read())
            await until(lambda: feed.gateways == 2 and len(received) == 1)
            assert received[0].full and len(received[0].pipelines) == 100

            for i in range(20):
                version = await asyncio.wait_for(feed.publish([plan(f"n{i}")]), 1)
                await until(lambda: table.version == str(version))  # the other gateway keeps up
            assert not await feed.wait_acked(version, 0.1)
            assert len(received) == 1  # nothing queued for the silent stream

            silent.set()  # it acknowledges the full set at last: one delta catches it up
            await until(lambda: len(received) == 2)
            assert not received[1].full and received[1].version == str(version)
            assert sorted(p.name for p in received[1].pipelines) == sorted(f"n{i}" for i in range(20))

            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await until(lambda: feed.gateways == 1)
        assert await feed.wait_acked(version, 10)


async def test_gateway_reconnects_after_the_manager_restarts(caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with mesh(PipelineFeed(plans(20))) as (manager, table):
        feed = manager.feed
        await manager.stop()
        await until(lambda: feed.gateways == 0)
        await until(lambda: any("reconnecting" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records))
        version = await feed.publish([plan("p0", 2)], removed=["p1"])
        assert table.get("p0").revision == 1 and table.get("p1") is not None  # the last set keeps being served

        caplog.clear()
        await manager.start()
        await synced(feed, table, version)
        assert table.messages[-1].full
        assert table.dropped[-1] == [("p0", 1), ("p1", 1)]
        assert any("connected to" in r.getMessage() for r in caplog.records)

        # a new manager (its versions start again) is served as it is
        await manager.stop()
        await until(lambda: feed.gateways == 0)
        restarted = PipelineFeed([plan("p0", 3), plan("z")])
        await manager.start(restarted)
        await synced(restarted, table, 0)
        assert table.revisions() == {"p0": 3, "z": 1}


async def test_gateway_reconnects_after_a_failure_inside_apply(caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    async with mesh(PipelineFeed(plans(20))) as (manager, table):
        feed = manager.feed
        table.fail_next = RuntimeError("injected failure")
        version = await feed.publish([plan("p0", 2)])
        await until(lambda: table.version == str(version))
        assert table.messages[-2].version == str(version) and not table.messages[-2].full  # the one that failed
        assert table.messages[-1].full  # the reconnect's
        await synced(feed, table, version)
        assert feed.gateways == 1
        [failure] = [r for r in caplog.records if r.exc_info and "injected failure" in str(r.exc_info[1])]
        assert failure.levelno == logging.ERROR and "reconnecting" in failure.getMessage()


async def test_a_silent_stream_costs_one_receipt_timeout_while_a_draining_gateway_is_waited_for() -> None:
    """Two deadlines: a stream that does not even say it received what it was sent is waited
    for once (the receipt timeout) and then not at all until it catches up; a gateway that
    received a change and is draining requests on a revision it dropped is waited for past
    the receipt timeout, up to the drain timeout."""
    def slow(revision: int) -> PipelinePlan:  # stages of 5 s: its requests may drain that long
        return dataclasses.replace(plan("slow", revision), stages=tuple(dataclasses.replace(s, timeout_ms=5000) for s in plan("slow", revision).stages))

    async with mesh(PipelineFeed([*plans(10), slow(1)])) as (manager, table):
        feed = manager.feed

        async def silent():
            yield pipeline_pb2.WatchRequest(node_id="silent")  # then nothing, ever
            await asyncio.Event().wait()

        received: list[pipeline_pb2.PipelineSet] = []
        async with grpc.aio.insecure_channel(manager.address) as channel:
            call = pipeline_pb2_grpc.PipelineDiscoveryStub(channel).Watch(silent())

            async def read():
                async for message in call:
                    received.append(message)

            reader = asyncio.create_task(read())
            await until(lambda: feed.gateways == 2 and len(received) == 1)

            first = await feed.publish([plan("n1")])
            started = time.monotonic()
            assert not await feed.wait_acked(first, 0.3, 5)  # the silent one never acknowledged
            assert 0.25 <= time.monotonic() - started < 2
            assert table.version == str(first)  # the real gateway is served and acknowledged

            second = await feed.publish([plan("n2")])
            await until(lambda: table.version == str(second))
            started = time.monotonic()
            await feed.wait_acked(second, 0.3, 5)
            assert time.monotonic() - started < 0.25  # no longer waited for

            running = table.get("slow")
            table.enter(running)
            third = await feed.publish([slow(2)])
            waiter = asyncio.create_task(feed.wait_acked(third, 0.2, 5))
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), 0.6)  # past the receipt timeout: still waiting
            table.leave(running)
            await asyncio.wait_for(waiter, 2)  # done as soon as the gateway drained
            assert table.version == str(third)

            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def test_wait_acked_names_the_silent_and_the_still_draining_gateways() -> None:
    """The answer says who did not confirm: a stream that never said it received the version
    (``silent``, by its node id) and a gateway still draining when the drain timeout ran
    out (``behind``); it is true only when no one is missing."""
    async with mesh(PipelineFeed(plans(3))) as (manager, table):
        feed = manager.feed

        async def silent():
            yield pipeline_pb2.WatchRequest(node_id="gw-silent")
            await asyncio.Event().wait()

        async with grpc.aio.insecure_channel(manager.address) as channel:
            call = pipeline_pb2_grpc.PipelineDiscoveryStub(channel).Watch(silent())
            reader = asyncio.create_task(call.read())
            await until(lambda: feed.gateways == 2)
            running = table.get("p0")
            table.enter(running)  # gw-1 drains p0 r1 until this request leaves
            version = await feed.publish([plan("p0", 2)])
            ack = await feed.wait_acked(version, 0.1, 0.2)  # its stages allow 0.35 s of draining
            assert not ack and not ack.ok
            assert (ack.version, ack.silent, ack.behind) == (version, ("gw-silent",), ("gw-1",))
            table.leave(running)
            ack = await feed.wait_acked(version, 0.2, 5)
            assert (ack.silent, ack.behind) == (("gw-silent",), ())  # gw-1 drained and acknowledged
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
        await until(lambda: feed.gateways == 1)
        assert (await feed.wait_acked(version, 1)).ok


async def test_a_held_feed_sends_nothing_until_released() -> None:
    """A restarted manager holds its feed until Envoy has the routes: a gateway that connects
    meanwhile gets nothing (and keeps serving what it had), then the whole set on release."""
    feed = PipelineFeed(plans(5), held=True)
    manager = Manager(feed)
    await manager.start()
    table = RecordingTable()
    watcher = asyncio.create_task(watch_pipelines(table, manager.address, "gw-1", 0))
    try:
        assert await feed.wait_connected(10)
        await asyncio.sleep(0.3)  # a message would have arrived by now if one were sent
        assert feed.held and table.messages == [] and not table.ready.is_set()
        await feed.release()
        await synced(feed, table, feed.version)
        assert not feed.held and table.messages[0].full and len(table.messages[0].pipelines) == 5
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await manager.stop()


async def test_wait_connected_times_out_with_no_gateway() -> None:
    assert not await PipelineFeed(plans(1)).wait_connected(0.05)


async def test_a_gateway_that_stops_answering_is_named_within_the_receipt_timeout() -> None:
    """A gateway that received every version so far and then goes silent (a stopped
    process) is reported after the receipt timeout, not after the drain timeout, also
    when no other gateway's answer wakes the wait."""
    feed = PipelineFeed(plans(3))
    manager = Manager(feed)
    await manager.start()

    async def answers_once():
        yield pipeline_pb2.WatchRequest(node_id="gw-stopped")
        yield pipeline_pb2.WatchRequest(node_id="gw-stopped", received_version="0")
        yield pipeline_pb2.WatchRequest(node_id="gw-stopped", ack_version="0")
        await asyncio.Event().wait()  # then stopped

    try:
        async with grpc.aio.insecure_channel(manager.address) as channel:
            call = pipeline_pb2_grpc.PipelineDiscoveryStub(channel).Watch(answers_once())
            reader = asyncio.create_task(call.read())
            await until(lambda: feed.gateways == 1)
            assert (await feed.wait_acked(0, 5)).ok
            version = await feed.publish([plan("p0", 2)])
            started = time.monotonic()
            ack = await feed.wait_acked(version, 0.3, 30)
            assert ack.silent == ("gw-stopped",) and time.monotonic() - started < 2
            call.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader
    finally:
        await manager.stop()
