"""Benchmark: overload is shed, not queued. The iris pipeline (2 stages) on a real local
mesh (manager, repository, scikit runtime, gateway, their Envoys) with explicit limits,
under 1, 8, 64 and 256 concurrent closed-loop clients (asyncio, one keep-alive
connection each, one record a request) for ``--seconds`` each.

Limits (set here, all from settings): the gateway sidecar admits ``--gateway-limit``
requests to the gateway at once (``SLUICE_MANAGER_GATEWAY_MAX_REQUESTS``; at most
``--gateway-limit`` more wait for a connection), the gateway process serves at most
``--gateway-limit`` (``SLUICE_GATEWAY_MAX_IN_FLIGHT``), the runtime's cluster admits
``--runtime-limit`` stage calls (``SLUICE_MANAGER_RUNTIME_MAX_REQUESTS``) and the
runtime process serves as many (``SLUICE_RUNTIME_MAX_IN_FLIGHT``). Beyond them a
request is answered 503 with ``Retry-After``; a shed client waits that long (a polite
client) unless ``--no-backoff``.

Prints per level: goodput (200s per second), p50/p99 latency of the 200s, shed (503s
with Retry-After: by the gateway, ``overloaded``, or naming a stage, ``stage_overloaded``),
other errors (any other answer, or none), and the slowest answer of all (shed included). Run by hand:
``.venv/bin/python bench/overload.py [--seconds 5] [--gateway-limit 32] [--runtime-limit 16]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec  # noqa: E402
from sluice.serving import install_uvloop  # noqa: E402

LEVELS = (1, 8, 64, 256)
RECORD = [{"sepal_length": 6.3, "sepal_width": 3.3, "petal_length": 6.0, "petal_width": 2.5}]
CHAIN = ["scikit/iris_scaler", "scikit/iris_classifier"]
#: the error codes of a shed request: the gateway's limit (its sidecar's or its own), a stage's
SHED_CODES = ("overloaded", "stage_overloaded")


@dataclass
class Level:
    clients: int
    seconds: float
    ok: list[float] = field(default_factory=list)  # latencies of the 200s
    shed: int = 0  # 503s
    errors: int = 0  # any other status, or no answer
    slowest: float = 0.0
    shed_codes: dict[str, int] = field(default_factory=dict)

    def row(self) -> list[str]:
        ok = sorted(self.ok)
        p = (lambda q: f"{ok[min(len(ok) - 1, int(q * len(ok)))] * 1000:.1f}") if ok else (lambda q: "-")
        return [
            str(self.clients), f"{len(ok) / self.seconds:.0f}", p(0.50), p(0.99), str(self.shed),
            str(self.shed_codes.get("overloaded", 0)), str(self.shed_codes.get("stage_overloaded", 0)),
            str(self.errors), f"{self.slowest * 1000:.0f}",
        ]


class Connection:
    """A minimal HTTP/1.1 keep-alive client for one pre-encoded request: a few tens of
    microseconds of Python a request, so that 256 clients in one process measure the
    mesh, not the client (httpx costs about a millisecond a request)."""

    def __init__(self, host: str, port: int, request: bytes):
        self.host, self.port, self.request = host, port, request
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self) -> tuple[int, dict[bytes, bytes], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
        body = await self.reader.readexactly(int(headers.get(b"content-length", b"0")))
        if headers.get(b"connection", b"").lower() == b"close":
            await self.close()
        return status, headers, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def _request_bytes(host: str, port: int) -> bytes:
    body = json.dumps(RECORD).encode()
    return (
        f"POST /serve/iris HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _client(connection: Connection, level: Level, stop_at: float, backoff: bool) -> None:
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            status, headers, body = await connection.send()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            level.errors += 1
            await connection.close()
            continue
        elapsed = time.perf_counter() - started
        level.slowest = max(level.slowest, elapsed)
        if status == 200:
            level.ok.append(elapsed)
        elif status == 503 and b"retry-after" in headers and (code := json.loads(body)["error"]["code"]) in SHED_CODES:
            level.shed += 1
            level.shed_codes[code] = level.shed_codes.get(code, 0) + 1
            if backoff:  # a polite client: come back after Retry-After (jittered)
                await asyncio.sleep(float(headers[b"retry-after"]) * random.uniform(0.5, 1.0))
        else:
            level.errors += 1


async def _level(url: str, clients: int, seconds: float, backoff: bool) -> Level:
    level = Level(clients, seconds)
    parsed = httpx.URL(url)
    request = _request_bytes(parsed.host, parsed.port)
    connections = [Connection(parsed.host, parsed.port, request) for _ in range(clients)]
    try:
        for _ in range(3):  # warm the path
            await connections[0].send()
        stop_at = time.perf_counter() + seconds
        await asyncio.gather(*(_client(c, level, stop_at, backoff) for c in connections))
    finally:
        for connection in connections:
            await connection.close()
    return level


async def run(args: argparse.Namespace) -> None:
    console = Console(width=160)
    env = {
        "SLUICE_MANAGER_GATEWAY_MAX_REQUESTS": str(args.gateway_limit),
        "SLUICE_MANAGER_GATEWAY_MAX_PENDING": str(args.gateway_limit),
        "SLUICE_GATEWAY_MAX_IN_FLIGHT": str(args.gateway_limit),
        "SLUICE_MANAGER_RUNTIME_MAX_REQUESTS": str(args.runtime_limit),
        "SLUICE_RUNTIME_MAX_IN_FLIGHT": str(args.runtime_limit),
    }
    with tempfile.TemporaryDirectory() as workdir:
        mesh = LocalMesh(Path(workdir), [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
                         MeshPorts.ephemeral(), env=env)
        with mesh:
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": "iris", "chain": CHAIN}, timeout=30)
            created.raise_for_status()
            levels = []
            for clients in args.levels:
                console.print(f"{clients} clients for {args.seconds:g} s ...")
                levels.append(await _level(mesh.gateway_url, clients, args.seconds, not args.no_backoff))
    table = Table(title=(
        f"iris pipeline under load: gateway limit {args.gateway_limit}, runtime limit {args.runtime_limit}, "
        f"{args.seconds:g} s a level, shed clients {'retry at once' if args.no_backoff else 'wait Retry-After'}"
    ))
    for column in ("clients", "goodput req/s", "p50 ms (200s)", "p99 ms (200s)", "shed (503)", "by the gateway",
                   "by a stage", "errors", "slowest ms"):
        table.add_column(column, justify="right")
    for level in levels:
        table.add_row(*level.row())
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--gateway-limit", type=int, default=32)
    parser.add_argument("--runtime-limit", type=int, default=16)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument("--no-backoff", action="store_true", help="shed clients send again at once")
    args = parser.parse_args()
    install_uvloop()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
