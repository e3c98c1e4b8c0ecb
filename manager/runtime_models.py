"""Loads and unloads model versions on runtime instances, over OIP's model-repository
extension (``RepositoryModelLoad`` / ``RepositoryModelUnload``, the calls tritonclient's
``load_model`` / ``unload_model`` make), so the same call works on our runtimes and on
a real Triton server.

The version travels as the string parameter ``version``: our runtimes load exactly
that version from the repository; Triton ignores it and loads what its version policy
says. The digests the manager recorded for that version travel as the string
parameter ``sluice.digests`` (JSON ``{path: sha256}``): our runtimes refuse a file
whose bytes hash to anything else (FAILED_PRECONDITION); Triton ignores it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from manager import tls
from manager.registry.base import Endpoint
from sluice.wire import DIGESTS_PARAMETER


@dataclass(frozen=True)
class LoadFailure:
    """One instance that did not do what it was asked, and why."""

    instance_id: str
    code: str  # the gRPC status name
    message: str

    @property
    def refused(self) -> bool:
        """The runtime answered and said no (bad artifact, unknown model), as opposed to unreachable."""
        return self.code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "INTERNAL")


def _parameters(version: str | None, digests: dict[str, str] | None = None) -> dict[str, pb.ModelRepositoryParameter]:
    parameters = {"version": pb.ModelRepositoryParameter(string_param=version)} if version else {}
    if version and digests:
        parameters[DIGESTS_PARAMETER] = pb.ModelRepositoryParameter(string_param=json.dumps(digests, sort_keys=True))
    return parameters


async def _call(endpoint: Endpoint, method: str, request, timeout_s: float) -> LoadFailure | None:
    # the runtime's sidecar, over mTLS with the manager's certificate (manager.tls)
    async with tls.runtime_channel(endpoint.host, endpoint.port, endpoint.runtime) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            await getattr(stub, method)(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            return LoadFailure(endpoint.instance_id, exc.code().name, exc.details() or "")
    return None


async def load(
    endpoints: list[Endpoint], model: str, version: str | None, timeout_s: float, digests: dict[str, str] | None = None
) -> list[LoadFailure]:
    """Load ``model`` (at ``version``, its files checked against ``digests``) on every
    endpoint at once; the failures, if any."""
    request = pb.RepositoryModelLoadRequest(model_name=model, parameters=_parameters(version, digests))
    results = await asyncio.gather(*(_call(e, "RepositoryModelLoad", request, timeout_s) for e in endpoints))
    return [r for r in results if r is not None]


async def unload(endpoints: list[Endpoint], model: str, version: str | None, timeout_s: float) -> list[LoadFailure]:
    """Unload ``model`` (one version, or all) on every endpoint; an instance that did not
    have it loaded is not a failure."""
    request = pb.RepositoryModelUnloadRequest(model_name=model, parameters=_parameters(version))
    results = await asyncio.gather(*(_call(e, "RepositoryModelUnload", request, timeout_s) for e in endpoints))
    return [r for r in results if r is not None and r.code != "NOT_FOUND"]
