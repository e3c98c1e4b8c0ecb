"""Limits a service puts on what it takes in: ASGI middleware for request bodies
(``BodyLimitMiddleware``: 413) and for requests in flight (``InFlightLimit``: 503 with
``Retry-After``), and ``Overloaded``, what a bounded queue raises when it is full.

Body limit: checks ``Content-Length`` up front and counts streamed (chunked) bodies as
they arrive, so an oversized upload is refused without being buffered. Paths matching
``overrides`` (a regex -> limit) get their own limit, e.g. model uploads. Bodies of a
``streamed`` content type (e.g. NDJSON record streams) pass unlimited: their handler
limits each part itself.
"""

from __future__ import annotations

import re

from sluice.errors import error_body


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, overrides: dict[str, int] | None = None, streamed: tuple[str, ...] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.overrides = [(re.compile(pattern), limit) for pattern, limit in (overrides or {}).items()]
        self.streamed = {t.lower().encode() for t in streamed}

    def _limit(self, path: str) -> int:
        for pattern, limit in self.overrides:
            if pattern.match(path):
                return limit
        return self.max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        content_type = None
        lengths = []
        for key, value in scope.get("headers", ()):
            if key == b"content-length":
                lengths.append(value)
            elif key == b"content-type" and content_type is None:
                content_type = value
        if content_type is not None and self.streamed and content_type.split(b";", 1)[0].strip().lower() in self.streamed:
            return await self.app(scope, receive, send)
        limit = self._limit(scope.get("path", ""))
        for value in lengths:
            if value.isdigit() and int(value) > limit:
                return await self._refuse(send, limit)
        if len(lengths) == 1 and lengths[0].isdigit():
            # the HTTP server reads exactly Content-Length bytes of body (no more can reach
            # the app), and that is within the limit: nothing to count
            return await self.app(scope, receive, send)
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


class Overloaded(RuntimeError):
    """A bounded queue (or in-flight limit) is full: the caller is refused at once rather
    than queued; it may retry later."""


class InFlightLimit:
    """At most ``max_in_flight`` HTTP requests at once; one more is answered at once with
    a 503, ``Retry-After: retry_after_s`` and the JSON error ``overloaded``, never queued.
    Paths starting with one of ``exempt`` (health, metrics) are neither counted nor shed.
    Every other 503 the app answers without ``Retry-After`` (a stage overloaded or down)
    gets it too, so a client always learns when to come back."""

    def __init__(self, app, max_in_flight: int, retry_after_s: int = 1, exempt: tuple[str, ...] = ("/healthz", "/metrics")):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after = str(retry_after_s).encode()
        self.exempt = exempt
        #: requests being served now
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").startswith(self.exempt):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            return await self._shed(send)
        self.in_flight += 1

        async def send_with_retry_after(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                headers = list(message.get("headers", ()))
                if not any(k.lower() == b"retry-after" for k, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", self.retry_after)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_retry_after)
        finally:
            self.in_flight -= 1

    async def _shed(self, send) -> None:
        body = error_body(
            "overloaded",
            f"{self.max_in_flight} requests are in flight, the limit; retry later",
            {"max_in_flight": self.max_in_flight, "retry_after_s": int(self.retry_after)},
        )
        await send({
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", self.retry_after),
            ],
        })
        await send({"type": "http.response.body", "body": body})
