"""ASGI middleware for JSON-only APIs: a body is read as JSON whatever its declared type.

``curl -d '{...}'`` declares ``application/x-www-form-urlencoded``; an API that speaks
only JSON should still take it (the seed's documented commands do exactly this).
A body that is not JSON is still refused, by the JSON parser, with a 422.
Paths matching ``raw_paths`` (e.g. model uploads) keep the type they declared.
"""

from __future__ import annotations

import re

_JSON = (b"content-type", b"application/json")


class JsonBodyMiddleware:
    def __init__(self, app, raw_paths: str | None = None):
        self.app = app
        self.raw_paths = re.compile(raw_paths) if raw_paths else None

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "http"
            and scope["method"] in ("POST", "PUT", "PATCH")
            and not (self.raw_paths and self.raw_paths.match(scope.get("path", "")))
        ):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, _JSON]}
        return await self.app(scope, receive, send)
