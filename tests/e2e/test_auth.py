"""Tokens and scopes on a real mesh in secure mode (``LocalMesh(secure=True)``, what
``sluice up --secure`` starts), checked by the real Envoy sidecars; runtime
registration refusals; and what dev mode does instead (no filters at all, loopback
only, cross-origin writes refused).

Secure mode here runs with ``SLUICE_MANAGER_RUNTIME_NETWORKS=127.0.0.1/32``, so that
127.0.0.2 (a loopback address this test listens on) is a host outside the networks:
the test can then show that a refused registration never connected to it.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.utils import InferenceServerException

from sluice.local.mesh import LocalMesh, MeshPorts, RuntimeSpec
from tests.conftest import eventually

pytestmark = pytest.mark.e2e

IRIS = ["scikit/iris_scaler", "scikit/iris_classifier"]
RECORD = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("secure"),
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
        env={"SLUICE_MANAGER_HEARTBEAT_TTL_S": "3", "SLUICE_MANAGER_RUNTIME_NETWORKS": "127.0.0.1/32"},
        secure=True,
    )
    with mesh:
        admin = bearer(mesh.admin_token)
        for name in ("iris", "other"):
            created = httpx.post(f"{mesh.manager_url}/api/v1/pipelines", json={"name": name, "chain": IRIS}, headers=admin, timeout=10)
            assert created.status_code == 201, created.text
        yield mesh


@pytest.fixture(scope="module")
def tokens(mesh) -> dict[str, dict]:
    """One token per role used below: ``{"token", "id", ...}``."""
    scopes = {
        "deploy": ["deploy"], "serve_iris": ["serve:iris"], "serve_all": ["serve:*"],
        "runtime_scikit": ["runtime:scikit"], "runtime_other": ["runtime:other"],
    }
    return {role: mesh.mint_token(s, ttl_s=3600) for role, s in scopes.items()}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    if code:
        assert error["code"] == code, error
    return error


# (base, method, path, body): one call on each API
CALLS = [
    ("manager", "GET", "/api/v1/pipelines", None),
    ("manager", "POST", "/api/v1/pipelines", {"name": "p", "chain": IRIS}),
    ("manager", "DELETE", "/api/v1/pipelines/iris", None),
    ("manager", "GET", "/api/v1/runtimes", None),
    ("manager", "POST", "/api/v1/runtimes/scikit/models", {"model": "iris_classifier"}),
    ("manager", "GET", "/api/v1/models", None),
    ("manager", "PUT", "/api/v1/models/iris_classifier/version-policy", {"default": "2"}),
    ("manager", "DELETE", "/api/v1/models/iris_classifier/version-policy", None),
    ("manager", "GET", "/api/v1/tokens", None),
    ("manager", "POST", "/api/v1/tokens", {"scopes": ["admin"]}),
    ("manager", "GET", "/api/v1/mesh", None),
    ("manager", "GET", "/metrics", None),
    ("gateway", "POST", "/serve/iris", [RECORD]),
    ("gateway", "POST", "/api/v1/serve/iris", [RECORD]),
    ("gateway", "POST", "/v2/models/iris/infer", {"inputs": []}),
    ("gateway", "GET", "/metrics", None),
]


def call(mesh, base: str, method: str, path: str, body, headers: dict | None = None) -> httpx.Response:
    url = (mesh.manager_url if base == "manager" else mesh.gateway_url) + path
    return httpx.request(method, url, json=body, headers=headers or {}, timeout=10)


@pytest.mark.parametrize("base,method,path,body", CALLS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CALLS])
def test_no_token_is_a_401_json_error(mesh, base, method, path, body):
    error = assert_error(call(mesh, base, method, path, body), 401, "unauthorized")
    assert "Jwt is missing" in error["message"]


@pytest.mark.parametrize("base,method,path,body", CALLS, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CALLS])
def test_a_token_without_the_scope_is_a_403_json_error(mesh, tokens, base, method, path, body):
    # serve:iris opens no management API; deploy serves nothing and issues no tokens
    wrong = tokens["deploy"] if base == "gateway" or "tokens" in path or path == "/metrics" else tokens["serve_iris"]
    assert_error(call(mesh, base, method, path, body, bearer(wrong["token"])), 403, "forbidden")


def test_bad_tokens_are_401(mesh, tokens):
    forged = tokens["serve_all"]["token"][:-4] + ("AAAA" if not tokens["serve_all"]["token"].endswith("AAAA") else "BBBB")
    for token in ("not-a-jwt", forged):
        assert_error(httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], headers=bearer(token), timeout=10), 401, "unauthorized")


def test_health_and_docs_need_no_token(mesh):
    assert httpx.get(f"{mesh.manager_url}/healthz", timeout=5).status_code == 200
    assert httpx.get(f"{mesh.manager_url}/openapi.json", timeout=5).status_code == 200
    assert httpx.get(f"{mesh.gateway_url}/healthz/ready", timeout=5).status_code == 200


def test_scopes_grant_what_they_name(mesh, tokens):
    admin, deploy = bearer(mesh.admin_token), bearer(tokens["deploy"]["token"])
    assert httpx.get(f"{mesh.manager_url}/api/v1/pipelines", headers=deploy, timeout=10).status_code == 200
    assert httpx.get(f"{mesh.manager_url}/api/v1/tokens", headers=admin, timeout=10).status_code == 200
    assert httpx.get(f"{mesh.gateway_url}/metrics", headers=admin, timeout=10).status_code == 200
    # any valid token may ask where the gateway is (the SDK's predict does)
    assert httpx.get(f"{mesh.manager_url}/api/v1/info", headers=bearer(tokens["serve_iris"]["token"]), timeout=10).status_code == 200


def test_a_serve_iris_token_serves_iris_and_nothing_else(mesh, tokens):
    headers = bearer(tokens["serve_iris"]["token"])
    for path in ("/serve/iris", "/api/v1/serve/iris"):
        response = httpx.post(f"{mesh.gateway_url}{path}", json=[RECORD], headers=headers, timeout=10)
        assert response.status_code == 200, response.text
        assert response.json()[0]["label"] == "setosa"
    assert httpx.get(f"{mesh.gateway_url}/v2/models/iris/ready", headers=headers, timeout=10).status_code == 200
    for path in ("/serve/other", "/api/v1/serve/other", "/v2/models/other/ready", "/v2/models/stats",
                 "/serve/iris/../other", "/serve//other", "/serve/iris%2F..%2Fother"):
        response = httpx.request("GET" if path.startswith("/v2") else "POST", f"{mesh.gateway_url}{path}",
                                 json=[RECORD], headers=headers, timeout=10)
        assert response.status_code in (400, 403), (path, response.status_code, response.text)
    everything = bearer(tokens["serve_all"]["token"])
    assert httpx.post(f"{mesh.gateway_url}/serve/other", json=[RECORD], headers=everything, timeout=10).status_code == 200


def test_grpc_model_infer_needs_serve_all(mesh, tokens):
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{mesh.ports.gateway}")
    try:
        assert client.is_server_live()  # liveness needs no token
        inputs = []
        for name, value in RECORD.items():
            tensor = tgrpc.InferInput(name, [1], "FP64")
            tensor.set_data_from_numpy(np.array([value]))
            inputs.append(tensor)
        result = client.infer("iris", inputs, headers=bearer(tokens["serve_all"]["token"]))
        assert result.as_numpy("label").reshape(-1)[0] in (b"setosa", "setosa")
        for headers, status in (({}, "UNAUTHENTICATED"), (bearer(tokens["serve_iris"]["token"]), "PERMISSION_DENIED")):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("iris", inputs, headers=headers)
            assert status in str(refused.value.status()), refused.value
    finally:
        client.close()


def test_tokens_are_listed_without_their_secret(mesh, tokens):
    response = httpx.get(f"{mesh.manager_url}/api/v1/tokens", headers=bearer(mesh.admin_token), timeout=10)
    listed = {t["id"]: t for t in response.json()}
    for issued in tokens.values():
        assert listed[issued["id"]]["scopes"] == issued["scopes"] and listed[issued["id"]]["status"] == "active"
        assert issued["token"] not in response.text
    assert all("token" not in t for t in listed.values())
    database = (mesh.workdir / "manager.db").read_bytes() + b"".join(p.read_bytes() for p in mesh.workdir.glob("manager.db-*"))
    assert not any(t["token"].encode() in database for t in tokens.values())


def test_a_revoked_token_fails_mesh_wide_within_a_second(mesh):
    issued = mesh.mint_token(["serve:iris", "deploy"])
    headers = bearer(issued["token"])
    assert httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], headers=headers, timeout=10).status_code == 200
    assert httpx.get(f"{mesh.manager_url}/api/v1/pipelines", headers=headers, timeout=10).status_code == 200
    listeners_before = listener_versions(mesh)
    started = time.monotonic()
    revoked = httpx.delete(f"{mesh.manager_url}/api/v1/tokens/{issued['id']}", headers=bearer(mesh.admin_token), timeout=10)
    assert revoked.status_code == 204, revoked.text

    def refused() -> bool:
        return (httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], headers=headers, timeout=5).status_code == 403
                and httpx.get(f"{mesh.manager_url}/api/v1/pipelines", headers=headers, timeout=5).status_code == 403)

    eventually(refused, timeout_s=1.0, interval_s=0.01)
    assert time.monotonic() - started < 1.0
    error = assert_error(httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], headers=headers, timeout=5), 403, "forbidden")
    assert "revoked" in error["details"]["reason"]
    # the revocation went out as route configuration: no listener was replaced
    assert listener_versions(mesh) == listeners_before
    listed = {t["id"]: t for t in httpx.get(f"{mesh.manager_url}/api/v1/tokens", headers=bearer(mesh.admin_token), timeout=10).json()}
    assert listed[issued["id"]]["status"] == "revoked"


def test_an_expired_token_is_refused(mesh):
    issued = mesh.mint_token(["serve:iris"], ttl_s=1)
    headers = bearer(issued["token"])
    assert httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], headers=headers, timeout=5).status_code == 200  # cached now
    # refused once past its expiry plus the 5 s of clock skew the sidecars allow, cache or not
    eventually(lambda: httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], headers=headers, timeout=5).status_code == 401,
               timeout_s=9.0, interval_s=0.25)


def listener_versions(mesh) -> dict[str, str]:
    out = {}
    for node in ("manager", "gateway"):
        dump = httpx.get(f"{mesh.admin_url(node)}/config_dump?resource=dynamic_listeners", timeout=5).json()
        for config in dump["configs"]:
            out[f"{node}/{config['name']}"] = config["active_state"]["version_info"]
    return out


def test_only_the_public_ingresses_check_tokens(mesh):
    for node, expected in (("manager", True), ("gateway", True), ("repository", True), ("runtime-scikit", False)):
        listeners = httpx.get(f"{mesh.admin_url(node)}/config_dump?resource=dynamic_listeners", timeout=5).text
        assert ("envoy.filters.http.jwt_authn" in listeners) is expected, node


def test_the_repository_takes_writes_only_with_deploy_scope_and_reads_from_anyone(mesh, tokens):
    # a model upload or delete straight at the repository's port (not through the manager)
    upload = f"{mesh.repository_url}/models/planted"
    body, kind = b"\x1f\x8b not really a tar", {"content-type": "application/gzip"}
    assert_error(httpx.post(upload, content=body, headers=kind, timeout=5), 401, "unauthorized")
    assert_error(httpx.post(upload, content=body, headers={**kind, **bearer(tokens["serve_all"]["token"])}, timeout=5), 403, "forbidden")
    assert_error(httpx.delete(f"{mesh.repository_url}/models/iris_scaler", timeout=5), 401, "unauthorized")
    assert httpx.get(f"{mesh.repository_url}/models/iris_scaler", timeout=5).status_code == 200
    # with deploy scope the write reaches the repository (which refuses the bad archive itself)
    passed = httpx.post(upload, content=body, headers={**kind, **bearer(tokens["deploy"]["token"])}, timeout=5)
    assert passed.status_code == 400 and passed.json()["error"]["code"] == "bad_archive"
    # through the manager, the caller's token is what the repository checks
    via = httpx.post(f"{mesh.manager_url}/api/v1/models/planted", content=body, headers={**kind, **bearer(tokens["deploy"]["token"])}, timeout=5)
    assert via.status_code == 400 and via.json()["error"]["code"] == "bad_archive"


def test_the_cli_and_sdk_read_the_admin_token_file(mesh, monkeypatch):
    from typer.testing import CliRunner

    from sluice.cli import app
    from sluice.client import Client

    assert oct((mesh.admin_token_path).stat().st_mode & 0o777) == "0o600"
    monkeypatch.delenv("SLUICE_TOKEN", raising=False)
    monkeypatch.setenv("SLUICE_HOME", str(mesh.workdir))
    runner = CliRunner()
    created = runner.invoke(app, ["token", "create", "--scope", "serve:iris", "--ttl", "600", "--manager", mesh.manager_url])
    assert created.exit_code == 0, created.output
    lines = created.output.strip().splitlines()
    token, token_id = lines[-1], lines[0].split(",")[0].removeprefix("id ")
    with Client(mesh.manager_url) as client:  # no token given: the admin token file
        assert {t["id"]: t["status"] for t in client.tokens()}[token_id] == "active"
    with Client(mesh.manager_url, token=token, gateway_url=mesh.gateway_url) as serving:
        assert serving.predict("iris", [RECORD])[0]["label"] == "setosa"
    revoked = runner.invoke(app, ["token", "revoke", token_id, "--manager", mesh.manager_url])
    assert revoked.exit_code == 0, revoked.output
    listing = runner.invoke(app, ["token", "list", "--manager", mesh.manager_url])
    assert listing.exit_code == 0 and "revoked" in listing.output


# --- runtime registration
def registration(port: int, host: str = "127.0.0.1", name: str = "scikit") -> dict:
    return {"name": name, "kind": "scikit", "host": host, "port": port, "models": ["iris_classifier"]}


def instances(mesh) -> list[dict]:
    response = httpx.get(f"{mesh.manager_url}/api/v1/runtimes/scikit", headers=bearer(mesh.admin_token), timeout=10)
    return sorted(response.json()["instances"], key=lambda i: i["id"])


def test_registration_refusals_change_nothing(mesh, tokens):
    port = mesh.runtime("scikit").public_port
    before = [(i["id"], i["host"], i["port"]) for i in instances(mesh)]
    url = f"{mesh.manager_url}/api/v1/runtimes"
    # no token
    assert_error(httpx.post(url, json=registration(port), timeout=10), 401, "unauthorized")
    # a token for another runtime (Envoy lets runtime:* through, the manager checks the name)
    assert_error(httpx.post(url, json=registration(port), headers=bearer(tokens["runtime_other"]["token"]), timeout=10), 403, "scope_mismatch")
    # a serve token is not a runtime token at all
    assert_error(httpx.post(url, json=registration(port), headers=bearer(tokens["serve_all"]["token"]), timeout=10), 403, "forbidden")
    # a client-chosen instance id
    chosen = {**registration(port), "instance_id": "scikit-mine"}
    assert_error(httpx.post(url, json=chosen, headers=bearer(tokens["runtime_scikit"]["token"]), timeout=10), 422)
    # an unresolvable host
    error = assert_error(httpx.post(url, json=registration(port, "no-such-host.invalid"), headers=bearer(tokens["runtime_scikit"]["token"]), timeout=10), 422, "host_unresolvable")
    assert error["details"]["host"] == "no-such-host.invalid"
    assert [(i["id"], i["host"], i["port"]) for i in instances(mesh)] == before


def test_a_host_outside_the_networks_is_refused_before_any_connection(mesh, tokens):
    server = socket.socket()
    server.bind(("127.0.0.2", 0))
    server.listen(8)
    server.settimeout(0.2)
    accepted: list = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        before = instances(mesh)
        response = httpx.post(f"{mesh.manager_url}/api/v1/runtimes", json=registration(server.getsockname()[1], "127.0.0.2"),
                              headers=bearer(tokens["runtime_scikit"]["token"]), timeout=10)
        error = assert_error(response, 422, "host_not_allowed")
        assert "SLUICE_MANAGER_RUNTIME_NETWORKS" in error["message"] and error["details"]["setting"] == "SLUICE_MANAGER_RUNTIME_NETWORKS"
        time.sleep(0.3)
        assert accepted == [] and instances(mesh) == before
    finally:
        stop.set()
        thread.join()
        server.close()


def test_heartbeats_and_deregistrations_need_the_registering_token(mesh, tokens):
    (instance,) = instances(mesh)
    path = f"{mesh.manager_url}/api/v1/runtimes/scikit/instances/{instance['id']}"
    second = mesh.mint_token(["runtime:scikit"])  # the same runtime, another credential
    assert_error(httpx.put(f"{path}/heartbeat", headers=bearer(second["token"]), timeout=10), 403, "not_owner")
    assert_error(httpx.delete(path, headers=bearer(second["token"]), timeout=10), 403, "not_owner")
    assert_error(httpx.put(f"{path}/heartbeat", headers=bearer(tokens["runtime_other"]["token"]), timeout=10), 403, "scope_mismatch")
    assert_error(httpx.put(f"{path}/heartbeat", timeout=10), 401, "unauthorized")
    # the instance under another runtime's name is not found
    other = f"{mesh.manager_url}/api/v1/runtimes/other/instances/{instance['id']}/heartbeat"
    assert_error(httpx.put(other, headers=bearer(tokens["runtime_other"]["token"]), timeout=10), 404)
    # the registering token renews it (the runtime's own, minted by the mesh)
    own = httpx.put(f"{path}/heartbeat", headers=bearer(mesh.runtime_token("scikit")), timeout=10)
    assert own.status_code == 204, own.text
    assert [i["id"] for i in instances(mesh)] == [instance["id"]]
    # and the pipeline still works
    served = httpx.post(f"{mesh.gateway_url}/serve/iris", json=[RECORD], headers=bearer(mesh.admin_token), timeout=10)
    assert served.status_code == 200, served.text


def test_the_manager_issues_instance_ids(mesh):
    (instance,) = instances(mesh)
    assert instance["id"].startswith("scikit-") and instance["id"] != f"scikit-127.0.0.1-{mesh.runtime('scikit').public_port}"
    assert instance["host"] == "127.0.0.1"


# --- dev mode
@pytest.fixture(scope="module")
def dev_mesh(tmp_path_factory, model_store):
    mesh = LocalMesh(
        tmp_path_factory.mktemp("dev"),
        [RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier"))],
        MeshPorts.ephemeral(),
    )
    with mesh:
        yield mesh


def test_dev_mode_pushes_no_auth_filters_and_binds_loopback(dev_mesh):
    for node in ("manager", "gateway"):
        dump = httpx.get(f"{dev_mesh.admin_url(node)}/config_dump?resource=dynamic_listeners", timeout=5).json()
        text = json.dumps(dump)
        assert "jwt_authn" not in text and "envoy.filters.http.rbac" not in text
        ingress = next(c for c in dump["configs"] if c["name"] == "ingress")
        assert ingress["active_state"]["listener"]["address"]["socket_address"]["address"] == "127.0.0.1"
    response = httpx.post(f"{dev_mesh.manager_url}/api/v1/tokens", json={"scopes": ["admin"]}, timeout=10)
    assert_error(response, 409, "auth_off")


FORM = "application/x-www-form-urlencoded"


@pytest.mark.parametrize("content_type", [FORM, "multipart/form-data; boundary=x", "text/plain"])
def test_dev_mode_refuses_cross_origin_writes(dev_mesh, content_type):
    body = json.dumps({"name": "csrf", "chain": IRIS})
    response = httpx.post(f"{dev_mesh.manager_url}/api/v1/pipelines", content=body,
                          headers={"content-type": content_type, "origin": "http://evil.example"}, timeout=10)
    assert_error(response, 403, "cross_origin_write")
    assert httpx.get(f"{dev_mesh.manager_url}/api/v1/pipelines/csrf", timeout=10).status_code == 404


def test_dev_mode_refuses_a_rebound_host_name(dev_mesh):
    # a page on evil.example whose name now resolves to 127.0.0.1: same-origin for the browser
    headers = {"host": "evil.example:8080", "origin": "http://evil.example:8080", "content-type": FORM}
    response = httpx.post(f"{dev_mesh.manager_url}/api/v1/pipelines", content=json.dumps({"name": "csrf", "chain": IRIS}), headers=headers, timeout=10)
    assert_error(response, 403, "host_not_loopback")
    assert_error(httpx.get(f"{dev_mesh.manager_url}/api/v1/pipelines", headers={"host": "evil.example"}, timeout=10), 403, "host_not_loopback")


def test_dev_mode_accepts_writes_from_its_own_origin_and_from_curl(dev_mesh):
    port = dev_mesh.ports.manager
    own = httpx.post(f"{dev_mesh.manager_url}/api/v1/pipelines", content=json.dumps({"name": "own", "chain": IRIS}),
                     headers={"content-type": FORM, "origin": f"http://127.0.0.1:{port}"}, timeout=10)
    assert own.status_code == 201, own.text
    curl = httpx.post(f"{dev_mesh.manager_url}/api/v1/pipelines", content=json.dumps({"name": "curl", "chain": IRIS}),
                      headers={"content-type": FORM}, timeout=10)
    assert curl.status_code == 201, curl.text
    served = httpx.post(f"{dev_mesh.gateway_url}/serve/curl", json=[RECORD], timeout=10)
    assert served.status_code == 200 and served.json()[0]["label"] == "setosa"
