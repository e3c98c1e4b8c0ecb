"""Scopes, and who a request comes from.

A token carries a list of scopes:

* ``admin``: everything, tokens included;
* ``deploy``: pipelines and models (create, replace, delete, upload, load);
* ``runtime:<name>``: register, heartbeat and deregister instances of runtime ``<name>``
  only (and read recorded model digests);
* ``serve:<pipeline>``: serve that pipeline; ``serve:*``: serve every pipeline (also
  over OIP gRPC, where the pipeline is named in the body and Envoy cannot see it).

Envoy checks scopes per route (``manager.xds.ingress_auth``). The one check Envoy
cannot express, that a ``runtime:<name>`` scope names the runtime in the path, is made
by the manager from the verified token payload Envoy forwards (``caller_from_header``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

ADMIN = "admin"
DEPLOY = "deploy"
RUNTIME_PREFIX = "runtime:"
SERVE_PREFIX = "serve:"
SERVE_ALL = "serve:*"

#: a runtime's name (``manager.schemas.RuntimeRegistration``) and a pipeline's (``schemas.NAME``)
RUNTIME_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}"
PIPELINE_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}"
SCOPE = re.compile(rf"^(?:{ADMIN}|{DEPLOY}|{RUNTIME_PREFIX}{RUNTIME_NAME}|{SERVE_PREFIX}(?:\*|{PIPELINE_NAME}))$")

#: the header in which the manager's sidecar forwards a verified token's payload
#: (base64url JSON; Envoy's ``forward_payload_header``, set only after verification)
PAYLOAD_HEADER = "x-sluice-jwt-payload"


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """The scopes, sorted and de-duplicated; ``ValueError`` naming the first bad one."""
    out = sorted(set(scopes))
    if not out:
        raise ValueError("a token needs at least one scope")
    for scope in out:
        if not isinstance(scope, str) or not SCOPE.match(scope):
            raise ValueError(
                f"unknown scope {scope!r}: use admin, deploy, runtime:<runtime>, serve:<pipeline> or serve:*"
            )
    return out


def runtime_scope(name: str) -> str:
    return f"{RUNTIME_PREFIX}{name}"


def serve_scope(pipeline: str) -> str:
    return f"{SERVE_PREFIX}{pipeline}"


@dataclass(frozen=True)
class Caller:
    """A request's verified token: its id (``jti``) and scopes."""

    token_id: str
    scopes: frozenset[str]

    def has(self, scope: str) -> bool:
        """True when the token grants ``scope`` (``admin`` grants everything)."""
        return ADMIN in self.scopes or scope in self.scopes

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes


def caller_from_payload(payload: dict) -> Caller | None:
    token_id, scopes = payload.get("jti"), payload.get("scopes")
    if not isinstance(token_id, str) or not token_id or not isinstance(scopes, list):
        return None
    return Caller(token_id, frozenset(s for s in scopes if isinstance(s, str)))


def caller_from_header(value: str | None) -> Caller | None:
    """The caller named by Envoy's forwarded payload header (None when absent or unreadable)."""
    if not value:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError):
        return None
    return caller_from_payload(payload) if isinstance(payload, dict) else None
