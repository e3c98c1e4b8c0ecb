"""The mesh's Envoy resources, kept incrementally, and each node's snapshot made of them.

Mesh-wide layers, shared by every gateway sidecar's snapshot: one cluster and one
endpoint assignment per runtime, one route scope per pipeline. Node layers: what a
sidecar needs for itself (``resources.node_resources``), built once per node. The
control plane tells ``MeshLayers`` what changed (a pipeline's live revisions, a
runtime, a runtime's endpoints); each call rebuilds only that resource, and
``snapshot_for`` assembles a node's snapshot from layer references, so nothing here
costs more with more pipelines.
"""

from __future__ import annotations

from manager.xds.resources import (
    CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SCOPED_ROUTE, MeshSettings, NodeInfo,
    endpoints_resource, node_resources, pipeline_scope_resource, retry_policy, runtime_cluster_resource,
)
from manager.xds.snapshot import ResourceSet, Snapshot, resource
from sluice.plan import PipelinePlan
from sluice.wire import pipeline_scope


class MeshLayers:
    def __init__(self, settings: MeshSettings):
        self.settings = settings
        self._retries = retry_policy(settings.stage_retries)
        self.clusters = ResourceSet("runtime-clusters", {})
        self.endpoints = ResourceSet("runtime-endpoints", {})
        self.scopes = ResourceSet("pipeline-scopes", {})
        self._runtimes: set[str] = set()
        self._endpoint_sets: dict[str, tuple[tuple[str, int], ...]] = {}
        self._nodes: dict[NodeInfo, dict[str, ResourceSet]] = {}
        self._builds = 0

    # --- changes
    def set_pipelines(self, pipelines: dict[str, list[PipelinePlan]]) -> None:
        """Each named pipeline's live revisions (an empty list withdraws the pipeline)."""
        upserts = []
        removals = []
        for name, revisions in pipelines.items():
            if revisions:
                upserts.append(resource(SCOPED_ROUTE, pipeline_scope_resource(name, revisions, self._retries)))
                for plan in revisions:
                    self.add_runtimes({s.runtime for s in plan.stages})
            else:
                removals.append(pipeline_scope(name))
        self.scopes = self.scopes.update(upserts, removals)

    def add_runtimes(self, runtimes: set[str]) -> None:
        """Runtimes need a cluster (and an assignment) as soon as they are known; never removed
        while the manager runs, so a route never points at a missing cluster."""
        new = runtimes - self._runtimes
        if not new:
            return
        self._runtimes |= new
        self.clusters = self.clusters.update(resource(CLUSTER, runtime_cluster_resource(r)) for r in sorted(new))
        self.endpoints = self.endpoints.update(
            resource(ENDPOINT, endpoints_resource(r, self._endpoint_sets.get(r, ()))) for r in sorted(new)
        )

    def set_endpoints(self, endpoints: dict[str, tuple[tuple[str, int], ...]]) -> None:
        """Every runtime's endpoints (host, port); only the assignments that changed are rebuilt."""
        endpoints = {r: tuple(sorted(eps)) for r, eps in endpoints.items()}  # order is no change
        changed = {r for r in self._runtimes | set(endpoints) if endpoints.get(r, ()) != self._endpoint_sets.get(r, ())}
        self._endpoint_sets = endpoints
        self.add_runtimes(set(endpoints))
        self.endpoints = self.endpoints.update(
            resource(ENDPOINT, endpoints_resource(r, self._endpoint_sets.get(r, ()))) for r in sorted(changed & self._runtimes)
        )

    # --- snapshots
    def snapshot_for(self, node: NodeInfo) -> Snapshot:
        own = self._nodes.get(node)
        if own is None:
            built = node_resources(node, self.settings)
            self._builds += 1  # a new lineage: a stream that saw another build compares in full
            own = {
                t: ResourceSet.of(f"node-{self._builds}-{t.rsplit('.', 1)[-1]}", (resource(t, m) for m in built.get(t, [])))
                for t in PUSH_ORDER
            }
            self._nodes[node] = own
        if node.role == "gateway" and node.egress_port:
            layers = {
                CLUSTER: (own[CLUSTER], self.clusters),
                ENDPOINT: (self.endpoints,),
                LISTENER: (own[LISTENER],),
                SCOPED_ROUTE: (self.scopes,),
                ROUTE: (own[ROUTE],),
            }
        else:
            layers = {t: (own[t],) for t in PUSH_ORDER}
        return Snapshot(layers)

    def forget(self, node: NodeInfo) -> None:
        self._nodes.pop(node, None)
