"""Runs a runtime kind: load its models from the repository, serve them over OIP
gRPC with gRPC health checking, register, and shut down cleanly on SIGTERM/SIGINT.

The models of ``SLUICE_RUNTIME_MODELS`` are loaded at start through the same
``models.ModelSet`` (and the same off-loop loading) that the model-repository
extension (``RepositoryModelLoad``/``RepositoryModelUnload``) changes at run time;
the registration announces whatever that set holds when it registers. Shutdown
closes every model.

Every model file is checked before a loader opens it: against the digests the manager
recorded for the version (asked of ``SLUICE_RUNTIME_MANAGER_URL`` with
``SLUICE_RUNTIME_TOKEN``, see ``digests``). A start-up model whose files do not match
stops the start-up with an error that names the file and both digests. With no
manager URL, files are checked against the repository's own listing with a warning,
or refused when ``SLUICE_RUNTIME_REQUIRE_DIGESTS`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from runtimes.sdk.consul import ConsulRegistration
from runtimes.sdk.digests import ManagerDigests
from runtimes.sdk.model import ModelLoadError
from runtimes.sdk.models import Loader, ModelSet
from runtimes.sdk.registration import ModelNames, Registration
from runtimes.sdk.repository import ModelRepository
from runtimes.sdk.server import InferenceService, PredictPool
from runtimes.sdk.settings import RuntimeSettings
from sluice.logs import setup_logging
from sluice.serving import install_uvloop
from sluice.settings import CommonSettings
from sluice.tracing import setup_tracing

log = logging.getLogger(__name__)

def model_set(settings: RuntimeSettings, loader: Loader) -> ModelSet:
    """An empty set that loads with ``loader`` from the settings' repository and cache,
    checking files against the digests the settings' manager recorded."""
    digests = (
        ManagerDigests(settings.manager_url, settings.token, wait_s=settings.manager_wait_s)
        if settings.manager_url else None
    )
    return ModelSet(
        loader=loader,
        repository=ModelRepository(settings.repository_url, settings.cache_dir),
        digests=digests,
        require_digests=settings.require_digests,
    )


async def close_set(models: ModelSet) -> None:
    """Close every model and the set's clients (repository, manager)."""
    await models.close()
    if models.repository is not None:
        await models.repository.aclose()
    if models.digests is not None:
        await models.digests.aclose()


async def load_models(settings: RuntimeSettings, loader: Loader, models: ModelSet | None = None) -> ModelSet:
    """Load the models of ``SLUICE_RUNTIME_MODELS`` (``name`` or ``name:version``) into
    ``models`` (default: a new set); a failure stops the start-up."""
    models = models if models is not None else model_set(settings, loader)
    for ref in settings.model_refs():
        name, _, version = ref.partition(":")
        try:
            await models.load(name, version)
        except ModelLoadError as exc:
            raise StartupLoadError(f"runtime {settings.name!r} cannot start: model {ref!r}: {exc}") from exc
    return models


class StartupLoadError(RuntimeError):
    """A model of ``SLUICE_RUNTIME_MODELS`` could not be loaded (or its files failed their check)."""


def registration_for(
    manager_url: str, name: str, kind: str, host: str, port: int, models: ModelNames
) -> Registration | ConsulRegistration | None:
    """Consul when ``SLUICE_CONSUL_ADDR`` is set, else the manager's embedded registry
    (if a manager URL is given). Also used for servers we did not write (Triton).
    ``models``: the names, or a callable that returns the names loaded now."""
    consul_addr = CommonSettings().consul_addr
    if consul_addr:
        return ConsulRegistration(consul_addr, name, kind, host, port, models)
    if manager_url:
        return Registration(manager_url, name, kind, host, port, models)
    return None


def _registration(settings: RuntimeSettings, kind: str, models: ModelNames) -> Registration | ConsulRegistration | None:
    host, port = settings.announce
    return registration_for(settings.manager_url, settings.name, kind, host, port, models)


async def serve_runtime(kind: str, loader: Loader, settings: RuntimeSettings | None = None) -> None:
    settings = settings or RuntimeSettings()
    models = model_set(settings, loader)
    try:
        await load_models(settings, loader, models)
    except BaseException:
        await close_set(models)
        raise
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    tracing = setup_tracing(settings.name)
    max_elements = settings.max_tensor_elements or settings.max_message_bytes
    pool = PredictPool(settings.predict_threads, settings.inline_below_ms / 1000)
    service = InferenceService(settings.name, kind, models, tracing, max_elements, settings.max_in_flight, pool)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{settings.host}:{settings.port}"
    server.add_insecure_port(address)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, settings.host)
    log.info("runtime %s (%s) serving %s on %s", settings.name, kind, ", ".join(models.names()) or "no models", address)

    registration = _registration(settings, kind, models.names)
    if registration:
        registration.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("runtime %s stopping", settings.name)
    await health_servicer.enter_graceful_shutdown()
    if registration:
        await registration.stop()
    await server.stop(grace=2)
    pool.close()
    await close_set(models)


def main(kind: str, loader: Loader) -> None:
    """Entry point of ``python -m runtimes.<kind>``."""
    setup_logging(f"runtime-{kind}", CommonSettings().log_level)
    install_uvloop()
    try:
        asyncio.run(serve_runtime(kind, loader))
    except StartupLoadError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
