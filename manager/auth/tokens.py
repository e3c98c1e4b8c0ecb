"""API tokens: ES256 JWTs signed by the manager, with scopes, expiry and revocation.

A token is ``{"iss": "sluice-manager", "aud": "sluice", "jti": <id>, "iat", "exp",
"scopes": [...]}`` signed with the manager's key (``keys.SigningKey``). The store keeps
each token's id, scopes, expiry and revocation time, never the token itself: a token
is shown once, when it is issued. Envoy verifies signature, issuer, audience and
expiry (``jwt_authn``) and checks scopes and revocations (``rbac``); revoked ids stay
in the sidecars' configuration only until the token would have expired anyway.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jwt

from manager.auth.keys import SigningKey, write_private
from manager.auth.scopes import ADMIN, Caller, caller_from_payload, check_scopes
from manager.store import Store, TokenRow

log = logging.getLogger(__name__)

ISSUER = "sluice-manager"
AUDIENCE = "sluice"


class InvalidToken(Exception):
    """A token that does not verify: bad signature, wrong issuer or audience, expired,
    unknown to this manager, or revoked."""


@dataclass(frozen=True)
class Issued:
    token: str
    row: TokenRow


class TokenService:
    def __init__(self, store: Store, key: SigningKey, *, max_ttl_s: float = 10 * 365 * 86400,
                 clock: Callable[[], float] = time.time):
        self.store = store
        self.key = key
        self.max_ttl_s = max_ttl_s
        self._clock = clock

    def issue(self, scopes: list[str], ttl_s: float) -> Issued:
        """A new token (``ValueError`` for a bad scope or TTL)."""
        scopes = check_scopes(scopes)
        if not 0 < ttl_s <= self.max_ttl_s:
            raise ValueError(f"ttl_s must be in (0, {self.max_ttl_s:g}]")
        now = self._clock()
        row = TokenRow(id=secrets.token_hex(8), scopes=tuple(scopes), created_at=now, expires_at=float(int(now + ttl_s)))
        token = jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "jti": row.id, "iat": int(now), "exp": int(row.expires_at), "scopes": scopes},
            self.key.private_key, algorithm="ES256", headers={"kid": self.key.kid},
        )
        self.store.put_token(row)
        log.info("auth: issued token %s with scopes %s, expires in %.0fs", row.id, ",".join(scopes), row.expires_at - now)
        return Issued(token, row)

    def tokens(self) -> list[TokenRow]:
        return self.store.tokens()

    def revoke(self, token_id: str) -> TokenRow | None:
        """Revoke a token (again is a no-op); None when no token has this id."""
        row = self.store.token(token_id)
        if row is None:
            return None
        if row.revoked_at is None:
            self.store.revoke_token(token_id, self._clock())
            log.info("auth: revoked token %s", token_id)
        return self.store.token(token_id)

    def revoked_ids(self) -> frozenset[str]:
        """Ids of revoked tokens that have not expired yet (what sidecars must refuse)."""
        return frozenset(self.store.revoked_token_ids(self._clock()))

    def verify(self, token: str) -> Caller:
        """The caller a token names, checked as Envoy checks it, plus revocation."""
        try:
            payload = jwt.decode(
                token, self.key.private_key.public_key(), algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER,
                options={"require": ["exp", "iss", "aud", "jti"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(str(exc)) from None
        caller = caller_from_payload(payload)
        if caller is None:
            raise InvalidToken("the token names no id or scopes")
        row = self.store.token(caller.token_id)
        if row is None:
            raise InvalidToken("unknown token")
        if row.revoked_at is not None:
            raise InvalidToken("revoked")
        return caller

    def ensure_admin_token(self, path: str | Path, ttl_s: float, renew_within_s: float = 86400.0) -> bool:
        """Make ``path`` (mode 0600) hold a valid admin token (see ``ensure_token_file``)."""
        return self.ensure_token_file(path, [ADMIN], ttl_s, renew_within_s)

    def ensure_token_file(self, path: str | Path, scopes: list[str], ttl_s: float, renew_within_s: float = 86400.0) -> bool:
        """Make ``path`` (mode 0600) hold a valid token with exactly ``scopes``: the one
        already there if it verifies and lasts more than ``renew_within_s`` (or half its
        lifetime), else a new one. True when a new token was written."""
        path = Path(path)
        wanted = frozenset(check_scopes(scopes))
        if path.exists():
            try:
                caller = self.verify(path.read_text().strip())
                row = self.store.token(caller.token_id)
                if caller.scopes == wanted and row is not None and row.expires_at - self._clock() > min(renew_within_s, ttl_s / 2):
                    return False
            except (InvalidToken, OSError):
                pass
        issued = self.issue(sorted(wanted), ttl_s)
        write_private(path, (issued.token + "\n").encode())
        log.info("auth: wrote a %s token (id %s) to %s (mode 0600)", ",".join(sorted(wanted)), issued.row.id, path)
        return True
