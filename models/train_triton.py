"""Train the Triton example models and write them as a Triton model repository.

Writes ``<root>/<model>/config.pbtxt`` and ``<root>/<model>/1/model.onnx`` in Triton's
own layout, so the same folder serves from a real Triton server (``tritonserver
--model-repository=models/triton``) or from Sluice's CPU fallback
(``runtimes.triton.fallback``). Everything is deterministic (fixed seeds, full-batch
training), and the whole run takes a few seconds:

* ``iris_onnx``: scikit-learn StandardScaler + LogisticRegression on iris, exported
  with skl2onnx (plain probability tensor, no ZipMap) plus its class label;
* ``mlp``: a 4-16-16-3 ReLU/softmax network trained on iris with NumPy, written
  node by node with ``onnx.helper``; it reads the raw measurements (FP32);
* ``mlp_scaled``: the same network before the standardisation is folded into its
  first layer, reading ``features`` FP64 [-1, 4] exactly as the ``iris_scaler``
  scikit-learn model outputs them, so it chains after that model as a stage;
* ``risk_mlp``: a 2-8-1 ReLU/sigmoid network that scores a binary classifier's
  probability vector (FP64, as Spark ML produces it) as a risk in [0, 1]; the last
  stage of a scikit -> Spark -> Triton pipeline.

The ONNX files use IR version 8 and opset 17 so that the onnxruntime builds in
Triton releases from 22.x on load them. Run: ``python models/train_triton.py
[--root DIR]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from tritonclient.grpc import model_config_pb2 as mc

DEFAULT_ROOT = Path(__file__).resolve().parent / "triton"
VERSION = "1"
ONNX_IR_VERSION = 8
ONNX_OPSET = 17
SEED = 20240601

# One model a layer: (weights [in, out], bias [out]).
Layers = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class TensorDef:
    """One tensor of a config.pbtxt: Triton data type and dims without the batch dim."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    # the shape the ONNX graph itself uses (without the batch dim), when it differs
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class TrainedModels:
    """What ``build_repository`` wrote, and the trained objects behind it (for tests)."""

    root: Path
    iris: Pipeline
    mlp: Layers
    risk_mlp: Layers
    mlp_scaled: Layers


# --- training ----------------------------------------------------------------


def train_iris_classifier() -> Pipeline:
    X, y = load_iris(return_X_y=True)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(X, y)


def train_mlp(X: np.ndarray, y: np.ndarray, sizes: list[int], *, steps: int, lr: float, seed: int) -> Layers:
    """Full-batch Adam on cross-entropy; softmax output, or sigmoid when sizes[-1] == 1."""
    rng = np.random.default_rng(seed)
    layers = [
        (rng.normal(0.0, np.sqrt(2.0 / n_in), (n_in, n_out)), np.zeros(n_out))
        for n_in, n_out in zip(sizes[:-1], sizes[1:])
    ]
    target = y.reshape(-1, 1).astype(float) if sizes[-1] == 1 else np.eye(sizes[-1])[y]
    params = [p for layer in layers for p in layer]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t in range(1, steps + 1):
        activations = [X]
        for W, b in layers[:-1]:
            activations.append(np.maximum(activations[-1] @ W + b, 0.0))
        out = _final_activation(activations[-1] @ layers[-1][0] + layers[-1][1])
        # softmax + cross-entropy and sigmoid + binary cross-entropy share this gradient
        delta = (out - target) / len(X)
        grads: list[np.ndarray] = []
        for i in range(len(layers) - 1, -1, -1):
            W, _ = layers[i]
            grads[:0] = [activations[i].T @ delta, delta.sum(axis=0)]
            if i:
                delta = (delta @ W.T) * (activations[i] > 0)
        for j, (p, g) in enumerate(zip(params, grads)):
            m[j] = 0.9 * m[j] + 0.1 * g
            v[j] = 0.999 * v[j] + 0.001 * g * g
            p -= lr * (m[j] / (1 - 0.9**t)) / (np.sqrt(v[j] / (1 - 0.999**t)) + 1e-8)
    return [(W.astype(np.float32), b.astype(np.float32)) for W, b in layers]


def _final_activation(z: np.ndarray) -> np.ndarray:
    if z.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-z))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def forward(layers: Layers, x: np.ndarray) -> np.ndarray:
    """NumPy forward pass of a trained MLP (float32), the reference for the ONNX graph."""
    h = np.asarray(x, dtype=np.float32)
    for W, b in layers[:-1]:
        h = np.maximum(h @ W + b, 0.0)
    return _final_activation(h @ layers[-1][0] + layers[-1][1]).astype(np.float32)


def train_iris_mlp_scaled() -> Layers:
    """The iris network on standardised measurements (what ``iris_scaler`` outputs)."""
    X, y = load_iris(return_X_y=True)
    mean, std = X.mean(axis=0), X.std(axis=0)
    return train_mlp((X - mean) / std, y, [4, 16, 16, 3], steps=1500, lr=0.01, seed=SEED)


def train_iris_mlp(scaled: Layers | None = None) -> Layers:
    """The iris network on raw measurements: ``scaled`` with the standardisation folded in."""
    X = load_iris().data
    mean, std = X.mean(axis=0), X.std(axis=0)
    layers = list(scaled or train_iris_mlp_scaled())
    # fold the standardisation into the first layer so the model takes raw features
    W, b = layers[0]
    W64 = W.astype(np.float64) / std[:, None]
    layers[0] = (W64.astype(np.float32), (b - (mean / std) @ W.astype(np.float64)).astype(np.float32))
    return layers


def train_risk_mlp() -> Layers:
    """Risk from a [p(negative), p(positive)] vector: high when p(positive) > 0.7."""
    rng = np.random.default_rng(SEED + 1)
    p = rng.uniform(0.0, 1.0, 2000)
    X = np.stack([1.0 - p, p], axis=1)
    y = (p + rng.normal(0.0, 0.05, p.shape) > 0.7).astype(int)
    return train_mlp(X, y, [2, 8, 1], steps=1500, lr=0.02, seed=SEED + 2)


# --- ONNX export ---------------------------------------------------------------


def iris_onnx(model: Pipeline) -> onnx.ModelProto:
    classifier = model.steps[-1][1]
    return convert_sklearn(
        model,
        "iris_onnx",
        initial_types=[("input", FloatTensorType([None, 4]))],
        final_types=[("label", Int64TensorType([None])), ("probabilities", FloatTensorType([None, 3]))],
        options={id(classifier): {"zipmap": False}},
        target_opset={"": ONNX_OPSET, "ai.onnx.ml": 3},
    )


def mlp_onnx(name: str, layers: Layers, inp: TensorDef, out: TensorDef) -> onnx.ModelProto:
    """A dense ReLU network as Gemm/Relu nodes; softmax or sigmoid output."""
    elem_type = {"TYPE_FP32": TensorProto.FLOAT, "TYPE_FP64": TensorProto.DOUBLE}[inp.data_type]
    nodes, inits = [], []
    h = inp.name
    if elem_type != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [h], ["x_fp32"], to=TensorProto.FLOAT))
        h = "x_fp32"
    for i, (W, b) in enumerate(layers):
        inits += [numpy_helper.from_array(W, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"W{i}", f"b{i}"], [f"z{i}"]))
        h = f"z{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [h], [f"h{i}"]))
            h = f"h{i}"
    final = "Sigmoid" if layers[-1][0].shape[1] == 1 else "Softmax"
    nodes.append(helper.make_node(final, [h], [out.name], **({"axis": -1} if final == "Softmax" else {})))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(inp.name, elem_type, ["batch", *inp.dims])],
        [helper.make_tensor_value_info(out.name, TensorProto.FLOAT, ["batch", *out.dims])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        producer_name="sluice-train-triton",
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
    )
    # helper stamps the newest IR version, which older onnxruntime builds refuse
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    return model


# --- config.pbtxt --------------------------------------------------------------


def triton_config(
    name: str,
    inputs: list[TensorDef],
    outputs: list[TensorDef],
    *,
    max_batch_size: int,
    max_queue_delay_us: int,
    preferred_batch_size: list[int],
) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    for defs, field in ((inputs, config.input), (outputs, config.output)):
        for d in defs:
            tensor = field.add(name=d.name, data_type=mc.DataType.Value(d.data_type), dims=d.dims)
            if d.reshape is not None:
                tensor.reshape.SetInParent()
                tensor.reshape.shape.extend(d.reshape)
    config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    config.dynamic_batching.preferred_batch_size.extend(preferred_batch_size)
    return config


def config_text(config: mc.ModelConfig, summary: str) -> str:
    """config.pbtxt text: a comment with the model's signature, then the message."""
    batch = ["-1"] if config.max_batch_size > 0 else []

    def line(t) -> str:
        datatype = mc.DataType.Name(t.data_type).removeprefix("TYPE_").replace("STRING", "BYTES")
        return f"#   {t.name}: {datatype} [{', '.join(batch + [str(d) for d in t.dims])}]"

    header = [f"# {config.name}: {summary}", "# Written by models/train_triton.py; edit that script, not this file.", "# inputs:"]
    header += [line(t) for t in config.input] + ["# outputs:"] + [line(t) for t in config.output]
    return "\n".join(header) + "\n" + text_format.MessageToString(config)


# --- the repository -------------------------------------------------------------


def write_model(root: Path, config: mc.ModelConfig, summary: str, model: onnx.ModelProto) -> Path:
    model_dir = root / config.name
    (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config_text(config, summary))
    (model_dir / VERSION / "model.onnx").write_bytes(model.SerializeToString())
    return model_dir


def build_repository(root: Path = DEFAULT_ROOT) -> TrainedModels:
    """Train every model and write the Triton repository under ``root``."""
    root = Path(root)
    iris = train_iris_classifier()
    features = TensorDef("input", "TYPE_FP32", (4,))
    probabilities = TensorDef("probabilities", "TYPE_FP32", (3,))
    write_model(
        root,
        triton_config(
            "iris_onnx",
            [features],
            # Triton needs at least one dim per batched tensor: the [batch] label is
            # served as [batch, 1] and reshaped to the graph's [batch]
            [probabilities, TensorDef("label", "TYPE_INT64", (1,), reshape=())],
            max_batch_size=32,
            max_queue_delay_us=500,
            preferred_batch_size=[8, 16],
        ),
        "iris class probabilities and label (scikit-learn LogisticRegression via skl2onnx)",
        iris_onnx(iris),
    )

    mlp_scaled = train_iris_mlp_scaled()
    mlp = train_iris_mlp(mlp_scaled)
    write_model(
        root,
        triton_config("mlp", [features], [probabilities], max_batch_size=64, max_queue_delay_us=1000, preferred_batch_size=[16, 32]),
        "iris class probabilities from a 4-16-16-3 ReLU/softmax network",
        mlp_onnx("mlp", mlp, features, probabilities),
    )
    scaled = TensorDef("features", "TYPE_FP64", (4,))
    write_model(
        root,
        triton_config("mlp_scaled", [scaled], [probabilities], max_batch_size=64, max_queue_delay_us=1000, preferred_batch_size=[16, 32]),
        "the mlp network on standardised features (iris_scaler's output), FP64 in",
        mlp_onnx("mlp_scaled", mlp_scaled, scaled, probabilities),
    )

    risk = train_risk_mlp()
    probability, score = TensorDef("probability", "TYPE_FP64", (2,)), TensorDef("risk", "TYPE_FP32", (1,))
    write_model(
        root,
        triton_config("risk_mlp", [probability], [score], max_batch_size=64, max_queue_delay_us=1000, preferred_batch_size=[16, 32]),
        "risk in [0, 1] from a binary classifier's [p(negative), p(positive)] (e.g. Spark ML's probability)",
        mlp_onnx("risk_mlp", risk, probability, score),
    )
    return TrainedModels(root=root, iris=iris, mlp=mlp, risk_mlp=risk, mlp_scaled=mlp_scaled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="model repository folder (default: %(default)s)")
    root = build_repository(parser.parse_args().root).root
    for config in sorted(root.glob("*/config.pbtxt")):
        print(f"wrote {config.parent}/{{config.pbtxt,{VERSION}/model.onnx}}")


if __name__ == "__main__":
    main()
