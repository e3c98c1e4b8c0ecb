"""The mesh CA (manager.ca) and the xDS node tokens (manager.xds.auth)."""

from __future__ import annotations

import datetime as dt
import os
import stat
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from manager.ca import CA_CERT, CA_KEY, RENEW_AT, CertificateAuthority, bootstrap, dns_name, main, spiffe_id
from manager.xds.auth import SECRET_FILE, NodeAuth, NodeClaims
from sluice.wire import MANAGER_TLS_NAME


def sans(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.UniformResourceIdentifier), ext.get_values_for_type(x509.DNSName)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_identities() -> None:
    assert spiffe_id("runtime", "scikit") == "spiffe://sluice/runtime/scikit"
    assert spiffe_id("gateway", "gateway") == "spiffe://sluice/gateway"
    assert spiffe_id("manager", "anything") == "spiffe://sluice/manager"
    assert spiffe_id("service", "repository") == "spiffe://sluice/service/repository"
    assert dns_name("runtime", "serving-localml-spark") == "serving-localml-spark.runtime.sluice"
    assert dns_name("manager", "manager") == MANAGER_TLS_NAME


def test_issue_signs_a_short_lived_p256_leaf_with_the_identity_as_sans() -> None:
    ca = CertificateAuthority.ephemeral()
    before = time.time()
    issued = ca.issue_for("runtime", "scikit", ttl_s=30)
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    cert.verify_directly_issued_by(ca.cert)  # raises unless the CA signed it
    assert sans(cert) == (["spiffe://sluice/runtime/scikit"], ["scikit.runtime.sluice"])
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert cert.serial_number == issued.serial and issued.uri == "spiffe://sluice/runtime/scikit"
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
    # valid for ttl_s from now (not before: a little earlier, for clock skew, never more than its ttl)
    not_after = cert.not_valid_after_utc.timestamp()
    assert before + 30 - 1 <= not_after <= time.time() + 30 + 1
    assert cert.not_valid_before_utc.timestamp() >= before - 30 - 1
    assert issued.not_after == pytest.approx(not_after, abs=1)
    assert before + 30 * RENEW_AT - 1 <= issued.renew_at <= time.time() + 30 * RENEW_AT
    # the key belongs to the certificate; every issue is a new key and serial
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(issued.key_pem, None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    again = ca.issue_for("runtime", "scikit", ttl_s=30)
    assert again.serial != issued.serial and again.key_pem != issued.key_pem
    assert issued.ca_pem == ca.cert_pem


def test_the_ca_certificate_is_a_ca_for_ten_years() -> None:
    ca = CertificateAuthority.ephemeral()
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    usage = ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert ca.cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=3600)


def test_the_ca_is_created_once_with_a_0600_key_and_reused_after_a_restart(tmp_path) -> None:
    data = tmp_path / "data"
    first = CertificateAuthority.load_or_create(data)
    assert mode(data / CA_KEY) == 0o600
    assert (data / CA_CERT).read_bytes() == first.cert_pem
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # no temporary files left
    again = CertificateAuthority.load_or_create(data)  # what the next start does
    assert again.cert_pem == first.cert_pem
    assert again.key.private_numbers() == first.key.private_numbers()
    # a leaf issued before the restart still verifies against the CA after it
    leaf = x509.load_pem_x509_certificate(first.issue_for("gateway", "gateway").cert_pem)
    leaf.verify_directly_issued_by(again.cert)
    os.chmod(data / CA_KEY, 0o644)  # a careless copy
    CertificateAuthority.load_or_create(data)
    assert mode(data / CA_KEY) == 0o600


def test_node_tokens_bind_node_role_and_service(tmp_path) -> None:
    auth = NodeAuth.load_or_create(tmp_path)
    assert mode(tmp_path / SECRET_FILE) == 0o600
    assert NodeAuth.load_or_create(tmp_path).mint("a", "runtime", "x") == auth.mint("a", "runtime", "x")  # reused
    token = auth.mint("runtime-scikit", "runtime", "scikit")
    assert auth.verify(token) == NodeClaims("runtime-scikit", "runtime", "scikit")
    assert auth.mint("gateway", "gateway", "gateway") != token
    assert NodeAuth(b"another secret!!").verify(token) is None  # another mesh's secret
    version, payload, mac = token.split(".")
    forged = NodeAuth(b"another secret!!").mint("gateway", "gateway", "gateway").split(".")[1]
    for bad in ("", "garbage", token + "x", f"{version}.{forged}.{mac}", f"v0.{payload}.{mac}", token.replace(".", "", 1)):
        assert auth.verify(bad) is None, bad
    with pytest.raises(ValueError):
        NodeAuth(b"short")


def test_bootstrap_writes_each_nodes_ca_and_token(tmp_path, capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    main(["bootstrap", "--data", str(data), "--out", str(out), "gateway:gateway:gateway", "runtime-scikit:runtime:scikit"])
    ca = CertificateAuthority.load(data)
    auth = NodeAuth.load_or_create(data)
    for node_id, role, service in (("gateway", "gateway", "gateway"), ("runtime-scikit", "runtime", "scikit")):
        assert (out / node_id / "ca.crt").read_bytes() == ca.cert_pem
        assert auth.verify((out / node_id / "token").read_text()) == NodeClaims(node_id, role, service)
        assert mode(out / node_id / "token") == 0o600
    bootstrap(data, out, [("gateway", "gateway", "gateway")])  # again: the same CA and secret
    assert CertificateAuthority.load(data).cert_pem == ca.cert_pem
    with pytest.raises(SystemExit):
        main(["bootstrap", "--data", str(data), "--out", str(out), "not-a-node"])
