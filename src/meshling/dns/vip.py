"""Stable virtual IPs for mesh services.

An app in transparent mode calls `http://api.mesh/`: the name resolves to the service's
virtual IP, the app connects to it, the capture rules hand the connection to the proxy,
and the proxy recovers the original destination and routes by it. The address means
nothing on the network; it only has to be the same wherever it is looked up, and stay
the same while the mesh changes, so that long-lived clients and caches never see a
service move.

So the address comes from the name itself: a hash of (mesh, service) picks a host in the
range (by default 240.0.0.0/4, reserved and never routed, as Kuma uses). Adding or
removing other services never moves it. Two names that hash to the same address (about
one chance in 2**28 per pair) are told apart by the order of their names: the first keeps
the address, the second takes the next free one after it. Only the control plane allocates; proxies
get the table in their snapshot.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from typing import Final

DEFAULT_RANGE: Final = "240.0.0.0/4"


def _offset(hosts: int, mesh: str, service: str) -> int:
    digest = hashlib.sha256(f"{mesh}\0{service}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % hosts


def allocate(services: Iterable[str], mesh: str, cidr: str = DEFAULT_RANGE) -> dict[str, str]:
    """Each service's virtual IP in `cidr` (IPv4); the same for a name whatever else is
    in `services`, but for a hash collision (resolved by name order)."""
    network = ipaddress.IPv4Network(cidr)
    # neither the network's address nor its broadcast address
    hosts = network.num_addresses - 2
    if hosts < 2:
        raise ValueError(f"{cidr}: too small for virtual IPs")
    taken: set[int] = set()
    result: dict[str, str] = {}
    for service in sorted(set(services)):
        if len(taken) == hosts:
            raise ValueError(f"{cidr}: no free virtual IP left for service {service!r}")
        offset = _offset(hosts, mesh, service)
        while offset in taken:
            offset = (offset + 1) % hosts
        taken.add(offset)
        result[service] = str(network.network_address + offset + 1)
    return result
