"""A runtime's OIP gRPC service served in-process, for unit tests: the SDK's
``InferenceService`` over a ``ModelSet`` on a free loopback port, stopped (and its
models and repository client closed) at the end."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtimes.sdk.models import ModelSet
from runtimes.sdk.server import InferenceService


@contextlib.asynccontextmanager
async def served(models: ModelSet, name: str = "inproc", kind: str = "scikit", **options) -> AsyncIterator[str]:
    """The ``host:port`` of a runtime serving ``models``; ``options`` go to InferenceService."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(name, kind, models, **options), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await models.close()
        if models.repository is not None:
            await models.repository.aclose()


@contextlib.asynccontextmanager
async def stub_of(address: str) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)
