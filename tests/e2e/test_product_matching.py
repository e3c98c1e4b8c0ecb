"""The seed's product-matching demo, verbatim, and a three-framework pipeline
(scikit-learn -> Spark ML -> Triton fallback) checked against the three models run
in-process (real pyspark for the Spark stage).

The demo's two requests are sent byte for byte as published (``demo.sh``): the pipeline
body and the records body below are its two ``-d`` arguments."""

from __future__ import annotations

import hashlib
import json

import httpx
import joblib
import numpy as np
import onnxruntime as ort
import pytest

from models.listings import DEMO_RECORDS
from runtimes.scikit.transformers import COLUMNS
from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.conftest import ROOT, STORE

pytestmark = pytest.mark.e2e
# The seed's two request bodies, verbatim (demo.sh's -d arguments).
PUBLISHED_PIPELINE = '{"name":"endpointML","transportType":"http", "chain":["serving-customscikit/pm_scikit","serving-localml-spark/pm_spark"]}'
PUBLISHED_RECORDS = """[{"Title1":"Apple iPhone 5 - 32GB - White & Silver (Verizon) Smartphone","ItemSpecifics1":"'Brand': ' Apple'; 'Style': ' Bar'; 'Processor': ' Dual Core'; 'Camera Resolution': ' 8.0MP'; 'Color': ' Silver'; 'Lock Status': ' Network Locked'; 'Network': ' Verizon'; 'Model': ' iPhone 5'; 'Storage Capacity': ' 32GB'; 'Cosmetic condition': ' Excellent'; 'Screen Size': ' 4''; 'No accessories': ' Yes'; 'UPC': ' 492550400162'","Title2":"Aquarium Fish Tank Vacuum Gravel Cleaner Water Siphon Pump Filter","ItemSpecifics2":"'Brand': ' Unbranded'; 'EAN': ' 4894462250013'; 'MPN': ' Does not apply'; 'ISBN': ' 4894462250013'; 'UPC': ' 4894462250013'; 'Designer/Brand': ' Unbranded'"},{"Title1":"Apple iPhone 5 - 32GB - White & Silver (Verizon) Smartphone","ItemSpecifics1":"'Brand': ' Apple'; 'Style': ' Bar'; 'Processor': ' Dual Core'; 'Camera Resolution': ' 8.0MP'; 'Color': ' Silver'; 'Lock Status': ' Network Locked'; 'Network': ' Verizon'; 'Model': ' iPhone 5'; 'Storage Capacity': ' 32GB'; 'Cosmetic condition': ' Excellent'; 'Screen Size': ' 4''; 'No accessories': ' Yes'; 'UPC': ' 492550400162'","Title2":"Apple iPhone 5 - 32GB - White & Silver (Verizon) Smartphone","ItemSpecifics2":"'Brand': ' Apple'; 'Style': ' Bar'; 'Processor': ' Dual Core'; 'Camera Resolution': ' 8.0MP'; 'Color': ' Silver'; 'Lock Status': ' Network Locked'; 'Network': ' Verizon'; 'Model': ' iPhone 5'; 'Storage Capacity': ' 32GB'; 'Cosmetic condition': ' Excellent'; 'Screen Size': ' 4''; 'No accessories': ' Yes'; 'UPC': ' 492550400162'"}]"""
PUBLISHED_RECORDS_SHA256 = "17504a8d10a42aca0afb5e8d6e59666921d961ad974be2b88a1dd19087b3780c"


@pytest.fixture(scope="module")
def pm_mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("pm"),
        [
            RuntimeSpec("serving-customscikit", "scikit", ("pm_scikit",)),
            RuntimeSpec("serving-localml-spark", "spark", ("pm_spark",)),
            RuntimeSpec("triton", "triton", ("risk_mlp",)),
        ],
        MeshPorts.ephemeral(),
    )
    with mesh:
        yield mesh


def test_seed_demo_verbatim(pm_mesh):
    assert hashlib.sha256(PUBLISHED_RECORDS.encode()).hexdigest() == PUBLISHED_RECORDS_SHA256
    assert json.loads(PUBLISHED_RECORDS) == DEMO_RECORDS
    # the seed's two curl commands: create the pipeline, then serve the two records
    created = httpx.post(
        f"{pm_mesh.manager_url}/api/v1/pipelines",
        content=PUBLISHED_PIPELINE.encode(),
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    served = httpx.post(
        f"{pm_mesh.gateway_url}/api/v1/serve/endpointML",
        content=PUBLISHED_RECORDS.encode(),
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert served.status_code == 200, served.text
    answer = served.json()
    assert [r["prediction"] for r in answer] == [0.0, 1.0]  # iPhone vs aquarium vacuum; iPhone vs itself
    for record in answer:
        assert set(record) == {"prediction", "probability"}
        assert len(record["probability"]) == 2 and abs(sum(record["probability"]) - 1) < 1e-9
    assert answer[0]["probability"][0] > 0.99 and answer[1]["probability"][1] > 0.99
    runtimes = {r["name"]: r for r in httpx.get(f"{pm_mesh.manager_url}/api/v1/runtimes", timeout=5).json()}
    assert runtimes["serving-localml-spark"]["models"][0]["platform"] == "spark-native"


@pytest.fixture(scope="module")
def spark():
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]").appName("sluice-e2e")
        .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", "1").getOrCreate()
    )
    yield session
    session.stop()


def in_process(records: list[dict], spark) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pm_scikit (joblib) -> pm_spark (real Spark transform) -> risk_mlp (onnxruntime)."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.linalg import Vectors

    X = np.array([[r[c] for c in COLUMNS] for r in records], dtype=object)
    features = joblib.load(STORE / "pm_scikit" / "1" / "model.joblib").transform(X)
    model = PipelineModel.load(str(STORE / "pm_spark" / "1" / "pipeline"))
    frame = spark.createDataFrame([(Vectors.dense(row.tolist()),) for row in features], ["features"])
    rows = model.transform(frame).select("prediction", "probability").collect()
    prediction = np.array([r["prediction"] for r in rows])
    probability = np.array([r["probability"].toArray() for r in rows])
    session = ort.InferenceSession(str(ROOT / "models" / "triton" / "risk_mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (risk,) = session.run(None, {session.get_inputs()[0].name: probability})
    return prediction, probability, risk


def test_three_frameworks_scikit_spark_triton(pm_mesh, spark):
    chain = ["serving-customscikit/pm_scikit", "serving-localml-spark/pm_spark", "triton/risk_mlp"]
    created = httpx.post(f"{pm_mesh.manager_url}/api/v1/pipelines", json={"name": "risk", "chain": chain}, timeout=10)
    assert created.status_code == 201, created.text
    assert created.json()["stages"][2]["bindings"] == {"probability": "probability"}
    from models.listings import listing_pairs

    pairs, _ = listing_pairs(n=24, seed=11)
    records = [dict(zip(COLUMNS, map(str, row))) for row in pairs]
    response = httpx.post(f"{pm_mesh.gateway_url}/serve/risk", json=records + DEMO_RECORDS, timeout=10)
    assert response.status_code == 200, response.text
    risk = np.array([r["risk"] for r in response.json()])
    _, _, expected = in_process(records + DEMO_RECORDS, spark)
    np.testing.assert_allclose(risk, expected, rtol=1e-5, atol=1e-6)
    assert risk[-2][0] < risk[-1][0]  # risk rises with p(same product): the iPhone against itself
