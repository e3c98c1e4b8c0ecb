"""Runtimes load and unload models at run time: OIP's model-repository extension.

Real parts: the model repository runs as its own process (``python -m repository``)
over a temporary model root; the scikit and triton runtimes run as processes
(``python -m runtimes.scikit`` / ``runtimes.triton``, not registering anywhere), and
are driven with Triton's own client (``tritonclient.grpc``) exactly as a Triton
server would be. The cases that need to hold a model mid-call (in-flight requests
across an unload, a loader held open) run the SDK's grpc.aio server in-process with
``tritonclient.grpc.aio``, still against the real repository.

Every process is stopped by PID at the end, also on failure; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import joblib
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from prometheus_client import REGISTRY
from sklearn.linear_model import LogisticRegression
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from models.train_iris import iris_data
from runtimes.scikit.model import load as sklearn_load
from runtimes.sdk.consul import ConsulRegistration
from runtimes.sdk.model import Model, ModelArtifact
from runtimes.sdk.models import ModelSet
from runtimes.sdk.registration import Registration
from runtimes.sdk.repository import ModelRepository
from tests.runtime_server import served
from sluice.local.procs import Proc, Supervisor, free_port, grpc_serving, http_ok, wait_until
from sluice.tensors import TensorSpec
from tests.conftest import ROOT, STORE, TRITON_REPOSITORY

X, _ = iris_data()
ROWS = X[::7]  # 22 rows across the three classes


# --- the model root, the repository process, runtime processes


@dataclass
class Root:
    store: Path
    triton: Path
    scaler: object  # iris_scaler, as saved
    v1: object  # iris_classifier versions 1 and 2, as saved
    v2: object

    @property
    def scaled(self) -> np.ndarray:
        """ROWS as iris_classifier reads them."""
        return self.scaler.transform(ROWS)


@pytest.fixture(scope="module")
def root(tmp_path_factory, model_store) -> Root:
    """iris_scaler 1, iris_classifier 1 and 2 (a different C), a broken model, and mlp (Triton layout)."""
    base = tmp_path_factory.mktemp("runtime-repo")
    store, triton = base / "store", base / "triton"
    for name in ("iris_scaler", "iris_classifier"):
        shutil.copytree(STORE / name / "1", store / name / "1")
    shutil.copytree(TRITON_REPOSITORY / "mlp", triton / "mlp")

    scaler = joblib.load(store / "iris_scaler" / "1" / "model.joblib")
    v1 = joblib.load(store / "iris_classifier" / "1" / "model.joblib")
    v2 = LogisticRegression(C=0.02, max_iter=1000).fit(scaler.transform(X), v1.predict(scaler.transform(X)))
    shutil.copytree(store / "iris_classifier" / "1", store / "iris_classifier" / "2")
    joblib.dump(v2, store / "iris_classifier" / "2" / "model.joblib")
    scaled = scaler.transform(ROWS)
    assert not np.allclose(v1.predict_proba(scaled), v2.predict_proba(scaled), atol=1e-3)  # two tellable versions

    shutil.copytree(store / "iris_classifier" / "1", store / "broken_model" / "1")
    (store / "broken_model" / "1" / "model.joblib").write_bytes(b"not a joblib file\x00\x01\x02" * 10)
    return Root(store, triton, scaler, v1, v2)


@pytest.fixture(scope="module")
def procs(tmp_path_factory) -> Iterator[Supervisor]:
    supervisor = Supervisor(tmp_path_factory.mktemp("runtime-repo-logs"))
    try:
        yield supervisor
    finally:
        supervisor.stop_all()  # by PID, SIGTERM then SIGKILL


# what every child process must not inherit from a developer's shell
QUIET_ENV = {"SLUICE_CONSUL_ADDR": "", "SLUICE_ZIPKIN_URL": "", "SLUICE_RUNTIME_MANAGER_URL": ""}


@pytest.fixture(scope="module")
def repository(root: Root, procs: Supervisor) -> str:
    port = free_port()
    env = {**QUIET_ENV, "SLUICE_REPOSITORY_PORT": str(port), "SLUICE_REPOSITORY_ROOTS": f"{root.store}:{root.triton}"}
    proc = procs.start_python("repository", "repository", env, ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_until(http_ok(f"{url}/healthz"), 30, "the repository", proc)
    return url


@dataclass
class Runtime:
    proc: Proc
    address: str

    def client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(self.address)


@pytest.fixture
def start_runtime(repository: str, procs: Supervisor, tmp_path):
    """Start ``python -m runtimes.<kind>`` with ``models``; stopped (by PID) after the test."""
    started: list[Proc] = []

    def start(kind: str, models: str = "") -> Runtime:
        port = free_port()
        env = {
            **QUIET_ENV,
            "SLUICE_RUNTIME_NAME": f"{kind}-test",
            "SLUICE_RUNTIME_PORT": str(port),
            "SLUICE_RUNTIME_MODELS": models,
            "SLUICE_RUNTIME_REPOSITORY_URL": repository,
            "SLUICE_RUNTIME_CACHE_DIR": str(tmp_path / f"cache-{kind}"),
        }
        proc = procs.start_python(f"{kind}-{port}", f"runtimes.{kind}", env, ROOT)
        started.append(proc)
        address = f"127.0.0.1:{port}"
        wait_until(grpc_serving(address), 60, f"the {kind} runtime", proc)
        return Runtime(proc, address)

    yield start
    for proc in started:
        procs.stop(proc)


# --- helpers


def classify(client, scaled: np.ndarray, version: str = "") -> tuple[np.ndarray, str]:
    """iris_classifier's probabilities for ``scaled`` and the version that answered."""
    features = grpcclient.InferInput("features", list(scaled.shape), "FP64")
    features.set_data_from_numpy(scaled)
    result = client.infer("iris_classifier", [features], model_version=version, client_timeout=10)
    return result.as_numpy("probabilities"), result.get_response().model_version


def status_of(call) -> str:
    with pytest.raises(InferenceServerException) as err:
        call()
    return f"{err.value.status()}: {err.value.message()}"


def stub(address: str) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def params(**values: str) -> dict[str, pb.ModelRepositoryParameter]:
    return {k: pb.ModelRepositoryParameter(string_param=v) for k, v in values.items()}


def index(address: str, ready: bool) -> list[tuple[str, str, str, str]]:
    reply = stub(address).RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), timeout=10)
    return [(m.name, m.version, m.state, m.reason) for m in reply.models]


# --- the runtime processes, driven with tritonclient


def test_load_a_model_the_runtime_did_not_start_with(start_runtime, root: Root) -> None:
    runtime = start_runtime("scikit", "iris_classifier:1")
    with runtime.client() as client:
        assert "model_repository" in client.get_server_metadata().extensions
        assert not client.is_model_ready("iris_scaler")
        client.load_model("iris_scaler")
        assert client.is_model_ready("iris_scaler") and client.is_model_ready("iris_scaler", "1")
        meta = client.get_model_metadata("iris_scaler")
        assert list(meta.versions) == ["1"] and meta.platform == "sklearn"
        assert [i.name for i in meta.inputs] == ["sepal_length", "sepal_width", "petal_length", "petal_width"]

        inputs = []
        for i, name in enumerate(["sepal_length", "sepal_width", "petal_length", "petal_width"]):
            column = grpcclient.InferInput(name, [len(ROWS)], "FP64")
            column.set_data_from_numpy(np.ascontiguousarray(ROWS[:, i]))
            inputs.append(column)
        result = client.infer("iris_scaler", inputs, client_timeout=10)
        np.testing.assert_allclose(result.as_numpy("features"), root.scaler.transform(ROWS))

        client.load_model("iris_scaler")  # already loaded: a no-op success
        assert list(client.get_model_metadata("iris_scaler").versions) == ["1"]

        loaded = [("iris_classifier", "1", "READY", ""), ("iris_scaler", "1", "READY", "")]
        assert index(runtime.address, ready=True) == loaded
        assert index(runtime.address, ready=False) == loaded + [
            ("broken_model", "1", "UNAVAILABLE", "not loaded"),
            ("iris_classifier", "2", "UNAVAILABLE", "not loaded"),
            ("mlp", "1", "UNAVAILABLE", "not loaded"),
        ]
        triton_view = client.get_model_repository_index(client_timeout=10)  # tritonclient asks ready=False
        assert [(m.name, m.version, m.state, m.reason) for m in triton_view.models] == index(runtime.address, ready=False)

    # shutdown closes every model and ends the process cleanly
    proc = runtime.proc
    proc.popen.terminate()
    assert proc.popen.wait(20) == 0, proc.log_tail()
    assert "stopping" in proc.log_tail()


def test_load_version_2_under_traffic_then_unload_version_1(start_runtime, root: Root) -> None:
    runtime = start_runtime("scikit", "iris_classifier:1")
    scaled = root.scaled
    v1 = root.v1.predict_proba(scaled)
    v2 = root.v2.predict_proba(scaled)

    answers: list[tuple[float, str]] = []  # (finished at, version) of every answer
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with runtime.client() as client:
            while not stop.is_set():
                try:
                    probabilities, version = classify(client, scaled)
                    expected = v1 if version == "1" else v2
                    if not np.allclose(probabilities, expected):
                        failures.append(f"version {version} answered something else")
                    answers.append((time.monotonic(), version))
                except Exception as exc:  # noqa: BLE001 - every failure counts
                    failures.append(repr(exc))

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        wait_until(lambda: len(answers) >= 20, 20, "traffic on version 1")
        with runtime.client() as client:
            client.load_model("iris_classifier")  # the repository's latest: 2
            loaded_at = time.monotonic()
            count = len(answers)
            wait_until(lambda: len(answers) >= count + 20, 20, "traffic after the load")
    finally:
        stop.set()
        sender.join(20)
    assert not sender.is_alive()
    assert failures == []
    assert {v for _, v in answers} == {"1", "2"}
    assert all(v == "2" for t, v in answers if t > loaded_at + 0.5)  # the default is now 2 (calls in flight aside)

    with runtime.client() as client:
        probabilities, version = classify(client, scaled)
        assert version == "2"
        np.testing.assert_allclose(probabilities, v2)
        probabilities, version = classify(client, scaled, "1")
        assert version == "1"
        np.testing.assert_allclose(probabilities, v1)
        assert list(client.get_model_metadata("iris_classifier").versions) == ["1", "2"]
        assert list(client.get_model_metadata("iris_classifier", "1").versions) == ["1", "2"]

        # unload version 1 only
        stub(runtime.address).RepositoryModelUnload(
            pb.RepositoryModelUnloadRequest(model_name="iris_classifier", parameters=params(version="1")), timeout=10
        )
        assert status_of(lambda: classify(client, scaled, "1")).startswith("StatusCode.NOT_FOUND")
        assert "loaded: 2" in status_of(lambda: classify(client, scaled, "1"))
        assert status_of(lambda: client.get_model_metadata("iris_classifier", "1")).startswith("StatusCode.NOT_FOUND")
        assert not client.is_model_ready("iris_classifier", "1") and client.is_model_ready("iris_classifier")
        probabilities, version = classify(client, scaled)
        assert version == "2"
        np.testing.assert_allclose(probabilities, v2)
        assert list(client.get_model_metadata("iris_classifier").versions) == ["2"]

        # an explicit version loads exactly that one; then unload without version: every version
        stub(runtime.address).RepositoryModelLoad(
            pb.RepositoryModelLoadRequest(model_name="iris_classifier", parameters=params(version="1")), timeout=30
        )
        assert list(client.get_model_metadata("iris_classifier").versions) == ["1", "2"]
        client.unload_model("iris_classifier")
        assert not client.is_model_ready("iris_classifier")
        assert status_of(lambda: classify(client, scaled)).startswith("StatusCode.NOT_FOUND")
        assert index(runtime.address, ready=True) == []


def test_unknown_models_and_versions_are_not_found(start_runtime, root: Root) -> None:
    runtime = start_runtime("scikit", "iris_classifier:1")
    scaled = root.scaled
    rpc = stub(runtime.address)
    with runtime.client() as client:
        assert status_of(lambda: client.unload_model("no_such_model")).startswith("StatusCode.NOT_FOUND")
        with pytest.raises(grpc.RpcError) as err:
            rpc.RepositoryModelUnload(
                pb.RepositoryModelUnloadRequest(model_name="iris_classifier", parameters=params(version="7")), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "loaded: 1" in err.value.details()

        message = status_of(lambda: client.load_model("no_such_model"))
        assert message.startswith("StatusCode.NOT_FOUND") and "no model 'no_such_model'" in message
        with pytest.raises(grpc.RpcError) as err:
            rpc.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="iris_classifier", parameters=params(version="9")), timeout=10
            )
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "has no version '9'" in err.value.details()

        # Triton's override config and files are not something our runtimes take
        message = status_of(lambda: client.load_model("iris_classifier", config=json.dumps({"name": "x"})))
        assert message.startswith("StatusCode.INVALID_ARGUMENT") and "config" in message
        message = status_of(lambda: client.load_model("iris_classifier", config="{}", files={"file:1/model.onnx": b"x"}))
        assert message.startswith("StatusCode.INVALID_ARGUMENT") and "file:1/model.onnx" in message

        assert index(runtime.address, ready=True) == [("iris_classifier", "1", "READY", "")]
        assert classify(client, scaled)[1] == "1"


def test_a_broken_artifact_is_refused_and_changes_nothing(start_runtime, root: Root) -> None:
    runtime = start_runtime("scikit", "iris_classifier:1")
    scaled = root.scaled
    with runtime.client() as client:
        message = status_of(lambda: client.load_model("broken_model"))
        assert message.startswith("StatusCode.INVALID_ARGUMENT"), message
        assert "failed to load 'broken_model' version 1" in message and "model.joblib" in message
        assert not client.is_model_ready("broken_model")
        assert index(runtime.address, ready=True) == [("iris_classifier", "1", "READY", "")]
        probabilities, version = classify(client, scaled)
        assert version == "1"
        np.testing.assert_allclose(probabilities, root.v1.predict_proba(scaled))
    assert runtime.proc.alive()


def test_a_triton_layout_model_loads_into_the_triton_runtime(start_runtime, root: Root) -> None:
    runtime = start_runtime("triton")
    with runtime.client() as client:
        assert index(runtime.address, ready=True) == []
        client.load_model("mlp")
        meta = client.get_model_metadata("mlp")
        assert list(meta.versions) == ["1"] and meta.platform.startswith("onnxruntime")
        batch = ROWS.astype(np.float32)
        tensor = grpcclient.InferInput("input", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch)
        result = client.infer("mlp", [tensor], client_timeout=10)
        session = ort.InferenceSession(str(root.triton / "mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        (expected,) = session.run(["probabilities"], {"input": batch})
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
        client.unload_model("mlp")
        assert not client.is_model_ready("mlp")


# --- in-process: the SDK's grpc.aio server, tritonclient.grpc.aio


@contextlib.asynccontextmanager
async def serving(models: ModelSet):
    async with served(models) as address:
        client = aioclient.InferenceServerClient(address)
        try:
            yield client
        finally:
            await client.close()


async def aio_status(call) -> str:
    with pytest.raises(InferenceServerException) as err:
        await call
    return f"{err.value.status()}: {err.value.message()}"


def _features(scaled: np.ndarray) -> list[aioclient.InferInput]:
    features = aioclient.InferInput("features", list(scaled.shape), "FP64")
    features.set_data_from_numpy(scaled)
    return [features]


class Gated(Model):
    """Echoes its input once ``gate`` is open; counts closes."""

    def __init__(self, version: str = "1"):
        super().__init__(ModelArtifact("gated", version, Path(".")), [TensorSpec("x", "FP64", (-1, 4))], [TensorSpec("y", "FP64", (-1, 4))])
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.closed = 0

    async def predict(self, inputs):
        self.entered.set()
        await self.gate.wait()
        return {"y": inputs["x"]}

    async def close(self) -> None:
        self.closed += 1


async def test_calls_in_flight_finish_after_an_unload() -> None:
    model = Gated()
    async with serving(ModelSet([model])) as client:
        x = aioclient.InferInput("x", [2, 4], "FP64")
        x.set_data_from_numpy(np.arange(8, dtype=np.float64).reshape(2, 4))
        running = asyncio.create_task(client.infer("gated", [x], client_timeout=10))
        await asyncio.wait_for(model.entered.wait(), 10)

        await client.unload_model("gated")
        assert model.closed == 0  # a call is still running on it
        assert not await client.is_model_ready("gated")
        assert (await aio_status(client.infer("gated", [x], client_timeout=10))).startswith("StatusCode.NOT_FOUND")

        model.gate.set()
        result = await asyncio.wait_for(running, 10)
        np.testing.assert_array_equal(result.as_numpy("y"), np.arange(8, dtype=np.float64).reshape(2, 4))
        deadline = time.monotonic() + 5
        while model.closed == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert model.closed == 1


async def test_loading_runs_off_the_event_loop_and_loads_of_a_name_are_serialised(repository: str, root: Root, tmp_path) -> None:
    gate, entered = threading.Event(), threading.Event()
    built: list[tuple[str, str]] = []

    def slow_loader(artifact: ModelArtifact) -> Model:
        built.append((artifact.name, artifact.version))
        if artifact.name == "iris_classifier":
            entered.set()
            assert gate.wait(20), "the test never opened the gate"
        return sklearn_load(artifact)

    models = ModelSet(loader=slow_loader, repository=ModelRepository(repository, tmp_path / "cache"))
    async with serving(models) as client:
        await client.load_model("iris_scaler")
        first = asyncio.create_task(client.load_model("iris_classifier"))
        await asyncio.to_thread(entered.wait, 20)
        second = asyncio.create_task(client.load_model("iris_classifier"))  # waits for the first
        # the loader is blocked in its thread: the event loop still serves
        assert await client.is_model_ready("iris_scaler")
        assert not await client.is_model_ready("iris_classifier")
        await asyncio.sleep(0.05)
        assert not second.done()
        gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 20)
        assert built == [("iris_scaler", "1"), ("iris_classifier", "2")]  # the second was a no-op
        result = await client.infer("iris_classifier", _features(root.scaled), client_timeout=10)
        assert result.get_response().model_version == "2"
        np.testing.assert_allclose(result.as_numpy("probabilities"), root.v2.predict_proba(root.scaled))


async def test_an_async_loader_is_awaited(repository: str, tmp_path) -> None:
    async def loader(artifact: ModelArtifact) -> Model:
        await asyncio.sleep(0)
        return sklearn_load(artifact)

    models = ModelSet(loader=loader, repository=ModelRepository(repository, tmp_path / "cache"))
    async with serving(models) as client:
        await client.load_model("iris_classifier")
        assert (await client.get_model_metadata("iris_classifier")).versions == ["2"]


async def test_an_unreachable_repository_is_unavailable(tmp_path) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    models = ModelSet([Gated()], loader=sklearn_load, repository=ModelRepository(nowhere, tmp_path / "cache", timeout_s=2))
    async with serving(models) as client:
        message = await aio_status(client.load_model("iris_classifier"))
        assert message.startswith("StatusCode.UNAVAILABLE") and "unreachable" in message
        index = await client.get_model_repository_index()  # ready=False: the loaded ones only
        assert [(m.name, m.version, m.state) for m in index.models] == [("gated", "1", "READY")]


async def test_metrics_label_only_loaded_models() -> None:
    def count(model: str, status: str) -> float:
        return REGISTRY.get_sample_value("sluice_runtime_inferences_total", {"model": model, "status": status}) or 0.0

    model = Gated()
    model.gate.set()
    unknown_before = count("unknown", "NOT_FOUND")
    async with serving(ModelSet([model])) as client:
        x = aioclient.InferInput("x", [1, 4], "FP64")
        x.set_data_from_numpy(np.zeros((1, 4)))
        before = count("gated", "OK")
        await client.infer("gated", [x], client_timeout=10)
        for i in range(3):
            await aio_status(client.infer(f"made-up-{i}", [x], client_timeout=10))
        assert count("gated", "OK") == before + 1
        assert count("unknown", "NOT_FOUND") == unknown_before + 3
        assert all(REGISTRY.get_sample_value("sluice_runtime_inferences_total", {"model": f"made-up-{i}", "status": "NOT_FOUND"}) is None for i in range(3))


async def test_registration_announces_the_models_loaded_now() -> None:
    loaded = ["iris_classifier"]
    bodies: list[dict] = []
    forget = asyncio.Event()

    def manager(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            bodies.append(json.loads(request.content))
            return httpx.Response(201, json={"instance_id": "x", "heartbeat_interval_s": 0.01, "ttl_s": 1})
        if request.method == "PUT":  # heartbeat: a restarted manager no longer knows us
            return httpx.Response(404 if forget.is_set() else 204)
        return httpx.Response(204)

    registration = Registration("http://manager", "scikit", "scikit", "127.0.0.1", 9000, lambda: list(loaded))
    await registration.client.aclose()
    registration.client = httpx.AsyncClient(base_url="http://manager", transport=httpx.MockTransport(manager))
    registration.start()
    try:
        await asyncio.wait_for(registration.registered.wait(), 5)
        loaded.append("iris_scaler")  # hot-loaded
        forget.set()
        deadline = time.monotonic() + 5
        while len(bodies) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        await registration.stop()
    assert bodies[0]["models"] == ["iris_classifier"]
    assert bodies[1]["models"] == ["iris_classifier", "iris_scaler"]


async def test_consul_meta_follows_the_loaded_models() -> None:
    from tests.unit.fake_consul import FakeConsul

    consul = FakeConsul()
    await consul.start()
    loaded = ["iris_classifier"]
    registration = ConsulRegistration(consul.address, "scikit", "scikit", "127.0.0.1", free_port(), lambda: list(loaded), recheck_s=0.02)
    try:
        registration.start()
        await asyncio.wait_for(registration.registered.wait(), 5)
        assert consul.registered[registration.service_id]["meta"]["models"] == "iris_classifier"
        loaded.append("iris_scaler")  # hot-loaded: registered again with the new Meta
        deadline = time.monotonic() + 5
        while consul.registered[registration.service_id]["meta"]["models"] != "iris_classifier,iris_scaler":
            assert time.monotonic() < deadline, consul.registered[registration.service_id]["meta"]
            await asyncio.sleep(0.01)
    finally:
        await registration.stop()
        await consul.stop()
    assert registration.service_id not in consul.registered
