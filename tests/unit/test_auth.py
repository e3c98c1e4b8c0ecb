"""Tokens, scopes, runtime networks, the dev-mode origin checks, and the Envoy
configuration that enforces tokens (without an Envoy: the e2e tests run it for real)."""

from __future__ import annotations

import base64
import json
import socket
import sqlite3
import stat
import threading
import time

import httpx
import jwt
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from manager.auth.keys import SigningKey
from manager.auth.networks import LOOPBACK, PRIVATE, RuntimeNetworks, parse_networks
from manager.auth.scopes import PAYLOAD_HEADER, Caller, caller_from_header, check_scopes
from manager.auth.tokens import AUDIENCE, ISSUER, InvalidToken, TokenService
from manager.registry.embedded import EmbeddedRegistry
from manager.store import InstanceRow, Store
from manager.xds.ingress_auth import JWT_FILTER, REVOCATIONS_FILTER, SCOPES_FILTER, IngressAuth
from manager.xds.resources import LISTENER, ROUTE, MeshSettings, NodeInfo, node_resources
from sluice.errors import ApiError
from sluice.jsonbody import JsonBodyMiddleware, same_origin


# --- scopes
def test_scopes_are_checked_sorted_and_deduplicated():
    assert check_scopes(["serve:iris", "admin", "serve:iris", "runtime:serving-localml-spark", "serve:*", "deploy"]) == [
        "admin", "deploy", "runtime:serving-localml-spark", "serve:*", "serve:iris",
    ]
    for bad in ([], ["root"], ["serve:"], ["serve:a.b"], ["runtime:"], ["serve:iris%2F"], ["runtime:*"], ["Admin"], [""]):
        with pytest.raises(ValueError):
            check_scopes(bad)


def test_admin_grants_every_scope():
    assert Caller("t", frozenset({"admin"})).has("runtime:scikit")
    caller = Caller("t", frozenset({"runtime:scikit"}))
    assert caller.has("runtime:scikit") and not caller.has("runtime:spark") and not caller.admin


def test_the_forwarded_payload_header_names_the_caller():
    payload = base64.urlsafe_b64encode(json.dumps({"jti": "abc", "scopes": ["deploy"]}).encode()).rstrip(b"=").decode()
    assert caller_from_header(payload) == Caller("abc", frozenset({"deploy"}))
    for bad in (None, "", "!!!", base64.urlsafe_b64encode(b"[1]").decode(), base64.urlsafe_b64encode(b'{"scopes": []}').decode()):
        assert caller_from_header(bad) is None


# --- the signing key and tokens
def test_the_signing_key_is_created_mode_0600_and_reused(tmp_path):
    path = tmp_path / "data" / "token-signing.key"
    first = SigningKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey.load_or_create(path).kid == first.kid
    path.chmod(0o644)
    SigningKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (jwk,) = first.jwks()["keys"]
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["alg"] == "ES256" and jwk["kid"] == first.kid


@pytest.fixture()
def service(tmp_path):
    store = Store(tmp_path / "manager.db")
    yield TokenService(store, SigningKey.generate())
    store.close()


def test_a_token_is_an_es256_jwt_that_the_public_key_verifies(service):
    issued = service.issue(["serve:iris", "deploy"], 3600)
    header = jwt.get_unverified_header(issued.token)
    assert header["alg"] == "ES256" and header["kid"] == service.key.kid
    # verified with the JWKS alone, as Envoy does
    public = jwt.PyJWK(service.key.jwks()["keys"][0]).key
    claims = jwt.decode(issued.token, public, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["jti"] == issued.row.id and claims["scopes"] == ["deploy", "serve:iris"]
    assert claims["exp"] == int(issued.row.expires_at) and abs(claims["exp"] - time.time() - 3600) < 5
    assert service.verify(issued.token) == Caller(issued.row.id, frozenset({"deploy", "serve:iris"}))


def test_tokens_that_do_not_verify(service):
    issued = service.issue(["admin"], 3600)
    other = TokenService(service.store, SigningKey.generate()).issue(["admin"], 3600)
    expired = service.issue(["admin"], 1)
    forged_payload = issued.token.split(".")
    forged_payload[1] = base64.urlsafe_b64encode(json.dumps({"jti": "x", "scopes": ["admin"]}).encode()).rstrip(b"=").decode()
    time.sleep(1.1)
    for token in (other.token, expired.token, ".".join(forged_payload), "garbage"):
        with pytest.raises(InvalidToken):
            service.verify(token)
    for scopes, ttl in ((["root"], 10), (["admin"], 0), (["admin"], 1e12)):
        with pytest.raises(ValueError):
            service.issue(scopes, ttl)


def test_the_store_keeps_ids_and_scopes_never_tokens(service, tmp_path):
    issued = service.issue(["serve:*"], 60)
    (row,) = service.tokens()
    assert (row.id, row.scopes, row.revoked_at) == (issued.row.id, ("serve:*",), None)
    database = b"".join(p.read_bytes() for p in tmp_path.glob("manager.db*"))
    assert issued.token.encode() not in database and issued.token.split(".")[2].encode() not in database


def test_revocation_lasts_until_the_token_would_expire(service):
    short = service.issue(["serve:iris"], 1)
    long = service.issue(["serve:iris"], 3600)
    assert service.revoke(long.row.id).revoked_at is not None
    assert service.revoke("nope") is None
    service.revoke(short.row.id)
    assert service.revoked_ids() == {short.row.id, long.row.id}
    with pytest.raises(InvalidToken, match="revoked"):
        service.verify(long.token)
    time.sleep(1.1)
    assert service.revoked_ids() == {long.row.id}  # an expired token fails by itself


def test_the_admin_token_file_is_written_once_and_renewed_when_no_longer_valid(service, tmp_path):
    path = tmp_path / "home" / "admin.token"
    assert service.ensure_admin_token(path, 3600) is True
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    token = path.read_text().strip()
    assert service.verify(token).admin
    assert service.ensure_admin_token(path, 3600) is False and path.read_text().strip() == token
    service.revoke(service.verify(token).token_id)
    assert service.ensure_admin_token(path, 3600) is True and path.read_text().strip() != token
    path.write_text("garbage")
    assert service.ensure_admin_token(path, 3600) is True


# --- runtime networks
def test_networks_parse_and_decide():
    assert [str(n) for n in parse_networks(LOOPBACK)] == ["127.0.0.0/8", "::1/128"]
    assert len(parse_networks(PRIVATE)) == 4
    with pytest.raises(ValueError, match="SLUICE_MANAGER_RUNTIME_NETWORKS"):
        parse_networks("10.0.0.0/8, nope")
    private = RuntimeNetworks(PRIVATE)
    assert private.allows("10.1.2.3") and private.allows("172.31.0.1") and private.allows("192.168.1.1") and private.allows("fd00::1")
    assert not private.allows("172.32.0.1") and not private.allows("8.8.8.8") and not private.allows("169.254.169.254")
    assert not private.allows("127.0.0.1") and not private.allows("not-an-ip")
    assert private.allows("::ffff:10.0.0.1")  # an IPv4-mapped address is its IPv4 address
    loopback = RuntimeNetworks()
    assert loopback.allows("127.0.0.2") and loopback.allows("::1") and not loopback.allows("0.0.0.0")


async def test_admit_resolves_checks_and_names_the_setting():
    loopback = RuntimeNetworks()
    assert await loopback.admit("127.0.0.1") == "127.0.0.1"
    assert await loopback.admit("localhost") in ("127.0.0.1", "::1")
    with pytest.raises(ApiError) as outside:
        await loopback.admit("10.0.0.7")
    assert outside.value.status == 422 and outside.value.code == "host_not_allowed"
    assert "SLUICE_MANAGER_RUNTIME_NETWORKS" in outside.value.message and outside.value.details["addresses"] == ["10.0.0.7"]
    with pytest.raises(ApiError) as unresolvable:
        await loopback.admit("no-such-host.invalid")
    assert unresolvable.value.status == 422 and unresolvable.value.code == "host_unresolvable"


async def test_names_are_resolved_off_the_loop_and_again_each_time(monkeypatch):
    answers = iter([["127.0.0.5"], ["127.0.0.6"], ["127.0.0.7", "10.0.0.1"]])
    threads = []

    def getaddrinfo(host, port, *args, **kwargs):
        threads.append(threading.current_thread())
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0)) for a in next(answers)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    networks = RuntimeNetworks()
    assert await networks.admit("runtime-a") == "127.0.0.5"
    assert await networks.admit("runtime-a") == "127.0.0.6"  # not cached
    with pytest.raises(ApiError, match="10.0.0.1"):  # partly outside: refused
        await networks.admit("runtime-a")
    assert all(t is not threading.main_thread() for t in threads) and len(threads) == 3


# --- the store and the registry
def test_instances_from_schema_2_are_migrated_and_checked_on_restore(tmp_path):
    path = tmp_path / "manager.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE instances (id TEXT PRIMARY KEY, runtime TEXT NOT NULL, host TEXT NOT NULL, port INTEGER NOT NULL, last_seen REAL NOT NULL)")
    db.executemany("INSERT INTO instances VALUES (?, ?, ?, ?, ?)", [
        ("a", "scikit", "127.0.0.1", 9000, 1.0), ("b", "scikit", "scikit-host", 9000, 1.0), ("c", "scikit", "10.0.0.1", 9000, 1.0),
    ])
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    store = Store(path)
    assert {i.id: (i.ip, i.token_id) for i in store.instances()} == {"a": ("", None), "b": ("", None), "c": ("", None)}
    registry = EmbeddedRegistry(store, 5.0, allows=RuntimeNetworks().allows)
    # a host name (never resolved) and an address outside the networks are dropped: they register again
    assert [e.instance_id for e in registry.endpoints()["scikit"]] == ["a"]
    assert [i.id for i in store.instances()] == ["a"]
    store.close()


def test_the_registry_keeps_the_resolved_address_and_the_registering_token(tmp_path):
    store = Store(tmp_path / "manager.db")
    registry = EmbeddedRegistry(store, 5.0)
    registry.register("scikit-1", "scikit", "scikit.internal", 9000, ip="127.0.0.9", token_id="t1")
    (endpoint,) = registry.endpoints()["scikit"]
    assert endpoint.host == "127.0.0.9"
    assert registry.holder("scikit-1").token_id == "t1" and registry.holder_at("scikit", "127.0.0.9", 9000).instance_id == "scikit-1"
    registry.register("scikit-2", "scikit", "scikit.internal", 9000, ip="127.0.0.9", token_id="t1", replaces="scikit-1")
    assert registry.holder("scikit-1") is None and [e.instance_id for e in registry.endpoints()["scikit"]] == ["scikit-2"]
    assert [(i.id, i.ip, i.token_id) for i in store.instances()] == [("scikit-2", "127.0.0.9", "t1")]
    store.close()


# --- what Envoy is told
GATEWAY = NodeInfo("gateway", "gateway", "gateway", 8083, 18083, egress_port=15001, grpc_port=18084)
MANAGER = NodeInfo("manager", "manager", "service", 8080, 18080)
RUNTIME = NodeInfo("runtime-scikit", "scikit", "runtime", 9000, 19000, "grpc")
REPOSITORY = NodeInfo("repository", "repository", "service", 8087, 18087)


def _filters(listener) -> list[str]:
    from google.protobuf import json_format

    hcm = json_format.MessageToDict(listener.filter_chains[0].filters[0].typed_config)
    return [f["name"] for f in hcm["httpFilters"]]


def test_dev_mode_pushes_no_token_filters_and_keeps_public_ingresses_on_loopback():
    settings = MeshSettings(listener_address="0.0.0.0", public_address="127.0.0.1")
    for node in (GATEWAY, MANAGER, REPOSITORY):
        resources = node_resources(node, settings)
        ingress = next(l for l in resources[LISTENER] if l.name == "ingress")
        assert _filters(ingress) == ["envoy.filters.http.router"]
        assert ingress.address.socket_address.address == "127.0.0.1"
    runtime = next(l for l in node_resources(RUNTIME, settings)[LISTENER] if l.name == "ingress")
    assert runtime.address.socket_address.address == "0.0.0.0"


def test_secure_mode_checks_tokens_on_the_public_ingresses_only():
    auth = IngressAuth(SigningKey.generate().jwks_json())
    settings = MeshSettings(auth=auth)
    for node in (GATEWAY, MANAGER, REPOSITORY):
        ingress = next(l for l in node_resources(node, settings)[LISTENER] if l.name == "ingress")
        assert _filters(ingress)[:3] == [JWT_FILTER, REVOCATIONS_FILTER, SCOPES_FILTER] and _filters(ingress)[-1] == "envoy.filters.http.router"
        assert ingress.filter_chains[0].filters[0].typed_config.value  # parsed: the @types resolved
    for node in (RUNTIME,):
        ingress = next(l for l in node_resources(node, settings)[LISTENER] if l.name == "ingress")
        assert JWT_FILTER not in str(ingress)


def test_a_revocation_changes_the_routes_not_the_listeners():
    auth = IngressAuth(SigningKey.generate().jwks_json())
    for node in (GATEWAY, MANAGER):
        before = node_resources(node, MeshSettings(auth=auth))
        after = node_resources(node, MeshSettings(auth=auth.with_revoked(frozenset({"abc123"}))))
        assert [l.SerializeToString(deterministic=True) for l in before[LISTENER]] == [l.SerializeToString(deterministic=True) for l in after[LISTENER]]
        assert before[ROUTE][0] != after[ROUTE][0] and "abc123" in str(after[ROUTE][0]) and "abc123" not in str(before[ROUTE][0])


def test_the_manager_forwards_the_payload_and_the_gateway_does_not():
    auth = IngressAuth(SigningKey.generate().jwks_json())
    manager = next(l for l in node_resources(MANAGER, MeshSettings(auth=auth))[LISTENER] if l.name == "ingress")
    gateway = next(l for l in node_resources(GATEWAY, MeshSettings(auth=auth))[LISTENER] if l.name == "ingress")
    assert PAYLOAD_HEADER in str(manager) and PAYLOAD_HEADER not in str(gateway)


# --- dev-mode origin checks
def test_same_origin():
    assert same_origin("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert same_origin("http://localhost", "localhost:80") and same_origin("https://m.example", "m.example")
    assert same_origin("http://[::1]:8080", "[::1]:8080")
    for origin, host in (("http://evil.example", "127.0.0.1:8080"), ("http://127.0.0.1:9999", "127.0.0.1:8080"),
                         ("null", "127.0.0.1:8080"), ("http://127.0.0.1:8080/x", "127.0.0.1:8080"), ("ftp://h", "h")):
        assert not same_origin(origin, host), (origin, host)


def _app(loopback_only: bool):
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"content_type": request.headers.get("content-type"), "body": (await request.body()).decode()})

    return JsonBodyMiddleware(Starlette(routes=[Route("/x", echo, methods=["GET", "POST", "DELETE"])]), loopback_only=loopback_only)


async def test_cross_origin_form_writes_are_refused_and_curl_is_not():
    transport = httpx.ASGITransport(app=_app(loopback_only=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8080") as client:
        curl = await client.post("/x", content='{"a": 1}', headers={"content-type": "application/x-www-form-urlencoded"})
        assert curl.json() == {"content_type": "application/json", "body": '{"a": 1}'}
        for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=b", "text/plain", "application/json"):
            refused = await client.post("/x", content="{}", headers={"content-type": content_type, "origin": "http://evil.example"})
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_origin_write"
        assert (await client.delete("/x", headers={"origin": "http://evil.example"})).status_code == 403
        own = await client.post("/x", content="{}", headers={"content-type": "text/plain", "origin": "http://127.0.0.1:8080"})
        assert own.status_code == 200
        assert (await client.get("/x", headers={"origin": "http://evil.example"})).status_code == 200  # reads: no body taken
        rebound = await client.get("/x", headers={"host": "evil.example:8080"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_loopback"
    transport = httpx.ASGITransport(app=_app(loopback_only=False))
    async with httpx.AsyncClient(transport=transport, base_url="https://sluice.example.com") as client:
        own = await client.post("/x", content="{}", headers={"origin": "https://sluice.example.com"})
        assert own.status_code == 200
        assert (await client.post("/x", content="{}", headers={"origin": "https://evil.example"})).status_code == 403
