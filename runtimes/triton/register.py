"""``python -m runtimes.triton.register``: announce a real Triton server to the mesh.

A real Triton is an OIP v2 server that Sluice does not run, so nothing inside it
registers. This helper does it on its behalf, through the same manager API every
runtime uses:

1. wait (bounded by ``--wait-s``) until Triton answers and has READY models, listed
   with ``remote.discover`` (repository index, metadata, config), or take ``--models``;
2. register it as every runtime does: with ``SLUICE_CONSUL_ADDR`` set, as a Consul
   service with a gRPC health check (``runtimes.sdk.consul``); otherwise with
   ``POST /api/v1/runtimes`` ``{name, kind: "triton", host, port, models}`` and
   heartbeats (``runtimes.sdk.registration``). Either way the manager reads the
   signatures itself over OIP ModelMetadata, as for any runtime;
3. keep the registration alive until SIGTERM/SIGINT, then withdraw it.

``--address`` is where the mesh sends stage calls (Triton's sidecar in compose, e.g.
``triton:9000``); ``--discover`` is where Triton's own gRPC port is read, by default
the same address.

    python -m runtimes.triton.register --address triton:9000 --discover triton:8001 \\
        --name triton --manager http://manager:8080
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from runtimes.sdk.app import registration_for as registration  # the SDK's own choice: Consul or the manager
from runtimes.sdk.registration import Registration
from runtimes.triton.remote import RemoteModel, RemoteTritonError, discover
from sluice.logs import setup_logging
from sluice.settings import CommonSettings

if TYPE_CHECKING:
    from runtimes.sdk.consul import ConsulRegistration

log = logging.getLogger(__name__)


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{address!r} is not host:port")
    return host, int(port)


def wait_for_models(
    address: str,
    wait_s: float,
    lister: Callable[[str], list[RemoteModel]] = discover,
    interval_s: float = 1.0,
) -> list[RemoteModel]:
    """The server's READY models, polling until it has some or ``wait_s`` has passed."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            models = lister(address)
            if models:
                return models
            why = "no model is READY yet"
        except RemoteTritonError as exc:
            why = str(exc)
        if time.monotonic() + interval_s > deadline:
            raise RemoteTritonError(f"Triton at {address} has no READY model after {wait_s:.0f}s: {why}")
        log.info("waiting for Triton at %s: %s", address, why)
        time.sleep(interval_s)


async def announce(registration: Registration | ConsulRegistration) -> None:
    """Keep ``registration`` alive until SIGTERM/SIGINT, then withdraw it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    registration.start()
    await stop.wait()
    await registration.stop()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m runtimes.triton.register", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, type=split_address, help="host:port the mesh routes stage calls to")
    parser.add_argument("--discover", help="host:port of Triton's own gRPC endpoint (default: --address)")
    parser.add_argument("--name", default="triton", help="the runtime's name in pipelines (default: %(default)s)")
    parser.add_argument("--kind", default="triton", help="reported kind (default: %(default)s)")
    parser.add_argument("--manager", default="http://127.0.0.1:8080", help="the manager's REST URL, without Consul (default: %(default)s)")
    parser.add_argument("--models", default="", help="comma-separated models to announce (default: every READY one)")
    parser.add_argument("--wait-s", type=float, default=120.0, help="how long to wait for READY models (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging("triton-register", CommonSettings().log_level)
    host, port = args.address
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models:
        found = wait_for_models(args.discover or f"{host}:{port}", args.wait_s)
        models = sorted({m.name for m in found})
        for m in found:
            log.info("Triton serves %s:%s (%s) %s -> %s", m.name, m.version, m.platform,
                     [s.as_dict() for s in m.inputs], [s.as_dict() for s in m.outputs])

    async def run() -> None:  # the registrations bind their clients to the running loop
        await announce(registration(args.manager, args.name, args.kind, host, port, models))

    asyncio.run(run())


if __name__ == "__main__":
    main()
