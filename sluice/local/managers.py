"""Extra manager processes beside a ``LocalMesh``'s own, for a control plane of several
managers on one PostgreSQL database (``SLUICE_MANAGER_DB_URL``).

An extra manager shares the mesh's data directory (the mesh CA and the xDS join secret:
sidecars and gateways trust every manager alike) and database, and has its own REST and
xDS ports; no sidecar (its REST API is reached on loopback directly, as in dev mode).
Started and stopped by PID through the mesh's ``Supervisor``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sluice.local.procs import Proc, Supervisor, free_port, http_ok, wait_until

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ExtraManager:
    key: str
    rest_port: int
    xds_port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def manager_id(self) -> str:
        """Its name in the store's ``managers`` and ``change_acks`` rows (and in 502/504 details)."""
        return manager_id(self.rest_port)


def manager_id(rest_port: int) -> str:
    """A manager's id on this host: ``<hostname>:<REST port>`` (``ControlPlane``)."""
    return f"{socket.gethostname()}:{rest_port}"


def start_manager(supervisor: Supervisor, key: str, workdir: Path, db_url: str, env: dict[str, str] | None = None,
                  timeout_s: float = 60.0, ports: tuple[int, int] | None = None) -> ExtraManager:
    """A manager process on free ports (or ``ports``: REST, xDS, e.g. to restart one where
    its sidecars reconnect); returns once its /healthz answers 200."""
    rest, xds = ports or (free_port(), free_port())
    proc = supervisor.start_python(key, "manager", {
        **(env or {}),
        "SLUICE_MANAGER_PORT": str(rest),
        "SLUICE_MANAGER_XDS_PORT": str(xds),
        "SLUICE_MANAGER_DB_URL": db_url,
        "SLUICE_MANAGER_DB_PATH": str(workdir / f"{key}.db"),  # unused with DB_URL; never the mesh's
        "SLUICE_MANAGER_DATA_DIR": str(workdir),
    }, cwd=ROOT)
    wait_until(http_ok(f"http://127.0.0.1:{rest}/healthz"), timeout_s, key, proc)
    return ExtraManager(key, rest, xds, proc)


@contextmanager
def two_manager_mesh(workdir: Path, runtimes: list, on_second: str | tuple[str, ...], env: dict[str, str] | None = None,
                     second_env: dict[str, str] | None = None) -> Iterator[tuple]:
    """A real PostgreSQL server, a second manager on it, then a ``LocalMesh`` whose own
    manager shares the database; the sidecars of the nodes ``on_second`` (e.g.
    ``runtime-scikit``, or ``gateway``: the gateway's sidecar, while the gateway process
    itself follows the mesh's manager) connect to the second manager, every other node to
    the mesh's. ``second_env``: settings of the second manager only. Yields ``(mesh,
    second, db_url)``; everything is stopped by PID at the end (the PostgreSQL server last)."""
    from manager.ca import CertificateAuthority
    from manager.xds.auth import NodeAuth
    from sluice.local.mesh import LocalMesh, MeshPorts
    from sluice.local.postgres import PostgresServer

    with PostgresServer() as server:
        url = server.create_database("sluice")
        # the mesh CA and the xDS join secret first: every manager and sidecar shares them
        CertificateAuthority.load_or_create(workdir)
        NodeAuth.load_or_create(workdir)
        mesh = LocalMesh(workdir, runtimes, MeshPorts.ephemeral(), env={**(env or {}), "SLUICE_MANAGER_DB_URL": url})
        try:
            second = start_manager(mesh.supervisor, "manager-2", workdir, url, {**(env or {}), **(second_env or {})})
            for node in (on_second,) if isinstance(on_second, str) else on_second:
                mesh.xds_ports[node] = second.xds_port
            mesh.start()
            yield mesh, second, url
        finally:
            mesh.stop()  # the second manager too (same supervisor)
