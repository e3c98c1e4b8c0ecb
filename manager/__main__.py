"""``python -m manager``: the control plane (REST API + xDS server)."""

from __future__ import annotations

import asyncio

from manager.app import create
from manager.settings import ManagerSettings
from sluice.logs import setup_logging
from sluice.serving import install_uvloop, serve
from sluice.settings import CommonSettings
from sluice.tracing import setup_tracing


def main() -> None:
    settings, common = ManagerSettings(), CommonSettings()
    setup_logging("manager", common.log_level)
    install_uvloop()

    async def run() -> None:
        app, grpc_server, _ = create(settings, common, setup_tracing("manager", common))
        await serve(app, settings.host, settings.port, grpc_server=grpc_server)

    asyncio.run(run())


if __name__ == "__main__":
    main()
