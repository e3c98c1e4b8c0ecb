"""Serves the console at ``/ui``: the page and its static files, and the JSON views the
browser needs beyond the REST API, under ``/ui/api``.

Everything else the console shows comes from the REST API itself (``/api/v1/...``),
called by the browser with the same token, so the console can show nothing its user
could not read with ``curl``. Trust (secure mode, ``manager.xds.ingress_auth``): the
page and its files (``/ui``, ``/ui/static``) are public, they hold no data; the JSON
views (``/ui/api``) need the scope of the API data they are made of (``deploy``, as
pipelines do).

Live figures are polled (the page asks ``/ui/api/stats`` every two seconds while it
is open), not pushed with server-sent events: the source is itself a reading of
cumulative counters (nothing to push between readings), an ``EventSource`` cannot send
the ``Authorization`` header the sidecar checks, and a long-lived stream would run
into the route timeouts of the manager's ingress.
"""

from __future__ import annotations

from pathlib import Path as FilePath

import yaml
from fastapi import APIRouter, FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from starlette.staticfiles import StaticFiles

from manager.schemas import NAME
from manager.settings import ManagerSettings
from manager.ui.schemas import ConsoleConfig, StatsOut, TracesOut, YamlIn
from manager.ui.settings import UiSettings
from manager.ui.stats import GatewayStats, ScrapeToken
from manager.ui.traces import ZipkinTraces
from sluice.errors import ApiError
from sluice.settings import CommonSettings

STATIC = FilePath(__file__).resolve().parent / "static"
#: the page loads only its own files and talks only to its own origin
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff", "cache-control": "no-cache"}

router = APIRouter(prefix="/ui", include_in_schema=False)


class Console:
    """The console's state in the manager: the stats window and the Zipkin client."""

    def __init__(self, settings: ManagerSettings, common: CommonSettings, ui: UiSettings, tokens=None):
        self.settings = settings
        self.stats = GatewayStats(settings.gateway_url, ui.window_s, ui.scrape_interval_s, ui.fetch_timeout_s,
                                  token=ScrapeToken(tokens) if tokens is not None else None)
        self.traces = ZipkinTraces(common.zipkin_url, ui.zipkin_ui_url, ui.fetch_timeout_s) if common.zipkin_url else None


def _console(request: Request) -> Console:
    return request.app.state.console


@router.get("")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=308)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers=HEADERS)


@router.get("/api/config", response_model=ConsoleConfig)
async def config(request: Request) -> ConsoleConfig:
    console = _console(request)
    return ConsoleConfig(
        secure=console.settings.auth,
        tracing=console.traces is not None,
        zipkin_url=console.traces.ui_url if console.traces else "",
        gateway_url=console.settings.gateway_url,
    )


@router.get("/api/stats", response_model=StatsOut)
async def stats(request: Request) -> StatsOut:
    """Requests, p50/p99 and error rate per pipeline and per stage over the last minute."""
    return await _console(request).stats.stats()


@router.get("/api/traces/{pipeline}", response_model=TracesOut)
async def traces(request: Request, pipeline: str = Path(pattern=NAME), limit: int = Query(20, ge=1, le=100)) -> TracesOut:
    """The last requests of a pipeline in Zipkin, newest first, with their spans."""
    console = _console(request)
    if console.traces is None:
        raise ApiError(409, "tracing is off: start the mesh with Zipkin (SLUICE_ZIPKIN_URL)", "tracing_off")
    return await console.traces.recent(pipeline, limit)


@router.post("/api/yaml")
async def parse_yaml(body: YamlIn) -> JSONResponse:
    """A YAML document as JSON (the editor's YAML mode); 422 naming the line and column."""
    try:
        return JSONResponse(jsonable_encoder(yaml.safe_load(body.text)))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = {"line": mark.line + 1, "column": mark.column + 1} if mark is not None else {}
        problem = getattr(exc, "problem", None) or str(exc)
        raise ApiError(422, f"not YAML: {problem}" + (f" (line {where['line']}, column {where['column']})" if where else ""),
                       "invalid_yaml", **where) from None


def install(app: FastAPI, settings: ManagerSettings, common: CommonSettings) -> None:
    """Mount the console on the manager's app (after ``auth_api.setup``: secure mode's
    token service signs the token the stats view scrapes the gateway with)."""
    app.state.console = Console(settings, common, UiSettings(), getattr(app.state, "tokens", None))
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
