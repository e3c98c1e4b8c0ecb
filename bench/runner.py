"""What every request-count benchmark's ``main`` does: parse ``--requests``, use uvloop
when it is there, run the async benchmark."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

from sluice.serving import install_uvloop


def run_benchmark(run: Callable[[int], Awaitable[None]], doc: str | None, default_requests: int = 2000) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=default_requests)
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(run(args.requests))
