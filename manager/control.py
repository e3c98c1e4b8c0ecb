"""The control plane's state and the order in which changes reach the mesh.

Holds what Envoy routes (``routed``: every live revision of every pipeline) and what
gateways serve (``served``: one revision per pipeline), and applies each change in
make-before-break order, waiting for acknowledgements between steps:

* create:  routes (and clusters) to Envoy -> ACK -> pipeline to gateways -> ACK
* replace: new revision's routes beside the old -> ACK -> gateways switch -> ACK ->
           old revision's routes withdrawn
* delete:  gateways drop it (they answer 404) -> ACK -> routes withdrawn -> store

A revision's routes carry the revision in their key, so an in-flight request always
finishes on the routes of the revision it started with.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from manager.feed import PipelineFeed
from manager import runtime_models
from manager.registry.base import Endpoint, Registry
from manager.registry.embedded import EmbeddedRegistry
from manager.resolve import resolve
from manager.schemas import PipelineSpec, Registered, RuntimeRegistration
from manager.settings import ManagerSettings
from manager.signatures import SignatureError, read_signatures
from manager.store import PipelineRow, RuntimeRow, Store
from manager.xds.resources import PUSH_ORDER, MeshState, NodeInfo, StageRoute, build_resources
from manager.xds.snapshot import Snapshot, SnapshotCache
from sluice.errors import ApiError
from sluice.v1 import pipeline_pb2

log = logging.getLogger(__name__)


class ControlPlane:
    def __init__(
        self,
        settings: ManagerSettings,
        store: Store,
        registry: Registry,
        zipkin: tuple[str, int] | None = None,
        trace_sample_percent: float = 100.0,
    ):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.zipkin = zipkin
        self.trace_sample_percent = trace_sample_percent
        self.runtimes: dict[str, RuntimeRow] = {r.name: r for r in store.runtimes()}
        self.routed: dict[str, list[PipelineRow]] = {}
        self.served: dict[str, PipelineRow] = {}
        for row in store.pipelines():
            self.routed[row.name] = [row]
            self.served[row.name] = row
        self.feed = PipelineFeed()
        self._state = self._mesh_state()
        self.cache = SnapshotCache(self._snapshot_for)
        self._lock = asyncio.Lock()
        registry.on_change(self._refresh_envoy)
        registry.on_runtime(self._learn_discovered)

    async def start(self) -> None:
        await self.registry.start()
        await self.feed.publish(self._served_protos())

    async def stop(self) -> None:
        await self.registry.stop()

    # --- what Envoy and gateways are told
    def _mesh_state(self) -> MeshState:
        routes = tuple(
            StageRoute(
                key=stage["route"],
                runtime=stage["runtime"],
                timeout_ms=stage["timeout_ms"],
                pipeline=row.name,
                stage=index,
                model=stage["model"],
            )
            for revisions in self.routed.values()
            for row in revisions
            for index, stage in enumerate(row.stages)
        )
        endpoints = self.registry.endpoints()
        return MeshState(
            runtimes=frozenset(self.runtimes) | {s.runtime for s in routes},
            endpoints=tuple(
                (runtime, tuple((e.host, e.port) for e in eps)) for runtime, eps in sorted(endpoints.items())
            ),
            routes=routes,
            listener_address=self.settings.listener_address,
            stage_retries=self.settings.stage_retries,
            zipkin=self.zipkin,
            trace_sample_percent=self.trace_sample_percent,
        )

    def _snapshot_for(self, node: NodeInfo) -> Snapshot:
        return Snapshot.of(build_resources(node, self._state))

    def _refresh_envoy(self) -> None:
        self._state = self._mesh_state()
        self.cache.rebuild()

    async def _envoy_step(self) -> None:
        self._refresh_envoy()
        await self.cache.wait_converged("gateway", PUSH_ORDER, self.settings.ack_timeout_s)

    async def _gateway_step(self) -> None:
        version = await self.feed.publish(self._served_protos())
        await self.feed.wait_acked(version, self.settings.ack_timeout_s)

    def _served_protos(self) -> list[pipeline_pb2.Pipeline]:
        return [to_proto(row) for _, row in sorted(self.served.items())]

    # --- pipelines
    def _resolve(self, spec: PipelineSpec, revision: int) -> list[dict[str, Any]]:
        return resolve(spec, revision, self.runtimes, self.settings.stage_timeout_ms)

    async def create_pipeline(self, spec: PipelineSpec) -> PipelineRow:
        async with self._lock:
            if spec.name in self.served:
                raise ApiError(409, f"pipeline {spec.name!r} already exists", "exists", pipeline=spec.name)
            stages = self._resolve(spec, 1)
            row = self.store.put_pipeline(spec.name, 1, spec.model_dump(exclude_none=True), stages)
            self.routed[spec.name] = [row]
            await self._envoy_step()
            self.served[spec.name] = row
            await self._gateway_step()
            log.info("pipeline %s created (%d stages)", spec.name, len(stages))
            return row

    async def replace_pipeline(self, name: str, spec: PipelineSpec) -> PipelineRow:
        if spec.name != name:
            raise ApiError(422, f"body names pipeline {spec.name!r}, path names {name!r}", "name_mismatch")
        async with self._lock:
            old = self.served.get(name)
            if old is None:
                raise ApiError(404, f"no pipeline {name!r}", "not_found", pipeline=name)
            revision = old.revision + 1
            stages = self._resolve(spec, revision)
            row = self.store.put_pipeline(name, revision, spec.model_dump(exclude_none=True), stages)
            self.routed[name] = [old, row]
            await self._envoy_step()
            self.served[name] = row
            await self._gateway_step()
            self.routed[name] = [row]
            self._refresh_envoy()
            log.info("pipeline %s replaced (revision %d)", name, revision)
            return row

    async def delete_pipeline(self, name: str) -> None:
        async with self._lock:
            if name not in self.served:
                raise ApiError(404, f"no pipeline {name!r}", "not_found", pipeline=name)
            del self.served[name]
            await self._gateway_step()
            del self.routed[name]
            await self._envoy_step()
            self.store.delete_pipeline(name)
            log.info("pipeline %s deleted", name)

    # --- runtimes
    @property
    def lock(self) -> asyncio.Lock:
        """Held while a change to pipelines (or to the models they use) is under way."""
        return self._lock

    async def register_runtime(self, reg: RuntimeRegistration) -> Registered:
        if not isinstance(self.registry, EmbeddedRegistry):
            raise ApiError(409, "runtimes register with Consul in this deployment", "registry_external")
        loaded = await self._load_recorded(reg.name, reg.host, reg.port)
        if loaded is None:
            raise ApiError(503, f"runtime {reg.name!r} instance at {reg.host}:{reg.port} could not load its recorded models", "models_not_loaded")
        try:
            models = await read_signatures(reg.host, reg.port, sorted({*reg.models, *loaded}), self.settings.metadata_timeout_s)
        except SignatureError as exc:
            raise ApiError(503, f"cannot read the models of runtime {reg.name!r}: {exc}", "runtime_unreachable") from exc
        await self.learn_runtime(reg.name, reg.kind, models)
        instance_id = reg.instance_id or f"{reg.name}-{uuid.uuid4().hex[:8]}"
        self.registry.register(instance_id, reg.name, reg.host, reg.port)
        return Registered(
            instance_id=instance_id,
            heartbeat_interval_s=self.settings.heartbeat_interval_s,
            ttl_s=self.settings.heartbeat_ttl_s,
        )

    async def _load_recorded(self, runtime: str, host: str, port: int) -> list[str] | None:
        """Load every model version recorded for ``runtime`` onto a new instance, before it
        takes traffic; the model names, or None when the instance refused one."""
        recorded = self.store.loaded_models(runtime)
        endpoint = [Endpoint(runtime, host, port, f"{host}:{port}")]
        for loaded in recorded:
            failures = await runtime_models.load(endpoint, loaded.model, loaded.version, self.settings.model_load_timeout_s)
            if failures:
                log.warning("runtime %s at %s:%d did not load %s version %s: %s", runtime, host, port, loaded.model, loaded.version, failures[0].message)
                return None
        return sorted({loaded.model for loaded in recorded})

    async def _learn_discovered(self, name: str, kind: str, host: str, port: int, models: list[str]) -> None:
        """A runtime instance found by discovery (Consul): load its recorded models onto it,
        then read its signatures unless known."""
        loaded = await self._load_recorded(name, host, port)
        models = sorted({*models, *(loaded or [])})
        known = self.runtimes.get(name)
        if known is not None and known.kind == kind and (not models or {m.partition(":")[0] for m in models} == set(known.models)):
            return
        try:
            signatures = await read_signatures(host, port, models, self.settings.metadata_timeout_s)
        except SignatureError as exc:
            log.warning("runtime %s at %s:%d: cannot read its models (retried when an instance appears): %s", name, host, port, exc)
            return
        await self.learn_runtime(name, kind, signatures)

    def forget_model(self, runtime: str, model: str) -> None:
        """A model that ``runtime`` no longer serves (every version unloaded)."""
        row = self.runtimes[runtime]
        models = {k: v for k, v in row.models.items() if k != model}
        self.store.put_runtime(runtime, row.kind, models)
        self.runtimes[runtime] = RuntimeRow(runtime, row.kind, models)
        self._refresh_envoy()

    async def learn_runtime(self, name: str, kind: str, models: dict[str, dict]) -> None:
        """Record a runtime's models and signatures (from registration or discovery)."""
        known = self.runtimes.get(name)
        if known is not None and known.kind == kind and known.models == models:
            return
        self.store.put_runtime(name, kind, models)
        self.runtimes[name] = RuntimeRow(name, kind, models)
        log.info("runtime %s (%s) serves %s", name, kind, ", ".join(sorted(models)) or "no models")
        self._refresh_envoy()


def to_proto(row: PipelineRow) -> pipeline_pb2.Pipeline:
    return pipeline_pb2.Pipeline(
        name=row.name,
        revision=row.revision,
        transport=row.definition.get("transportType", "http"),
        stages=[
            pipeline_pb2.Stage(
                name=s["name"],
                runtime=s["runtime"],
                model=s["model"],
                model_version=s.get("version") or "",
                route=s["route"],
                timeout_ms=s["timeout_ms"],
                inputs=[pipeline_pb2.TensorSpec(**t) for t in s["inputs"]],
                outputs=[pipeline_pb2.TensorSpec(**t) for t in s["outputs"]],
                bindings=[pipeline_pb2.InputBinding(input=k, source=v) for k, v in s["bindings"].items()],
            )
            for s in row.stages
        ],
    )
