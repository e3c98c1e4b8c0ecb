"""Overload inside a runtime: bounded batching queues (Spark's micro-batcher, Triton's
dynamic batcher) refuse at once when full; the OIP server answers RESOURCE_EXHAUSTED
beyond its in-flight limit and for a full queue; and a slow CPU-bound predict runs
off the event loop, so a health check answers promptly while it runs."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtimes.sdk.model import Model, ModelArtifact
from runtimes.sdk.server import InferenceService, PredictPool
from runtimes.spark.batching import MicroBatcher
from runtimes.triton.batching import DynamicBatcher
from sluice.limits import Overloaded
from sluice.tensors import TensorSpec, to_raw

WAIT_S = 5.0  # bound on every wait for a thread to reach a point


class Gate:
    """A blocking run function that waits (in its worker thread) until released."""

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def wait_here(self) -> None:
        self.calls += 1
        self.started.set()
        assert self.release.wait(WAIT_S), "the test never released the gate"


async def _until(event: threading.Event) -> None:
    deadline = time.monotonic() + WAIT_S
    while not event.is_set():
        assert time.monotonic() < deadline, "the worker thread never started"
        await asyncio.sleep(0.005)


async def test_spark_micro_batcher_refuses_at_once_when_its_queue_is_full() -> None:
    gate = Gate()

    def run_batch(payloads):
        gate.wait_here()
        return [p * 10 for p in payloads]

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(run_batch, executor=pool, max_rows=1, max_delay_s=0.0, max_queue=2)
        running = asyncio.create_task(batcher.submit(1, 1))
        await _until(gate.started)  # the first request is in its (blocked) job, off the queue
        queued = [asyncio.create_task(batcher.submit(n, 1)) for n in (2, 3)]
        await asyncio.sleep(0)  # both are in the queue now
        started = time.perf_counter()
        with pytest.raises(Overloaded, match="2 requests are waiting"):
            await batcher.submit(4, 1)
        assert time.perf_counter() - started < 0.1  # refused at once, not queued
        gate.release.set()
        assert await asyncio.wait_for(asyncio.gather(running, *queued), WAIT_S) == [10, 20, 30]
        await batcher.close()


async def test_triton_dynamic_batcher_refuses_at_once_when_its_queue_is_full() -> None:
    gate = Gate()

    def run(inputs):
        gate.wait_here()
        return {"y": inputs["x"] * 2}

    batcher = DynamicBatcher(run, max_batch_size=1, max_queue_delay_s=0.0, instances=1, max_queue_size=2)
    one = lambda v: {"x": np.array([[v]], dtype=np.float32)}  # noqa: E731
    running = asyncio.create_task(batcher.submit(one(1)))
    await _until(gate.started)
    # the collector holds the next request while it waits for a free instance: it counts as waiting
    queued = [asyncio.create_task(batcher.submit(one(v))) for v in (2, 3)]
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded, match="2 requests are waiting"):
        await batcher.submit(one(4))
    gate.release.set()
    results = await asyncio.wait_for(asyncio.gather(running, *queued), WAIT_S)
    assert [r["y"].item() for r in results] == [2.0, 4.0, 6.0]
    assert gate.calls == 3  # the refused request never ran
    await batcher.close()


def test_batchers_refuse_a_queue_bound_below_one() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda i: i, max_batch_size=1, max_queue_delay_s=0, max_queue_size=0)
    with pytest.raises(ValueError):
        MicroBatcher(lambda p: p, executor=None, max_rows=1, max_delay_s=0, max_queue=0)


# --- the runtime's gRPC server ---------------------------------------------------------------


def _spec() -> list[TensorSpec]:
    return [TensorSpec("x", "FP32", (-1, 1))]


class Spin(Model):
    """A CPU-bound model: holds the CPU (and, between switches, the GIL) for ``seconds``."""

    def __init__(self, tmp_path, seconds: float):
        super().__init__(ModelArtifact("spin", "1", tmp_path), _spec(), [TensorSpec("y", "FP32", (-1, 1))])
        self.seconds = seconds
        self.started = threading.Event()

    async def predict(self, inputs):
        self.started.set()
        end = time.perf_counter() + self.seconds
        n = 0
        while time.perf_counter() < end:
            n += 1
        return {"y": inputs["x"]}


class Held(Model):
    """A model that waits, on the loop, until the test releases it."""

    runs_on_loop = True

    def __init__(self, tmp_path):
        super().__init__(ModelArtifact("held", "1", tmp_path), _spec(), [TensorSpec("y", "FP32", (-1, 1))])
        self.release = asyncio.Event()
        self.entered = 0

    async def predict(self, inputs):
        self.entered += 1
        await self.release.wait()
        return {"y": inputs["x"]}


class Full(Model):
    """A model whose batching queue is full."""

    def __init__(self, tmp_path):
        super().__init__(ModelArtifact("full", "1", tmp_path), _spec(), [TensorSpec("y", "FP32", (-1, 1))])

    async def predict(self, inputs):
        raise Overloaded("1024 requests are waiting for a batch, the limit; retry later")


def _request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1])
    request.raw_input_contents.append(to_raw(np.array([[1.0]], dtype=np.float32))[1])
    return request


async def _serve(models: dict, **options):
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService("limits", "python", models, **options), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return server, f"127.0.0.1:{port}"


class ServerThread:
    """The server on an event loop of its own, in a thread, as in a runtime process: the
    test's client loop is not the server's, so a blocked server loop shows as latency."""

    def __init__(self, models: dict, **options):
        self.models, self.options = models, options
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server, self.address = self.loop.run_until_complete(_serve(self.models, **self.options))
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> str:
        self.thread.start()
        assert self.ready.wait(WAIT_S)
        return self.address

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(WAIT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        self.loop.close()


async def _health_latency_during_spin(tmp_path, pool: PredictPool | None) -> float:
    model = Spin(tmp_path, seconds=1.5)
    with ServerThread({"spin": model}, predict_pool=pool) as address:
        async with grpc.aio.insecure_channel(address) as channel:
            health_stub = health_pb2_grpc.HealthStub(channel)
            await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)  # the channel is up
            infer = asyncio.ensure_future(pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request("spin"), timeout=10))
            await asyncio.to_thread(model.started.wait, WAIT_S)
            started = time.perf_counter()
            answer = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S)
            latency = time.perf_counter() - started
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            assert (await infer).outputs[0].name == "y"
            return latency


async def test_health_check_answers_promptly_while_a_cpu_bound_predict_runs_in_the_pool(tmp_path) -> None:
    pool = PredictPool(2)
    try:
        latency = await _health_latency_during_spin(tmp_path, pool)
    finally:
        pool.close()
    # the predict spins for 1.5 s in a pool thread; the loop only waits for GIL switches (ms)
    assert latency < 0.5, f"health check took {latency:.3f}s while the predict ran"


async def test_without_the_pool_the_same_predict_stalls_the_health_check(tmp_path) -> None:
    """The control for the test above: on the event loop, the predict blocks everything."""
    latency = await _health_latency_during_spin(tmp_path, None)
    assert latency > 1.0


async def test_infer_beyond_the_in_flight_limit_is_resource_exhausted_at_once(tmp_path) -> None:
    model = Held(tmp_path)
    server, address = await _serve({"held": model}, max_in_flight=2)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            holding = [asyncio.ensure_future(stub.ModelInfer(_request("held"), timeout=10)) for _ in range(2)]
            deadline = time.monotonic() + WAIT_S
            while model.entered < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            started = time.perf_counter()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ModelInfer(_request("held"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "limit of 2 inferences" in refused.value.details()
            assert time.perf_counter() - started < 0.5
            # metadata and health are not counted against the limit
            assert (await stub.ModelMetadata(pb.ModelMetadataRequest(name="held"), timeout=WAIT_S)).name == "held"
            model.release.set()
            assert all(r.model_name == "held" for r in await asyncio.gather(*holding))
            assert model.entered == 2  # the refused call never reached the model
            # and once they are done, the limit admits calls again
            assert (await stub.ModelInfer(_request("held"), timeout=WAIT_S)).model_name == "held"
    finally:
        await server.stop(None)


async def test_a_full_batching_queue_is_resource_exhausted(tmp_path) -> None:
    server, address = await _serve({"full": Full(tmp_path)}, predict_pool=None)
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_request("full"), timeout=WAIT_S)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "waiting for a batch" in refused.value.details()
    finally:
        await server.stop(None)
