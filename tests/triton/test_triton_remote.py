"""A real Triton's answers (the real protobuf messages) become Sluice signatures."""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from runtimes.triton.config import load_config
from runtimes.triton.remote import RemoteTritonError, describe, discover, list_models, remote_model
from sluice.tensors import TensorSpec


def metadata_for(trained, name: str, versions=("1",)) -> pb.ModelMetadataResponse:
    """What Triton answers to ModelMetadata for a model of the repository."""
    config = load_config(trained.root / name)
    response = pb.ModelMetadataResponse(name=name, versions=list(versions), platform=config.platform)
    for specs, field in ((config.input_specs, response.inputs), (config.output_specs, response.outputs)):
        for s in specs:
            field.add(name=s.name, datatype=s.datatype, shape=list(s.shape))
    return response


def config_for(trained, name: str) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(config=load_config(trained.root / name).proto)


INDEX = pb.RepositoryIndexResponse(
    models=[
        pb.RepositoryIndexResponse.ModelIndex(name="mlp", version="1", state="READY"),
        pb.RepositoryIndexResponse.ModelIndex(name="iris_onnx", version="1", state="READY"),
        pb.RepositoryIndexResponse.ModelIndex(name="broken", version="1", state="UNAVAILABLE", reason="bad config"),
    ]
)


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Triton's repository, metadata and config RPCs, answering from the repository."""

    def __init__(self, trained, index=INDEX):
        self.trained = trained
        self.index = index

    def RepositoryIndex(self, request, context):
        return self.index

    def ModelMetadata(self, request, context):
        if request.name == "broken":
            context.abort(grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'broken' is not ready")
        return metadata_for(self.trained, request.name)

    def ModelConfig(self, request, context):
        return config_for(self.trained, request.name)


class InProcessClient:
    """The three client calls, answered by a FakeTriton without a network."""

    def __init__(self, trained):
        self.servicer = FakeTriton(trained)

    def get_model_repository_index(self, client_timeout=None):
        return self.servicer.RepositoryIndex(None, None)

    def get_model_metadata(self, model_name, model_version="", client_timeout=None):
        return self.servicer.ModelMetadata(pb.ModelMetadataRequest(name=model_name, version=model_version), None)

    def get_model_config(self, model_name, model_version="", client_timeout=None):
        return self.servicer.ModelConfig(pb.ModelConfigRequest(name=model_name, version=model_version), None)


def test_metadata_and_config_become_a_remote_model(trained):
    model = remote_model(metadata_for(trained, "iris_onnx"), config_for(trained, "iris_onnx"), "1")
    assert model.name == "iris_onnx" and model.version == "1"
    assert model.platform == "onnxruntime_onnx"
    assert model.inputs == (TensorSpec("input", "FP32", (-1, 4)),)
    assert model.outputs == (TensorSpec("probabilities", "FP32", (-1, 3)), TensorSpec("label", "INT64", (-1, 1)))
    assert (model.max_batch_size, model.max_queue_delay_us) == (32, 500)
    assert model.as_dict()["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]


def test_without_an_index_version_the_highest_is_taken(trained):
    model = remote_model(metadata_for(trained, "mlp", versions=("2", "10", "3")), config_for(trained, "mlp"))
    assert model.version == "10"


def test_a_model_without_dynamic_batching_has_no_queue_delay():
    model = remote_model(pb.ModelMetadataResponse(name="m", versions=["1"]), pb.ModelConfigResponse(config={"backend": "python"}))
    assert (model.platform, model.max_batch_size, model.max_queue_delay_us) == ("python", 0, None)


def test_list_models_describes_the_ready_ones(trained):
    models = list_models(InProcessClient(trained))
    assert [(m.name, m.version) for m in models] == [("iris_onnx", "1"), ("mlp", "1")]
    assert models[1].outputs == (TensorSpec("probabilities", "FP32", (-1, 3)),)


@pytest.fixture
def serve(trained):
    """Start a gRPC server answering as Triton would; returns its address."""
    servers = []

    def _serve(index=INDEX) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FakeTriton(trained, index), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield _serve
    for server in servers:
        server.stop(grace=None)


def test_discover_over_grpc_with_the_real_client(serve):
    models = discover(serve(), timeout_s=5)
    assert [m.as_dict() for m in models] == [
        {
            "name": "iris_onnx",
            "version": "1",
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]},
                {"name": "label", "datatype": "INT64", "shape": [-1, 1]},
            ],
            "max_batch_size": 32,
        },
        {
            "name": "mlp",
            "version": "1",
            "platform": "onnxruntime_onnx",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}],
            "max_batch_size": 64,
        },
    ]


def test_server_errors_name_the_address(serve):
    # the index says READY, but the model is gone by the time its metadata is asked for
    index = pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(name="broken", version="1", state="READY")])
    address = serve(index)
    with pytest.raises(RemoteTritonError, match=f"Triton at {address}: .*'broken' is not ready"):
        discover(address, timeout_s=5)


def test_an_unreachable_server_is_a_remote_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # bound and released: nothing listens there now
    with pytest.raises(RemoteTritonError, match=f"127.0.0.1:{port}"):
        discover(f"127.0.0.1:{port}", timeout_s=5)
