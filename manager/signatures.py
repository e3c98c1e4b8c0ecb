"""Reads the models a runtime serves and their signatures over OIP v2 gRPC.

Works against any Open-Inference-Protocol server (our runtimes, Triton, MLServer):
ModelMetadata for each named model, or the repository index when none are named.
A model named without a version is read as the server answers it unpinned: our
runtimes answer with their default version (the model's version-policy default when
loaded, else the highest: ``sluice.version_policy``), Triton with its highest loaded
one; so an unpinned stage is checked against the signature of the version that will
serve it. A model with several versions loaded has each version's signature read too
(``ServedModel.by_version``), so a stage pinned to a version, or a split between
versions, is checked against the version that serves it.
The call goes to the runtime's sidecar over mTLS with the manager's certificate
(``manager.tls``), and checks that the sidecar is the named runtime's.
"""

from __future__ import annotations

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from manager import tls
from manager.served_models import ServedModel, Signature
from sluice.tensors import TensorSpec


class SignatureError(RuntimeError):
    pass


def _signature(meta: pb.ModelMetadataResponse) -> Signature:
    def tensors(items) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in items)

    return Signature(tensors(meta.inputs), tensors(meta.outputs))


def split_model_ref(ref: str) -> tuple[str, str]:
    name, _, version = ref.partition(":")
    return name, version


async def read_signatures(host: str, port: int, models: list[str], timeout_s: float, *, runtime: str) -> dict[str, ServedModel]:
    """Each model (a name, or ``name:version``) as the server, the sidecar of runtime
    ``runtime``, serves it."""
    async with tls.runtime_channel(host, port, runtime) as channel:
        try:
            return await read_from(pb_grpc.GRPCInferenceServiceStub(channel), models, timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise SignatureError(f"{host}:{port}: {exc.code().name}: {exc.details()}") from exc


async def read_from(stub: pb_grpc.GRPCInferenceServiceStub, models: list[str], timeout_s: float) -> dict[str, ServedModel]:
    """``read_signatures`` over a stub (every model the server has ready when ``models`` is empty)."""
    if not models:
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=timeout_s)
        models = sorted({m.name for m in index.models})
    out: dict[str, ServedModel] = {}
    for ref in models:
        name, version = split_model_ref(ref)
        meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version), timeout=timeout_s)
        by_version = {}
        if len(meta.versions) > 1:
            for v in meta.versions:
                each = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=v), timeout=timeout_s)
                by_version[v] = _signature(each)
        out[name] = ServedModel(tuple(meta.versions) or ((version,) if version else ()), meta.platform, _signature(meta), by_version)
    return out
