"""ASGI middleware that refuses request bodies above a configured size with a 413.

Checks ``Content-Length`` up front and counts streamed (chunked) bodies as they
arrive, so an oversized upload is refused without being buffered. Paths matching
``overrides`` (a regex -> limit) get their own limit, e.g. model uploads.
"""

from __future__ import annotations

import re

from sluice.errors import error_body


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, overrides: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = [(re.compile(pattern), limit) for pattern, limit in (overrides or {}).items()]

    def _limit(self, path: str) -> int:
        return next((limit for pattern, limit in self.overrides if pattern.match(path)), self.max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self._limit(scope.get("path", ""))
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                return await self._refuse(send, limit)
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send, limit)

    async def _refuse(self, send, limit: int) -> None:
        body = error_body("payload_too_large", f"request body is larger than {limit} bytes", {"limit": limit})
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
