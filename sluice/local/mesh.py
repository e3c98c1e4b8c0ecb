"""A whole Sluice mesh on one machine, as processes: what ``sluice up`` and the
end-to-end tests start.

Order: manager (it is the xDS server every sidecar needs), repository, runtimes,
gateway; each service with its own Envoy sidecar, each step ready-checked before
the next. The sidecar owns the public port; the process listens on a local one.
Every process is stopped by its PID, in reverse order, also when start-up fails.

Trust: the mesh CA and the xDS join secret live in the workdir (the manager's data
directory), made here before the manager starts (the manager reuses them). Each
sidecar's bootstrap carries the token minted for its node id, role and service and
the CA file that the manager's xDS certificate is checked against; the gateway gets
its token in a file of mode 0600. Sidecar-to-sidecar mTLS is always on.

Replicas (``replicas=N``, ``sluice up --replicas N``): N processes of every runtime,
each with its own sidecar (node id ``runtime-<name>-<i>``), all registered under the
runtime's name, so that the gateway's sidecar has one cluster with N endpoints; and N
gateway processes (``gateway-<i>``, each its own PipelineDiscovery node and token)
behind the one gateway sidecar, whose local clusters then have N endpoints. With one
replica the process keys are the plain ones (``runtime-<name>``, ``gateway``).

API tokens (``secure=True``, ``sluice up --secure``): the manager runs with
``SLUICE_MANAGER_AUTH=true`` and writes an admin token to ``<workdir>/admin.token``
(mode 0600); this launcher reads it, mints a ``runtime:<name>`` token per runtime
through the API and hands it over as ``SLUICE_RUNTIME_TOKEN``. In dev mode (the
default) there are no tokens and the public listeners stay on 127.0.0.1.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from manager.ca import CA_CERT, CertificateAuthority, Issued, dns_name
from manager.xds.auth import NodeAuth
from sluice.client import ADMIN_TOKEN_FILE, sluice_home
from sluice.local import zipkin
from sluice.local.envoy import Sidecar
from sluice.local.procs import Proc, StartError, Supervisor, free_port, grpc_serving, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[2]
#: the example models (trained by ./build.sh into the source tree): served beside the
#: workdir's upload root, read-only (the API never adds a version to them or deletes them)
EXAMPLE_ROOTS = "models/store:models/triton"


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    kind: str  # module runtimes.<kind>
    models: tuple[str, ...]
    public_port: int = 0  # the sidecar's ingress; 0: pick a free port
    local_port: int = 0
    metrics_port: int = 0
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class GatewayPorts:
    """A gateway process's own ports: HTTP API and OIP gRPC API (its sidecar fronts both)."""

    http: int
    grpc: int


@dataclass(frozen=True)
class MeshPorts:
    manager: int = 8080
    manager_local: int = 18080
    xds: int = 18000
    gateway: int = 8083
    gateway_local: int = 18083
    gateway_grpc: int = 18084
    egress: int = 15001
    repository: int = 8087
    repository_local: int = 18087

    @classmethod
    def ephemeral(cls) -> "MeshPorts":
        return cls(**{name: free_port() for name in cls.__dataclass_fields__})


@dataclass
class LocalMesh:
    workdir: Path
    runtimes: list[RuntimeSpec]
    ports: MeshPorts = field(default_factory=MeshPorts)
    env: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 60.0
    #: run the real Zipkin server on this port and trace everything; None: tracing off
    zipkin_port: int | None = None
    #: secure mode: API tokens required on the manager's REST API and the gateway
    secure: bool = False
    #: processes of every runtime and of the gateway (each runtime process with its own sidecar)
    replicas: int = 1
    #: several managers (``sluice.local.managers``): node id -> the xDS port of the manager
    #: that sidecar connects to; the others connect to ``ports.xds``
    xds_ports: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, not {self.replicas}")
        self.workdir = Path(self.workdir)
        self.supervisor = Supervisor(self.workdir / "logs")
        self.procs: dict[str, Proc] = {}
        self.runtimes = [self._with_ports(r) for r in self.runtimes]
        #: process key -> the runtime spec with that instance's own ports (the first
        #: instance's are the spec's); also the node id of the instance's sidecar
        self.runtime_instances: dict[str, RuntimeSpec] = {
            instance_key(f"runtime-{r.name}", i, self.replicas): r if i == 1 else self._with_ports(
                replace(r, public_port=0, local_port=0, metrics_port=0))
            for r in self.runtimes for i in range(1, self.replicas + 1)
        }
        #: process key -> the gateway instance's local ports (HTTP, gRPC); the first's are ``ports``'
        self.gateway_instances: dict[str, GatewayPorts] = {
            instance_key("gateway", i, self.replicas): GatewayPorts(self.ports.gateway_local, self.ports.gateway_grpc)
            if i == 1 else GatewayPorts(free_port(), free_port())
            for i in range(1, self.replicas + 1)
        }
        self._runtime_tokens: dict[str, str] = {}
        #: each sidecar's bootstrap (written once, re-read by a restarted Envoy), its
        #: admin-ready URL and the URL that checks the service through it (if any)
        self._sidecars: dict[str, tuple[Sidecar, Path, str]] = {}
        #: set to abort the ready-checks in progress (``abort``): the mesh is stopping
        self.stopping = threading.Event()

    # --- tokens (secure mode)
    @property
    def admin_token_path(self) -> Path:
        return self.workdir / ADMIN_TOKEN_FILE

    @property
    def admin_token(self) -> str:
        """The admin token the manager wrote (secure mode); "" in dev mode."""
        if not self.secure:
            return ""
        return self.admin_token_path.read_text().strip()

    @property
    def admin_headers(self) -> dict[str, str]:
        """``Authorization`` for admin calls (empty in dev mode)."""
        return {"authorization": f"Bearer {self.admin_token}"} if self.secure else {}

    def mint_token(self, scopes: list[str], ttl_s: float = 30 * 86400.0) -> dict:
        """A new token through the manager's API, with the admin token: ``{"token", "id", ...}``."""
        response = httpx.post(f"{self.manager_url}/api/v1/tokens", json={"scopes": scopes, "ttl_s": ttl_s},
                              headers=self.admin_headers, timeout=10)
        if response.status_code != 201:
            raise StartError(f"the manager did not issue a token for {scopes}: {response.status_code} {response.text[:300]}")
        return response.json()

    def runtime_token(self, name: str) -> str:
        """Runtime ``name``'s ``runtime:<name>`` token (minted once per mesh); "" in dev mode."""
        if not self.secure:
            return ""
        if name not in self._runtime_tokens:
            self._runtime_tokens[name] = self.mint_token([f"runtime:{name}"])["token"]
        return self._runtime_tokens[name]

    # --- addresses
    @property
    def manager_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.manager}"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.gateway}"

    @property
    def zipkin_url(self) -> str:
        return f"http://127.0.0.1:{self.zipkin_port}" if self.zipkin_port else ""

    @property
    def repository_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.repository}"

    def runtime(self, name: str) -> RuntimeSpec:
        """Runtime ``name``'s spec (with its first instance's ports)."""
        return next(r for r in self.runtimes if r.name == name)

    def instances(self, name: str) -> list[str]:
        """The process keys of runtime ``name``'s instances (also their sidecars' node ids)."""
        return [key for key, spec in self.runtime_instances.items() if spec.name == name]

    def admin_url(self, node_id: str) -> str:
        return f"http://127.0.0.1:{self._admin_ports[node_id]}"

    # --- trust
    @property
    def ca_file(self) -> Path:
        return self.workdir / CA_CERT

    def _trust(self) -> tuple[CertificateAuthority, NodeAuth]:
        if not hasattr(self, "_ca"):
            self._ca = CertificateAuthority.load_or_create(self.workdir)
            self._auth = NodeAuth.load_or_create(self.workdir)
        return self._ca, self._auth

    def node_token(self, node_id: str, role: str, service: str) -> str:
        """The xDS token of a node (what its sidecar's bootstrap carries)."""
        return self._trust()[1].mint(node_id, role, service)

    def certificate(self, role: str, name: str = "", ttl_s: float = 3600.0) -> Issued:
        """A certificate from this mesh's CA, e.g. to call a runtime's sidecar as the
        manager does (tests, tools)."""
        return self._trust()[0].issue_for(role, name or role, ttl_s)

    def runtime_grpc_credentials(self, runtime: str, role: str = "manager"):
        """(channel credentials, channel options) to call runtime ``runtime`` through its
        sidecar with a ``role`` certificate (the sidecar takes the manager's and the gateway's)."""
        import grpc

        issued = self.certificate(role)
        credentials = grpc.ssl_channel_credentials(issued.ca_pem, issued.key_pem, issued.cert_pem)
        return credentials, [("grpc.ssl_target_name_override", dns_name("runtime", runtime))]

    # --- lifecycle
    def start(self) -> "LocalMesh":
        self._admin_ports: dict[str, int] = {}
        self.stopping.clear()
        self._trust()
        try:
            if self.zipkin_port:
                self.start_zipkin()
            self.start_manager()
            self.start_repository()
            for runtime in self.runtimes:
                self.start_runtime(runtime.name)
            self.start_gateway()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.supervisor.stop_all()
        self.procs.clear()

    def abort(self) -> None:
        """Make every ready-check in progress (in another thread: ``Healer``) fail at once."""
        self.stopping.set()

    def restart(self, key: str) -> Proc:
        """Start process ``key`` of ``procs`` again (stopping it by PID first if it still
        runs), through the same start function and ready-checks as start-up; a sidecar's
        Envoy re-reads its bootstrap and gets its config from the manager."""
        old = self.procs.pop(key, None)
        if old is not None:
            self.supervisor.stop(old)
        if key.endswith("-sidecar") and key[: -len("-sidecar")] in self._sidecars:
            self.start_sidecar(key[: -len("-sidecar")])
        elif key == "zipkin":
            self.start_zipkin()
        elif key == "manager":
            self.start_manager()
        elif key == "repository":
            self.start_repository()
        elif key in self.gateway_instances:
            self.start_gateway_instance(key)
        elif key in self.runtime_instances:
            self.start_instance(key)
        else:
            raise StartError(f"no way to restart {key!r}")
        return self.procs[key]

    def __enter__(self) -> "LocalMesh":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_zipkin(self) -> None:
        jar = zipkin.jar_path()
        if jar is None or zipkin.java() is None:
            raise StartError("tracing needs Java and the Zipkin jar (./build.sh fetches it)")
        argv, env = zipkin.command(jar, self.zipkin_port)
        proc = self.supervisor.start("zipkin", argv, env=env)
        self.procs["zipkin"] = proc
        self.env["SLUICE_ZIPKIN_URL"] = self.zipkin_url
        self._wait(http_ok(f"{self.zipkin_url}/health"), "Zipkin", proc, timeout_s=max(self.timeout_s, 90), interval_s=0.2)

    def stop_zipkin(self) -> None:
        self.supervisor.stop(self.procs.pop("zipkin"))

    def start_manager(self) -> None:
        """The manager process (and its sidecar, unless that runs already)."""
        self._start_service("manager", "manager", self.ports.manager, self.ports.manager_local, self._manager_env())

    def start_repository(self) -> None:
        """The repository process (and its sidecar, unless that runs already)."""
        self._start_service("repository", "repository", self.ports.repository, self.ports.repository_local, {
            "SLUICE_REPOSITORY_PORT": str(self.ports.repository_local),
            "SLUICE_REPOSITORY_ROOTS": self.env.get("SLUICE_REPOSITORY_ROOTS", self._repository_roots()),
            "SLUICE_REPOSITORY_READ_ONLY_ROOTS": EXAMPLE_ROOTS,
        })

    def stop_manager(self) -> None:
        """Stop the manager process only; its sidecar (and every other Envoy) keeps serving."""
        self.supervisor.stop(self.procs.pop("manager"))

    def restart_manager(self) -> None:
        """Start the manager process again (stopping it first if it runs); state comes from its store."""
        if "manager" in self.procs:
            self.stop_manager()
        self.start_manager()

    def start_runtime(self, name: str) -> None:
        """Every instance of runtime ``name`` (each returns once registered)."""
        for key in self.instances(name):
            self.start_instance(key)

    def start_instance(self, key: str) -> None:
        """Runtime instance ``key`` (of ``runtime_instances``), then its sidecar unless that
        runs already; returns once the manager lists a new registration of it."""
        spec = self.runtime_instances[key]
        env = {
            "SLUICE_RUNTIME_NAME": spec.name,
            "SLUICE_RUNTIME_PORT": str(spec.local_port),
            "SLUICE_RUNTIME_PUBLIC_PORT": str(spec.public_port),
            "SLUICE_RUNTIME_MODELS": ",".join(spec.models),
            "SLUICE_RUNTIME_REPOSITORY_URL": self.repository_url,
            "SLUICE_RUNTIME_MANAGER_URL": self.manager_url,
            "SLUICE_RUNTIME_CACHE_DIR": str(self.workdir / "cache" / key[len("runtime-"):]),
            "SLUICE_RUNTIME_METRICS_PORT": str(spec.metrics_port),
            **({"SLUICE_RUNTIME_TOKEN": self.runtime_token(spec.name)} if self.secure else {}),
            **dict(spec.env),
        }
        before = self._instance_ids(spec.name)  # a restarted runtime must register anew
        proc = self._python(key, f"runtimes.{spec.kind}", env)
        self._wait(grpc_serving(f"127.0.0.1:{spec.local_port}"), f"runtime {key}", proc)
        if f"{key}-sidecar" not in self.procs:
            self.front_runtime(spec.name, spec.local_port, spec.public_port, key=key)
        self._wait(self._registered(spec.name, before), f"runtime {key} to register", proc)

    def front_runtime(self, name: str, local_port: int, public_port: int = 0, key: str = "") -> int:
        """Give the OIP gRPC server on ``local_port`` its Envoy sidecar, as a runtime's
        container has one; returns the sidecar's public port. Also for servers this mesh
        did not start (Triton, MLServer): they then register through the manager's API.
        ``key``: the sidecar's node id (default ``runtime-<name>``). The sidecar is
        stopped with the mesh."""
        public_port = public_port or free_port()
        self._sidecar(key or f"runtime-{name}", name, "runtime", public_port, local_port, protocol="grpc")
        return public_port

    def stop_runtime(self, name: str) -> None:
        """Stop a runtime's processes by PID (their sidecars stay, as a crashed container's would)."""
        for key in self.instances(name):
            if key in self.procs:
                self.supervisor.stop(self.procs.pop(key))

    # --- internals
    def _with_ports(self, spec: RuntimeSpec) -> RuntimeSpec:
        return replace(
            spec,
            public_port=spec.public_port or free_port(),
            local_port=spec.local_port or free_port(),
            metrics_port=spec.metrics_port or free_port(),
        )

    def _repository_roots(self) -> str:
        """Uploads land in the workdir (the first root); the example models are read beside them."""
        uploads = self.workdir / "models"
        uploads.mkdir(parents=True, exist_ok=True)
        return f"{uploads}:{EXAMPLE_ROOTS}"

    def _manager_env(self) -> dict[str, str]:
        return {
            "SLUICE_MANAGER_PORT": str(self.ports.manager_local),
            "SLUICE_MANAGER_XDS_PORT": str(self.ports.xds),
            "SLUICE_MANAGER_DB_PATH": str(self.workdir / "manager.db"),
            "SLUICE_MANAGER_DATA_DIR": str(self.workdir),  # the CA and join secret made here
            "SLUICE_MANAGER_REPOSITORY_URL": self.repository_url,
            "SLUICE_MANAGER_GATEWAY_URL": self.gateway_url,
            "SLUICE_MANAGER_AUTH": "true" if self.secure else "false",
            **({"SLUICE_MANAGER_ADMIN_TOKEN_PATH": str(self.admin_token_path)} if self.secure else {}),
        }

    def _python(self, key: str, module: str, env: dict[str, str]) -> Proc:
        proc = self.supervisor.start_python(key, module, {**self.env, **env}, cwd=ROOT)
        self.procs[key] = proc
        return proc

    def _wait(self, check, what: str, proc: Proc | None, timeout_s: float | None = None, interval_s: float = 0.05) -> None:
        wait_until(check, self.timeout_s if timeout_s is None else timeout_s, what, proc, interval_s=interval_s, abort=self.stopping)

    def _sidecar(self, key: str, service: str, role: str, ingress: int, local: int, through: str = "", **extra) -> Proc:
        """Write the bootstrap of ``key``'s sidecar and start it (``start_sidecar``);
        ``through``: a URL that must answer 200 through the sidecar once it is ready."""
        node_id = key
        admin = free_port()
        self._admin_ports[node_id] = admin
        sidecar = Sidecar(
            node_id=node_id, service=service, role=role, ingress_port=ingress, service_port=local,
            admin_port=admin, xds_host="127.0.0.1", xds_port=self.xds_ports.get(node_id, self.ports.xds),
            xds_token=self.node_token(node_id, role, service), xds_ca_file=str(self.ca_file), **extra,
        )
        path = self.workdir / "envoy" / f"{node_id}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sidecar.bootstrap())
        self._sidecars[key] = (sidecar, path, through)
        return self.start_sidecar(key)

    def start_sidecar(self, key: str) -> Proc:
        """Start the Envoy of ``key``'s sidecar from its bootstrap file (written by
        ``_sidecar``): ready when Envoy's ``/ready`` answers (it has its config from the
        manager) and the service answers through it."""
        sidecar, path, through = self._sidecars[key]
        proc = self.supervisor.start(f"{key}-sidecar", sidecar.command(path))
        self.procs[f"{key}-sidecar"] = proc
        self._wait(http_ok(sidecar.ready_url), f"{key}'s Envoy sidecar", proc)
        if through:
            self._wait(http_ok(through), f"{key} through its sidecar", proc)
        return proc

    def _start_service(self, key: str, module: str, public: int, local: int, env: dict[str, str]) -> None:
        """A service process, ready-checked; then its sidecar if that does not run yet
        (start-up), or a check through the running one (a restart)."""
        proc = self._python(key, module, env)
        self._wait(http_ok(f"http://127.0.0.1:{local}/healthz"), key, proc)
        through = f"http://127.0.0.1:{public}/healthz"
        if f"{key}-sidecar" not in self.procs:
            self._sidecar(key, key, "service", public, local, through=through)
        else:
            self._wait(http_ok(through), f"{key} through its sidecar", proc)

    def start_gateway(self) -> None:
        """Every gateway process, then their one sidecar (unless that runs already)."""
        p = self.ports
        for key in self.gateway_instances:
            self.start_gateway_instance(key)
        if "gateway-sidecar" not in self.procs:
            several = len(self.gateway_instances) > 1
            self._sidecar("gateway", "gateway", "gateway", p.gateway, p.gateway_local,
                          through=f"{self.gateway_url}/healthz/ready", egress_port=p.egress, grpc_port=p.gateway_grpc,
                          service_ports=tuple(g.http for g in self.gateway_instances.values()) if several else (),
                          grpc_ports=tuple(g.grpc for g in self.gateway_instances.values()) if several else ())

    def start_gateway_instance(self, key: str) -> None:
        """Gateway process ``key`` (of ``gateway_instances``): its own PipelineDiscovery node
        id and token; ready when it serves its pipeline set (and, with the sidecar up,
        through it)."""
        p, ports = self.ports, self.gateway_instances[key]
        token_file = self.workdir / f"{key}.xds-token"
        token_file.touch(mode=0o600)
        os.chmod(token_file, 0o600)
        token_file.write_text(self.node_token(key, "gateway", "gateway"))
        proc = self._python(key, "gateway", {
            "SLUICE_GATEWAY_NODE_ID": key,
            "SLUICE_GATEWAY_XDS_TOKEN_FILE": str(token_file),
            "SLUICE_GATEWAY_XDS_CA_FILE": str(self.ca_file),
            "SLUICE_GATEWAY_PORT": str(ports.http),
            "SLUICE_GATEWAY_GRPC_PORT": str(ports.grpc),
            "SLUICE_GATEWAY_EGRESS": f"127.0.0.1:{p.egress}",
            "SLUICE_GATEWAY_MANAGER_GRPC": f"127.0.0.1:{p.xds}",
        })
        self._wait(http_ok(f"http://127.0.0.1:{ports.http}/healthz/ready"), key, proc)
        if "gateway-sidecar" in self.procs:
            self._wait(http_ok(f"{self.gateway_url}/healthz/ready"), f"{key} through its sidecar", proc)

    def _instance_ids(self, runtime: str) -> set[str]:
        """The ids of the instances the manager lists for ``runtime`` now (none if unknown)."""
        try:
            response = httpx.get(f"{self.manager_url}/api/v1/runtimes/{runtime}", timeout=2, headers=self.admin_headers)
        except httpx.HTTPError:
            return set()
        return {i["id"] for i in response.json()["instances"]} if response.status_code == 200 else set()

    def _registered(self, runtime: str, before: set[str] = frozenset()):
        """True once ``runtime`` has an instance not in ``before`` (a new registration)."""
        def check() -> bool:
            response = httpx.get(f"{self.manager_url}/api/v1/runtimes/{runtime}", timeout=1, headers=self.admin_headers)
            return response.status_code == 200 and bool({i["id"] for i in response.json()["instances"]} - before)

        return check


def instance_key(base: str, index: int, replicas: int) -> str:
    """The process key of instance ``index`` (from 1) of ``base``: ``base`` itself when there
    is one instance (the keys of a mesh without replicas), else ``<base>-<index>``."""
    return base if replicas == 1 else f"{base}-{index}"


def default_runtimes() -> list[RuntimeSpec]:
    """The runtimes ``sluice up`` starts: the iris example on scikit-learn, the seed's
    product-matching demo (a custom scikit-learn featurizer and a Spark ML classifier),
    and the Triton-layout models on the CPU fallback of the Triton runtime."""
    return [
        RuntimeSpec("scikit", "scikit", ("iris_scaler", "iris_classifier", "iris_tree", "iris_vote"), 9000, 19000, 9100),
        RuntimeSpec("serving-customscikit", "scikit", ("pm_scikit",), 9001, 19001, 9101),
        RuntimeSpec("serving-localml-spark", "spark", ("pm_spark",), 9002, 19002, 9102),
        RuntimeSpec("triton", "triton", ("iris_onnx", "mlp", "mlp_scaled", "risk_mlp"), 9003, 19003, 9103),
    ]


def workdir_default() -> Path:
    return sluice_home()
