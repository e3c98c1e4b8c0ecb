"""Names that travel on the wire between the manager, Envoy and the gateway, in one
place: request headers, route keys, cluster and listener names, the egress's
"no route" answer. Change one here and every service agrees.
"""

from __future__ import annotations

#: the header Envoy's egress routes match on: one value per (pipeline, revision, stage)
ROUTE_HEADER = "x-sluice-route"
#: the header the egress's scoped routes are keyed on: one route scope per pipeline
PIPELINE_HEADER = "x-sluice-pipeline"
STAGE_HEADER = "x-sluice-stage"
MODEL_HEADER = "x-sluice-model"
#: on every answer of the gateway: the revision that served it
REVISION_HEADER = "x-sluice-revision"

#: the body (gRPC message) of the egress's answer when a stage call met no route: it
#: reached no runtime, so it is safe to retry
UNROUTED = "sluice: no route for this stage"

#: listener and route-configuration names on every sidecar
INGRESS = "ingress"
EGRESS = "egress"
ZIPKIN_CLUSTER = "zipkin"


def route_key(pipeline: str, revision: int, stage: int) -> str:
    """The ``x-sluice-route`` value of one stage of one revision."""
    return f"{pipeline}.r{revision}.s{stage}"


def runtime_cluster(runtime: str) -> str:
    """The Envoy cluster of a runtime. Injective (``a.b`` and ``a_b`` stay apart) and
    free of dots, which Envoy's stat tag extraction would split names at."""
    return "runtime_" + runtime.replace("_", "__").replace(".", "_d")


def pipeline_scope(pipeline: str) -> str:
    """The name of a pipeline's route scope (and of its route configuration) on the egress."""
    return f"{EGRESS}.{pipeline}"


#: the string parameter of OIP ``RepositoryModelLoad`` that carries the SHA-256 digests the
#: manager recorded for the version being loaded (JSON ``{path: sha256}``); Triton ignores it
DIGESTS_PARAMETER = "sluice.digests"

#: gRPC metadata that carries a node's token on the manager's xDS and PipelineDiscovery
#: streams (sidecars: the bootstrap's ``initial_metadata``; the gateway: its Watch call)
XDS_TOKEN_HEADER = "x-sluice-xds-token"
#: the name clients check on the manager's TLS certificate (a DNS SAN beside its
#: ``spiffe://sluice/manager`` URI SAN), whatever address they dial
MANAGER_TLS_NAME = "manager.sluice"
