"""The Consul imitation (tests/unit/fake_consul.py) as a process of its own, for end-to-end
tests that SIGKILL it: ``python -m tests.e2e.consul_server --port P --data FILE``.

Like a Consul server's data directory, ``FILE`` keeps the catalog across a crash: every
registration and the last status of its check are written there (atomically, whenever
the index moves), and a restarted process serves them again at once, then goes on
running each gRPC check as the agent does. A killed process answers nothing (clients get
connection refused) until it is started again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
from pathlib import Path

from tests.unit.fake_consul import FakeConsul, health_entry


def save(consul: FakeConsul, path: Path) -> None:
    state = {
        "index": consul.index,
        "services": [
            {"payload": payload, "status": consul.entries[sid]["Checks"][1]["Status"]}
            for sid, payload in consul.registered.items() if sid in consul.entries
        ],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def restore(consul: FakeConsul, path: Path) -> None:
    """The catalog as it was saved: each service with its check's last status, checks running."""
    if not path.exists():
        return
    state = json.loads(path.read_text())
    consul.index = int(state["index"]) + 1
    for saved in state["services"]:
        body, status = saved["payload"], saved["status"]
        service_id = body.get("id") or body["name"]
        consul.registered[service_id] = body
        consul.entries[service_id] = health_entry(service_id, body["name"], body.get("address", ""), body["port"],
                                                  body.get("tags") or [], body.get("meta") or {}, status)
        for check in body.get("checks") or []:
            check = {k.lower(): v for k, v in check.items()}
            if "grpc" in check:
                consul._checkers[service_id] = asyncio.create_task(consul._run_grpc_check(service_id, check))


async def serve(port: int, data: Path) -> None:
    consul = FakeConsul()
    restore(consul, data)
    await consul.start(port)
    print(f"fake consul on 127.0.0.1:{consul.port}, index {consul.index}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    saved = -1
    while not stopping.is_set():
        if consul.index != saved:
            saved = consul.index
            save(consul, data)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stopping.wait(), 0.05)
    await consul.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.data))


if __name__ == "__main__":
    main()
