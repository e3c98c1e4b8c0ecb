"""The manager's REST API: pipelines (one at a time, or a declarative bulk apply),
runtimes (registration and heartbeats), mesh status, tokens (``manager.auth.api``).

Who may call what is decided by the manager's sidecar (secure mode: tokens and scopes,
``manager.xds.ingress_auth``), not here; the exception is runtime registration, where
the token's ``runtime:<name>`` must name the runtime in the request and heartbeats must
come with the token that registered the instance: the manager reads the verified
token payload the sidecar forwards (``x-sluice-jwt-payload``).
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Query, Request, Response, status

from grpc_health.v1 import health_pb2, health_pb2_grpc

from manager import tls
from manager.auth.api import router as tokens_router
from manager.auth.scopes import PAYLOAD_HEADER, Caller, caller_from_header
from manager.control import ControlPlane
from manager.schemas import (
    ApplyOut,
    ApplyRequest,
    InstanceOut,
    ModelOut,
    PipelineOut,
    PipelineSpec,
    Registered,
    RuntimeOut,
    RuntimeRegistration,
    StageOut,
)
from manager.store import PipelineRow
from sluice.errors import ApiError, error_responses

router = APIRouter(prefix="/api/v1")
router.include_router(tokens_router)

#: a pipeline definition's errors: unreadable body, schema or signature problems (details name the stage)
_DEFINITION_ERRORS = error_responses(
    400, 422,
    s422="the definition does not validate, or a stage does not fit its runtime's models or the previous stage (details name the stage and tensor)",
)
_CHANGE_ERRORS = error_responses(
    502, 504,
    s502="an Envoy node rejected the change (NACK; the message names the node and Envoy's reason): rolled back, the last good state serves",
    s504="an Envoy node or a gateway did not acknowledge the change in time: rolled back, the last good state serves",
)
_NO_PIPELINE = error_responses(404, s404="no pipeline of that name")
_NO_RUNTIME = error_responses(404, s404="no runtime of that name")
_INSTANCE_ERRORS = error_responses(
    401, 403, 404,
    s401="secure mode: no verified token", s403="secure mode: not the token that registered the instance",
    s404="no such instance of that runtime (register again)",
)


def _control(request: Request) -> ControlPlane:
    return request.app.state.control


def _caller(request: Request) -> Caller | None:
    """The verified token's caller in secure mode (None in dev mode, or when absent)."""
    if not _control(request).settings.auth:
        return None
    return caller_from_header(request.headers.get(PAYLOAD_HEADER))


def _pipeline_out(row: PipelineRow) -> PipelineOut:
    return PipelineOut(
        name=row.name,
        transportType=row.plan.transport,
        revision=row.revision,
        definition=row.definition,
        stages=[StageOut.of(s) for s in row.plan.stages],
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


@router.get("/pipelines", response_model=list[PipelineOut], tags=["pipelines"])
async def list_pipelines(request: Request) -> list[PipelineOut]:
    return [_pipeline_out(r) for _, r in sorted(_control(request).served.items())]


@router.post("/pipelines", response_model=PipelineOut, status_code=status.HTTP_201_CREATED, tags=["pipelines"],
             responses={**_DEFINITION_ERRORS, **error_responses(409, s409="a pipeline of that name exists"), **_CHANGE_ERRORS})
async def create_pipeline(spec: PipelineSpec, request: Request) -> PipelineOut:
    """Create a pipeline; it is served once Envoy holds its routes."""
    return _pipeline_out(await _control(request).create_pipeline(spec))


@router.post("/pipelines:apply", response_model=ApplyOut, tags=["pipelines"], responses={**_DEFINITION_ERRORS, **error_responses(413), **_CHANGE_ERRORS})
async def apply_pipelines(body: ApplyRequest, request: Request, dry_run: bool = Query(False)) -> ApplyOut:
    """Create or replace every listed pipeline in one change (and with `prune`, delete the
    ones not listed). Validated as a whole: one bad definition refuses everything with a 422
    listing every problem. Answers once the whole set is live: routes acknowledged by Envoy
    and the gateways serving it. `?dry_run=true` answers the diff and changes nothing."""
    result = await _control(request).apply(body.pipelines, body.prune, dry_run)
    return ApplyOut(created=result.created, replaced=result.replaced, unchanged=result.unchanged, deleted=result.deleted, dry_run=dry_run)


@router.get("/pipelines/{name}", response_model=PipelineOut, tags=["pipelines"], responses=_NO_PIPELINE)
async def get_pipeline(name: str, request: Request) -> PipelineOut:
    row = _control(request).served.get(name)
    if row is None:
        raise ApiError(404, f"no pipeline {name!r}", "not_found", pipeline=name)
    return _pipeline_out(row)


@router.put("/pipelines/{name}", response_model=PipelineOut, tags=["pipelines"],
            responses={**_NO_PIPELINE, **_DEFINITION_ERRORS, **_CHANGE_ERRORS})
async def replace_pipeline(name: str, spec: PipelineSpec, request: Request) -> PipelineOut:
    """Replace a pipeline: the new revision is routed before it is served (blue/green)."""
    return _pipeline_out(await _control(request).replace_pipeline(name, spec))


@router.delete("/pipelines/{name}", status_code=status.HTTP_204_NO_CONTENT, tags=["pipelines"], responses={**_NO_PIPELINE, **_CHANGE_ERRORS})
async def delete_pipeline(name: str, request: Request) -> Response:
    await _control(request).delete_pipeline(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/runtimes", response_model=list[RuntimeOut], tags=["runtimes"])
async def list_runtimes(request: Request) -> list[RuntimeOut]:
    """Every runtime with its instances; each instance's `healthy` is a live gRPC health
    check of it (through its sidecar, bounded by a short timeout), made now."""
    control = _control(request)
    return list(await asyncio.gather(*(_runtime_out(control, name) for name in sorted(control.runtimes))))


@router.get("/runtimes/{name}", response_model=RuntimeOut, tags=["runtimes"], responses=_NO_RUNTIME)
async def get_runtime(name: str, request: Request) -> RuntimeOut:
    control = _control(request)
    if name not in control.runtimes:
        raise ApiError(404, f"no runtime {name!r}", "not_found", runtime=name)
    return await _runtime_out(control, name)


#: how long a live health check of one instance may take before it counts as unhealthy
HEALTH_CHECK_TIMEOUT_S = 1.0


async def _instance_healthy(host: str, port: int, runtime: str) -> bool:
    """A gRPC health check (``grpc.health.v1``) of the instance, through its sidecar with
    the manager's certificate: SERVING within ``HEALTH_CHECK_TIMEOUT_S``."""
    try:
        async with tls.runtime_channel(host, port, runtime) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_CHECK_TIMEOUT_S)
        return reply.status == health_pb2.HealthCheckResponse.SERVING
    except Exception:  # unreachable, refused, timed out, no TLS set up: not healthy
        return False


async def _runtime_out(control: ControlPlane, name: str) -> RuntimeOut:
    runtime = control.runtimes[name]
    endpoints = control.registry.endpoints().get(name, [])
    seen = control.registry.last_seen()
    healthy = await asyncio.gather(*(_instance_healthy(e.host, e.port, name) for e in endpoints))
    return RuntimeOut(
        name=name,
        kind=runtime.kind,
        models=[ModelOut(name=m, versions=list(served.versions), platform=served.platform, **served.signature.to_json())
                for m, served in sorted(runtime.models.items())],
        instances=[
            InstanceOut(id=e.instance_id, host=e.host, port=e.port, healthy=ok, last_seen=seen.get(e.instance_id, time.time()))
            for e, ok in zip(endpoints, healthy)
        ],
    )


@router.post("/runtimes", response_model=Registered, status_code=status.HTTP_201_CREATED, tags=["runtimes"],
             responses=error_responses(
                 400, 401, 403, 409, 422, 503,
                 s401="secure mode: no verified token", s403="secure mode: the token is not this runtime's",
                 s409="runtimes register with Consul in this deployment",
                 s422="the registration does not validate, or its host is outside the runtime networks",
                 s503="the runtime cannot be reached at that address, or could not load its recorded models: retry",
             ))
async def register_runtime(reg: RuntimeRegistration, request: Request) -> Registered:
    """Register a runtime instance (any OIP v2 gRPC server); its models' signatures are read over OIP.
    Secure mode: needs a `runtime:<name>` (or `admin`) token. The host must resolve inside
    `SLUICE_MANAGER_RUNTIME_NETWORKS` (422 otherwise). Answers the instance id the manager gave it."""
    return await _control(request).register_runtime(reg, _caller(request))


@router.put("/runtimes/{name}/instances/{instance_id}/heartbeat", status_code=204, tags=["runtimes"], responses=_INSTANCE_ERRORS)
async def heartbeat(name: str, instance_id: str, request: Request) -> Response:
    """Renew an instance; secure mode: with the token that registered it."""
    control = _control(request)
    control.check_instance_caller(name, instance_id, _caller(request))
    if not control.registry.heartbeat(instance_id):
        raise ApiError(404, f"no instance {instance_id!r} of runtime {name!r}: register again", "not_registered")
    return Response(status_code=204)


@router.delete("/runtimes/{name}/instances/{instance_id}", status_code=204, tags=["runtimes"], responses=_INSTANCE_ERRORS)
async def deregister(name: str, instance_id: str, request: Request) -> Response:
    """Remove an instance; secure mode: with the token that registered it, or an admin token."""
    control = _control(request)
    control.check_instance_caller(name, instance_id, _caller(request), deregister=True)
    if not control.registry.deregister(instance_id):
        raise ApiError(404, f"no instance {instance_id!r} of runtime {name!r}", "not_found")
    return Response(status_code=204)


@router.get("/mesh", tags=["mesh"])
async def mesh(request: Request) -> dict:
    """What each connected Envoy node holds: snapshot versions, acknowledged versions, NACKs."""
    control = _control(request)
    return {
        "gateways": control.feed.gateways,
        "pushes": control.xds.pushes,
        "bytes_sent": control.xds.bytes_sent,
        "nacks": control.xds.nacks,
        "nodes": {
            node_id: {
                "role": s.info.role,
                "service": s.info.service,
                "connected": s.streams > 0,
                "versions": {t.rsplit(".", 1)[-1]: v for t, v in snapshot.versions.items()} if (snapshot := control.cache.snapshot(node_id)) else {},
                "acked": {t.rsplit(".", 1)[-1]: v for t, v in s.acked.items()},
                "nacks": s.nacks,
                "last_nack": s.last_nack,
            }
            for node_id, s in sorted(control.xds.nodes().items())
        },
    }
