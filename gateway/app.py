"""Wires the gateway: pipeline table and its watch, the stage executor, HTTP and gRPC APIs."""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.api import router
from gateway.executor import Executor
from gateway.oip import PipelineInferenceService
from gateway.pipelines import PipelineTable, watch_pipelines
from gateway.settings import GatewaySettings
from sluice.errors import error_response, install_error_handlers
from sluice.limits import BodyLimitMiddleware
from sluice.metrics import mount_metrics
from sluice.tracing import TracingMiddleware, Tracing


def create(settings: GatewaySettings, tracing: Tracing | None = None) -> tuple[FastAPI, grpc.aio.Server | None]:
    """Build the gateway; call from inside the running event loop (the channel binds to it)."""
    tracing = tracing or Tracing("gateway", None)
    table = PipelineTable()
    executor = Executor(table, settings.egress, settings.max_message_bytes, tracing)

    grpc_server = None
    if settings.grpc_port:
        grpc_server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ]
        )
        grpc_server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(PipelineInferenceService(table, executor), grpc_server)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(
            watch_pipelines(table, settings.manager_grpc, settings.node_id, settings.deadline_slack_ms)
        )
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await executor.close()

    app = FastAPI(title="Sluice gateway", version="0.1.0", lifespan=lifespan)
    app.state.table = table
    app.state.executor = executor
    install_error_handlers(app)
    app.include_router(router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/healthz/ready", tags=["health"])
    async def ready():
        if not table.ready.is_set():
            return error_response(503, "no pipeline set received from the manager yet")
        return {"status": "ready", "pipelines": len(table.pipelines), "version": table.version}

    mount_metrics(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TracingMiddleware, tracing=tracing)
    return app, grpc_server
