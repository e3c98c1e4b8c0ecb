"""Stage fusion on a real mesh (``sluice.fusion``): the iris chain (scaler then
classifier, both on the scikit runtime) runs as one call on a route of its own in the
gateway sidecar's Envoy, with the two stages' summed timeout; it answers what the two
models answer in-process; ``x-sluice-served-by`` still lists each stage; a stage that
fails inside a fused call is named in the error; and a stage with a policy of its own
is never fused (its calls stay apart)."""

from __future__ import annotations

import grpc
import joblib
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.conftest import STORE
from tests.e2e.conftest import IRIS_CHAIN, routes

FEATURES = ("sepal_length", "sepal_width", "petal_length", "petal_width")
ROWS = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3], [5.9, 3.0, 4.2, 1.5]]
RECORDS = [dict(zip(FEATURES, row)) for row in ROWS]


@pytest.fixture(scope="module")
def fused(manager):
    created = manager.post("/api/v1/pipelines", json={"name": "fused", "chain": IRIS_CHAIN})
    assert created.status_code == 201, created.text
    return created.json()


def test_the_chain_runs_on_one_fused_route_with_the_summed_timeout(mesh, fused):
    first, second = fused["stages"]
    fused_route = routes(mesh)[f"{first['route']}+2"]
    total_ms = first["timeout_ms"] + second["timeout_ms"]
    assert fused_route["route"]["timeout"] == f"{total_ms // 1000}s"
    assert fused_route["route"]["cluster"] == "runtime_scikit"
    # the stages' own routes stay (a gateway with fusion off, or an older one, uses them)
    assert {first["route"], second["route"]} <= routes(mesh).keys()


def test_the_fused_answer_equals_the_models_in_process_and_names_each_stage(gateway, fused):
    answer = gateway.post("/serve/fused", json=RECORDS)
    assert answer.status_code == 200, answer.text
    X = np.array(ROWS)
    scaler = joblib.load(STORE / "iris_scaler" / "1" / "model.joblib")
    classifier = joblib.load(STORE / "iris_classifier" / "1" / "model.joblib")
    expected = classifier.predict_proba(scaler.transform(X))
    np.testing.assert_allclose([r["probabilities"] for r in answer.json()], expected, rtol=1e-9)
    assert answer.headers["x-sluice-served-by"] == "0=scikit/iris_scaler:1, 1=scikit/iris_classifier:1"


def test_a_stage_failing_inside_a_fused_call_is_named(mesh, fused):
    # NaN passes the scaler and makes the classifier raise: stage 1 fails, not stage 0
    request = pb.ModelInferRequest(model_name="fused")
    for name, value in zip(FEATURES, (np.nan, 3.5, 1.4, 0.2)):
        request.inputs.add(name=name, datatype="FP64", shape=[1])
        request.raw_input_contents.append(np.array([value]).astype("<f8").tobytes())
    with grpc.insecure_channel(f"127.0.0.1:{mesh.ports.gateway}") as channel:
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert "stage 1" in caught.value.details() and "iris_classifier" in caught.value.details(), caught.value.details()


def test_a_stage_with_its_own_policy_is_not_fused(mesh, manager, gateway):
    stages = [{"runtime": "scikit", "model": "iris_scaler"},
              {"runtime": "scikit", "model": "iris_classifier", "retries": {"attempts": 2, "on": ["unavailable"]}}]
    created = manager.post("/api/v1/pipelines", json={"name": "apart", "stages": stages})
    assert created.status_code == 201, created.text
    first = created.json()["stages"][0]
    assert f"{first['route']}+2" not in routes(mesh)
    answer = gateway.post("/serve/apart", json=RECORDS[:1])
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-sluice-served-by"] == "0=scikit/iris_scaler:1, 1=scikit/iris_classifier:1"
