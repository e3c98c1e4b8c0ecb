"""Streaming through the gateway's real Envoy sidecar, on a real mesh: OIP gRPC
``ModelStreamInfer`` with ``tritonclient.grpc``'s own streaming client
(``start_stream``/``async_stream_infer``), and ``POST /serve/<p>`` with an
``application/x-ndjson`` body sent and read at once (aiohttp, chunked both ways).

The mesh: manager, repository, gateway and one scikit runtime serving the iris models
and ``slow_echo`` (``SLOW_S`` a call), each with its Envoy sidecar; the gateway runs at
most ``WINDOW`` requests of a stream at once (``SLUICE_GATEWAY_STREAM_MAX_IN_FLIGHT``)
and takes bodies of at most 64 KiB (an NDJSON stream: each line).

What is checked: answers come in the requests' order and equal the unary answers
(``ModelInfer``, JSON ``/serve``) of the same inputs; the first answer arrives before
the last request is sent (nothing on the path, Envoy included, holds the stream);
a bad request or line gets its error in its place and the stream goes on; while the
oldest request of a stream is slow, no more than ``WINDOW`` of its requests have run;
and the sidecar's routes to the gateway set no timeout that would cut a long stream.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import aiohttp
import httpx
import numpy as np
import orjson
import pytest
import tritonclient.grpc as tgrpc
from sklearn.datasets import load_iris

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.wire import INGRESS
from tests.e2e.slow_model import write_slow_echo

pytestmark = pytest.mark.e2e

FEATURES = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
X = load_iris().data  # 150 x 4 FP64
WINDOW = 4
SLOW_S = 1.5
MAX_BODY = 65536
#: how long any single answer may take to arrive (bounded waits, never a hang)
ANSWER_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    workdir = tmp_path_factory.mktemp("streaming")
    write_slow_echo(workdir / "models", delay_s=SLOW_S)
    mesh = LocalMesh(
        workdir,
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier", "slow_echo"))],
        MeshPorts.ephemeral(),
        env={"SLUICE_GATEWAY_MAX_BODY_BYTES": str(MAX_BODY), "SLUICE_GATEWAY_STREAM_MAX_IN_FLIGHT": str(WINDOW)},
    )
    with mesh:
        for name, chain in (("iris", ["scikit/iris_scaler", "scikit/iris_classifier"]), ("slow", ["scikit/slow_echo"])):
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "chain": chain}, timeout=10)
            assert created.status_code == 201, created.text
        yield mesh


@pytest.fixture(scope="module")
def address(mesh) -> str:
    """The gateway's public port: its Envoy sidecar's ingress."""
    return f"127.0.0.1:{mesh.ports.gateway}"


def iris_inputs(rows: np.ndarray, datatype: str = "FP64") -> list[tgrpc.InferInput]:
    inputs = []
    for i, name in enumerate(FEATURES):
        tensor = tgrpc.InferInput(name, [len(rows)], datatype)
        tensor.set_data_from_numpy(rows[:, i].astype("float64" if datatype == "FP64" else "float32"))
        inputs.append(tensor)
    return inputs


class Stream:
    """One tritonclient gRPC stream; answers (result or error) land in a queue in arrival order."""

    def __init__(self, address: str):
        self.client = tgrpc.InferenceServerClient(address)
        self.answers: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.answers.put((result, error)))

    def send(self, model: str, inputs, request_id: str) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id)

    def next(self, timeout: float = ANSWER_TIMEOUT_S):
        return self.answers.get(timeout=timeout)

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def same_answer(result, unary) -> None:
    assert [v.decode() for v in result.as_numpy("label")] == [v.decode() for v in unary.as_numpy("label")]
    # equal to the last bits or so: concurrent requests are folded into shared runs (gateway.batching),
    # and a model's floating-point rounding (BLAS kernels) may differ with the run's number of rows
    np.testing.assert_allclose(result.as_numpy("probabilities"), unary.as_numpy("probabilities"), rtol=1e-12, atol=1e-15)


def grpc_stream_session(address: str, seed: int) -> None:
    """One client: a stream of iris requests of several sizes with a bad one in the
    middle, each answer checked against the unary ModelInfer of the same rows."""
    rng = np.random.default_rng(seed)
    batches = [X[rng.integers(0, len(X), size=int(rng.integers(1, 40)))] for _ in range(24)]
    stream = Stream(address)
    try:
        stream.send("iris", iris_inputs(batches[0]), "0")
        first, error = stream.next()  # the first answer, before any other request is sent
        assert error is None, error
        assert first.get_response().id == "0"
        bad_at = 12
        for i, rows in enumerate(batches[1:], start=1):
            if i == bad_at:  # FP32 where the pipeline takes FP64
                stream.send("iris", iris_inputs(rows, "FP32"), "bad")
            stream.send("iris", iris_inputs(rows), str(i))
        answers = [stream.next() for _ in range(len(batches))]  # the 23 left and the bad one
    finally:
        stream.close()
    ids = [r.get_response().id if e is None else "error" for r, e in answers]
    assert ids == [str(i) for i in range(1, bad_at)] + ["error"] + [str(i) for i in range(bad_at, len(batches))]
    error = answers[bad_at - 1][1]
    assert "sepal_length" in error.message() and "FP64" in error.message(), error.message()
    unary = tgrpc.InferenceServerClient(address)
    try:
        for (result, _), rows in zip([(first, None), *[a for a in answers if a[1] is None]], batches):
            same_answer(result, unary.infer("iris", iris_inputs(rows)))
    finally:
        unary.close()


def test_grpc_stream_through_envoy_answers_in_order_equal_to_unary_with_errors_in_place(address):
    """Three clients at once, each with its own stream (tritonclient's streaming client)."""
    failures: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            grpc_stream_session(address, seed)
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    if failures:
        raise failures[0]


def served_count(client: tgrpc.InferenceServerClient, pipeline: str) -> int:
    stats = client.get_inference_statistics(pipeline).model_stats
    return sum(s.inference_stats.success.count for s in stats)


def test_grpc_stream_runs_at_most_the_window_while_its_oldest_request_is_slow(address):
    """The first request takes SLOW_S; 30 fast ones follow at once. Until the first is
    answered, the gateway has run only WINDOW - 1 of them (it reads no further: the
    client's sends wait in HTTP/2 flow control); then all are answered, in order."""
    stats = tgrpc.InferenceServerClient(address)
    stream = Stream(address)
    try:
        before = served_count(stats, "iris")
        x = tgrpc.InferInput("x", [1], "FP64")
        x.set_data_from_numpy(np.array([7.0]))
        stream.send("slow", [x], "slow")
        for i in range(30):
            stream.send("iris", iris_inputs(X[i : i + 1]), str(i))
        deadline = time.monotonic() + SLOW_S
        while served_count(stats, "iris") - before < WINDOW - 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        # the slow request is still running: were the gateway unbounded, the 30 fast
        # requests (a few ms each) would all have run by now
        time.sleep(0.3)
        assert stream.answers.empty(), "the slow request was answered too early for this check"
        assert served_count(stats, "iris") - before == WINDOW - 1
        answers = [stream.next() for _ in range(31)]
    finally:
        stream.close()
        stats.close()
    assert [e for _, e in answers] == [None] * 31
    assert [r.get_response().id for r, _ in answers] == ["slow", *map(str, range(30))]
    assert answers[0][0].as_numpy("y").tolist() == [7.0]


# --- NDJSON over HTTP/1.1


def records(rows: np.ndarray) -> list[dict]:
    return [dict(zip(FEATURES, map(float, row))) for row in rows]


async def ndjson_session(url: str, lines: list[bytes]) -> tuple[list, float]:
    """POST the lines as one chunked NDJSON body: the first line alone, the rest only
    once its answer has been read. The answers (parsed), and the body's size."""
    first_answered = asyncio.Event()

    async def body():
        yield lines[0]
        await asyncio.wait_for(first_answered.wait(), ANSWER_TIMEOUT_S)
        for line in lines[1:]:
            yield line

    answers = []
    timeout = aiohttp.ClientTimeout(total=60, sock_read=ANSWER_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.post(f"{url}/serve/iris", data=body(), headers={"content-type": "application/x-ndjson"}) as response:
            assert response.status == 200, await response.text()
            assert response.headers["content-type"] == "application/x-ndjson"
            async for raw in response.content:  # one line at a time
                answers.append(orjson.loads(raw))
                first_answered.set()
    return answers, sum(map(len, lines))


def test_ndjson_through_envoy_answers_in_order_equal_to_json_with_error_lines_in_place(mesh, gateway):
    """Three clients at once; each streams 60 lines (a record, lists of records, bad lines):
    more than the 64 KiB body limit in all, each line under it."""
    rng = np.random.default_rng(1)
    bodies = [orjson.dumps(records(X[:1]))[1:-1]]  # the first line: one record
    bodies += [orjson.dumps(records(X[rng.integers(0, len(X), size=int(rng.integers(1, 60)))])) for _ in range(56)]
    bad = {
        10: (b"{not json", "invalid_input", 422),
        20: (orjson.dumps({"sepal_length": 1.0}), "invalid_input", 422),
        30: (b'{"pad": "' + b"x" * MAX_BODY + b'"}', "payload_too_large", 413),
    }
    lines = [bad.get(i, (b,))[0] + b"\n" for i, b in enumerate(bodies)]
    expected = {i: gateway.post("/serve/iris", content=b, headers={"content-type": "application/json"})
                for i, b in enumerate(bodies) if i not in bad}

    async def clients():
        return await asyncio.gather(*(ndjson_session(mesh.gateway_url, lines) for _ in range(3)))

    for answers, size in asyncio.run(clients()):
        assert size > MAX_BODY
        assert len(answers) == len(lines)
        for i, answer in enumerate(answers):
            if i in bad:
                _, code, status = bad[i]
                assert answer["error"]["code"] == code and answer["error"]["details"]["status"] == status, answer
                assert answer["error"]["details"]["line"] == i + 1
            else:
                assert expected[i].status_code == 200, expected[i].text
                assert answer == expected[i].json(), i


# --- the sidecar's route


def test_gateway_sidecar_sets_no_timeout_that_would_cut_a_long_stream(mesh):
    """The gateway's sidecar in Envoy's own config_dump: its routes to the gateway have
    the route timeout off (Envoy's default would cut any request, a stream included, at
    15 s) and no max stream duration; its listener has no request timeout and only an
    idle timeout (a stream is cut only after that long without a byte either way)."""
    admin = mesh.admin_url("gateway")
    routes = httpx.get(f"{admin}/config_dump?resource=dynamic_route_configs", timeout=5).json()["configs"]
    ingress = next(c["route_config"] for c in routes if c["route_config"]["name"] == INGRESS)
    to_gateway = [r["route"] for v in ingress["virtual_hosts"] for r in v["routes"] if "route" in r]
    assert any(r["cluster"].endswith("_grpc") for r in to_gateway)  # the gRPC API's own route
    for route in to_gateway:
        assert route.get("timeout") == "0s", route
        assert "max_stream_duration" not in route, route
    listeners = httpx.get(f"{admin}/config_dump?resource=dynamic_listeners", timeout=5).text
    listener = next(
        entry["active_state"]["listener"]
        for entry in orjson.loads(listeners)["configs"]
        if entry["name"] == INGRESS
    )
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert "request_timeout" not in hcm or hcm["request_timeout"] == "0s"
    assert "max_stream_duration" not in hcm.get("common_http_protocol_options", {})
    assert hcm["stream_idle_timeout"] == "300s"
