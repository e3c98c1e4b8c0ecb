"""The mesh's explicit limits: circuit breakers on runtime clusters (default and per runtime,
from the manager's settings) and on the gateway's and runtimes' local clusters; the
gateway sidecar's overflow answer (503, Retry-After, JSON error); and the gateway's own
in-flight limit (``sluice.limits.InFlightLimit``) on a real ASGI app."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from envoy.config.cluster.v3.cluster_pb2 import Cluster
from google.protobuf.json_format import MessageToDict

from manager.settings import ManagerSettings
from manager.xds.layers import MeshLayers
from manager.xds.limits import ClusterLimits, MeshLimits, parse_overrides
from manager.xds.resources import CLUSTER, LISTENER, MeshSettings, NodeInfo, node_resources
from sluice.errors import error_response
from sluice.limits import InFlightLimit

GATEWAY = NodeInfo(id="gateway", service="gateway", role="gateway", ingress_port=8083, service_port=18083, egress_port=15001, grpc_port=18084)
RUNTIME = NodeInfo(id="runtime-scikit", service="scikit", role="runtime", ingress_port=9001, service_port=19001, protocol="grpc")
MANAGER = NodeInfo(id="manager", service="sluice.manager", role="service", ingress_port=8080, service_port=18080)


def _thresholds(cluster) -> dict:
    (thresholds,) = MessageToDict(cluster, preserving_proto_field_name=True)["circuit_breakers"]["thresholds"]
    return thresholds


def test_manager_settings_give_every_runtime_cluster_its_breakers_and_overrides_by_name() -> None:
    settings = ManagerSettings(runtime_max_requests=40, runtime_max_pending=5, runtime_max_connections=7,
                               runtime_max_retries=3, runtime_limits="slow=2, fast=100")
    layers = MeshLayers(MeshSettings(limits=MeshLimits.from_settings(settings)))
    layers.add_runtimes({"slow", "fast", "other"})
    by_runtime = {}
    for name, res in layers.clusters.items.items():
        cluster = Cluster()
        assert res.body.Unpack(cluster)
        by_runtime[name.removeprefix("runtime_")] = _thresholds(cluster)
    assert by_runtime["other"] == {"max_connections": 7, "max_pending_requests": 5, "max_requests": 40, "max_retries": 3}
    assert by_runtime["slow"] == {**by_runtime["other"], "max_requests": 2}
    assert by_runtime["fast"] == {**by_runtime["other"], "max_requests": 100}


@pytest.mark.parametrize("bad", ["slow", "slow=0", "=3", "slow=x", "slow=-1"])
def test_a_malformed_runtime_limit_is_refused_with_the_entry_named(bad: str) -> None:
    with pytest.raises(ValueError, match="runtime limit"):
        parse_overrides(bad)
    with pytest.raises(ValueError):
        ManagerSettings(runtime_limits=bad)


def test_gateway_and_runtime_local_clusters_get_breakers_and_other_services_keep_envoys_defaults() -> None:
    limits = MeshLimits(runtime=ClusterLimits(9, 8, 7, 6), gateway=ClusterLimits(5, 4, 3, 2), retry_after_s=4)
    state = MeshSettings(limits=limits)
    gateway_clusters = {c.name: c for c in node_resources(GATEWAY, state)[CLUSTER]}
    assert set(gateway_clusters) == {"local_gateway", "local_gateway_grpc"}
    for cluster in gateway_clusters.values():  # the HTTP and the gRPC front door alike
        assert _thresholds(cluster) == {"max_connections": 5, "max_pending_requests": 4, "max_requests": 3, "max_retries": 2}
    (runtime_local,) = node_resources(RUNTIME, state)[CLUSTER]
    assert _thresholds(runtime_local) == {"max_connections": 9, "max_pending_requests": 8, "max_requests": 7, "max_retries": 6}
    (manager_local,) = node_resources(MANAGER, state)[CLUSTER]
    assert not manager_local.HasField("circuit_breakers")


def test_the_gateway_sidecar_answers_its_overflow_503_with_retry_after_in_the_json_error_shape() -> None:
    state = MeshSettings(limits=MeshLimits(retry_after_s=4))
    ingress = next(l for l in node_resources(GATEWAY, state)[LISTENER] if l.name == "ingress")
    hcm = MessageToDict(ingress.filter_chains[0].filters[0].typed_config, preserving_proto_field_name=True)
    (mapper,) = hcm["local_reply_config"]["mappers"]
    assert mapper["filter"] == {"response_flag_filter": {"flags": ["UO"]}}  # upstream overflow only
    assert mapper["status_code"] == 503
    assert mapper["headers_to_add"][0]["header"] == {"key": "retry-after", "value": "4"}
    body = mapper["body_format_override"]["json_format"]["error"]
    assert body["code"] == "overloaded" and body["details"] == {"retry_after_s": 4.0} and body["message"]


# --- the gateway's own in-flight limit, on a real ASGI app --------------------------------------


def _app(max_in_flight: int) -> tuple[FastAPI, asyncio.Event, list[int]]:
    app = FastAPI()
    release, entered = asyncio.Event(), []

    @app.post("/serve/p")
    async def serve() -> dict:
        entered.append(1)
        await release.wait()
        return {"ok": True}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/down")
    async def down():
        return error_response(503, "stage 0 (r/m) failed: down", "stage_unavailable")

    app.add_middleware(InFlightLimit, max_in_flight=max_in_flight, retry_after_s=3)
    return app, release, entered


async def test_beyond_max_in_flight_a_request_is_shed_at_once_with_503_retry_after_and_json() -> None:
    app, release, entered = _app(2)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        held = [asyncio.create_task(client.post("/serve/p")) for _ in range(2)]
        while len(entered) < 2:
            await asyncio.sleep(0.001)
        shed = await asyncio.wait_for(client.post("/serve/p"), 1.0)  # answered without waiting for the two
        assert shed.status_code == 503 and shed.headers["retry-after"] == "3"
        assert shed.json() == {"error": {"code": "overloaded", "message": "2 requests are in flight, the limit; retry later",
                                         "details": {"max_in_flight": 2, "retry_after_s": 3}}}
        assert len(entered) == 2  # the shed request never reached the app
        # health is neither counted nor shed
        assert (await client.get("/healthz")).status_code == 200
        release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await client.post("/serve/p")).status_code == 200  # capacity is back


async def test_every_503_the_app_answers_gets_retry_after() -> None:
    app, _, _ = _app(4)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        down = await client.post("/down")
    assert down.status_code == 503 and down.headers["retry-after"] == "3"
    assert down.json()["error"]["code"] == "stage_unavailable"


def test_in_flight_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        InFlightLimit(FastAPI(), max_in_flight=0)
