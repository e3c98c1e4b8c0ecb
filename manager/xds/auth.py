"""Who may open an xDS (ADS) or PipelineDiscovery stream: known nodes only.

The manager's gRPC server speaks TLS (a server certificate from the mesh CA, see
``manager.tls``), and every stream must carry a **node token** in its initial metadata
(``x-sluice-xds-token``): ``<claims>.<mac>``, where the claims are a node id, a role
and a service name, and the MAC is HMAC-SHA256 over them with the mesh's join secret
(32 random bytes in ``xds-join.key``, mode 0600, in the manager's data directory).
Whoever starts a sidecar gets its token from whoever holds the secret: ``LocalMesh``
mints them in-process, ``python -m manager.ca bootstrap`` writes them for compose.

The token is checked when a stream opens, before anything is read from it or sent on
it; then the node a stream announces must be the one its token names (id, role,
service) — a token for one node does not work for another — and only a gateway's
token opens ``PipelineDiscovery.Watch``.

A token may name a node id *prefix* instead, ending in ``*`` (``runtime-scikit-*``):
it admits any node id that starts with the prefix and goes on (letters, digits, ``.``,
``-``, ``_``), for the same role and service only. That is how replicas share one token
(Kubernetes: the node id is ``<prefix><pod name>``, unique per pod, while the Secret
holding the token is one per role and service; see deploy/k8s). It grants nothing a
per-node token of the same role and service would not: certificates are per role and
service anyway. Since a sidecar's certificate (its SDS
secret) travels on this channel, the token is what stands between a stranger and
the mesh's identities.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from sluice.v1 import pipeline_pb2_grpc
from sluice.wire import XDS_TOKEN_HEADER

#: gRPC metadata key that carries a node's token
TOKEN_HEADER = XDS_TOKEN_HEADER
SECRET_FILE = "xds-join.key"
_VERSION = "v1"


#: what may follow a wildcard token's prefix (a pod name is a DNS label)
_SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,200}")


@dataclass(frozen=True)
class NodeClaims:
    node_id: str  # one node id, or a prefix ending in "*" (see the module docstring)
    role: str
    service: str

    def admits(self, node_id: str) -> bool:
        """Whether a stream announcing ``node_id`` is the node (or one of the nodes) this token names."""
        if not self.node_id.endswith("*"):
            return node_id == self.node_id
        prefix = self.node_id[:-1]
        return node_id.startswith(prefix) and _SUFFIX.fullmatch(node_id[len(prefix):]) is not None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class NodeAuth:
    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError("the xDS join secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def load_or_create(cls, directory: str | Path) -> "NodeAuth":
        """The join secret in ``directory`` (``xds-join.key``, mode 0600), made when missing."""
        path = Path(directory) / SECRET_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode())
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # never replaces a secret another process made meanwhile
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
        os.chmod(path, 0o600)
        return cls(bytes.fromhex(path.read_text().strip()))

    def _mac(self, payload: str) -> bytes:
        return hmac.new(self._secret, f"sluice-xds-{_VERSION}|{payload}".encode(), hashlib.sha256).digest()

    def mint(self, node_id: str, role: str, service: str) -> str:
        payload = _b64(json.dumps([node_id, role, service], separators=(",", ":")).encode())
        return f"{_VERSION}.{payload}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> NodeClaims | None:
        """The node a token names, or None when it is not one this mesh issued."""
        try:
            version, payload, mac = token.split(".")
            if version != _VERSION or not hmac.compare_digest(_unb64(mac), self._mac(payload)):
                return None
            node_id, role, service = json.loads(_unb64(payload))
            if not all(isinstance(v, str) and v for v in (node_id, role, service)):
                return None
            return NodeClaims(node_id, role, service)
        except (ValueError, TypeError, UnicodeDecodeError):
            return None

    async def authenticate(self, context: grpc.aio.ServicerContext, roles: tuple[str, ...] | None = None) -> NodeClaims:
        """The claims of the stream's token; aborts the call (UNAUTHENTICATED, or
        PERMISSION_DENIED for a role not in ``roles``) otherwise."""
        token = next((v for k, v in (context.invocation_metadata() or ()) if k == TOKEN_HEADER), None)
        claims = self.verify(token) if isinstance(token, str) else None
        if claims is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a node token is required (metadata x-sluice-xds-token)" if token is None else "invalid node token",
            )
        if roles is not None and claims.role not in roles:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"role {claims.role!r} may not call this")
        return claims


class AuthenticatedFeed(pipeline_pb2_grpc.PipelineDiscoveryServicer):
    """``PipelineDiscovery`` for gateways with a token only; every request on the stream
    must name the token's node."""

    def __init__(self, feed: pipeline_pb2_grpc.PipelineDiscoveryServicer, auth: NodeAuth):
        self.feed = feed
        self.auth = auth

    async def Watch(self, request_iterator, context):
        claims = await self.auth.authenticate(context, roles=("gateway",))
        impostor: list[str] = []

        async def checked() -> AsyncIterator:
            async for request in request_iterator:
                if request.node_id and not claims.admits(request.node_id):
                    impostor.append(request.node_id)
                    return  # ends the feed's stream; refused below
                yield request

        await self.feed.Watch(checked(), context)
        if impostor:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token is for node {claims.node_id!r}, not {impostor[0]!r}")
