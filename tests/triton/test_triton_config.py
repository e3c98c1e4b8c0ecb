"""config.pbtxt parsing: Triton's schema in, TensorSpecs and batching settings out."""

from __future__ import annotations

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from runtimes.triton.config import ConfigError, load_config, model_config, oip_datatype, parse_config
from sluice.tensors import TensorSpec


def test_iris_config(trained):
    config = load_config(trained.root / "iris_onnx")
    assert config.name == "iris_onnx"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 32
    assert config.input_specs == [TensorSpec("input", "FP32", (-1, 4))]
    assert config.output_specs == [TensorSpec("probabilities", "FP32", (-1, 3)), TensorSpec("label", "INT64", (-1, 1))]
    # the label is [batch, 1] for clients and [batch] inside the ONNX graph
    assert [t.model_shape for t in config.outputs] == [(-1, 3), (-1,)]
    assert config.dynamic_batching.max_queue_delay_us == 500
    assert config.dynamic_batching.preferred_batch_sizes == (8, 16)
    assert config.instance_count == 1


def test_mlp_and_risk_configs(trained):
    mlp = load_config(trained.root / "mlp")
    assert (mlp.max_batch_size, mlp.dynamic_batching.max_queue_delay_us) == (64, 1000)
    assert mlp.input_specs == [TensorSpec("input", "FP32", (-1, 4))]
    assert mlp.output_specs == [TensorSpec("probabilities", "FP32", (-1, 3))]
    risk = load_config(trained.root / "risk_mlp")
    assert risk.input_specs == [TensorSpec("probability", "FP64", (-1, 2))]
    assert risk.output_specs == [TensorSpec("risk", "FP32", (-1, 1))]


@pytest.mark.parametrize(
    "triton, oip",
    [("TYPE_FP32", "FP32"), ("TYPE_FP64", "FP64"), ("TYPE_FP16", "FP16"), ("TYPE_INT64", "INT64"),
     ("TYPE_UINT8", "UINT8"), ("TYPE_BOOL", "BOOL"), ("TYPE_STRING", "BYTES"), ("TYPE_BF16", "BF16")],
)
def test_datatypes(triton, oip):
    assert oip_datatype(mc.DataType.Value(triton)) == oip


def test_missing_datatype_is_refused():
    with pytest.raises(ConfigError, match="no data_type"):
        model_config(parse_config('input { name: "x" dims: 1 } output { name: "y" data_type: TYPE_FP32 dims: 1 }'))


def test_no_batch_dim_without_max_batch_size():
    config = model_config(parse_config('max_batch_size: 0 input { name: "x" data_type: TYPE_STRING dims: [ 2, 3 ] }'), name="dir")
    assert config.name == "dir"  # Triton names a model after its directory
    assert config.input_specs == [TensorSpec("x", "BYTES", (2, 3))]
    assert config.dynamic_batching is None


def test_dynamic_batching_needs_a_batch_dim():
    with pytest.raises(ConfigError, match="max_batch_size > 0"):
        model_config(parse_config("max_batch_size: 0 dynamic_batching { }"))


def test_instance_groups_add_up():
    config = model_config(parse_config("instance_group [ { count: 2 kind: KIND_CPU }, { count: 3 } ]"))
    assert config.instance_count == 5


def test_parse_error_says_where(tmp_path):
    (tmp_path / "config.pbtxt").write_text('name: "m"\nmax_batch_size: lots\n')
    with pytest.raises(ConfigError, match="2:"):
        load_config(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)
