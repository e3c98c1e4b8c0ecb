"""The gateway app's OIP gRPC front door (``gateway.oip``) on a free loopback port, in the
test's event loop, for unit tests that drive it with a real gRPC client."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.oip import PipelineInferenceService


@contextlib.asynccontextmanager
async def oip_stub(app, stream_max_in_flight: int = 16,
                   options: Sequence[tuple[str, int]] = ()) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    """A stub to ``app``'s pipelines over OIP gRPC; the server stops on exit."""
    server = grpc.aio.server(options=list(options))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        PipelineInferenceService(app.state.table, app.state.executor, app.state.oip, stream_max_in_flight), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.GRPCInferenceServiceStub(channel)
    finally:
        await server.stop(None)
