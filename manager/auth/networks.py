"""Which hosts the manager lets a runtime register at: ``SLUICE_MANAGER_RUNTIME_NETWORKS``.

A registration names a host that the manager then dials (to read model signatures,
to load models) and that Envoy sends stage traffic to. So the host is resolved (off
the event loop: ``loop.getaddrinfo`` runs in the default executor) and every address
it resolves to must lie in one of the configured networks, all before any connection
is made; otherwise the registration is a 422 that names the setting. The first
address is stored with the instance and is what everyone dials from then on: a name
is resolved again only when the instance registers again, never cached for the
manager's lifetime, and a name that does not resolve is refused at registration
instead of breaking a later snapshot build.

Defaults: loopback (``127.0.0.0/8,::1/128``), the local mesh's world; compose sets
the private ranges (``10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from sluice.errors import ApiError

SETTING = "SLUICE_MANAGER_RUNTIME_NETWORKS"
LOOPBACK = "127.0.0.0/8,::1/128"
PRIVATE = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: str | Iterable[str]) -> tuple[Network, ...]:
    """CIDRs, comma- or space-separated; ``ValueError`` for a bad one."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{SETTING}: {item!r} is not a CIDR network ({exc})") from None
    return tuple(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class RuntimeNetworks:
    def __init__(self, networks: str | Iterable[str] = LOOPBACK, resolve_timeout_s: float = 5.0):
        self.networks = parse_networks(networks)
        self.resolve_timeout_s = resolve_timeout_s

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks)

    def allows(self, address: str) -> bool:
        """True when the IP address ``address`` lies in one of the networks."""
        try:
            ip = _ip(address)
        except ValueError:
            return False
        return any(ip.version == n.version and ip in n for n in self.networks)

    async def addresses(self, host: str) -> list[str]:
        """Every address ``host`` resolves to now (an IP literal is itself), resolved off the loop."""
        try:
            return [str(_ip(host))]
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), self.resolve_timeout_s
        )
        seen: list[str] = []
        for *_, sockaddr in infos:
            address = str(_ip(sockaddr[0]))
            if address not in seen:
                seen.append(address)
        return seen

    async def admit(self, host: str) -> str:
        """The address to store for a runtime registering at ``host``; ``ApiError`` 422 when
        the host does not resolve or resolves (even partly) outside the networks."""
        try:
            addresses = await self.addresses(host)
        except (OSError, UnicodeError, asyncio.TimeoutError) as exc:
            raise ApiError(
                422, f"runtime host {host!r} does not resolve ({type(exc).__name__}: {exc}); register with a name "
                "this manager can resolve, or an IP address", "host_unresolvable", host=host,
            ) from None
        if not addresses:
            raise ApiError(422, f"runtime host {host!r} resolves to no address", "host_unresolvable", host=host)
        outside = [a for a in addresses if not self.allows(a)]
        if outside:
            raise ApiError(
                422, f"runtime host {host!r} ({', '.join(outside)}) is outside {SETTING} ({self}); "
                f"the manager dials only hosts inside it", "host_not_allowed",
                host=host, addresses=addresses, setting=SETTING, networks=[str(n) for n in self.networks],
            )
        return addresses[0]
