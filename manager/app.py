"""Wires the manager: store, registry, control plane, REST app and the gRPC server
that carries both ADS (for Envoys) and PipelineDiscovery (for gateways).

The gRPC server speaks TLS with a certificate from the mesh CA (``manager.ca``, kept
in the data directory) and takes streams from known nodes only (node tokens,
``manager.xds.auth``); the CA also signs every sidecar's certificate (SDS) and the
manager's own client certificate for its calls to runtimes (``manager.tls``).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from manager import metrics, tls
from manager.ca import CertificateAuthority
from manager.api import router
from manager.auth import api as auth_api
from manager.auth.networks import RuntimeNetworks
from manager.models import ModelService
from manager.models_api import UPLOAD_PATH
from manager.models_api import router as models_router
from manager.repository import RepositoryClient
from manager.control import ControlPlane
from manager.registry.embedded import EmbeddedRegistry
from manager.settings import ManagerSettings
from manager.store import Store
from manager.ui.router import install as install_console
from manager.xds.ads import AdsServicer
from manager.xds.auth import AuthenticatedFeed, NodeAuth
from sluice.errors import error_response, install_error_handlers
from sluice.jsonbody import JsonBodyMiddleware
from sluice.limits import BodyLimitMiddleware
from sluice.metrics import mount_metrics
from sluice.tracing import Tracing, TracingMiddleware
from sluice.settings import CommonSettings
from sluice.v1 import pipeline_pb2_grpc

log = logging.getLogger(__name__)


def build_registry(settings: ManagerSettings, common: CommonSettings, store: Store):
    networks = RuntimeNetworks(settings.runtime_networks)
    if settings.registry == "kubernetes":
        from manager.registry.kubernetes import KubernetesRegistry

        return KubernetesRegistry(settings.kubernetes_namespace, admit=networks.admit)
    if common.consul_addr:
        from manager.registry.consul import ConsulRegistry

        return ConsulRegistry(common.consul_addr, token=common.consul_token or None, admit=networks.admit)
    return EmbeddedRegistry(store, settings.heartbeat_ttl_s, allows=networks.allows)


def zipkin_address(url: str) -> tuple[str, int] | None:
    if not url:
        return None
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 9411


def open_store(settings: ManagerSettings) -> Store:
    """PostgreSQL when SLUICE_MANAGER_DB_URL is set (several managers share it), else SQLite."""
    if settings.db_url:
        from manager.store_pg import PgStore

        return PgStore(settings.db_url)  # type: ignore[return-value]  (the same interface)
    return Store(settings.db_path)


def create(settings: ManagerSettings, common: CommonSettings, tracing: Tracing | None = None) -> tuple[FastAPI, grpc.aio.Server, ControlPlane]:
    store = open_store(settings)
    ca = CertificateAuthority.load_or_create(settings.data_path)
    node_auth = NodeAuth.load_or_create(settings.data_path)
    manager_tls = tls.ManagerTls(ca, settings.cert_ttl_s)
    tls.install(manager_tls)
    control = ControlPlane(
        settings,
        store,
        build_registry(settings, common, store),
        zipkin=zipkin_address(common.zipkin_url),
        trace_sample_percent=common.trace_sample_rate * 100,
        ca=ca,
        plaintext_health=bool(common.consul_addr),  # Consul checks runtime sidecars in plaintext
    )

    server = grpc.aio.server(options=[("grpc.keepalive_time_ms", 30_000)])
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(AdsServicer(control.cache, control.xds, node_auth), server)
    pipeline_pb2_grpc.add_PipelineDiscoveryServicer_to_server(AuthenticatedFeed(control.feed, node_auth), server)
    server.add_secure_port(f"{settings.xds_host}:{settings.xds_port}", manager_tls.server_credentials())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await control.start()
        log.info("manager: REST on %s:%d, xDS on %s:%d", settings.host, settings.port, settings.xds_host, settings.xds_port)
        yield
        await control.stop()
        await repository.close()
        store.close()

    app = FastAPI(
        title="Sluice manager",
        version="0.1.0",
        description="Pipelines and runtimes of the Sluice mesh; the xDS control plane of its Envoy sidecars.",
        lifespan=lifespan,
    )
    repository = RepositoryClient(settings.repository_url)
    app.state.control = control
    app.state.models = ModelService(control, repository)
    tokens = auth_api.setup(app, control, store, settings)  # secure mode: signing key, ingress checks, admin token
    if tokens is not None:  # shared store: revocations made through another manager
        control.on_tokens_changed = lambda: control.set_ingress_auth(auth_api.ingress_auth(tokens))
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(models_router)
    install_console(app, settings, common)  # the web console at /ui

    @app.get("/healthz", tags=["health"], responses={503: {"description": "the store or the registry is failing (details say which)"}})
    async def healthz() -> Response:
        """The manager's own state: its store answers, its registry works; and what its xDS
        server holds (connected nodes, lagging ones, gateways watching)."""
        checks = {"store": store.health(), "registry": control.registry.health()}
        nodes = control.xds.nodes()
        xds = {
            "nodes": len(nodes),
            "lagging": sorted(n for n, s in nodes.items() if s.lagging),
            "gateways": control.feed.gateways,
        }
        failing = {k: v for k, v in checks.items() if v}
        if failing:
            return error_response(503, "; ".join(f"{k}: {v}" for k, v in failing.items()), "unhealthy", checks=failing, xds=xds)
        return JSONResponse({"status": "ok", "store": "ok", "registry": "ok", "xds": xds})

    metrics.register(control)
    mount_metrics(app)
    app.add_middleware(JsonBodyMiddleware, raw_paths=UPLOAD_PATH, loopback_only=not settings.auth)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, overrides={UPLOAD_PATH: settings.max_upload_bytes, r"^/api/v1/pipelines:apply$": settings.max_apply_bytes})
    app.add_middleware(TracingMiddleware, tracing=tracing or Tracing("manager", None))
    return app, server, control
