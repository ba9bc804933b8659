"""The original destination of a connection that iptables REDIRECT handed to the proxy.

REDIRECT rewrites the destination to the proxy's own port; conntrack keeps the address
the app connected to, and `getsockopt(SOL_IP, SO_ORIGINAL_DST)` (IPv6:
`IP6T_SO_ORIGINAL_DST` on SOL_IPV6 (IPPROTO_IPV6), the same number) returns it as a `sockaddr_in` /
`sockaddr_in6`. Parsing is kept apart from the system call so it is tested on bytes.
"""

from __future__ import annotations

import socket
import struct

# linux/netfilter_ipv4.h SO_ORIGINAL_DST, linux/netfilter_ipv6/ip6_tables.h IP6T_SO_ORIGINAL_DST
SO_ORIGINAL_DST = 80
SOCKADDR_IN_SIZE = 16
SOCKADDR_IN6_SIZE = 28


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """(address, port) of a `sockaddr_in` or `sockaddr_in6`.

    The family is in host byte order, the port and address in network order.
    """
    if len(raw) < 4:
        raise ValueError(f"a socket address of {len(raw)} bytes is too short")
    (family,) = struct.unpack("=H", raw[:2])
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET and len(raw) >= 8:
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        # after the port: 4 bytes of flow information, then the 16-byte address
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"not an IPv4 or IPv6 socket address (family {family}, {len(raw)} bytes)")


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where the app sent a redirected connection; OSError when the kernel knows none
    (no conntrack entry: the connection was not redirected)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, SOCKADDR_IN6_SIZE)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, SOCKADDR_IN_SIZE)
    return parse_sockaddr(raw)
