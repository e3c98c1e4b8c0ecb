"""Discovery from Kubernetes: the EndpointSlices of Services labelled as Sluice runtimes.

A runtime is a Service labelled ``sluice.io/runtime=<runtime name>`` (deploy/k8s labels
scikit, spark and triton so). The EndpointSlice controller copies a Service's labels onto
its slices, so the slices are selected by that label too; what a runtime serves is on
the Service: label ``sluice.io/kind`` (the runtime kind) and annotation
``sluice.io/models`` (comma-separated model refs; annotations are not copied onto
slices, so Services are watched as well). Each *ready* endpoint of a slice
(``conditions.ready`` true, or unset: the API says to read unset as ready) becomes an
``Endpoint(runtime, address, port, pod name)``; the port is the slice's port named
``grpc``, else its only port. Addresses are admitted like registrations through the
manager's API (``admit``: the runtime networks), and ``on_runtime`` listeners hear of
each new instance once, as with Consul, so the manager reads its signatures.

Both resources are followed the way Kubernetes' own informers do, with the official
client (``kubernetes_asyncio``): list, then watch from the list's ``resourceVersion``
with ``allowWatchBookmarks`` (a bookmark only moves the version on) and a server-side
``timeoutSeconds``, after which the watch resumes from the last version seen. A 410
Gone (the version left the API server's window: an ``ERROR`` event or a 410 answer)
re-lists from scratch and replaces all that was known. Other errors keep the last
endpoints, back off exponentially, and show in ``health()`` (the manager's /healthz).

The client's configuration: in a pod, its service account (``load_incluster_config``);
elsewhere the kubeconfig (``KUBECONFIG``, ``~/.kube/config``). It needs ``list`` and
``watch`` on ``endpointslices`` (discovery.k8s.io) and ``services`` in its namespace
(deploy/k8s/components/kubernetes-discovery has the Role).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from manager.registry.base import Discovered, Endpoint, Registry

log = logging.getLogger(__name__)

RUNTIME_LABEL = "sluice.io/runtime"
KIND_LABEL = "sluice.io/kind"
MODELS_ANNOTATION = "sluice.io/models"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
PORT_NAME = "grpc"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


#: what this backend finds
Instance = Discovered


@dataclass(frozen=True)
class RuntimeService:
    """What a runtime Service says about itself."""

    runtime: str
    kind: str
    models: tuple[str, ...]


def runtime_service(service: client.V1Service) -> RuntimeService | None:
    labels = service.metadata.labels or {}
    if not labels.get(RUNTIME_LABEL):
        return None
    models = (service.metadata.annotations or {}).get(MODELS_ANNOTATION) or ""
    return RuntimeService(labels[RUNTIME_LABEL], labels.get(KIND_LABEL, ""), tuple(m.strip() for m in models.split(",") if m.strip()))


def ready_endpoints(endpoint_slice: client.V1EndpointSlice) -> list[Endpoint]:
    """The ready endpoints of a runtime's slice (none when it names no runtime or no port)."""
    labels = endpoint_slice.metadata.labels or {}
    runtime = labels.get(RUNTIME_LABEL)
    ports = endpoint_slice.ports or []
    port = next((p.port for p in ports if p.name == PORT_NAME), ports[0].port if len(ports) == 1 else None)
    if not runtime or not port:
        return []
    out = []
    for endpoint in endpoint_slice.endpoints or []:
        conditions = endpoint.conditions
        if conditions is not None and conditions.ready is False:
            continue
        for address in (endpoint.addresses or [])[:1]:  # all addresses of one endpoint are one pod
            name = endpoint.target_ref.name if endpoint.target_ref is not None and endpoint.target_ref.name else f"{runtime}-{address}-{port}"
            out.append(Endpoint(runtime, address, int(port), name))
    return sorted(out)


def default_namespace() -> str:
    """The pod's own namespace (its service account's), else ``default``."""
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


async def api_client() -> client.ApiClient:
    """A client configured from the pod's service account, else from the kubeconfig."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:  # the client reads KUBECONFIG once, at import: read it now
        await config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


class KubernetesRegistry(Registry):
    def __init__(
        self,
        namespace: str = "",
        *,
        watch_timeout_s: int = 300,
        backoff_min_s: float = 0.1,
        backoff_max_s: float = 5.0,
        admit: Callable[[str], Awaitable[str]] | None = None,
        connect: Callable[[], Awaitable[client.ApiClient]] = api_client,
    ):
        """``namespace``: where runtime Services live (default: the manager's own);
        ``admit(host)``: the IP to dial for an address, raising when it is not allowed;
        ``connect``: makes the API client (default: in-cluster, else kubeconfig)."""
        super().__init__()
        self.namespace = namespace or default_namespace()
        self._watch_timeout_s = watch_timeout_s
        self._backoff = (backoff_min_s, backoff_max_s)
        self._admit = admit
        self._connect = connect
        self._api: client.ApiClient | None = None
        self._tasks: list[asyncio.Task] = []
        self._slices: dict[str, list[Endpoint]] = {}  # slice name -> its ready endpoints
        self._services: dict[str, RuntimeService] = {}  # runtime name -> its Service's word
        self._instances: tuple[Instance, ...] = ()
        self._refused: dict[str, str] = {}
        self._failing: dict[str, str] = {}
        self._refreshing = asyncio.Lock()
        #: resource -> the resourceVersion its watch resumes from (None: list first)
        self.versions: dict[str, str | None] = {"endpointslices": None, "services": None}
        #: how many times each resource was listed (the first list, then one per 410)
        self.lists: dict[str, int] = {"endpointslices": 0, "services": 0}

    def endpoints(self) -> dict[str, list[Endpoint]]:
        out: dict[str, list[Endpoint]] = {}
        for instance in self._instances:
            out.setdefault(instance.endpoint.runtime, []).append(instance.endpoint)
        return {runtime: sorted(eps) for runtime, eps in sorted(out.items())}

    def health(self) -> str | None:
        if self._failing:
            what, error = next(iter(self._failing.items()))
            return f"kubernetes watch of {what} failing ({error}): serving the last endpoints it gave"
        return None

    async def start(self) -> None:
        self._api = await self._connect()
        discovery, core = client.DiscoveryV1Api(self._api), client.CoreV1Api(self._api)
        self._tasks = [
            asyncio.create_task(self._follow("services", core.list_namespaced_service, self._set_services, self._service_event)),
            asyncio.create_task(self._follow("endpointslices", discovery.list_namespaced_endpoint_slice, self._set_slices, self._slice_event)),
        ]
        log.info("discovering runtimes from Kubernetes: EndpointSlices of Services labelled %s in namespace %s", RUNTIME_LABEL, self.namespace)

    async def stop(self) -> None:
        tasks = [*self._tasks, *self._listener_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = []
        if self._api is not None:
            await self._api.close()
            self._api = None

    # --- list and watch
    async def _follow(self, what: str, list_call: Callable[..., Awaitable[Any]],
                      replace_all: Callable[[list], None], apply: Callable[[str, Any], None]) -> None:
        delay = self._backoff[0]
        while True:
            try:
                if self.versions[what] is None:
                    listed = await list_call(self.namespace, label_selector=RUNTIME_LABEL, _request_timeout=30)
                    self.lists[what] += 1
                    self._failing.pop(what, None)  # the API server answers again
                    replace_all(listed.items)
                    self.versions[what] = listed.metadata.resource_version
                    await self._refresh()
                await self._watch(what, list_call, apply)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 410:  # Gone: our version is too old to resume from
                    log.info("kubernetes %s: resourceVersion %s is gone (410): listing again", what, self.versions[what])
                    self.versions[what] = None
                    continue
                delay = await self._failed(what, f"HTTP {exc.status} {exc.reason}", delay)
                continue
            except Exception as exc:  # connection refused or reset, timeouts, bad answers
                delay = await self._failed(what, f"{type(exc).__name__}: {exc}", delay)
                continue
            self._failing.pop(what, None)
            delay = self._backoff[0]

    async def _watch(self, what: str, list_call: Callable[..., Awaitable[Any]], apply: Callable[[str, Any], None]) -> None:
        """One watch from the current version until the server ends it (its timeout)."""
        stream = watch.Watch()
        try:
            async for event in stream.stream(list_call, self.namespace, label_selector=RUNTIME_LABEL,
                                             resource_version=self.versions[what], allow_watch_bookmarks=True,
                                             timeout_seconds=self._watch_timeout_s,
                                             # a silent connection fails here, not never
                                             _request_timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=self._watch_timeout_s + 30)):
                self._failing.pop(what, None)
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    apply(event["type"], event["object"])
                    await self._refresh()
                if stream.resource_version:  # events and bookmarks move it on
                    self.versions[what] = stream.resource_version
        finally:
            await stream.close()

    async def _failed(self, what: str, error: str, delay: float) -> float:
        log.warning("kubernetes %s: %s; keeping the last endpoints, retry in %.2fs", what, error, delay)
        self._failing[what] = error
        await asyncio.sleep(delay)
        return min(delay * 2, self._backoff[1])

    # --- state
    def _set_services(self, services: list[client.V1Service]) -> None:
        found = [runtime_service(s) for s in services]
        self._services = {s.runtime: s for s in found if s is not None}

    def _service_event(self, kind: str, service: client.V1Service) -> None:
        said = runtime_service(service)
        runtime = (service.metadata.labels or {}).get(RUNTIME_LABEL)
        if kind == "DELETED" or said is None:
            if runtime:
                self._services.pop(runtime, None)
        else:
            self._services[said.runtime] = said

    def _set_slices(self, slices: list[client.V1EndpointSlice]) -> None:
        self._slices = {s.metadata.name: ready_endpoints(s) for s in slices}

    def _slice_event(self, kind: str, endpoint_slice: client.V1EndpointSlice) -> None:
        if kind == "DELETED":
            self._slices.pop(endpoint_slice.metadata.name, None)
        else:
            self._slices[endpoint_slice.metadata.name] = ready_endpoints(endpoint_slice)

    async def _refresh(self) -> None:
        """Recompute the instances; tell listeners when they changed."""
        async with self._refreshing:
            found = []
            for endpoint in sorted({e for eps in self._slices.values() for e in eps}):
                said = self._services.get(endpoint.runtime)
                instance = Instance(endpoint, said.kind if said else "", said.models if said else ())
                admitted = await self._admitted(instance)
                if admitted is not None:
                    found.append(admitted)
            found_t = tuple(sorted(found))
            if found_t == self._instances:
                return
            previous, self._instances = set(self._instances), found_t
            for instance in found_t:
                # announced once its Service (kind, models) is known: an endpoint whose
                # slice came before its Service is announced when the Service arrives
                if instance not in previous and instance.endpoint.runtime in self._services:
                    self._announce(instance)
            log.info("kubernetes: %d ready runtime endpoint(s)", len(found_t))
            self._changed()

    async def _admitted(self, instance: Instance) -> Instance | None:
        if self._admit is None:
            return instance
        host = instance.endpoint.host
        try:
            ip = await self._admit(host)
        except Exception as exc:  # outside the runtime networks, or unresolvable
            why = getattr(exc, "message", str(exc))
            if self._refused.get(host) != why:
                self._refused[host] = why
                log.warning("kubernetes: runtime %s endpoint %s left out: %s", instance.endpoint.runtime, instance.endpoint.instance_id, why)
            return None
        self._refused.pop(host, None)
        return dataclasses.replace(instance, endpoint=dataclasses.replace(instance.endpoint, host=ip))


__all__ = ["KubernetesRegistry", "Instance", "RuntimeService", "ready_endpoints", "runtime_service"]
