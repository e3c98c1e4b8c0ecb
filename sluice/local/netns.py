"""Several "hosts" on one machine: Linux network namespaces joined by a bridge.

``HostNetwork`` makes one bridge in the root namespace and, for each host, a network
namespace with a veth pair: ``eth0`` inside the host, its peer enslaved to the bridge
(the host's "cable"). Every name carries the network's tag (random per run), so parallel
runs never collide and ``destroy`` removes exactly what this run made, by name, also
after a failure half-way through ``add_host``. The bridge gets the subnet's first
address, so the root namespace (a test, a client) reaches every host's public ports.

``cut(host)`` sets the host's bridge-side link down (the cable pulled: packets to and
from it vanish, no reset is sent), ``restore(host)`` sets it up again.

Processes run in a host through ``argv(host, ...)`` (``ip netns exec``, which execs the
command: the PID a ``Supervisor`` holds is the process itself). Code that must reach a
host's loopback (an Envoy's admin, a process's local port) runs through ``call``, in a
thread that entered the host's namespace (``setns``), so sockets it opens are the host's.

Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's ``ip``.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import secrets
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = "/var/run/netns"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; raise with its error text when it fails (``check``)."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _enter(namespace: str) -> None:
    """Move the calling thread into network namespace ``namespace``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, namespace), os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({namespace}): {os.strerror(errno)}")
    finally:
        os.close(fd)


@dataclass
class Host:
    """One "host": a network namespace with one address on the bridge."""

    name: str  # the logical name (``control``, ``rt1``)
    namespace: str
    address: str
    link: str  # the bridge-side end of its veth pair, in the root namespace
    _threads: ThreadPoolExecutor | None = field(default=None, repr=False)

    def call(self, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """``fn()`` run in a thread inside this host's namespace."""
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"netns-{self.name}",
                                               initializer=_enter, initargs=(self.namespace,))
        return self._threads.submit(fn).result(timeout_s)

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None


class HostNetwork:
    """A bridge and hosts on it, named ``sl<tag>...``; ``destroy`` removes them by name."""

    def __init__(self, subnet: str | None = None, tag: str | None = None):
        self.tag = tag or secrets.token_hex(3)  # interface names: at most 15 characters
        self.subnet = ipaddress.ip_network(subnet or self._free_subnet())
        self.bridge = f"slb{self.tag}"
        self.hosts: dict[str, Host] = {}
        self._addresses = self.subnet.hosts()
        self.gateway_address = str(next(self._addresses))  # the bridge's own: the root namespace's
        self._made_bridge = False

    @staticmethod
    def _free_subnet() -> str:
        """A /24 in 10.200.0.0/13 that no route of this machine covers."""
        routes = ip("-4", "route", "show", "table", "all").stdout
        used = [ipaddress.ip_network(w, strict=False) for line in routes.splitlines() for w in line.split()[:1] if "/" in w]
        for _ in range(100):
            candidate = ipaddress.ip_network(f"10.{200 + secrets.randbelow(8)}.{secrets.randbelow(256)}.0/24")
            if not any(candidate.overlaps(u) for u in used):
                return str(candidate)
        raise RuntimeError("no free /24 in 10.200.0.0/13 for the test hosts")

    def create(self) -> "HostNetwork":
        self._made_bridge = True  # from here on, destroy() removes it even if this fails
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.gateway_address}/{self.subnet.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        return self

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge, with the next free address."""
        index = len(self.hosts) + 1
        host = Host(name, f"sluice-{self.tag}-{name}", str(next(self._addresses)), f"slv{self.tag}{index}")
        self.hosts[name] = host  # registered first: destroy() cleans a half-made host too
        ip("netns", "add", host.namespace)
        ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
        ip("link", "set", host.link, "master", self.bridge, "up")
        ip("-n", host.namespace, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip("-n", host.namespace, "link", "set", "eth0", "up")
        ip("-n", host.namespace, "link", "set", "lo", "up")
        return host

    def argv(self, host: Host, argv: list[str]) -> list[str]:
        """``argv`` run inside ``host`` (``ip netns exec`` execs it: same PID)."""
        return ["ip", "netns", "exec", host.namespace, *argv]

    def cut(self, host: Host) -> None:
        """Pull the host's cable: its bridge-side link goes down."""
        ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        ip("link", "set", host.link, "up")

    def destroy(self) -> list[str]:
        """Remove every namespace and link of this network, by name; returns what could
        not be removed (empty when all went). Stop the processes inside first."""
        left = []
        for host in self.hosts.values():
            host.close()
            if ip("netns", "del", host.namespace, check=False).returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, host.namespace)):
                left.append(host.namespace)
            ip("link", "del", host.link, check=False)  # gone with its namespace's peer, normally
        if self._made_bridge and ip("link", "del", self.bridge, check=False).returncode != 0:
            if ip("link", "show", self.bridge, check=False).returncode == 0:
                left.append(self.bridge)
        return left

    def __enter__(self) -> "HostNetwork":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()
