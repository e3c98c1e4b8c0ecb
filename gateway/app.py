"""Wires the gateway: pipeline table and its watch, the stage executor, HTTP and gRPC APIs.

HTTP: ``/serve/<p>`` (records, ``gateway.api``) and OIP REST v2 (``gateway.v2``); gRPC:
OIP (``gateway.oip``). Both OIP front doors share one ``PipelineModels``. Paths under
``/v2`` answer every error, the framework's own (unknown path, wrong method, a
crash) included, in OIP's ``{"error": "..."}`` shape, and enforce the body limit
themselves (so that its 413 is in that shape too). Every front door runs pipelines through
one executor, which folds concurrent requests to one revision into shared runs
(``gateway.batching``, ``SLUICE_GATEWAY_BATCH_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from gateway.api import NDJSON, router
from gateway.batching import Batcher, BatchSettings
from gateway.executor import Executor
from gateway import openapi, v2
from gateway.oip import PipelineInferenceService
from gateway.oip_models import PipelineModels
from gateway.pipelines import PipelineTable, WatchCredentials, watch_pipelines
from gateway.served_by import ServedByMiddleware
from gateway.settings import GatewaySettings
from sluice.errors import error_response, error_responses, install_error_handlers
from sluice.limits import BodyLimitMiddleware, InFlightLimit
from sluice.metrics import mount_metrics
from sluice.tracing import TracingMiddleware, Tracing, stage_work


class PhasedExecutor(Executor):
    """The executor, folding concurrent requests to one revision into one run
    (``gateway.batching``; off unless ``batching`` says so), and marking on the request's
    span when its stage calls began and ended, so the span carries the gateway's parse
    and encode times (``sluice.tracing.stage_work``)."""

    def __init__(self, *args, batching: BatchSettings = BatchSettings(max_rows=0), **kwargs):
        super().__init__(*args, **kwargs)
        self.batcher = Batcher(super().run, self.table, batching)

    async def run(self, pipeline, inputs):
        with stage_work():
            return await self.batcher.run(pipeline, inputs)


def create(settings: GatewaySettings, tracing: Tracing | None = None) -> tuple[FastAPI, grpc.aio.Server | None]:
    """Build the gateway; call from inside the running event loop (the channel binds to it)."""
    tracing = tracing or Tracing("gateway", None)
    credentials = WatchCredentials.load(settings.xds_token, settings.xds_token_file, settings.xds_ca_file)
    table = PipelineTable(fuse=settings.fuse_stages)
    batching = BatchSettings(settings.batch_max_rows, settings.batch_max_bytes, settings.batch_max_runs)
    executor = PhasedExecutor(table, settings.egress, settings.max_message_bytes, tracing, batching=batching)
    models = PipelineModels(table, executor)

    grpc_server = None
    if settings.grpc_port:
        grpc_server = grpc.aio.server(
            maximum_concurrent_rpcs=settings.max_in_flight,
            options=[
                ("grpc.max_receive_message_length", settings.max_body_bytes),
                ("grpc.max_send_message_length", settings.max_message_bytes),
            ]
        )
        grpc_server.add_insecure_port(f"{settings.host}:{settings.grpc_port}")
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(PipelineInferenceService(table, executor, models, settings.stream_max_in_flight), grpc_server)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(
            watch_pipelines(table, settings.manager_grpc, settings.node_id, settings.deadline_slack_ms, credentials)
        )
        # uvicorn binds the port after start-up: no request before the pipeline set (bounded)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(table.ready.wait(), settings.first_set_timeout_s)
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await executor.close()

    app = FastAPI(title="Sluice gateway", version="0.1.0", lifespan=lifespan)
    app.state.table = table
    app.state.executor = executor
    app.state.oip = models
    app.state.max_body_bytes = settings.max_body_bytes
    app.state.stream_max_in_flight = settings.stream_max_in_flight
    install_error_handlers(app)
    _oip_errors_on_v2(app)
    app.include_router(router)
    app.include_router(v2.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/healthz/ready", tags=["health"], responses=error_responses(503, s503="no pipeline set received from the manager yet"))
    async def ready():
        if not table.ready.is_set():
            return error_response(503, "no pipeline set received from the manager yet")
        return {"status": "ready", "pipelines": len(table.pipelines), "version": table.version}

    openapi.install(app, table)
    mount_metrics(app)
    # /v2 reads its bodies under the same limit itself (gateway.v2), answering in OIP's shape
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, overrides={r"/v2(/|$)": 1 << 62},
                       streamed=(NDJSON,))  # NDJSON streams: a limit per line (gateway.api)
    app.add_middleware(TracingMiddleware, tracing=tracing)
    app.add_middleware(ServedByMiddleware)  # x-sluice-served-by, forwarded variant/sticky headers
    # outermost: shed beyond max_in_flight before any work; Retry-After on every 503
    app.add_middleware(InFlightLimit, max_in_flight=settings.max_in_flight, retry_after_s=settings.retry_after_s)
    return app, grpc_server


def _oip_errors_on_v2(app: FastAPI) -> None:
    """On ``/v2`` paths, the framework's errors in OIP's shape; elsewhere the project's."""
    project = dict(app.exception_handlers)

    def wrap(kind, status_of, message_of):
        fallback = project[kind]

        async def handler(request: Request, exc: Exception):
            path = request.url.path
            if path != "/v2" and not path.startswith("/v2/"):
                return await fallback(request, exc)
            response = v2.error(status_of(exc), message_of(exc))
            for key, value in (getattr(exc, "headers", None) or {}).items():  # e.g. a 405's Allow
                response.headers[key] = value
            return response

        app.add_exception_handler(kind, handler)

    wrap(StarletteHTTPException, lambda e: e.status_code, lambda e: str(e.detail))
    wrap(RequestValidationError, lambda e: 400, lambda e: f"invalid request: {e.errors()[0].get('msg', '') if e.errors() else ''}")
    wrap(Exception, lambda e: 500, lambda e: f"internal error ({type(e).__name__})")
