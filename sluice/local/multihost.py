"""A Sluice mesh spread over several hosts (network namespaces, ``sluice.local.netns``).

The layout of a small cluster: host ``control`` runs the manager and the repository,
host ``gateway`` the gateway, and hosts ``rt1``..``rtN`` one replica each of a runtime;
every process with its own Envoy sidecar on its own host, started with ``ip netns exec``
by a ``Supervisor`` and stopped by PID. Since every host is a network stack of its own,
every service keeps the design's default ports (DESIGN.md, "Ports").

Sidecars reach the manager's xDS server at the control host's address (the runtime
replicas with one shared token for their node id prefix, as deploy/k8s's pods do, see
``manager.xds.auth``); sidecar-to-sidecar traffic (gateway -> runtimes, manager ->
runtimes) crosses the bridge over mTLS, as it always does. Runtimes register with their host's address (``SLUICE_RUNTIME_PUBLIC_HOST``)
and the manager admits the hosts' subnet (``SLUICE_MANAGER_RUNTIME_NETWORKS``). The mesh
runs in secure mode: that is what puts the manager's and the gateway's ingress on the
hosts' addresses (dev mode keeps them on loopback, unreachable from another host); the
admin token is the one the manager writes, runtimes get theirs minted through the API.

Ready-checks: loopback ones (a process's local port, an Envoy's ``/ready``) run inside
the host (``Host.call``); the public ones from the root namespace, across the bridge.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from manager.ca import CA_CERT, CertificateAuthority
from manager.xds.auth import NodeAuth
from sluice.local.envoy import Sidecar
from sluice.local.mesh import EXAMPLE_ROOTS, MeshPorts, RuntimeSpec
from sluice.local.netns import Host, HostNetwork
from sluice.local.procs import Proc, StartError, Supervisor, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[2]
ADMIN_PORT = 9901
RUNTIME_PUBLIC_PORT = 9000
RUNTIME_LOCAL_PORT = 19000


@dataclass
class MultiHostMesh:
    workdir: Path
    network: HostNetwork
    runtime: RuntimeSpec
    replicas: int = 2
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir)
        self.ports = MeshPorts()
        self.supervisor = Supervisor(self.workdir / "logs")
        self.procs: dict[str, Proc] = {}
        self.ca = CertificateAuthority.load_or_create(self.workdir)
        self.auth = NodeAuth.load_or_create(self.workdir)
        self.control: Host | None = None
        self.gateway: Host | None = None
        self.runtime_hosts: list[Host] = []
        #: node id -> (host, admin port) of each sidecar: 9901, 9902... per host
        self.sidecars: dict[str, tuple[Host, int]] = {}

    # --- addresses
    @property
    def manager_url(self) -> str:
        return f"http://{self.control.address}:{self.ports.manager}"

    @property
    def repository_url(self) -> str:
        return f"http://{self.control.address}:{self.ports.repository}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway.address}:{self.ports.gateway}"

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {(self.workdir / 'admin.token').read_text().strip()}"}

    def admin(self, node_id: str, path: str) -> httpx.Response:
        """GET ``path`` on the Envoy admin of sidecar ``node_id`` (on its host's loopback)."""
        host, port = self.sidecars[node_id]
        return host.call(lambda: httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5))

    # --- lifecycle
    def start(self) -> "MultiHostMesh":
        try:
            self.control = self.network.add_host("control")
            self.gateway = self.network.add_host("gateway")
            self.runtime_hosts = [self.network.add_host(f"rt{i}") for i in range(1, self.replicas + 1)]
            self._start_manager()
            self._start_repository()
            token = self._mint([f"runtime:{self.runtime.name}"])
            for host in self.runtime_hosts:
                self._start_runtime(host, token)
            self._start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Every process by PID, in reverse order (the network is the caller's to destroy)."""
        self.supervisor.stop_all()
        self.procs.clear()

    def __enter__(self) -> "MultiHostMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- services
    def _start_manager(self) -> None:
        p, host = self.ports, self.control
        proc = self._python(host, "manager", "manager", {
            "SLUICE_MANAGER_PORT": str(p.manager_local),
            "SLUICE_MANAGER_XDS_HOST": "0.0.0.0",
            "SLUICE_MANAGER_XDS_PORT": str(p.xds),
            "SLUICE_MANAGER_LISTENER_ADDRESS": "0.0.0.0",
            "SLUICE_MANAGER_DB_PATH": str(self.workdir / "manager.db"),
            "SLUICE_MANAGER_DATA_DIR": str(self.workdir),
            "SLUICE_MANAGER_REPOSITORY_URL": self.repository_url,
            "SLUICE_MANAGER_GATEWAY_URL": self.gateway_url,
            "SLUICE_MANAGER_AUTH": "true",
            "SLUICE_MANAGER_ADMIN_TOKEN_PATH": str(self.workdir / "admin.token"),
            "SLUICE_MANAGER_RUNTIME_NETWORKS": str(self.network.subnet),
        })
        self._wait_in(host, f"http://127.0.0.1:{p.manager_local}/healthz", "manager", proc)
        self._sidecar(host, "manager", "manager", "service", p.manager, p.manager_local, xds_host="127.0.0.1")
        self._wait(http_ok(f"{self.manager_url}/healthz"), "the manager through its sidecar, across the bridge", proc)

    def _start_repository(self) -> None:
        p, host = self.ports, self.control
        uploads = self.workdir / "models"
        uploads.mkdir(parents=True, exist_ok=True)
        proc = self._python(host, "repository", "repository", {
            "SLUICE_REPOSITORY_PORT": str(p.repository_local),
            "SLUICE_REPOSITORY_ROOTS": f"{uploads}:{EXAMPLE_ROOTS}",
            "SLUICE_REPOSITORY_READ_ONLY_ROOTS": EXAMPLE_ROOTS,
        })
        self._wait_in(host, f"http://127.0.0.1:{p.repository_local}/healthz", "repository", proc)
        self._sidecar(host, "repository", "repository", "service", p.repository, p.repository_local)
        self._wait(http_ok(f"{self.repository_url}/healthz"), "the repository through its sidecar", proc)

    def _start_runtime(self, host: Host, token: str) -> None:
        """One replica on ``host``: ready once the manager lists it at the host's address."""
        name = self.runtime.name
        proc = self._python(host, f"runtime-{host.name}", f"runtimes.{self.runtime.kind}", {
            "SLUICE_RUNTIME_NAME": name,
            "SLUICE_RUNTIME_PORT": str(RUNTIME_LOCAL_PORT),
            "SLUICE_RUNTIME_PUBLIC_HOST": host.address,
            "SLUICE_RUNTIME_PUBLIC_PORT": str(RUNTIME_PUBLIC_PORT),
            "SLUICE_RUNTIME_MODELS": ",".join(self.runtime.models),
            "SLUICE_RUNTIME_REPOSITORY_URL": self.repository_url,
            "SLUICE_RUNTIME_MANAGER_URL": self.manager_url,
            "SLUICE_RUNTIME_CACHE_DIR": str(self.workdir / "cache" / host.name),
            "SLUICE_RUNTIME_TOKEN": token,
        })
        # the replicas share one xDS token for the node id prefix runtime-<name>-, as the pods
        # of a Kubernetes Deployment do (deploy/k8s): each still connects as its own node
        shared = self.auth.mint(f"runtime-{name}-*", "runtime", name)
        self._sidecar(host, f"runtime-{name}-{host.name}", name, "runtime", RUNTIME_PUBLIC_PORT, RUNTIME_LOCAL_PORT,
                      protocol="grpc", xds_token=shared)
        self._wait(lambda: host.address in self.instance_hosts(), f"{name} on {host.name} to register", proc)

    def _start_gateway(self) -> None:
        p, host = self.ports, self.gateway
        token_file = self.workdir / "gateway.xds-token"
        token_file.touch(mode=0o600)
        os.chmod(token_file, 0o600)
        token_file.write_text(self.auth.mint("gateway", "gateway", "gateway"))
        proc = self._python(host, "gateway", "gateway", {
            "SLUICE_GATEWAY_NODE_ID": "gateway",
            "SLUICE_GATEWAY_XDS_TOKEN_FILE": str(token_file),
            "SLUICE_GATEWAY_XDS_CA_FILE": str(self.workdir / CA_CERT),
            "SLUICE_GATEWAY_PORT": str(p.gateway_local),
            "SLUICE_GATEWAY_GRPC_PORT": str(p.gateway_grpc),
            "SLUICE_GATEWAY_EGRESS": f"127.0.0.1:{p.egress}",
            "SLUICE_GATEWAY_MANAGER_GRPC": f"{self.control.address}:{p.xds}",
        })
        self._wait_in(host, f"http://127.0.0.1:{p.gateway_local}/healthz/ready", "gateway", proc)
        self._sidecar(host, "gateway", "gateway", "gateway", p.gateway, p.gateway_local,
                      egress_port=p.egress, grpc_port=p.gateway_grpc)
        self._wait(http_ok(f"{self.gateway_url}/healthz/ready"), "the gateway through its sidecar", proc)

    # --- what the manager knows
    def instance_hosts(self) -> list[str]:
        """The hosts of the runtime's instances the manager lists now."""
        response = httpx.get(f"{self.manager_url}/api/v1/runtimes/{self.runtime.name}", headers=self.admin_headers, timeout=2)
        return [i["host"] for i in response.json()["instances"]] if response.status_code == 200 else []

    def _mint(self, scopes: list[str]) -> str:
        response = httpx.post(f"{self.manager_url}/api/v1/tokens", json={"scopes": scopes}, headers=self.admin_headers, timeout=10)
        if response.status_code != 201:
            raise StartError(f"no token for {scopes}: {response.status_code} {response.text[:300]}")
        return response.json()["token"]

    # --- internals
    def _python(self, host: Host, key: str, module: str, env: dict[str, str]) -> Proc:
        proc = self.supervisor.start(key, self.network.argv(host, [sys.executable, "-m", module]),
                                     env={**self.env, **env}, cwd=ROOT)
        self.procs[key] = proc
        return proc

    def _sidecar(self, host: Host, node_id: str, service: str, role: str, ingress: int, local: int,
                 xds_host: str = "", xds_token: str = "", **extra) -> Proc:
        admin_port = ADMIN_PORT + sum(h is host for h, _ in self.sidecars.values())
        self.sidecars[node_id] = (host, admin_port)
        sidecar = Sidecar(
            node_id=node_id, service=service, role=role, ingress_port=ingress, service_port=local,
            admin_port=admin_port, xds_host=xds_host or self.control.address, xds_port=self.ports.xds,
            xds_token=xds_token or self.auth.mint(node_id, role, service), xds_ca_file=str(self.workdir / CA_CERT), **extra,
        )
        path = self.workdir / "envoy" / f"{node_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sidecar.bootstrap())
        key = f"{node_id}-sidecar"
        proc = self.supervisor.start(key, self.network.argv(host, sidecar.command(path)))
        self.procs[key] = proc
        self._wait_in(host, sidecar.ready_url, f"{node_id}'s Envoy", proc)
        return proc

    def _wait(self, check, what: str, proc: Proc | None) -> None:
        wait_until(check, self.timeout_s, what, proc, interval_s=0.1)

    def _wait_in(self, host: Host, url: str, what: str, proc: Proc) -> None:
        """Wait until ``url`` answers 200 from inside ``host`` (its loopback)."""
        check = http_ok(url)
        self._wait(lambda: host.call(check, timeout_s=5), what, proc)
