"""deploy/k8s: both kustomize overlays render with the real kubectl, every object parses
as its Kubernetes type with the official client's models (kubernetes_asyncio: no
unknown field, no required field missing), and the mesh's invariants hold: every Sluice
pod has its Envoy as a native sidecar with a per-pod node id, probes on the real health
endpoints, requests and limits, Services that point at real container ports,
NetworkPolicies for the mesh's paths only, PDBs and HPAs, the Secrets that
deploy/k8s/mesh-secrets.sh makes (tokens that admit each replica's node id, and only its
role and service), and each sidecar's bootstrap accepted by the real Envoy in validate mode.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio.client import ApiClient

from manager.registry.kubernetes import KIND_LABEL, MODELS_ANNOTATION, RUNTIME_LABEL
from manager.xds.auth import NodeAuth, NodeClaims
from sluice.local.envoy import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("dev", "secure")
PYTHON_APPS = {"manager": ("manager", "SLUICE_MANAGER_PORT"), "repository": ("repository", "SLUICE_REPOSITORY_PORT"),
               "gateway": ("gateway", "SLUICE_GATEWAY_PORT")}
#: the runtime pods' Services, and the Secrets the operator makes after the manager's first start
RUNTIMES = ("scikit", "spark", "triton")
OPERATOR_SECRETS = {"sluice-runtime-tokens"}

MODELS = {
    ("v1", "ConfigMap"): k8s.V1ConfigMap, ("v1", "Service"): k8s.V1Service, ("v1", "Namespace"): k8s.V1Namespace,
    ("v1", "Secret"): k8s.V1Secret, ("v1", "PersistentVolumeClaim"): k8s.V1PersistentVolumeClaim,
    ("apps/v1", "Deployment"): k8s.V1Deployment, ("policy/v1", "PodDisruptionBudget"): k8s.V1PodDisruptionBudget,
    ("autoscaling/v2", "HorizontalPodAutoscaler"): k8s.V2HorizontalPodAutoscaler,
    ("networking.k8s.io/v1", "NetworkPolicy"): k8s.V1NetworkPolicy,
    ("v1", "ServiceAccount"): k8s.V1ServiceAccount, ("rbac.authorization.k8s.io/v1", "Role"): k8s.V1Role,
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): k8s.V1RoleBinding,
}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is not on PATH: these tests render deploy/k8s with `kubectl kustomize` (install kubectl)")
    return found


@cache
def render(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay}: {done.stderr}"
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


@cache
def render_with_discovery(tmp: str) -> tuple[dict, ...]:
    """The secure overlay with the kubernetes-discovery component, as an overlay of a copy."""
    root = Path(tmp) / "k8s"
    shutil.copytree(K8S, root)
    overlay = root / "overlays" / "discovery"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": "sluice", "resources": ["../secure"], "components": ["../../components/kubernetes-discovery"]}))
    done = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


@cache
def mesh_secrets() -> tuple[dict, ...]:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run([str(K8S / "mesh-secrets.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(d for d in yaml.safe_load_all(done.stdout) if d)


def of_kind(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def sidecar_of(deployment: dict) -> dict | None:
    return next((c for c in pod(deployment).get("initContainers", []) if c["image"].startswith("sluice-envoy")), None)


def sluice_deployments(objects) -> dict[str, dict]:
    """The Deployments of the mesh's own services (not Consul's or Zipkin's)."""
    return {n: d for n, d in of_kind(objects, "Deployment").items() if n not in ("consul", "zipkin")}


def exec_text(probe: dict) -> str:
    return " ".join(probe["exec"]["command"]) if "exec" in probe else ""


# --- parsing and rendering


@pytest.mark.parametrize("overlay", OVERLAYS)
async def test_every_rendered_object_parses_as_its_kubernetes_type_with_no_unknown_field(overlay):
    async with ApiClient() as api:
        check_models(api, render(overlay) + mesh_secrets())


def check_models(api: ApiClient, objects) -> None:
    for obj in objects:
        model = MODELS.get((obj["apiVersion"], obj["kind"]))
        assert model is not None, f"{obj['apiVersion']} {obj['kind']} is not a type this test knows"
        # required fields: the models refuse None where the API requires a value
        parsed = api._ApiClient__deserialize(obj, model)
        # unknown fields: the models drop what they do not know, so the round trip differs
        again = api.sanitize_for_serialization(parsed)
        if obj["kind"] == "Secret":
            obj = {k: v for k, v in obj.items() if k != "metadata"} | {"metadata": {"name": obj["metadata"]["name"]}}
            again = {k: v for k, v in again.items() if k != "metadata"} | {"metadata": {"name": again["metadata"]["name"]}}
        assert again == obj, f"{obj['kind']}/{obj['metadata']['name']} has fields the Kubernetes model does not know"


def test_both_overlays_run_in_their_own_namespace_with_the_same_mesh_as_compose():
    for overlay in OVERLAYS:
        objects = render(overlay)
        assert list(of_kind(objects, "Namespace")) == ["sluice"]
        assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {"sluice"}
        assert {"manager", "repository", "gateway", "scikit", "spark", "consul", "zipkin"} <= set(of_kind(objects, "Deployment"))
    assert "triton" in of_kind(render("secure"), "Deployment")


# --- pods


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_sluice_pod_has_its_envoy_as_a_native_sidecar_with_a_per_pod_node_id(overlay):
    for name, deployment in sluice_deployments(render(overlay)).items():
        sidecar = sidecar_of(deployment)
        assert sidecar is not None, f"{name}: no Envoy sidecar"
        assert sidecar["restartPolicy"] == "Always", f"{name}: the sidecar must be a native sidecar"
        pod_name = next(e for e in sidecar["env"] if e["name"] == "POD_NAME")
        assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        variables = env_of(sidecar)
        assert variables["NODE_ID"].endswith("-$(POD_NAME)"), f"{name}: node ids must be unique per pod"
        assert variables["XDS_HOST"] == ("127.0.0.1" if name == "manager" else "manager")
        mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
        volumes = {v["name"]: v for v in pod(deployment)["volumes"]}
        assert volumes[mounts["/etc/sluice/xds"]]["secret"]["secretName"] == f"sluice-xds-{variables['SERVICE']}"
        process = [c for c in pod(deployment)["containers"] if c["image"].startswith("sluice") and c["name"] != "register"]
        for container in process:  # the process's own port is the one the sidecar fronts
            port_var = PYTHON_APPS.get(name, (None, "SLUICE_RUNTIME_PORT"))[1]
            assert env_of(container)[port_var] == variables["SERVICE_PORT"], name
        if name == "gateway":
            (gateway,) = process
            assert env_of(gateway)["SLUICE_GATEWAY_NODE_ID"] == variables["NODE_ID"]  # one node: its ADS and its pipeline watch
            assert env_of(gateway)["SLUICE_GATEWAY_EGRESS"] == f"127.0.0.1:{variables['EGRESS_PORT']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_probes_on_its_real_health_endpoint_and_requests_and_limits(overlay):
    for name, deployment in of_kind(render(overlay), "Deployment").items():
        spec = pod(deployment)
        for container in spec.get("initContainers", []) + spec["containers"]:
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}/{container['name']}: {bound}"
            if container.get("restartPolicy") != "Always" and container in spec.get("initContainers", []):
                continue  # a run-to-completion init container
            if container["name"] == "register":
                continue  # Triton's registration helper serves nothing
            assert "readinessProbe" in container and "livenessProbe" in container, f"{name}/{container['name']}"
            probes = " ".join(exec_text(container[p]) or str(container[p]) for p in ("readinessProbe", "livenessProbe"))
            if container["image"].startswith("sluice-envoy"):
                admin = env_of(container).get("ADMIN_PORT", "9901")
                assert f"/dev/tcp/127.0.0.1/{admin}" in probes and "GET /ready" in probes, name
                assert re.search(r'ADMIN_PORT:-9901', (ROOT / "envoy" / "entrypoint.sh").read_text())
            elif name in PYTHON_APPS:
                package, port_var = PYTHON_APPS[name]
                port = env_of(container)[port_var]
                for path in re.findall(rf"127\.0\.0\.1:{port}(/[\w/]+)|'127\.0\.0\.1', {port}.*?'GET', '(/[\w/]+)'", probes):
                    route = next(p for p in path if p)
                    assert f'"{route}"' in (ROOT / package / "app.py").read_text(), f"{name}: {route} is no route of {package}"
                assert f"127.0.0.1:{port}/" in probes and f"'127.0.0.1', {port}" in probes, name
            elif container["image"].startswith("sluice:") and name in RUNTIMES:
                port = env_of(container)["SLUICE_RUNTIME_PORT"]
                assert f"HealthStub(grpc.insecure_channel('127.0.0.1:{port}'))" in probes, name
                assert "SERVING" in exec_text(container["readinessProbe"]), name
            elif name == "triton":
                assert "/v2/health/ready" in probes and "/v2/health/live" in probes
            else:
                assert "httpGet" in probes, name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_port_is_a_port_of_a_container_in_the_pods_it_selects(overlay):
    objects = render(overlay)
    deployments = of_kind(objects, "Deployment")
    for name, service in of_kind(objects, "Service").items():
        selected = [d for d in deployments.values()
                    if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(selected) == 1, f"Service {name} selects {len(selected)} Deployments"
        spec = pod(selected[0])
        ports = {p.get("name"): p["containerPort"] for c in spec.get("initContainers", []) + spec["containers"] for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), f"Service {name}: {target} is no container port"
            number = ports.get(target, target)
            sidecar = sidecar_of(selected[0])
            if sidecar is not None and number != 18000:  # the manager's xDS port is the process's own
                assert int(env_of(sidecar)["INGRESS_PORT"]) == number, f"Service {name} must point at its sidecar's ingress"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_and_autoscalers_cover_what_they_must(overlay):
    objects = render(overlay)
    deployments = of_kind(objects, "Deployment")
    pdbs = of_kind(objects, "PodDisruptionBudget")
    for name in sluice_deployments(objects):
        assert name in pdbs and pdbs[name]["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in of_kind(objects, "HorizontalPodAutoscaler").values()}
    runtimes = {n for n, d in deployments.items() if "sluice.io/runtime" in d["metadata"]["labels"]}
    assert scaled == {"gateway"} | runtimes and runtimes >= {"scikit", "spark"}
    for name in scaled:  # two at least: losing one pod loses no request
        assert deployments[name]["spec"]["replicas"] >= 2 or name == "triton"
        if name != "triton":
            assert pdbs[name]["spec"].get("minAvailable") == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_deny_by_default_and_admit_only_the_mesh_paths(overlay):
    objects = render(overlay)
    policies = of_kind(objects, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}

    def allowed(pod_labels: dict, port: int) -> list[list | None]:
        """The sources allowed to ``port`` of pods with ``pod_labels`` (None: anyone)."""
        sources = []
        for policy in policies.values():
            selector = policy["spec"]["podSelector"]
            if not selector.get("matchLabels", {}).items() <= pod_labels.items():
                continue
            if any(e["operator"] == "Exists" and e["key"] not in pod_labels for e in selector.get("matchExpressions", [])):
                continue
            for rule in policy["spec"].get("ingress", []):
                if any(p["port"] == port for p in rule.get("ports", [])):
                    sources.append(rule.get("from"))
        return sources

    deployments = of_kind(objects, "Deployment")
    labels = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in deployments.items()}
    for name, service in of_kind(objects, "Service").items():  # every Service port is reachable by someone
        (deployment,) = [n for n in labels if service["spec"]["selector"].items() <= labels[n].items()]
        for port in service["spec"]["ports"]:
            assert allowed(labels[deployment], port["port"]), f"{name}:{port['port']} is reachable by nobody"
    for runtime in ("scikit", "spark"):  # runtimes: the gateway, the manager, Consul's health check only
        (sources,) = allowed(labels[runtime], 9000)
        assert sorted(s["podSelector"]["matchLabels"]["app.kubernetes.io/name"] for s in sources) == ["consul", "gateway", "manager"]
        assert allowed(labels[runtime], 19000) == []  # never the process behind the sidecar
    (xds,) = allowed(labels["manager"], 18000)
    assert xds == [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "sluice"}}}]
    assert allowed(labels["gateway"], 8083) == [None]  # the public entry
    assert allowed(labels["manager"], 9901) == [] and allowed(labels["gateway"], 15001) == []


# --- secrets, tokens and modes


def test_mesh_secrets_give_every_sidecar_a_token_that_admits_each_replica_and_nothing_else():
    secrets = of_kind(mesh_secrets(), "Secret")
    ca = secrets["sluice-mesh-ca"]["data"]
    auth = NodeAuth(bytes.fromhex(base64.b64decode(ca["xds-join.key"]).decode()))
    for overlay in OVERLAYS:
        objects = render(overlay)
        referenced = {v["secret"]["secretName"] for d in of_kind(objects, "Deployment").values() for v in pod(d).get("volumes", []) if "secret" in v}
        assert referenced - OPERATOR_SECRETS <= set(secrets), f"{overlay}: Secrets nobody makes: {referenced - OPERATOR_SECRETS - set(secrets)}"
        for name, deployment in sluice_deployments(objects).items():
            variables = env_of(sidecar_of(deployment))
            data = secrets[f"sluice-xds-{variables['SERVICE']}"]["data"]
            assert data["ca.crt"] == ca["ca.crt"]
            claims = auth.verify(base64.b64decode(data["token"]).decode())
            assert claims is not None and (claims.role, claims.service) == (variables["ROLE"], variables["SERVICE"]), name
            for pod_name in (f"{name}-7d9c8b6f5-x2x9q", f"{name}-7d9c8b6f5-k4p8z"):
                assert claims.admits(variables["NODE_ID"].replace("$(POD_NAME)", pod_name)), name
            assert not claims.admits("gateway-x") or name == "gateway"


def test_a_prefix_token_admits_only_node_ids_that_extend_its_prefix():
    claims = NodeClaims("runtime-scikit-*", "runtime", "scikit")
    assert claims.admits("runtime-scikit-scikit-5f7c9-abcde")
    assert not claims.admits("runtime-scikit-")  # something must follow
    assert not claims.admits("runtime-spark-x")
    assert not claims.admits("runtime-scikit-a b") and not claims.admits("runtime-scikit-a/../b")
    exact = NodeClaims("gateway", "gateway", "gateway")
    assert exact.admits("gateway") and not exact.admits("gateway-2")
    auth = NodeAuth(b"k" * 32)
    assert auth.verify(auth.mint("runtime-scikit-*", "runtime", "scikit")) == claims


def test_secure_overlay_turns_tokens_on_and_mounts_each_runtime_only_its_own_token():
    secure, dev = of_kind(render("secure"), "ConfigMap"), of_kind(render("dev"), "ConfigMap")
    assert secure["sluice-config"]["data"]["SLUICE_MANAGER_AUTH"] == "true"
    assert secure["sluice-config"]["data"]["SLUICE_MANAGER_ADMIN_TOKEN_PATH"].startswith("/data/")
    assert dev["sluice-config"]["data"]["SLUICE_MANAGER_AUTH"] == "false"
    for name, deployment in of_kind(render("secure"), "Deployment").items():
        if name not in RUNTIMES:
            continue
        volumes = {v["name"]: v for v in pod(deployment)["volumes"]}
        assert volumes["runtime-token"]["secret"]["items"] == [{"key": name, "path": "token"}]
        (user,) = [c for c in pod(deployment)["containers"] if c["image"].startswith("sluice:")]
        assert env_of(user)["SLUICE_RUNTIME_TOKEN_FILE"] == "/etc/sluice/runtime/token"
    manager = pod(of_kind(render("secure"), "Deployment")["manager"])
    assert {v["name"]: v for v in manager["volumes"]}["mesh-ca"]["secret"]["secretName"] == "sluice-mesh-ca"
    others = [pod(d) for n, d in of_kind(render("secure"), "Deployment").items() if n != "manager"]
    assert all(v.get("secret", {}).get("secretName") != "sluice-mesh-ca" for p in others for v in p.get("volumes", []))


def test_settings_endpoints_are_in_the_configmap():
    data = of_kind(render("secure"), "ConfigMap")["sluice-config"]["data"]
    assert data["SLUICE_ZIPKIN_URL"] == "http://zipkin:9411" and data["SLUICE_CONSUL_ADDR"] == "consul:8500"
    assert "SLUICE_MANAGER_DB_URL" in data


def test_triton_asks_for_a_gpu_on_a_gpu_node():
    triton = pod(of_kind(render("secure"), "Deployment")["triton"])
    (server,) = [c for c in triton["containers"] if c["name"] == "triton"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert triton["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in triton["tolerations"]
    assert "--grpc-address=127.0.0.1" in server["command"]  # only its sidecar is reachable
    assert env_of(sidecar_of(of_kind(render("secure"), "Deployment")["triton"]))["SERVICE_PORT"] == "8001"


# --- the real Envoy


@pytest.mark.skipif(shutil.which("envsubst") is None, reason="envsubst (gettext-base) is not installed here")
@pytest.mark.parametrize("name", ["manager", "repository", "gateway", "scikit", "spark", "triton"])
def test_envoy_accepts_each_sidecars_rendered_bootstrap(name, tmp_path):
    """envoy/entrypoint.sh with the sidecar's rendered environment (POD_NAME filled as the
    kubelet would), its Secret's files, and the real Envoy in validate mode."""
    deployment = of_kind(render("secure"), "Deployment")[name]
    secret = of_kind(mesh_secrets(), "Secret")[f"sluice-xds-{env_of(sidecar_of(deployment))['SERVICE']}"]["data"]
    for key in ("ca.crt", "token"):
        (tmp_path / key).write_bytes(base64.b64decode(secret[key]))
    pod_name = f"{name}-5d8f9c7b6-q7w2e"
    variables = {k: v.replace("$(POD_NAME)", pod_name) for k, v in env_of(sidecar_of(deployment)).items()}
    variables.update(POD_NAME=pod_name, XDS_CA_FILE=str(tmp_path / "ca.crt"), XDS_TOKEN_FILE=str(tmp_path / "token"),
                     ENVOY_TEMPLATE=str(ROOT / "envoy" / "bootstrap.yaml"), ENVOY_CONFIG=str(tmp_path / "envoy.yaml"),
                     PATH=f"{Path(envoy_binary()).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    done = subprocess.run([str(ROOT / "envoy" / "entrypoint.sh"), "--mode", "validate"], env=variables,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    bootstrap = yaml.safe_load((tmp_path / "envoy.yaml").read_text())
    assert bootstrap["node"]["id"] == variables["NODE_ID"] and pod_name in variables["NODE_ID"]
    (grpc_service,) = bootstrap["dynamic_resources"]["ads_config"]["grpc_services"]
    (token,) = [m["value"] for m in grpc_service["initial_metadata"] if m["key"] == "x-sluice-xds-token"]
    assert token == base64.b64decode(secret["token"]).decode()


async def test_the_kubernetes_discovery_component_gives_the_manager_what_its_registry_reads(tmp_path):
    objects = render_with_discovery(str(tmp_path))
    async with ApiClient() as api:
        check_models(api, objects)
    config = of_kind(objects, "ConfigMap")["sluice-config"]["data"]
    assert config["SLUICE_MANAGER_REGISTRY"] == "kubernetes" and config["SLUICE_CONSUL_ADDR"] == ""
    deployments = of_kind(objects, "Deployment")
    manager = pod(deployments["manager"])
    assert manager["serviceAccountName"] == "manager" and manager["automountServiceAccountToken"] is True
    assert all(pod(d).get("automountServiceAccountToken") is False for n, d in deployments.items() if n not in ("manager", "consul", "zipkin"))
    (role,) = of_kind(objects, "Role").values()
    assert sorted((r["apiGroups"][0], r["resources"][0], tuple(r["verbs"])) for r in role["rules"]) == [
        ("", "services", ("list", "watch")), ("discovery.k8s.io", "endpointslices", ("list", "watch"))]
    (binding,) = of_kind(objects, "RoleBinding").values()
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "manager", "namespace": "sluice"}]
    for name in RUNTIMES:  # what the registry reads is on each runtime's Service
        service = of_kind(objects, "Service")[name]
        labels, annotations = service["metadata"]["labels"], service["metadata"].get("annotations", {})
        assert labels[RUNTIME_LABEL] == name and labels[KIND_LABEL] == name and annotations[MODELS_ANNOTATION]
        assert service["spec"]["ports"][0]["name"] == "grpc"
        containers = pod(deployments[name])["containers"]
        assert [c["name"] for c in containers] == (["triton"] if name == "triton" else ["runtime"])  # no register helper
        for c in containers:  # nothing registers anywhere
            assert env_of(c).get("SLUICE_RUNTIME_MANAGER_URL", "") == ""
            if name != "triton":
                assert env_of(c)["SLUICE_RUNTIME_NAME"] == name
                assert env_of(c)["SLUICE_RUNTIME_MODELS"] == annotations[MODELS_ANNOTATION]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_addresses_name_a_service_and_a_port_it_has_and_python_commands_name_real_modules(overlay):
    import importlib.util
    from urllib.parse import urlparse

    objects = render(overlay)
    services = {n: {p["port"] for p in s["spec"]["ports"]} for n, s in of_kind(objects, "Service").items()}
    variables = dict(of_kind(objects, "ConfigMap")["sluice-config"]["data"])
    checked = 0
    for name, deployment in of_kind(objects, "Deployment").items():
        spec = pod(deployment)
        for container in spec.get("initContainers", []) + spec["containers"]:
            env = {**variables, **env_of(container)}
            if env.get("XDS_HOST") not in (None, "127.0.0.1"):
                env["XDS_ADDR"] = f"{env['XDS_HOST']}:{env['XDS_PORT']}"
            for key, value in env.items():
                if key.endswith(("_URL", "_ADDR", "_GRPC")) and value and "127.0.0.1" not in value:
                    parsed = urlparse(value if "//" in value else f"//{value}")
                    assert parsed.hostname in services, f"{name}/{container['name']}: {key}={value} names no Service"
                    assert parsed.port in services[parsed.hostname], f"{name}/{container['name']}: {key}={value}"
                    checked += 1
            if container["image"].startswith("sluice:") and container["command"][:2] == ["python", "-m"]:
                module = container["command"][2]
                assert importlib.util.find_spec(module) is not None, f"{name}: no module {module}"
    assert checked >= 10
