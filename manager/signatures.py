"""Reads the models a runtime serves and their signatures over OIP v2 gRPC.

Works against any Open-Inference-Protocol server (our runtimes, Triton, MLServer):
ModelMetadata for each named model, or the repository index when none are named.
A model named without a version is read as the server answers it unpinned: our
runtimes answer with their default version (the model's version-policy default when
loaded, else the highest: ``sluice.version_policy``), Triton with its highest loaded
one; so an unpinned stage is checked against the signature of the version that will
serve it.
The call goes to the runtime's sidecar over mTLS with the manager's certificate
(``manager.tls``), and checks that the sidecar is the named runtime's.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from manager import tls


class SignatureError(RuntimeError):
    pass


def _tensors(items) -> list[dict]:
    return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]


def split_model_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition(":")
    return name, version


async def read_signatures(host: str, port: int, models: list[str], timeout_s: float, *, runtime: str) -> dict[str, dict]:
    """Model name -> {versions, platform, inputs, outputs} read from the server, the
    sidecar of runtime ``runtime``."""
    async with tls.runtime_channel(host, port, runtime) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            if not models:
                index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=timeout_s)
                models = sorted({m.name for m in index.models})
            out: dict[str, dict] = {}
            for ref in models:
                name, version = split_model_ref(ref)
                meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=timeout_s)
                out[name] = {
                    "versions": list(meta.versions) or ([version] if version else []),
                    "platform": meta.platform,
                    "inputs": _tensors(meta.inputs),
                    "outputs": _tensors(meta.outputs),
                }
            return out
        except grpc.aio.AioRpcError as exc:
            raise SignatureError(f"{host}:{port}: {exc.code().name}: {exc.details()}") from exc
