"""``python -m repository``: the model repository's HTTP server."""

from __future__ import annotations

import asyncio

from repository.app import create
from repository.settings import RepositorySettings
from sluice.logs import setup_logging
from sluice.serving import install_uvloop, serve
from sluice.settings import CommonSettings


def main() -> None:
    settings = RepositorySettings()
    setup_logging("repository", CommonSettings().log_level)
    install_uvloop()
    asyncio.run(serve(create(settings), settings.host, settings.port))


if __name__ == "__main__":
    main()
