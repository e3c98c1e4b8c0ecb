"""``python -m gateway``: the pipeline gateway (HTTP and OIP gRPC)."""

from __future__ import annotations

import asyncio

from gateway.app import create
from gateway.settings import GatewaySettings
from sluice.logs import setup_logging
from sluice.serving import install_uvloop, serve
from sluice.settings import CommonSettings
from sluice.tracing import setup_tracing


def main() -> None:
    settings, common = GatewaySettings(), CommonSettings()
    setup_logging("gateway", common.log_level)
    install_uvloop()

    async def run() -> None:
        app, grpc_server = create(settings, setup_tracing("gateway", common))
        await serve(app, settings.host, settings.port, grpc_server=grpc_server)

    asyncio.run(run())


if __name__ == "__main__":
    main()
