"""The SDK's packaging: signatures derived from estimators and ONNX graphs, and the
files each kind of upload carries (checked with the runtimes' own loaders)."""

from __future__ import annotations

import asyncio
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_iris
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from runtimes.scikit.model import SklearnModel
from runtimes.sdk.model import ModelArtifact
from runtimes.triton.config import load_config
from sluice.packaging import PackagingError, package
from tests.conftest import STORE, TRITON_REPOSITORY


@pytest.fixture(scope="module")
def iris():
    data = load_iris(as_frame=True)
    return data.data, data.target_names[data.target]


def _manifest(pkg) -> dict:
    return json.loads((pkg.directory / "model.json").read_text())


def test_classifier_on_a_dataframe_gets_one_column_per_feature_and_string_labels(iris):
    X, y = iris
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(X, y)
    with package(est, "iris_lr") as pkg:
        manifest = _manifest(pkg)
        assert pkg.kind == "sklearn"
        assert [t["name"] for t in manifest["inputs"]] == list(X.columns)
        assert all(t["datatype"] == "FP64" and t["shape"] == [-1] for t in manifest["inputs"])
        assert manifest["outputs"] == [
            {"name": "label", "datatype": "BYTES", "shape": [-1], "method": "predict"},
            {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3], "method": "predict_proba"},
        ]
        # the scikit runtime loads what was packaged and answers as the estimator does
        model = SklearnModel(ModelArtifact("iris_lr", "1", pkg.directory, manifest))
        inputs = {c: X[c].to_numpy() for c in X.columns}
        out = asyncio.run(model.predict(inputs))
        assert out["label"].tolist() == est.predict(X).tolist()
        np.testing.assert_allclose(out["probabilities"], est.predict_proba(X))


def test_numpy_fitted_regressor_and_transformer_signatures(iris):
    X, _ = iris
    reg = LinearRegression().fit(X.to_numpy()[:, :3], X.to_numpy()[:, 3])
    with package(reg, "petal") as pkg:
        manifest = _manifest(pkg)
        assert manifest["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 3]}]
        assert manifest["outputs"] == [{"name": "prediction", "datatype": "FP64", "shape": [-1], "method": "predict"}]
    pca = PCA(n_components=2).fit(X.to_numpy())
    with package(pca, "pca") as pkg:
        assert _manifest(pkg)["outputs"] == [{"name": "features", "datatype": "FP64", "shape": [-1, 2], "method": "transform"}]


def test_integer_labels_and_overrides(iris):
    X, _ = iris
    y = np.arange(len(X)) % 2
    est = LogisticRegression(max_iter=500).fit(X.to_numpy(), y)
    with package(est, "parity") as pkg:
        assert _manifest(pkg)["outputs"][0]["datatype"] == "INT64"
    custom = [{"name": "features", "datatype": "FP64", "shape": [-1, 4]}]
    with package(est, "parity", inputs=custom) as pkg:
        assert _manifest(pkg)["inputs"] == custom


def test_unfitted_or_unknown_objects_are_refused_with_what_to_pass():
    with pytest.raises(PackagingError, match="inputs="):
        package(LogisticRegression(), "unfitted")
    with pytest.raises(PackagingError, match="cannot package"):
        package(object(), "x")
    with pytest.raises(PackagingError, match="does not exist"):
        package("/nonexistent/model.onnx", "x")


def test_onnx_file_gets_a_triton_config_the_triton_runtime_reads(tmp_path):
    with package(TRITON_REPOSITORY / "mlp" / "1" / "model.onnx", "mlp2") as pkg:
        assert pkg.kind == "onnx"
        assert sorted(p.name for p in pkg.directory.iterdir()) == ["config.pbtxt", "model.onnx"]
        model_dir = tmp_path / "mlp2"
        (model_dir / "1").mkdir(parents=True)
        (model_dir / "config.pbtxt").write_bytes((pkg.directory / "config.pbtxt").read_bytes())
        config = load_config(model_dir)
    assert config.name == "mlp2" and config.max_batch_size == 64
    assert [(s.name, s.datatype, list(s.shape)) for s in config.input_specs] == [("input", "FP32", [-1, 4])]
    assert [(s.name, s.datatype, list(s.shape)) for s in config.output_specs] == [("probabilities", "FP32", [-1, 3])]


def test_spark_pipeline_directory_and_prepared_directories(tmp_path):
    with package(STORE / "pm_spark" / "1" / "pipeline", "pm") as pkg:
        assert pkg.kind == "spark" and _manifest(pkg) == {"framework": "spark"}
        assert (pkg.directory / "pipeline" / "metadata").is_dir()
        archive = pkg.archive(tmp_path / "pm.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "model.json" in names and any(n.startswith("pipeline/metadata/") for n in names)
    assert not any(n.startswith("/") or ".." in n for n in names)
    with package(STORE / "iris_scaler" / "1", "copy") as pkg:
        assert pkg.kind == "prepared" and (pkg.directory / "model.joblib").is_file()


def test_dataframe_detection_does_not_need_pandas_for_lists():
    from sluice.client import _is_dataframe

    assert _is_dataframe(pd.DataFrame({"a": [1]})) and not _is_dataframe([{"a": 1}])
