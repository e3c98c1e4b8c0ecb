"""An imitation of the parts of Consul's HTTP API that Sluice uses, for tests without an agent.

A real local HTTP server (aiohttp), so py-consul's own client talks to it over the
wire. It follows Consul's documented behaviour:

* ``GET /v1/catalog/services``: ``{name: [tags]}``; ``GET /v1/health/service/<name>``:
  ``[{"Node", "Service", "Checks"}]`` with ``passing`` and ``tag`` filters. Both are
  blocking queries: with ``index=N`` the answer is held until the data's index moves
  past N or ``wait`` expires, then comes back with ``X-Consul-Index``. As in Consul,
  an unrelated write may wake a query (one index for everything here).
* ``PUT /v1/agent/service/register`` (case-insensitive keys, as Consul decodes them),
  ``PUT /v1/agent/service/deregister/<id>``, ``GET /v1/agent/services``. A registered
  gRPC check starts ``critical`` and is then run like the agent runs it: ``grpc.health.v1``
  ``Check`` against its address every ``interval``.

Test controls: ``fail(path, n)`` (answer the next n requests for path with 500),
``rewind`` (the index goes backwards, as after a snapshot restore, which in Consul also
wakes every blocking query), ``touch`` (a write that changes nothing we read), and
``requests`` (every request seen, with its time, query, status and ACL token);
``acl_token`` turns ACLs on (default deny: a request without that token is a 403).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

NODE = {
    "ID": "40e4a748-2192-161a-0510-9bf59fe950b5",
    "Node": "foobar",
    "Address": "10.1.10.12",
    "Datacenter": "dc1",
    "TaggedAddresses": {"lan": "10.1.10.12", "wan": "10.1.10.12"},
    "Meta": {"instance_type": "t2.medium"},
}

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(text: str) -> float:
    """A Go duration as Consul takes them ("10s", "500ms", "5m", "1m30s") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"bad duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def service_check(service_id: str, name: str, tags: list[str], status: str) -> dict:
    return {
        "Node": NODE["Node"],
        "CheckID": f"service:{service_id}",
        "Name": f"Service '{name}' check",
        "Status": status,
        "Notes": "",
        "Output": "",
        "ServiceID": service_id,
        "ServiceName": name,
        "ServiceTags": tags,
        "Namespace": "default",
    }


SERF_CHECK = {
    "Node": NODE["Node"],
    "CheckID": "serfHealth",
    "Name": "Serf Health Status",
    "Status": "passing",
    "Notes": "",
    "Output": "",
    "ServiceID": "",
    "ServiceName": "",
    "ServiceTags": [],
    "Namespace": "default",
}


def health_entry(service_id: str, name: str, address: str, port: int, tags: list[str], meta: dict, status: str) -> dict:
    """One element of ``/v1/health/service/<name>``, shaped as Consul documents it."""
    return {
        "Node": dict(NODE),
        "Service": {
            "ID": service_id,
            "Service": name,
            "Tags": tags,
            "Address": address,
            "TaggedAddresses": {"lan": {"address": address or NODE["Address"], "port": port}},
            "Meta": meta,
            "Port": port,
            "Weights": {"Passing": 1, "Warning": 1},
            "EnableTagOverride": False,
            "Namespace": "default",
        },
        "Checks": [SERF_CHECK, service_check(service_id, name, tags, status)],
    }


@dataclass
class Seen:
    at: float
    method: str
    path: str
    query: dict[str, str]
    status: int = 0
    token: str | None = None  # the X-Consul-Token it carried


class FakeConsul:
    def __init__(self, index: int = 10, acl_token: str | None = None) -> None:
        """``acl_token``: ACLs on, default deny: every request must carry this token (else 403)."""
        self.index = index
        self.acl_token = acl_token
        self.entries: dict[str, dict] = {}  # service id -> health entry
        self.registered: dict[str, dict] = {}  # service id -> register payload (keys lower-cased)
        self.requests: list[Seen] = []
        self._failures: dict[str, int] = {}
        self._epoch = 0  # bumped by rewind(): wakes blocking queries like a restore does
        self.port = 0
        self._changed = asyncio.Condition()
        self._closing = False
        self._checkers: dict[str, asyncio.Task] = {}
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- lifecycle
    async def start(self, port: int = 0) -> int:
        app = web.Application()
        app.router.add_get("/v1/catalog/services", self._catalog_services)
        app.router.add_get("/v1/health/service/{name}", self._health_service)
        app.router.add_put("/v1/agent/service/register", self._register)
        app.router.add_put("/v1/agent/service/deregister/{id}", self._deregister)
        app.router.add_get("/v1/agent/services", self._agent_services)
        app.middlewares.append(self._record)
        self._closing = False
        self._runner = web.AppRunner(app, shutdown_timeout=0.5, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        """Close the listening socket (clients then get connection refused); data is kept."""
        self._closing = True
        async with self._changed:
            self._changed.notify_all()
        for task in self._checkers.values():
            task.cancel()
        await asyncio.gather(*self._checkers.values(), return_exceptions=True)
        self._checkers.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- test controls (each write moves the index, like a Raft write)
    async def _bump(self) -> None:
        async with self._changed:
            self.index += 1
            self._changed.notify_all()

    async def add(self, service_id: str, name: str, address: str, port: int, *, kind: str = "scikit",
                  models: str = "iris", tags: list[str] | None = None, status: str = "passing") -> None:
        tags = ["sluice-runtime", kind] if tags is None else tags
        meta = {"sluice-runtime": name, "kind": kind, "models": models}
        self.entries[service_id] = health_entry(service_id, name, address, port, tags, meta, status)
        await self._bump()

    async def set_status(self, service_id: str, status: str) -> None:
        self.entries[service_id]["Checks"][1]["Status"] = status
        await self._bump()

    async def remove(self, service_id: str) -> None:
        del self.entries[service_id]
        await self._bump()

    async def touch(self) -> None:
        await self._bump()

    async def rewind(self, index: int) -> None:
        """The index goes backwards (Consul docs: e.g. a snapshot restore)."""
        async with self._changed:
            self.index = index
            self._epoch += 1
            self._changed.notify_all()

    def fail(self, path: str, times: int) -> None:
        self._failures[path] = times

    def seen(self, path: str) -> list[Seen]:
        return [r for r in self.requests if r.path == path]

    # --- HTTP
    @web.middleware
    async def _record(self, request: web.Request, handler):
        seen = Seen(time.monotonic(), request.method, request.path, dict(request.query), token=request.headers.get("X-Consul-Token"))
        self.requests.append(seen)
        if self.acl_token is not None and seen.token != self.acl_token:
            seen.status = 403
            return web.Response(status=403, text="ACL not found" if seen.token else "Permission denied")
        if self._failures.get(request.path, 0) > 0:
            self._failures[request.path] -= 1
            seen.status = 500
            return web.Response(status=500, text="rpc error: No cluster leader")
        response = await handler(request)
        seen.status = response.status
        return response

    async def _block(self, request: web.Request) -> None:
        index = int(request.query.get("index", "0"))
        if index <= 0:
            return
        wait, epoch = duration_s(request.query.get("wait", "5m")), self._epoch
        with contextlib.suppress(asyncio.TimeoutError):
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.index > index or self._epoch != epoch or self._closing), wait
                )

    def _answer(self, data) -> web.Response:
        return web.Response(text=json.dumps(data), content_type="application/json", headers={"X-Consul-Index": str(self.index)})

    async def _catalog_services(self, request: web.Request) -> web.Response:
        await self._block(request)
        out: dict[str, set[str]] = {"consul": set()}
        for entry in self.entries.values():
            out.setdefault(entry["Service"]["Service"], set()).update(entry["Service"]["Tags"])
        return self._answer({name: sorted(tags) for name, tags in out.items()})

    async def _health_service(self, request: web.Request) -> web.Response:
        await self._block(request)
        name, tags = request.match_info["name"], request.query.getall("tag", [])
        out = [
            e for e in self.entries.values()
            if e["Service"]["Service"] == name
            and all(t in e["Service"]["Tags"] for t in tags)
            and ("passing" not in request.query or all(c["Status"] == "passing" for c in e["Checks"]))
        ]
        return self._answer(out)

    async def _register(self, request: web.Request) -> web.Response:
        body = {k.lower(): v for k, v in (await request.json()).items()}
        service_id = body.get("id") or body["name"]
        self.registered[service_id] = body
        meta, tags = body.get("meta") or {}, body.get("tags") or []
        # Consul: a check with no initial Status starts critical
        self.entries[service_id] = health_entry(service_id, body["name"], body.get("address", ""), body["port"], tags, meta, "critical")
        for check in body.get("checks") or []:
            check = {k.lower(): v for k, v in check.items()}
            if "grpc" in check:
                self._checkers[service_id] = asyncio.create_task(self._run_grpc_check(service_id, check))
        await self._bump()
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["id"]
        task = self._checkers.pop(service_id, None)
        if task:
            task.cancel()
        self.registered.pop(service_id, None)
        if self.entries.pop(service_id, None) is not None:
            await self._bump()
        return web.Response(status=200)

    async def _agent_services(self, request: web.Request) -> web.Response:
        return web.json_response({sid: e["Service"] for sid, e in self.entries.items() if sid in self.registered})

    async def _run_grpc_check(self, service_id: str, check: dict) -> None:
        interval = duration_s(check["interval"])
        timeout = duration_s(check.get("timeout", "10s"))
        async with grpc.aio.insecure_channel(check["grpc"]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
                    status = "passing" if reply.status == health_pb2.HealthCheckResponse.SERVING else "critical"
                except grpc.aio.AioRpcError:
                    status = "critical"
                entry = self.entries.get(service_id)
                if entry is not None and entry["Checks"][1]["Status"] != status:
                    await self.set_status(service_id, status)
                await asyncio.sleep(interval)
