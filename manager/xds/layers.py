"""The mesh's Envoy resources, kept incrementally, and each node's snapshot made of them.

Mesh-wide layers, shared by every gateway sidecar's snapshot: one cluster and one
endpoint assignment per runtime, one route scope per pipeline. Node layers: what a
sidecar needs for itself (``resources.node_resources``), built once per node. The
control plane tells ``MeshLayers`` what changed (a pipeline's live revisions, a
runtime, a runtime's endpoints); each call rebuilds only that resource, and
``snapshot_for`` assembles a node's snapshot from layer references, so nothing here
costs more with more pipelines.

Secrets: a node whose resources use mTLS (``resources.uses_mtls``: runtimes, gateways)
gets a layer of its own SDS secrets: a certificate for its identity from the mesh CA
and the CA itself. ``rotate_due`` re-issues the certificates past two thirds of their
life; the new secret goes out as one changed resource, new connections use it, and
open connections (and the requests on them) are left alone.

Test-only fault hook (``fault_nack``, from ``SLUICE_MANAGER_FAULT_NACK_REVISIONS``; empty,
hence off, unless that setting names revisions): a pipeline scope that holds a listed
revision (``name@revision``) gets a route whose header match is an invalid regex, so a
real Envoy rejects it (NACK). It exists so tests can make Envoy refuse a change; it
changes nothing else and no other resource.
"""

from __future__ import annotations

import time
from dataclasses import replace

from manager.ca import CertificateAuthority, Issued
from manager.xds.resources import (
    CLUSTER, ENDPOINT, LISTENER, PUSH_ORDER, ROUTE, SCOPED_ROUTE, SECRET, MeshSettings, NodeInfo,
    endpoints_resource, node_resources, pipeline_scope_resource, retry_policy, runtime_cluster_resource,
    secret_resources, stage_cluster_resources, stage_endpoints_resource, uses_mtls,
)
from manager.xds.traffic import stage_runtimes
from manager.xds.ingress_auth import public_ingress
from manager.xds.snapshot import ResourceSet, Snapshot, resource
from sluice.plan import PipelinePlan
from sluice.wire import pipeline_scope


class MeshLayers:
    def __init__(self, settings: MeshSettings, ca: CertificateAuthority | None = None, cert_ttl_s: float = 3600.0):
        """``ca``: the mesh CA that signs node certificates (the manager passes its persisted
        one; tests and tools get a CA in memory)."""
        self.settings = settings
        self.ca = ca or CertificateAuthority.ephemeral()
        self.cert_ttl_s = cert_ttl_s
        self._secrets: dict[NodeInfo, tuple[ResourceSet, Issued]] = {}
        self._retries = retry_policy(settings.stage_retries)
        self.clusters = ResourceSet("runtime-clusters", {})
        self.endpoints = ResourceSet("runtime-endpoints", {})
        self.scopes = ResourceSet("pipeline-scopes", {})
        #: clusters of stages with their own outlier detection / circuit breakers (manager.xds.traffic)
        self.stage_clusters = ResourceSet("stage-clusters", {})
        self.stage_endpoints = ResourceSet("stage-endpoints", {})
        self._stage_cluster_names: dict[str, frozenset[str]] = {}
        self._stage_cluster_runtimes: dict[str, str] = {}  # stage cluster -> its runtime
        self._runtimes: set[str] = set()
        self._endpoint_sets: dict[str, tuple[tuple[str, int], ...]] = {}
        self._nodes: dict[NodeInfo, dict[str, ResourceSet]] = {}
        self._builds = 0
        #: test-only: revisions (name, revision) whose route scope is made invalid (see above)
        self.fault_nack: frozenset[tuple[str, int]] = frozenset()

    # --- changes
    def set_pipelines(self, pipelines: dict[str, list[PipelinePlan]]) -> None:
        """Each named pipeline's live revisions (an empty list withdraws the pipeline)."""
        upserts = []
        removals = []
        cluster_upserts, cluster_removals, endpoint_upserts = [], [], []
        for name, revisions in pipelines.items():
            own = [c for plan in revisions for c in stage_cluster_resources(plan, self.settings.limits)]
            names = frozenset(c.name for c, _ in own)
            for cluster, runtime in own:
                cluster_upserts.append(resource(CLUSTER, cluster))
                endpoint_upserts.append(resource(ENDPOINT, stage_endpoints_resource(cluster.name, runtime, self._endpoint_sets.get(runtime, ()))))
                self._stage_cluster_runtimes[cluster.name] = runtime
            gone = self._stage_cluster_names.get(name, frozenset()) - names
            cluster_removals.extend(gone)
            for cluster_name in gone:
                self._stage_cluster_runtimes.pop(cluster_name, None)
            self._stage_cluster_names[name] = names
            if revisions:
                for plan in revisions:
                    self.add_runtimes({r for s in plan.stages for r in stage_runtimes(s)})
                scope = pipeline_scope_resource(name, revisions, self._retries)
                if self.fault_nack and any((p.name, p.revision) in self.fault_nack for p in revisions):
                    _invalidate(scope)
                upserts.append(resource(SCOPED_ROUTE, scope))
            else:
                removals.append(pipeline_scope(name))
                self._stage_cluster_names.pop(name, None)
        self.stage_clusters = self.stage_clusters.update(cluster_upserts, cluster_removals)
        self.stage_endpoints = self.stage_endpoints.update(endpoint_upserts, cluster_removals)
        self.scopes = self.scopes.update(upserts, removals)

    def add_runtimes(self, runtimes: set[str]) -> None:
        """Runtimes need a cluster (and an assignment) as soon as they are known; never removed
        while the manager runs, so a route never points at a missing cluster."""
        new = runtimes - self._runtimes
        if not new:
            return
        self._runtimes |= new
        self.clusters = self.clusters.update(resource(CLUSTER, runtime_cluster_resource(r, self.settings.limits.for_runtime(r))) for r in sorted(new))
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
        self.stage_endpoints = self.stage_endpoints.update(
            resource(ENDPOINT, stage_endpoints_resource(c, r, self._endpoint_sets.get(r, ())))
            for c, r in sorted(self._stage_cluster_runtimes.items()) if r in changed
        )

    def set_auth(self, auth) -> None:
        """Secure mode: what the public ingresses check changed (first set, or a token was
        revoked). Only the nodes whose ingress checks tokens are rebuilt; of their resources
        only the ingress route configuration differs, so only it is sent."""
        self.settings = replace(self.settings, auth=auth)
        for node in [n for n in self._nodes if public_ingress(n)]:
            del self._nodes[node]

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
        secrets = self._secrets_for(node)
        if node.role == "gateway" and node.egress_port:
            layers = {
                SECRET: secrets,
                CLUSTER: (own[CLUSTER], self.clusters, self.stage_clusters),
                ENDPOINT: (self.endpoints, self.stage_endpoints),
                LISTENER: (own[LISTENER],),
                SCOPED_ROUTE: (self.scopes,),
                ROUTE: (own[ROUTE],),
            }
        else:
            layers = {t: (own[t],) for t in PUSH_ORDER if t != SECRET}
            layers[SECRET] = secrets
        return Snapshot({t: layers[t] for t in PUSH_ORDER})

    def _secrets_for(self, node: NodeInfo) -> tuple[ResourceSet, ...]:
        if not uses_mtls(node):
            return ()
        held = self._secrets.get(node)
        if held is None:
            held = self._issue(node, None)
        return (held[0],)

    def _issue(self, node: NodeInfo, previous: ResourceSet | None) -> tuple[ResourceSet, Issued]:
        issued = self.ca.issue_for(node.role, node.service, self.cert_ttl_s)
        resources = [resource(SECRET, m) for m in secret_resources(issued)]
        self._builds += 1
        layer = previous.update(resources) if previous is not None else ResourceSet.of(f"secrets-{self._builds}", resources)
        self._secrets[node] = (layer, issued)
        return self._secrets[node]

    def certificate(self, node: NodeInfo) -> Issued | None:
        """The certificate a node holds now (None: it uses none)."""
        held = self._secrets.get(node)
        return held[1] if held else None

    def next_renewal(self) -> float | None:
        """When the next certificate is due for renewal (epoch seconds), if any is held."""
        return min((issued.renew_at for _, issued in self._secrets.values()), default=None)

    def rotate_due(self, now: float | None = None) -> list[NodeInfo]:
        """Re-issue every certificate past its renewal time; the nodes whose secrets changed."""
        now = time.time() if now is None else now
        due = [node for node, (_, issued) in self._secrets.items() if issued.renew_at <= now]
        for node in due:
            self._issue(node, self._secrets[node][0])
        return due

    def forget(self, node: NodeInfo) -> None:
        self._nodes.pop(node, None)
        self._secrets.pop(node, None)


def _invalidate(scope) -> None:
    """The test-only fault: an unbalanced regex in the first route's header match, which
    Envoy refuses when it compiles the scope (RE2: missing ``)``)."""
    routes = scope.route_configuration.virtual_hosts[0].routes
    routes[0].match.headers[0].string_match.safe_regex.regex = "(fault-injected"
