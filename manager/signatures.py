"""Reads the models a runtime serves and their signatures over OIP v2 gRPC.

Works against any Open-Inference-Protocol server (our runtimes, Triton, MLServer):
ModelMetadata for each named model, or the repository index when none are named.
A model named without a version is read as the server answers it unpinned: our
runtimes answer with their default version (the model's version-policy default when
loaded, else the highest: ``sluice.version_policy``), Triton with its highest loaded
one; so an unpinned stage is checked against the signature of the version that will
serve it. A model with several versions loaded has each version's signature read too
(``by_version``), so a stage pinned to a version, or a split between versions, is
checked against the version that serves it (``signature_for``).
The call goes to the runtime's sidecar over mTLS with the manager's certificate
(``manager.tls``), and checks that the sidecar is the named runtime's.
"""

from __future__ import annotations

from typing import Any

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
    """Model name -> {versions, platform, inputs, outputs[, by_version]} read from the
    server, the sidecar of runtime ``runtime``."""
    async with tls.runtime_channel(host, port, runtime) as channel:
        try:
            return await read_from(pb_grpc.GRPCInferenceServiceStub(channel), models, timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise SignatureError(f"{host}:{port}: {exc.code().name}: {exc.details()}") from exc


async def read_from(stub: pb_grpc.GRPCInferenceServiceStub, models: list[str], timeout_s: float) -> dict[str, dict]:
    """``read_signatures`` over a stub (every model the server has ready when ``models`` is empty)."""
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
        if len(meta.versions) > 1:
            by_version = {}
            for v in meta.versions:
                each = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=v), timeout=timeout_s)
                by_version[v] = {"inputs": _tensors(each.inputs), "outputs": _tensors(each.outputs)}
            out[name]["by_version"] = by_version
    return out


def signature_for(model: dict[str, Any], version: str) -> dict[str, Any]:
    """The ``inputs`` and ``outputs`` of ``version`` of a model as ``read_signatures`` read
    it ("" or a version not read alone: the unpinned answer's)."""
    return (model.get("by_version") or {}).get(version, model) if version else model
