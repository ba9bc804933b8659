"""The nameservers that names outside the mesh go to, from /etc/resolv.conf.

Read once, when the responder starts without a `dns.upstream` in its snapshot: the
proxy takes the host's resolvers as they were, before any capture rules pointed the
app's queries at the proxy itself. A resolver on the proxy's own DNS address would send
queries round in a loop, so it is left out.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable

RESOLV_CONF = "/etc/resolv.conf"
DNS_PORT = 53
# what resolv(5) reads at most; more are ignored by the C library too
MAX_NAMESERVERS = 3

Server = tuple[str, int]


def nameservers(text: str, *, exclude: Iterable[Server] = ()) -> tuple[Server, ...]:
    """The `nameserver` lines of a resolv.conf text, as (address, 53), in order.

    Lines that are comments, other options or not an IP address are skipped, as the C
    library skips them; so are the servers in `exclude`.
    """
    excluded = set(exclude)
    found: list[Server] = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        # an IPv6 address may carry a zone ("fe80::1%eth0"), which sockets take as is
        address = words[1]
        if not _is_ip(address.split("%", 1)[0]):
            continue
        server = (address, DNS_PORT)
        if server not in excluded and server not in found:
            found.append(server)
        if len(found) == MAX_NAMESERVERS:
            break
    return tuple(found)


def read_resolv_conf(
    path: str = RESOLV_CONF, *, exclude: Iterable[Server] = ()
) -> tuple[Server, ...]:
    """The nameservers of a resolv.conf file; none if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return nameservers(f.read(), exclude=exclude)
    except OSError:
        return ()


def _is_ip(value: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, value)
        except OSError:
            continue
        return True
    return False
