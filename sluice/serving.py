"""Runs a service's servers in one asyncio loop: a FastAPI app under uvicorn and,
optionally, a grpc.aio server, stopping both cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import grpc
import uvicorn

log = logging.getLogger(__name__)


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()


async def serve(
    app,
    host: str,
    port: int,
    grpc_server: grpc.aio.Server | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    limit_concurrency: int | None = None,
) -> None:
    """Serve ``app`` (and ``grpc_server``, already bound) until a stop signal."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        loop="none",
        http="httptools",
        lifespan="on",
        limit_concurrency=limit_concurrency,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    if grpc_server is not None:
        await grpc_server.start()
    try:
        await server.serve()
    finally:
        if on_shutdown is not None:
            await on_shutdown()
        if grpc_server is not None:
            await grpc_server.stop(grace=2)
