"""ASGI middleware for JSON-only APIs: a body is read as JSON whatever its declared type,
and writes from other web origins are refused.

``curl -d '{...}'`` declares ``application/x-www-form-urlencoded``; an API that speaks
only JSON should still take it (the seed's documented commands do exactly this).
A body that is not JSON is still refused, by the JSON parser, with a 422.
Paths matching ``raw_paths`` (e.g. model uploads) keep the type they declared.

Taking form types as JSON is what a cross-site form post would rely on: a page on
another origin can make a browser send ``application/x-www-form-urlencoded``,
``multipart/form-data`` or ``text/plain`` bodies without asking first (no CORS
preflight). Browsers name the page's origin in an ``Origin`` header on such requests;
curl, the SDK and the CLI send none. So a write (POST, PUT, PATCH, DELETE) that
carries an ``Origin`` is accepted only when that origin is the API's own (the scheme,
host and port the request was sent to, from ``Host``); otherwise it is a 403 JSON
error, before the application sees it. Writes without ``Origin`` are not affected.

``loopback_only`` (dev mode, where there are no tokens): the API's own origin must
also be a loopback one (``127.0.0.1``, ``localhost``, ``[::1]``), and every request
must name a loopback host in ``Host``: a page whose DNS name is re-pointed at
127.0.0.1 (DNS rebinding) is then refused too, reads included.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from sluice.errors import error_body

_JSON = (b"content-type", b"application/json")
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _split_host(host: str) -> tuple[str, int | None] | None:
    """``Host`` -> (host name, port or None); None when malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        name, rest = host[1:end], host[end + 1:]
    else:
        name, _, port = host.partition(":")
        rest = f":{port}" if port else ""
    if rest and not re.fullmatch(r":\d{1,5}", rest):
        return None
    return name, int(rest[1:]) if rest else None


def is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def same_origin(origin: str, host: str) -> bool:
    """True when ``origin`` (an ``Origin`` header) is the origin of a request sent to
    ``host`` (its ``Host`` header): same host name and port (a port left out is the
    origin scheme's default, so a TLS-terminating proxy in front is fine)."""
    try:
        parsed = urlsplit(origin.strip())
        origin_port = parsed.port
    except ValueError:
        return False
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.hostname or parsed.path not in ("", "/"):
        return False
    target = _split_host(host)
    if target is None:
        return False
    name, port = target
    origin_port = origin_port or _DEFAULT_PORTS[parsed.scheme]
    target_port = port or _DEFAULT_PORTS[parsed.scheme]
    return parsed.hostname == name and origin_port == target_port


class JsonBodyMiddleware:
    def __init__(self, app, raw_paths: str | None = None, loopback_only: bool = False):
        self.app = app
        self.raw_paths = re.compile(raw_paths) if raw_paths else None
        self.loopback_only = loopback_only

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        host = next((v.decode("latin-1") for k, v in headers if k == b"host"), "")
        if self.loopback_only:
            target = _split_host(host)
            if target is None or not is_loopback(target[0]):
                return await _refuse(send, "host_not_loopback",
                                     f"this API answers requests for loopback hosts only (dev mode), not {host!r}", host=host)
        method = scope["method"]
        if method in _WRITES:
            origin = next((v.decode("latin-1") for k, v in headers if k == b"origin"), None)
            if origin is not None and not (
                same_origin(origin, host)
                and (not self.loopback_only or is_loopback((_split_host(host) or ("", None))[0]))
            ):
                return await _refuse(send, "cross_origin_write",
                                     f"a write from the web origin {origin!r} is refused: only this API's own origin may write "
                                     "from a browser (curl, the SDK and the CLI send no Origin header)", origin=origin)
            if method != "DELETE" and not (self.raw_paths and self.raw_paths.match(scope.get("path", ""))):
                kept = [(k, v) for k, v in headers if k != b"content-type"]
                scope = {**scope, "headers": [*kept, _JSON]}
        return await self.app(scope, receive, send)


async def _refuse(send, code: str, message: str, **details) -> None:
    body = error_body(code, message, details)
    await send({"type": "http.response.start", "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
