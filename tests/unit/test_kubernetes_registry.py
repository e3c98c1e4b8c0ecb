"""The Kubernetes registry against a tiny real HTTP server that speaks the API server's
list/watch protocol (JSON lists with a resourceVersion; watches as chunked streams of
one JSON event per line: ADDED/MODIFIED/DELETED, BOOKMARK, ERROR with a 410 Status),
driven by the real official client (kubernetes_asyncio, configured from a kubeconfig
file that points at the server). No API server, kubelet or EndpointSlice controller
runs here: the slices are the ones the controller would write.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from manager.registry.base import Endpoint
from manager.registry.kubernetes import KubernetesRegistry
from sluice.local.procs import free_port

NS = "sluice"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
SERVICES = f"/api/v1/namespaces/{NS}/services"
END = object()  # the server ends a watch stream (as at its timeoutSeconds)


def service(name: str, models: str, kind: str = "scikit") -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "7",
                         "labels": {"sluice.io/runtime": name, "sluice.io/kind": kind},
                         "annotations": {"sluice.io/models": models}},
            "spec": {"clusterIP": "None", "ports": [{"name": "grpc", "port": 9000}]}}


def endpoint_slice(name: str, runtime: str, endpoints: list[tuple[str, str, bool | None]], version: str) -> dict:
    """A slice as the EndpointSlice controller writes it: the Service's labels copied."""
    def one(pod: str, ip: str, ready: bool | None) -> dict:
        conditions = {} if ready is None else {"ready": ready}
        return {"addresses": [ip], "conditions": conditions, "targetRef": {"kind": "Pod", "name": pod, "namespace": NS}}

    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": version,
                         "labels": {"sluice.io/runtime": runtime, "kubernetes.io/service-name": runtime}},
            "ports": [{"name": "grpc", "port": 9000, "protocol": "TCP"}],
            "endpoints": [one(*e) for e in endpoints]}


@dataclass
class Resource:
    kind: str
    items: list[dict]
    version: str
    lists: list[dict] = field(default_factory=list)  # query of each list
    watches: list[dict] = field(default_factory=list)  # query of each watch
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class FakeApiServer:
    """Lists and watches of two resources; a test pushes watch events with ``send``."""

    def __init__(self):
        self.resources = {
            SLICES: Resource("EndpointSliceList", [], "1"),
            SERVICES: Resource("ServiceList", [], "1"),
        }
        self.fail_lists = False
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        for path in self.resources:
            app.router.add_get(path, self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        for resource in self.resources.values():
            resource.events.put_nowait(END)
        await self._runner.cleanup()

    def send(self, path: str, kind: str, obj: dict) -> None:
        self.resources[path].events.put_nowait({"type": kind, "object": obj})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        resource = self.resources[request.path]
        query = dict(request.query)
        if query.get("watch", "").lower() not in ("true", "1"):  # the API server's ParseBool
            resource.lists.append(query)
            if self.fail_lists:
                return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 503,
                                          "reason": "ServiceUnavailable", "message": "etcd is down"}, status=503)
            return web.json_response({"kind": resource.kind, "apiVersion": "v1",
                                      "metadata": {"resourceVersion": resource.version}, "items": resource.items})
        resource.watches.append(query)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        while True:
            event = await resource.events.get()
            if event is END:
                break
            await response.write(json.dumps(event).encode() + b"\n")
            if event["type"] == "ERROR":
                break  # the API server ends a watch after an ERROR event
        await response.write_eof()
        return response


async def eventually(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.01)


@pytest.fixture
async def api(tmp_path, monkeypatch):
    server = FakeApiServer()
    await server.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server.url}}],
        "users": [{"name": "test", "user": {"token": "test-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NS}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield server
    await server.stop()


async def admit_private(host: str) -> str:
    """The runtime networks of this test: 10.0.0.0/8 only."""
    if not host.startswith("10."):
        raise ValueError(f"{host} is outside the runtime networks")
    return host


async def test_lists_then_watches_ready_endpoints_with_bookmarks_and_relists_on_410(api):
    api.resources[SERVICES].items = [service("scikit", "iris_scaler,iris_classifier")]
    api.resources[SERVICES].version = "40"
    api.resources[SLICES].items = [endpoint_slice("scikit-abc", "scikit", [
        ("scikit-1", "10.1.0.5", True), ("scikit-2", "10.1.0.6", False), ("scikit-3", "192.168.9.9", True)], "99")]
    api.resources[SLICES].version = "100"
    registry = KubernetesRegistry(NS, admit=admit_private, watch_timeout_s=60)
    found, changes = [], []
    registry.on_change(lambda: changes.append(registry.endpoints()))

    async def learn(*args):
        found.append(args)

    registry.on_runtime(learn)
    await registry.start()
    try:
        # the first list: ready endpoints only, admitted ones only, with the Service's models
        await eventually(lambda: registry.endpoints() == {"scikit": [Endpoint("scikit", "10.1.0.5", 9000, "scikit-1")]})
        await eventually(lambda: found == [("scikit", "scikit", "10.1.0.5", 9000, ["iris_scaler", "iris_classifier"])])
        slices = api.resources[SLICES]
        await eventually(lambda: len(slices.watches) == 1)
        assert slices.lists[0]["labelSelector"] == "sluice.io/runtime"
        watch = slices.watches[0]
        assert (watch["resourceVersion"], watch["allowWatchBookmarks"].lower(), watch["labelSelector"]) == ("100", "true", "sluice.io/runtime")
        assert watch["timeoutSeconds"] == "60"

        # a watch event: the second pod turns ready (ready unset counts as ready)
        api.send(SLICES, "MODIFIED", endpoint_slice("scikit-abc", "scikit", [("scikit-1", "10.1.0.5", True), ("scikit-2", "10.1.0.6", None)], "101"))
        await eventually(lambda: [e.host for e in registry.endpoints().get("scikit", [])] == ["10.1.0.5", "10.1.0.6"])
        assert changes[-1] == registry.endpoints()
        await eventually(lambda: [f[2] for f in found] == ["10.1.0.5", "10.1.0.6"])

        # a bookmark moves the version on; the server ends the watch; the next resumes there
        api.send(SLICES, "BOOKMARK", {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": "150"}})
        await eventually(lambda: registry.versions["endpointslices"] == "150")
        slices.events.put_nowait(END)
        await eventually(lambda: len(slices.watches) == 2)
        assert slices.watches[1]["resourceVersion"] == "150" and len(slices.lists) == 1

        # 410 Gone: list again from scratch, and everything known is replaced
        slices.items = [endpoint_slice("scikit-def", "scikit", [("scikit-7", "10.1.0.7", True)], "300")]
        slices.version = "300"
        before = len(changes)
        api.send(SLICES, "ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                   "reason": "Expired", "message": "too old resource version: 150 (290)"})
        await eventually(lambda: len(slices.lists) == 2)
        await eventually(lambda: registry.endpoints() == {"scikit": [Endpoint("scikit", "10.1.0.7", 9000, "scikit-7")]})
        assert len(changes) == before + 1  # one change: the old slice's endpoints left with the re-list
        await eventually(lambda: len(slices.watches) == 3)
        assert slices.watches[2]["resourceVersion"] == "300"

        # the Service's annotation changes: the instance is announced again with its models
        api.send(SERVICES, "MODIFIED", service("scikit", "iris_scaler,iris_classifier,pm_scikit"))
        await eventually(lambda: found[-1] == ("scikit", "scikit", "10.1.0.7", 9000, ["iris_scaler", "iris_classifier", "pm_scikit"]))

        # the slice goes: no endpoint left
        api.send(SLICES, "DELETED", slices.items[0])
        await eventually(lambda: registry.endpoints() == {})
        assert registry.health() is None
    finally:
        await registry.stop()


async def test_a_failing_api_server_keeps_the_last_endpoints_and_says_so_in_health(api):
    api.resources[SLICES].items = [endpoint_slice("spark-1", "spark", [("spark-0", "10.2.0.1", True)], "5")]
    api.resources[SLICES].version = "5"
    registry = KubernetesRegistry(NS, watch_timeout_s=60, backoff_min_s=0.01, backoff_max_s=0.05)
    await registry.start()
    try:
        await eventually(lambda: registry.endpoints() == {"spark": [Endpoint("spark", "10.2.0.1", 9000, "spark-0")]})
        slices = api.resources[SLICES]
        await eventually(lambda: len(slices.watches) == 1)
        api.fail_lists = True
        api.send(SLICES, "ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410,
                                   "reason": "Expired", "message": "too old"})
        await eventually(lambda: registry.health() is not None and "503" in registry.health())
        assert "endpointslices" in registry.health()
        assert registry.endpoints() == {"spark": [Endpoint("spark", "10.2.0.1", 9000, "spark-0")]}  # kept
        lists = len(slices.lists)
        await eventually(lambda: len(slices.lists) >= lists + 2)  # retried, backing off
        api.fail_lists = False
        await eventually(lambda: registry.health() is None and len(slices.watches) == 2)
    finally:
        await registry.stop()


def test_the_manager_picks_the_kubernetes_registry_by_setting():
    from manager.app import build_registry
    from manager.settings import ManagerSettings
    from sluice.settings import CommonSettings

    registry = build_registry(ManagerSettings(registry="kubernetes", kubernetes_namespace="ml"), CommonSettings(consul_addr=""), store=None)
    assert isinstance(registry, KubernetesRegistry) and registry.namespace == "ml"
    assert not registry.accepts_registrations  # runtimes do not register through the API then
    with pytest.raises(ValueError):
        ManagerSettings(registry="etcd")
