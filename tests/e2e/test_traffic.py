"""Traffic per stage on a real mesh (manager, repository, gateway and three scikit
runtimes, each with its real Envoy sidecar): weighted splits between versions and
between runtimes, read from ``x-sluice-served-by`` and the gateway's metrics; pinning
with ``x-sluice-variant`` and sticky hashing; a mirror whose target hangs or fails;
Envoy's local rate limit answered 429 with ``Retry-After``; weight changes under load;
per-stage policies visible in Envoy's config_dump.

The runtimes: ``scikit`` serves ``iris_scaler`` and ``iris_classifier`` versions 1
(logistic regression) and 2 (k-nearest neighbours, ``models.train_iris_v2``);
``canary`` serves ``iris_classifier`` 1 and 5 (every call takes ``SLOW_S``); ``shadow``
serves ``iris_classifier`` 3 (every call hangs ``HANG_S``) and 4 (every call fails). The models live in a repository root
of this module's own, so the example store is untouched.
"""

from __future__ import annotations

import shutil
import statistics
import queue
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import joblib
import numpy as np
import pytest

from bench.load import Load
from models.manifest import tensor, version_dir, write_manifest
from models import train_iris_v2
from models.train_iris import FEATURES, iris_data
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.conftest import STORE, eventually

pytestmark = pytest.mark.e2e

HANG_S = 2.0
SLOW_S = 1.5
CLIENTS = 8


class HangingClassifier:
    """A classifier whose every call blocks its thread ``delay_s`` (in ``predict``; the
    runtime calls ``predict_proba`` on the same records right after)."""

    classes_ = np.array(["setosa", "versicolor", "virginica"])

    def __init__(self, delay_s: float):
        self.delay_s = delay_s

    def predict(self, X):
        time.sleep(self.delay_s)
        return np.full(len(X), "setosa", dtype=object)

    def predict_proba(self, X):
        return np.tile([1.0, 0.0, 0.0], (len(X), 1))


class FailingClassifier:
    """A classifier whose every call raises (the mirror target that errors)."""

    classes_ = HangingClassifier.classes_

    def predict(self, X):
        raise RuntimeError("the shadow version always fails")

    predict_proba = predict


def _write_classifier(root, version: str, estimator) -> None:
    path = version_dir(root, "iris_classifier", version)
    joblib.dump(estimator, path / "model.joblib")
    write_manifest(
        path, "sklearn",
        inputs=[tensor("features", "FP64", [-1, 4])],
        outputs=[tensor("label", "BYTES", [-1], method="predict"), tensor("probabilities", "FP64", [-1, 3], method="predict_proba")],
        artifact="model.joblib",
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    store = tmp_path_factory.mktemp("traffic-store")
    for name in ("iris_scaler", "iris_classifier"):
        shutil.copytree(STORE / name / "1", store / name / "1")
    train_iris_v2.train(store)
    _write_classifier(store, "3", HangingClassifier(HANG_S))
    _write_classifier(store, "4", FailingClassifier())
    _write_classifier(store, "5", HangingClassifier(SLOW_S))
    mesh = LocalMesh(
        tmp_path_factory.mktemp("traffic"),
        [
            RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier:1", "iris_classifier:2")),
            RuntimeSpec("canary", "scikit", ("iris_classifier:1", "iris_classifier:5")),
            RuntimeSpec("shadow", "scikit", ("iris_classifier:3", "iris_classifier:4")),
        ],
        MeshPorts.ephemeral(),
        env={"SLUICE_REPOSITORY_ROOTS": str(store)},
    )
    with mesh:
        yield mesh


@pytest.fixture(scope="module")
def manager(mesh):
    with httpx.Client(base_url=mesh.manager_url, timeout=30) as client:
        yield client


def classifier_stage(**traffic) -> dict:
    return {"runtime": "scikit", "model": "iris_classifier", **traffic}


def define(manager, name: str, classifier: dict, method: str = "POST", **pipeline) -> dict:
    body = {"name": name, "stages": [{"runtime": "scikit", "model": "iris_scaler"}, classifier], **pipeline}
    response = manager.request(method, "/api/v1/pipelines" + (f"/{name}" if method == "PUT" else ""), json=body)
    assert response.status_code in (200, 201), response.text
    return response.json()


def served_by(response: httpx.Response) -> dict[str, tuple[str, str, str]]:
    """``x-sluice-served-by`` as {stage id: (runtime, model, version)}."""
    return served_by_entries(response.headers["x-sluice-served-by"])


def served_by_entries(value: str) -> dict[str, tuple[str, str, str]]:
    """A served-by value (``<stage-id>=<runtime>/<model>:<version>, ...``) as {stage id: (runtime, model, version)}."""
    entries = {}
    for entry in value.split(","):
        stage, _, target = entry.strip().partition("=")
        runtime, _, rest = target.partition("/")
        model, _, version = rest.rpartition(":")
        entries[stage] = (runtime, model, version)
    return entries


RECORDS = [dict(zip(FEATURES, map(float, row))) for row in iris_data()[0][::10]]  # 15 records, all classes


def send(url: str, pipeline: str, count: int, headers_of=lambda i: {}, records=RECORDS[:1]) -> list[httpx.Response]:
    """``count`` requests from CLIENTS threads (one connection each); the answers in order."""
    local = threading.local()

    def one(i: int) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=20)
        return local.client.post(f"/serve/{pipeline}", json=records, headers=headers_of(i))

    with ThreadPoolExecutor(CLIENTS) as pool:
        return list(pool.map(one, range(count)))


def in_process(version: str):
    """iris_classifier ``version`` run here on the scaled RECORDS: (labels, probabilities)."""
    scaler = joblib.load(STORE / "iris_scaler" / "1" / "model.joblib")
    classifier = joblib.load(STORE / "iris_classifier" / "1" / "model.joblib") if version == "1" else train_iris_v2.fit()
    X = scaler.transform(np.array([[r[f] for f in FEATURES] for r in RECORDS]))
    return list(classifier.predict(X)), classifier.predict_proba(X)


def test_a_50_50_version_split_lands_between_40_and_60_percent_on_each(mesh, manager):
    define(manager, "versions", classifier_stage(traffic=[{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]))
    answers = send(mesh.gateway_url, "versions", 400, records=RECORDS)
    assert {a.status_code for a in answers} == {200}
    versions = Counter(served_by(a)["1"] for a in answers)
    assert set(versions) == {("scikit", "iris_classifier", "1"), ("scikit", "iris_classifier", "2")}
    for count in versions.values():
        assert 160 <= count <= 240, versions
    assert {served_by(a)["0"] for a in answers} == {("scikit", "iris_scaler", "1")}
    # each answer is exactly what the version its header names computes (Envoy's version header reached the runtime)
    expected = {v: in_process(v) for v in ("1", "2")}
    assert expected["1"][0] != expected["2"][0] or not np.allclose(expected["1"][1], expected["2"][1])
    for answer in answers[:60]:
        labels, probabilities = expected[served_by(answer)["1"][2]]
        assert [r["label"] for r in answer.json()] == labels
        np.testing.assert_allclose([r["probabilities"] for r in answer.json()], probabilities, rtol=0, atol=1e-12)
    # and the gateway's metrics count the same split
    metrics = httpx.get(f"{mesh.gateway_url}/metrics", timeout=5).text
    for (runtime, _, version), count in versions.items():
        line = f'sluice_gateway_stage_served_total{{pipeline="versions",runtime="{runtime}",stage="1",version="{version}"}} {float(count)}'
        assert line in metrics, line


def test_a_90_10_runtime_split_pins_with_x_sluice_variant_and_keeps_sticky_keys(mesh, manager):
    split = [{"runtime": "scikit", "weight": 90}, {"runtime": "canary", "weight": 10}]
    define(manager, "runtimes", classifier_stage(version="1", traffic=split))
    answers = send(mesh.gateway_url, "runtimes", 400)
    assert {a.status_code for a in answers} == {200}
    runtimes = Counter(served_by(a)["1"][0] for a in answers)
    assert set(runtimes) == {"scikit", "canary"} and 20 <= runtimes["canary"] <= 60, runtimes  # 10 % +- 5 points

    for variant in ("canary", "scikit"):  # the client's pin wins over the weights
        pinned = send(mesh.gateway_url, "runtimes", 40, lambda i: {"x-sluice-variant": variant})
        assert {served_by(a)["1"][0] for a in pinned} == {variant}

    define(manager, "runtimes", classifier_stage(version="1", traffic=[dict(v, weight=50) for v in split], sticky="x-user"), method="PUT")
    users = [f"user-{n}" for n in range(30)]
    answers = send(mesh.gateway_url, "runtimes", 150, lambda i: {"x-user": users[i % 30]})
    by_user: dict[str, set[str]] = {}
    for i, answer in enumerate(answers):
        by_user.setdefault(users[i % 30], set()).add(served_by(answer)["1"][0])
    assert all(len(seen) == 1 for seen in by_user.values()), by_user  # one key, one variant
    assert {next(iter(seen)) for seen in by_user.values()} == {"scikit", "canary"}  # keys spread over both


def grpc_iris_request(pipeline: str) -> pb.ModelInferRequest:
    """RECORDS as an OIP request: one FP64 tensor per feature (the scaler's inputs)."""
    request = pb.ModelInferRequest(model_name=pipeline)
    for name in FEATURES:
        request.inputs.add(name=name, datatype="FP64", shape=[len(RECORDS)])
        request.raw_input_contents.append(np.array([r[name] for r in RECORDS], "<f8").tobytes())
    return request


def grpc_stream(address: str, pipeline: str, count: int, headers: dict[str, str] | None = None) -> list:
    """``count`` requests on one ``tritonclient.grpc`` stream (with ``headers`` as its
    metadata); each answer's ``sluice.served_by`` parameter, in the requests' order."""
    answers: queue.Queue = queue.Queue()
    client = tgrpc.InferenceServerClient(address)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)), headers=headers)
        for i in range(count):
            inputs = []
            for name in FEATURES:
                tensor = tgrpc.InferInput(name, [len(RECORDS)], "FP64")
                tensor.set_data_from_numpy(np.array([r[name] for r in RECORDS], "<f8"))
                inputs.append(tensor)
            client.async_stream_infer(pipeline, inputs, request_id=str(i))
        got = [answers.get(timeout=20) for _ in range(count)]
    finally:
        client.stop_stream()
        client.close()
    assert [e for _, e in got] == [None] * count, got
    responses = [r.get_response() for r, _ in got]
    assert [r.id for r in responses] == [str(i) for i in range(count)]
    return [r.parameters["sluice.served_by"].string_param for r in responses]


def test_grpc_answers_name_the_variant_in_each_answer_and_the_unary_trailers(mesh, manager):
    define(manager, "grpc-split", classifier_stage(traffic=[{"version": "1", "weight": 50}, {"version": "2", "weight": 50}]))
    scaler = ("scikit", "iris_scaler", "1")
    both = {("scikit", "iris_classifier", "1"), ("scikit", "iris_classifier", "2")}
    address = f"127.0.0.1:{mesh.ports.gateway}"  # the gateway's Envoy sidecar
    request = grpc_iris_request("grpc-split")
    expected = {v: in_process(v)[1] for v in ("1", "2")}
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # tritonclient.grpc's ModelInfer
        seen = Counter()
        for _ in range(30):
            response, call = stub.ModelInfer.with_call(request, timeout=20)
            entries = served_by_entries(dict(call.trailing_metadata())["x-sluice-served-by"])
            assert response.parameters["sluice.served_by"].string_param == dict(call.trailing_metadata())["x-sluice-served-by"]
            assert entries["0"] == scaler and entries["1"] in both, entries
            seen[entries["1"]] += 1
            probabilities = response.raw_output_contents[[o.name for o in response.outputs].index("probabilities")]
            np.testing.assert_allclose(np.frombuffer(probabilities, "<f8").reshape(-1, 3), expected[entries["1"][2]],
                                       rtol=0, atol=1e-12)  # the version named is the one that computed the answer
        assert set(seen) == both, seen  # 30 calls at 50/50: each version at least once (1 - 2^-29)
        for version in ("1", "2"):  # the call's x-sluice-variant metadata pins the version
            _, call = stub.ModelInfer.with_call(request, metadata=(("x-sluice-variant", version),), timeout=20)
            assert served_by_entries(dict(call.trailing_metadata())["x-sluice-served-by"])["1"] == ("scikit", "iris_classifier", version)

    streamed = [served_by_entries(v) for v in grpc_stream(address, "grpc-split", 20)]
    assert all(e["0"] == scaler and len(e) == 2 for e in streamed), streamed  # each answer its own entries
    assert {e["1"] for e in streamed} == both  # each request of the stream routed on its own
    pinned = [served_by_entries(v) for v in grpc_stream(address, "grpc-split", 10, {"x-sluice-variant": "2"})]
    assert pinned == [{"0": scaler, "1": ("scikit", "iris_classifier", "2")}] * 10  # the stream's pin, for each request


def _stat(mesh, name: str) -> int:
    text = httpx.get(f"{mesh.admin_url('gateway')}/stats?filter=^{name}$", timeout=5).text
    return int(text.split(":")[1]) if ":" in text else 0


def _timed(client: httpx.Client, pipeline: str) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(f"/serve/{pipeline}", json=RECORDS)
    return time.perf_counter() - started, response


@pytest.mark.parametrize("version, what", [("3", "hangs"), ("4", "fails")])
def test_a_mirror_that_hangs_or_fails_changes_neither_answer_nor_latency(mesh, manager, version, what):
    plain, mirrored = f"plain-{version}", f"mirrored-{version}"
    define(manager, plain, classifier_stage(version="1"))
    define(manager, mirrored, classifier_stage(version="1", mirror={"runtime": "shadow", "version": version, "percent": 100}))
    shadowed_before = _stat(mesh, "cluster.runtime_shadow.upstream_rq_total")
    times: dict[str, list[float]] = {plain: [], mirrored: []}
    with httpx.Client(base_url=mesh.gateway_url, timeout=20) as client:
        reference = client.post(f"/serve/{plain}", json=RECORDS).json()
        for _ in range(40):  # interleaved, so both see the same noise
            for pipeline in (plain, mirrored):
                took, response = _timed(client, pipeline)
                assert response.status_code == 200, response.text
                assert response.json() == reference  # the shadow's answer or error never reaches the caller
                times[pipeline].append(took)
    # the shadow did get every call (Envoy counts them), and hung or failed on them
    eventually(lambda: _stat(mesh, "cluster.runtime_shadow.upstream_rq_total") - shadowed_before >= 40, timeout_s=10)
    base, shadowed = statistics.median(times[plain]), statistics.median(times[mirrored])
    assert shadowed <= base * 1.5 + 0.005, (what, base, shadowed)
    assert max(times[mirrored]) < HANG_S / 2, (what, max(times[mirrored]))  # nobody waited for a hanging shadow


def test_a_rate_limit_of_20_rps_refuses_above_it_with_429_and_none_below(mesh, manager):
    define(manager, "limited", classifier_stage(), rate_limit={"rps": 20, "burst": 20})
    statuses = Counter()
    with httpx.Client(base_url=mesh.gateway_url, timeout=20) as client:
        started = time.monotonic()
        for i in range(45):  # 15 rps for 3 s, on a schedule
            time.sleep(max(0.0, started + i / 15 - time.monotonic()))
            statuses[client.post("/serve/limited", json=RECORDS[:1]).status_code] += 1
    assert statuses == {200: 45}

    started = time.monotonic()
    answers = send(mesh.gateway_url, "limited", 200)
    elapsed = time.monotonic() - started
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) == {200, 429} and statuses[429] > 0, statuses
    assert statuses[200] <= 20 + 20 * elapsed + 5, (statuses, elapsed)  # the bucket: burst + rps x time
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and "rate limit" in error["message"] and error["details"]["pipeline"] == "limited"


def test_weight_changes_under_load_lose_no_request(mesh, manager):
    def weights(v1: int, v2: int) -> dict:
        return classifier_stage(traffic=[{"version": "1", "weight": v1}, {"version": "2", "weight": v2}])

    define(manager, "shifting", weights(100, 0))
    with Load(mesh.gateway_url, "shifting", RECORDS[:3], ok=lambda r: len(r.json()) == 3, clients=CLIENTS) as load:
        load.wait_successes(40)
        for v1, v2 in ((50, 50), (0, 100), (90, 10), (0, 100)):
            define(manager, "shifting", weights(v1, v2), method="PUT")
            load.wait_successes(40, since=time.monotonic())
    assert load.answers and not load.failures(), load.failures()[:3]
    after = send(mesh.gateway_url, "shifting", 40)
    assert {served_by(a)["1"][2] for a in after} == {"2"}  # the last weights rule


def test_stage_policies_are_in_envoys_config_dump_and_enforced_there(mesh, manager):
    policy = {
        "timeout_ms": 3000,
        "retries": {"attempts": 3, "per_try_timeout_ms": 2500, "on": ["unavailable", "reset"]},
        "outlier_detection": {"consecutive_errors": 3, "base_ejection_ms": 500, "max_ejection_percent": 100},
        "circuit_breaker": {"max_requests": 1, "max_pending_requests": 1},
        "rate_limit": {"rps": 100, "burst": 50},
    }
    plan = define(manager, "policed", {"runtime": "canary", "model": "iris_classifier", "version": "5", **policy})
    route_key = plan["stages"][1]["route"]
    dump = httpx.get(f"{mesh.admin_url('gateway')}/config_dump?resource=dynamic_scoped_route_configs", timeout=5).json()
    scopes = [s for c in dump["configs"] for s in c.get("scoped_route_configs", [])]
    (route,) = [r for s in scopes for h in s["route_configuration"]["virtual_hosts"] for r in h["routes"] if r.get("name") == route_key]
    action = route["route"]
    assert action["timeout"] == "3s"
    assert action["retry_policy"]["num_retries"] == 3 and action["retry_policy"]["per_try_timeout"] == "2.500s"
    assert action["retry_policy"]["retry_on"] == "unavailable,reset"
    assert route["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]["token_bucket"]["max_tokens"] == 50
    clusters = httpx.get(f"{mesh.admin_url('gateway')}/config_dump?resource=dynamic_active_clusters", timeout=5).json()
    own_name = action["cluster"]
    (own,) = [c["cluster"] for c in clusters["configs"] if c["cluster"]["name"] == own_name]
    assert own_name != "runtime_canary"  # the stage's own cluster, beside the runtime's shared one
    assert own["outlier_detection"]["consecutive_5xx"] == 3 and own["outlier_detection"]["base_ejection_time"] == "0.500s"
    assert own["circuit_breakers"]["thresholds"][0]["max_requests"] == 1

    # enforced by Envoy: while one call (SLOW_S long) is on the stage, a second overflows its breaker at once
    with httpx.Client(base_url=mesh.gateway_url, timeout=20) as client, ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/serve/policed", json=RECORDS[:1])
        eventually(lambda: _stat(mesh, f"cluster.{own_name}.upstream_rq_active") >= 1, timeout_s=SLOW_S / 2)
        started = time.perf_counter()
        second = client.post("/serve/policed", json=RECORDS[:1])
        took = time.perf_counter() - started
        assert second.status_code == 503 and second.json()["error"]["code"] == "stage_overloaded", second.text
        assert second.json()["error"]["details"]["stage"] == 1 and took < SLOW_S / 2
        assert first.result().status_code == 200  # the call under way was served, through the stage's cluster
        assert served_by(first.result())["1"] == ("canary", "iris_classifier", "5")
    assert _stat(mesh, f"cluster.{own_name}.upstream_rq_total") >= 1
