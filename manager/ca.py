"""The mesh's certificate authority: the manager signs every sidecar's certificate.

One ECDSA P-256 CA key and self-signed CA certificate, persisted in the manager's data
directory (beside its database): ``ca.key`` (mode 0600) and ``ca.crt``, created on
first start and reused after. Identities are SPIFFE-style URI SANs in the trust
domain ``sluice``:

* ``spiffe://sluice/runtime/<name>`` for a runtime's sidecar,
* ``spiffe://sluice/gateway`` for the gateway's sidecar,
* ``spiffe://sluice/manager`` for the manager (its xDS server, and its own calls to
  runtimes for ModelMetadata and model loads),
* ``spiffe://sluice/service/<name>`` for any other service.

Each certificate also carries a DNS SAN (``<name>.runtime.sluice``,
``gateway.sluice``, ``manager.sluice``, ...), which is what gRPC clients check as the
host name (with ``grpc.ssl_target_name_override``); Envoy matches the URI SAN.
Leaf certificates are short-lived (``ManagerSettings.cert_ttl_s``, 1 h by default)
and re-issued at two thirds of their life (``Issued.renew_at``).

Also here: ``python -m manager.ca bootstrap`` writes, for a deployment whose sidecars
run elsewhere (docker-compose.yml), each node's CA certificate and xDS join token
into a folder of its own (see ``manager.xds.auth``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "sluice"
CA_KEY = "ca.key"
CA_CERT = "ca.crt"
CA_TTL_S = 10 * 365 * 24 * 3600
#: certificates are valid from a little before they were issued: clocks differ between hosts
CLOCK_SKEW_S = 60
#: a certificate is renewed when this share of its life has passed
RENEW_AT = 2 / 3

MANAGER_ID = f"spiffe://{TRUST_DOMAIN}/manager"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"


def spiffe_id(role: str, name: str) -> str:
    """The URI SAN of a sidecar (or the manager) by role and service name."""
    if role in ("gateway", "manager"):
        return f"spiffe://{TRUST_DOMAIN}/{role}"
    if role == "runtime":
        return f"spiffe://{TRUST_DOMAIN}/runtime/{name}"
    return f"spiffe://{TRUST_DOMAIN}/service/{name}"


def dns_name(role: str, name: str) -> str:
    """The DNS SAN of the same identity: what a gRPC client checks as the host name."""
    if role in ("gateway", "manager"):
        return f"{role}.{TRUST_DOMAIN}"
    return f"{name.lower()}.{'runtime' if role == 'runtime' else 'service'}.{TRUST_DOMAIN}"


def runtime_id(name: str) -> str:
    return spiffe_id("runtime", name)


@dataclass(frozen=True)
class Issued:
    """A leaf certificate and its key, PEM-encoded, with the CA certificate that signed it."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    serial: int
    not_after: float  # epoch seconds
    renew_at: float  # epoch seconds: when to replace it (two thirds of its life)
    uri: str


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start, atomically."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate):
        self.key = key
        self.cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)

    # --- creation
    @classmethod
    def ephemeral(cls, common_name: str = "Sluice mesh CA") -> "CertificateAuthority":
        """A CA in memory only (tests, tools); the manager uses ``load_or_create``."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sluice"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(seconds=CLOCK_SKEW_S))
            .not_valid_after(now + dt.timedelta(seconds=CA_TTL_S))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load(cls, directory: str | Path) -> "CertificateAuthority":
        directory = Path(directory)
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{directory / CA_KEY}: not an EC private key")
        return cls(key, x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes()))

    @classmethod
    def load_or_create(cls, directory: str | Path) -> "CertificateAuthority":
        """The CA persisted in ``directory``; made (key mode 0600) when there is none."""
        directory = Path(directory)
        if (directory / CA_KEY).exists():
            ca = cls.load(directory)
            os.chmod(directory / CA_KEY, 0o600)  # whatever a copy did to it
            return ca
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls.ephemeral()
        key_pem = ca.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        # the certificate first: a key without its certificate is never left behind
        _write_public(directory / CA_CERT, ca.cert_pem)
        _write_private(directory / CA_KEY, key_pem)
        return ca

    # --- issuing
    def issue(self, uri: str, dns: list[str] | tuple[str, ...] = (), ttl_s: float = 3600.0,
              ips: tuple[str, ...] = ()) -> Issued:
        """A fresh key and a leaf certificate for ``uri`` (server and client auth), valid for ``ttl_s``."""
        import ipaddress

        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        not_after = now + dt.timedelta(seconds=ttl_s)
        serial = x509.random_serial_number()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        sans += [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Sluice")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(seconds=min(CLOCK_SKEW_S, ttl_s)))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)  # the subject is empty of identity
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        issued_at = time.time()
        return Issued(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
            ca_pem=self.cert_pem,
            serial=serial,
            not_after=not_after.timestamp(),
            renew_at=issued_at + ttl_s * RENEW_AT,
            uri=uri,
        )

    def issue_for(self, role: str, name: str, ttl_s: float = 3600.0) -> Issued:
        """The certificate of a sidecar (or the manager) by role and service name."""
        return self.issue(spiffe_id(role, name), [dns_name(role, name)], ttl_s)


# --- bootstrap files for sidecars that run elsewhere (compose)
def bootstrap(data_dir: Path, out: Path, nodes: list[tuple[str, str, str]]) -> None:
    """Make (or reuse) the CA and the xDS join secret in ``data_dir``; write, for each
    (node id, role, service), ``out/<node id>/ca.crt`` and ``out/<node id>/token``."""
    from manager.xds.auth import NodeAuth

    ca = CertificateAuthority.load_or_create(data_dir)
    auth = NodeAuth.load_or_create(data_dir)
    for node_id, role, service in nodes:
        folder = out / node_id
        folder.mkdir(parents=True, exist_ok=True)
        _write_public(folder / "ca.crt", ca.cert_pem)
        _write_private(folder / "token", auth.mint(node_id, role, service).encode())


def _node(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":")
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"{spec!r} is not NODE_ID:ROLE:SERVICE")
    return parts[0], parts[1], parts[2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m manager.ca", description="The mesh CA's files for sidecars that run elsewhere.")
    sub = parser.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("bootstrap", help="CA + join secret in --data; per node: ca.crt and xDS token in --out/<node id>/")
    boot.add_argument("--data", required=True, type=Path, help="the manager's data directory")
    boot.add_argument("--out", required=True, type=Path)
    boot.add_argument("nodes", nargs="+", type=_node, metavar="NODE_ID:ROLE:SERVICE")
    args = parser.parse_args(argv)
    bootstrap(args.data, args.out, args.nodes)
    print(f"mesh CA in {args.data}; bootstrap files for {len(args.nodes)} nodes in {args.out}")


if __name__ == "__main__":
    main()
