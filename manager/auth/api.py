"""``/api/v1/tokens``: issue, list and revoke API tokens (the manager's sidecar lets
only ``admin`` tokens through), and the wiring of secure mode into the manager.

A revocation answers once every connected sidecar has acknowledged the route
configuration that refuses the token (or after one second), so a ``204`` means the
token no longer works anywhere in the mesh.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fastapi import APIRouter, Request, Response, status

from manager.auth.keys import KEY_FILE, SigningKey
from manager.auth.scopes import runtime_scope
from manager.auth.tokens import TokenService
from manager.schemas import TokenInfo, TokenIssued, TokenRequest
from manager.store import Store, TokenRow
from manager.xds.ingress_auth import IngressAuth
from sluice.errors import ApiError, error_responses

log = logging.getLogger(__name__)

router = APIRouter()

#: how long a revocation waits for the sidecars' acknowledgements before answering
REVOKE_WAIT_S = 1.0


def setup(app, control, store: Store, settings) -> TokenService | None:
    """Secure mode: load (or create) the signing key, tell the public ingresses what to
    check, and write the admin token file if asked to. Dev mode: nothing (None)."""
    app.state.tokens = None
    if not settings.auth:
        log.info("auth is off (dev mode): no tokens; the REST API and the gateway listen on 127.0.0.1 only")
        return None
    key = SigningKey.load_or_create(Path(settings.data_path) / KEY_FILE)
    tokens = TokenService(store, key)
    control.set_ingress_auth(ingress_auth(tokens))
    if settings.admin_token_path:
        tokens.ensure_admin_token(settings.admin_token_path, settings.admin_token_ttl_s)
    if settings.runtime_token_dir:
        for name in (n.strip() for n in settings.runtime_tokens.split(",")):
            if name:
                path = Path(settings.runtime_token_dir) / name / "token"
                tokens.ensure_token_file(path, [runtime_scope(name)], settings.admin_token_ttl_s)
    app.state.tokens = tokens
    log.info("auth is on: tokens are checked by the manager's and the gateway's sidecars")
    return tokens


def ingress_auth(tokens: TokenService) -> IngressAuth:
    return IngressAuth(jwks=tokens.key.jwks_json(), revoked=tokens.revoked_ids())


def _tokens(request: Request) -> TokenService:
    tokens = request.app.state.tokens
    if tokens is None:
        raise ApiError(409, "auth is off (dev mode): tokens mean nothing here; start the mesh with `sluice up --secure` "
                       "(or the manager with SLUICE_MANAGER_AUTH=true)", "auth_off")
    return tokens


def _info(row: TokenRow, now: float) -> TokenInfo:
    state = "revoked" if row.revoked_at is not None else "expired" if row.expires_at <= now else "active"
    return TokenInfo(id=row.id, scopes=list(row.scopes), created_at=row.created_at, expires_at=row.expires_at,
                     revoked_at=row.revoked_at, status=state)


@router.post("/tokens", response_model=TokenIssued, status_code=status.HTTP_201_CREATED, tags=["tokens"],
             responses=error_responses(400, 409, 422, s409="auth is off (dev mode)", s422="an unknown scope or a bad ttl_s"))
async def create_token(body: TokenRequest, request: Request) -> TokenIssued:
    """Issue a token with these scopes (``admin``, ``deploy``, ``runtime:<runtime>``,
    ``serve:<pipeline>``, ``serve:*``); the answer is the only place the token appears."""
    tokens = _tokens(request)
    ttl_s = body.ttl_s if body.ttl_s is not None else request.app.state.control.settings.token_ttl_s
    try:
        issued = tokens.issue(body.scopes, ttl_s)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid_token_request", scopes=body.scopes) from None
    return TokenIssued(token=issued.token, id=issued.row.id, scopes=list(issued.row.scopes), expires_at=issued.row.expires_at)


@router.get("/tokens", response_model=list[TokenInfo], tags=["tokens"], responses=error_responses(409, s409="auth is off (dev mode)"))
async def list_tokens(request: Request) -> list[TokenInfo]:
    """Every token issued: id, scopes, times, status; never the token itself."""
    now = time.time()
    return [_info(row, now) for row in _tokens(request).tokens()]


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT, tags=["tokens"],
               responses=error_responses(404, 409, s404="no such token", s409="auth is off (dev mode)"))
async def revoke_token(token_id: str, request: Request) -> Response:
    """Revoke a token: refused by every sidecar once this answers (within a second)."""
    tokens = _tokens(request)
    if tokens.revoke(token_id) is None:
        raise ApiError(404, f"no token {token_id!r}", "not_found", token=token_id)
    control = request.app.state.control
    control.set_ingress_auth(ingress_auth(tokens))
    await control.wait_routes_live(REVOKE_WAIT_S)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
