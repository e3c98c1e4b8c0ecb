"""The manager's token-signing key: ECDSA P-256 (ES256), in a file of mode 0600 next to
the manager's database, created on first start in secure mode.

Envoy verifies tokens against the public half, pushed to every protected sidecar as
an inline JWKS (``local_jwks``); no sidecar ever fetches keys over the network. To
rotate the key (and so invalidate every token at once), stop the manager, delete the
file and start it again: the new JWKS reaches the sidecars with the next snapshot.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

KEY_FILE = "token-signing.key"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the first byte (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class SigningKey:
    def __init__(self, private_key: ec.EllipticCurvePrivateKey):
        if not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError("the token-signing key must be an ECDSA P-256 key (ES256)")
        self.private_key = private_key
        numbers = private_key.public_key().public_numbers()
        self._x, self._y = _b64(numbers.x.to_bytes(32, "big")), _b64(numbers.y.to_bytes(32, "big"))
        # RFC 7638 thumbprint: the key's id, so a token names the key that signed it
        canonical = json.dumps({"crv": "P-256", "kty": "EC", "x": self._x, "y": self._y}, separators=(",", ":"), sort_keys=True)
        self.kid = _b64(hashlib.sha256(canonical.encode()).digest())

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load_or_create(cls, path: str | Path) -> "SigningKey":
        """The key in ``path``; a new one (written mode 0600) when the file does not exist."""
        path = Path(path)
        if not path.exists():
            key = cls.generate()
            write_private(path, key.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
            ))
            log.info("auth: created the token-signing key %s (mode 0600)", path)
            return key
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("auth: %s had mode %o; set to 0600", path, mode)
            path.chmod(0o600)
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} does not hold an ECDSA key")
        return cls(loaded)

    def jwks(self) -> dict:
        """The public key as a JSON Web Key Set (what Envoy's ``local_jwks`` takes)."""
        return {"keys": [{"kty": "EC", "crv": "P-256", "x": self._x, "y": self._y, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def jwks_json(self) -> str:
        return json.dumps(self.jwks(), separators=(",", ":"), sort_keys=True)
