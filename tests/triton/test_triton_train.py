"""The training script writes a deterministic Triton repository that a real Triton loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from sklearn.datasets import load_iris

REPO = Path(__file__).resolve().parents[2]
MODELS = ("iris_onnx", "mlp", "mlp_scaled", "risk_mlp")


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_tritons(trained):
    assert set(_files(trained.root)) == {f"{m}/{f}" for m in MODELS for f in ("config.pbtxt", "1/model.onnx")}


def test_build_is_deterministic(train_triton, trained, tmp_path):
    again = train_triton.build_repository(tmp_path)
    assert _files(again.root) == _files(trained.root)


def test_committed_configs_are_what_the_script_writes(trained):
    for model in MODELS:
        committed = REPO / "models" / "triton" / model / "config.pbtxt"
        assert committed.read_text() == (trained.root / model / "config.pbtxt").read_text(), model


def test_onnx_files_load_in_older_onnxruntime_builds(trained):
    # what the onnxruntime inside Triton releases from 22.x supports
    for model in MODELS:
        proto = onnx.load(trained.root / model / "1" / "model.onnx")
        onnx.checker.check_model(proto)
        assert proto.ir_version <= 8, model
        assert all(o.version <= 17 for o in proto.opset_import if o.domain in ("", "ai.onnx")), model


def test_models_learned_their_task(trained, train_triton):
    X, y = load_iris(return_X_y=True)
    assert (trained.iris.predict(X) == y).mean() > 0.95
    assert (train_triton.forward(trained.mlp, X).argmax(axis=1) == y).mean() > 0.95
    # mlp_scaled is mlp before the standardisation was folded in: same answers on scaled input
    scaled = ort.InferenceSession(str(trained.root / "mlp_scaled" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    (from_scaled,) = scaled.run(None, {"features": (X - X.mean(axis=0)) / X.std(axis=0)})
    np.testing.assert_allclose(from_scaled, train_triton.forward(trained.mlp, X), atol=1e-5)
    assert (from_scaled.argmax(axis=1) == y).mean() > 0.95
    session = ort.InferenceSession(str(trained.root / "risk_mlp" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    p = np.array([0.05, 0.5, 0.95])
    risk = session.run(None, {"probability": np.stack([1 - p, p], axis=1)})[0].ravel()
    assert risk[0] < 0.1 and risk[2] > 0.9
    assert np.all(np.diff(risk) > 0)
