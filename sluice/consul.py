"""The Consul client both sides use: the manager to discover runtimes, runtimes to register.

``SLUICE_CONSUL_ADDR`` names the agent as ``host:port`` (or ``http(s)://host:port``);
``SLUICE_CONSUL_TOKEN`` is the ACL token sent with every call (``X-Consul-Token``), for
agents that run with ACLs on (the README says how).
The client is py-consul's asyncio flavour (``consul.aio``, over aiohttp), so blocking
queries are plain awaits that a task can cancel at any moment.
"""

from __future__ import annotations

import urllib.parse
import warnings

import consul.aio

#: the tag (and Meta key) that marks a Consul service as a Sluice runtime
RUNTIME_TAG = "sluice-runtime"


def split_address(address: str) -> tuple[str, str, int]:
    """``host:port`` or ``scheme://host:port`` -> (scheme, host, port); port 8500 by default."""
    text = address.strip()
    parsed = urllib.parse.urlparse(text if "//" in text else f"//{text}")
    if not parsed.hostname:
        raise ValueError(f"not a Consul address (host:port): {address!r}")
    return parsed.scheme or "http", parsed.hostname, parsed.port or 8500


def client(address: str, timeout_s: float | None = None, token: str | None = None) -> consul.aio.Consul:
    """An asyncio Consul client; ``timeout_s`` bounds every request (blocking ones included);
    ``token``: the ACL token (default ``SLUICE_CONSUL_TOKEN``; none when empty).

    Must be called with an event loop running (aiohttp's session binds to it); close it
    with ``await c.close()``.
    """
    scheme, host, port = split_address(address)
    if token is None:
        from sluice.settings import CommonSettings

        token = CommonSettings().consul_token
    with warnings.catch_warnings():
        # py-consul 1.8 still hands aiohttp its deprecated ssl_context/verify_ssl arguments
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"consul\.aio")
        warnings.filterwarnings("ignore", message=r".*(ssl_context|verify_ssl) is deprecated", category=DeprecationWarning)
        return consul.aio.Consul(host=host, port=port, scheme=scheme, token=token or None, connections_timeout=timeout_s)
