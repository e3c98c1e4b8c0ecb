"""Adaptive batching at the gateway (``gateway.batching``) on a real mesh: concurrent
requests to one pipeline are folded into shared runs (the gateway's batch histograms
show runs of more than one request), and yet every caller, over HTTP records or OIP
gRPC, gets exactly its own answer (compared with the models run in this process) and
its own ``x-sluice-served-by``; a request a stage refuses, sent among good ones that
share its run, fails alone with the stage's 422 while the others succeed.

The mesh: manager, repository, gateway and one scikit runtime (iris_scaler,
iris_classifier, and ``picky_double``, ``tests.e2e.picky_model``: 50 ms a call, refuses
negative values), each with its Envoy sidecar; the gateway's default batching settings.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from sluice.tensors import from_raw, raw_outputs
from tests.e2e.conftest import IRIS_CHAIN
from tests.e2e.picky_model import write_picky_double
from tests.e2e.test_iris_pipeline import FEATURES, in_process
from tests.e2e.test_metrics import samples

pytestmark = pytest.mark.e2e

HTTP_CLIENTS = 12
GRPC_CLIENTS = 4
REQUESTS_PER_CLIENT = 8
X = load_iris().data


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    workdir = tmp_path_factory.mktemp("batching")
    write_picky_double(workdir / "models")  # the repository's first root (uploads)
    mesh = LocalMesh(workdir, [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier", "picky_double"))],
                     MeshPorts.ephemeral())
    with mesh:
        for name, chain in (("iris", IRIS_CHAIN), ("picky", ["scikit/picky_double"])):
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "chain": chain}, timeout=10)
            assert created.status_code == 201, created.text
        yield mesh


def _rows(client: int, request: int) -> np.ndarray:
    """Rows of iris no other request of the test sends in this order: 1 to 3 of them."""
    start = (client * REQUESTS_PER_CLIENT + request) * 3 % (len(X) - 3)
    return X[start : start + 1 + (client + request) % 3]


def _batches(mesh, pipeline: str) -> tuple[float, float, float]:
    """(folded runs, requests they held, rows they held) from the gateway's histograms."""
    g = samples(f"{mesh.gateway_url}/metrics")
    label = (("pipeline", pipeline),)
    return (g.get(("sluice_gateway_batch_requests_count", label), 0.0), g.get(("sluice_gateway_batch_requests_sum", label), 0.0),
            g.get(("sluice_gateway_batch_rows_sum", label), 0.0))


def test_concurrent_http_and_grpc_requests_are_folded_and_each_caller_gets_its_own_answer(mesh):
    with httpx.Client(base_url=mesh.gateway_url, timeout=10) as client:  # the served-by of one lone request
        alone = client.post("/serve/iris", json=[dict(zip(FEATURES, X[0]))])
    assert alone.status_code == 200, alone.text
    served = alone.headers["x-sluice-served-by"]
    assert served.count("=scikit/iris_") == 2, served
    before = _batches(mesh, "iris")

    async def http_client(c: int) -> list[tuple[np.ndarray, list[dict], str]]:
        out = []
        async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10) as http:
            for r in range(REQUESTS_PER_CLIENT):
                rows = _rows(c, r)
                response = await http.post("/serve/iris", json=[dict(zip(FEATURES, map(float, row))) for row in rows])
                assert response.status_code == 200, response.text
                out.append((rows, response.json(), response.headers["x-sluice-served-by"]))
        return out

    async def grpc_client(c: int) -> list[tuple[np.ndarray, list[dict], str]]:
        out = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for r in range(REQUESTS_PER_CLIENT):
                rows = _rows(c, r)
                request = pb.ModelInferRequest(model_name="iris")
                for i, name in enumerate(FEATURES):
                    request.inputs.add(name=name, datatype="FP64", shape=[len(rows)])
                    request.raw_input_contents.append(rows[:, i].astype("<f8").tobytes())
                call = stub.ModelInfer(request)
                answer = raw_outputs(await call)
                labels = from_raw(answer["label"][2], "BYTES", answer["label"][1])
                probabilities = from_raw(answer["probabilities"][2], "FP64", answer["probabilities"][1])
                records = [{"label": l.decode(), "probabilities": p.tolist()} for l, p in zip(labels, probabilities)]
                served_by = dict(await call.trailing_metadata()).get("x-sluice-served-by", "")
                out.append((rows, records, served_by))
        return out

    async def load():
        clients = [http_client(c) for c in range(HTTP_CLIENTS)]
        clients += [grpc_client(HTTP_CLIENTS + c) for c in range(GRPC_CLIENTS)]
        return [a for answers in await asyncio.gather(*clients) for a in answers]

    answers = asyncio.run(load())
    assert len(answers) == (HTTP_CLIENTS + GRPC_CLIENTS) * REQUESTS_PER_CLIENT
    for rows, records, served_by in answers:
        labels, probabilities = in_process(rows)
        assert [r["label"] for r in records] == labels  # exactly its own rows, in its order
        np.testing.assert_allclose([r["probabilities"] for r in records], probabilities, rtol=0, atol=1e-12)
        assert served_by == served
    runs, requests, rows = (now - then for now, then in zip(_batches(mesh, "iris"), before))
    assert runs > 0 and requests > runs, (runs, requests)  # folded runs held more than one request each, on average
    assert rows >= requests


def test_a_request_a_stage_refuses_fails_alone_among_good_ones_folded_with_it(mesh):
    runtime_metrics = f"http://127.0.0.1:{mesh.runtime('scikit').metrics_port}/metrics"
    refused = ("sluice_runtime_inferences_total", (("model", "picky_double"), ("status", "INVALID_ARGUMENT")))
    rounds, good = 3, 11

    async def load():
        async with httpx.AsyncClient(base_url=mesh.gateway_url, timeout=10,
                                     limits=httpx.Limits(max_connections=good + 1)) as http:
            answers = []
            for round_ in range(rounds):
                values = [float(10 * round_ + i) for i in range(good)] + [-1.0 - round_]  # the bad one sent last
                responses = await asyncio.gather(*(http.post("/serve/picky", json=[{"x": v}]) for v in values))
                answers += list(zip(values, responses))
            return answers

    before = samples(runtime_metrics).get(refused, 0.0)
    folded_before = _batches(mesh, "picky")
    answers = asyncio.run(load())
    for value, response in answers:
        if value >= 0:
            assert response.status_code == 200, response.text
            assert response.json() == [{"y": 2 * value}]
            continue
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["code"] == "stage_rejected_input" and error["details"]["stage_name"] == "scikit/picky_double"
        assert "negative values refused" in error["message"] and str(value) in error["message"]
    runs, requests, _ = (now - then for now, then in zip(_batches(mesh, "picky"), folded_before))
    assert requests > runs  # requests were folded
    # the runtime refused more calls than there were bad requests: folded runs holding a bad
    # request were refused whole, then each of their requests ran alone
    assert samples(runtime_metrics).get(refused, 0.0) - before > rounds
