"""The project's error answers (``sluice.errors``) on a small FastAPI app: a 405 names in
``Allow`` every method the path takes, across routes and across included routers."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, FastAPI

from sluice.errors import install_error_handlers


def app_with_split_routes() -> FastAPI:
    """``/things/{name}``: GET and DELETE as two routes of an included router, PUT on the
    app itself; ``/other``: POST only."""
    router = APIRouter()

    @router.get("/things/{name}")
    async def read(name: str) -> dict:
        return {"name": name}

    @router.delete("/things/{name}")
    async def remove(name: str) -> dict:
        return {"removed": name}

    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)

    @app.put("/things/{name}")
    async def replace(name: str) -> dict:
        return {"replaced": name}

    @app.post("/other")
    async def other() -> dict:
        return {}

    return app


async def test_a_405_names_every_method_of_every_route_on_the_path():
    transport = httpx.ASGITransport(app=app_with_split_routes())
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        wrong = await client.post("/things/a")
        assert wrong.status_code == 405
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert wrong.headers["allow"] == "GET, PUT, DELETE"
        other = await client.get("/other")
        assert other.status_code == 405 and other.headers["allow"] == "POST"
        assert (await client.delete("/things/a")).json() == {"removed": "a"}
