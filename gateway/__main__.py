"""``python -m gateway``: the pipeline gateway (HTTP and OIP gRPC).

Both APIs open only once the manager's pipeline set has arrived (or after
``first_set_timeout_s``): the HTTP server binds after the app's start-up, which waits
for it (``gateway.app``), and the gRPC server is started here once it is in. A
restarted gateway behind a sidecar that already sends it requests thus never answers
"no such pipeline" for one it has not received yet: its refused connections are retried
on another gateway instance (``sluice up --replicas``) or fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from gateway.app import create
from gateway.settings import GatewaySettings
from sluice.logs import setup_logging
from sluice.serving import install_uvloop, serve
from sluice.settings import CommonSettings
from sluice.tracing import setup_tracing


async def _start_when_ready(server: grpc.aio.Server, ready: asyncio.Event, timeout_s: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(ready.wait(), timeout_s)
    await server.start()


def main() -> None:
    settings, common = GatewaySettings(), CommonSettings()
    setup_logging("gateway", common.log_level)
    install_uvloop()

    async def run() -> None:
        app, grpc_server = create(settings, setup_tracing("gateway", common))
        if grpc_server is None:
            await serve(app, settings.host, settings.port)
            return
        opener = asyncio.create_task(_start_when_ready(grpc_server, app.state.table.ready, settings.first_set_timeout_s))

        async def stop_grpc() -> None:
            opener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opener
            await grpc_server.stop(grace=2)

        await serve(app, settings.host, settings.port, on_shutdown=stop_grpc)

    asyncio.run(run())


if __name__ == "__main__":
    main()
