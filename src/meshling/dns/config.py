"""The `dns:` section of a snapshot: reading and checking it.

```yaml
dns:
  address: 127.0.0.1      # where the responder listens, UDP and TCP (default)
  port: 15053             # (default)
  domain: mesh            # names are <service>.<domain> (default)
  ttl: 30s                # how long clients may cache an answer (default; 0 to 1h)
  upstream: [10.0.0.2, "127.0.0.1:5353"]   # other names; default: /etc/resolv.conf's
  names: {api: 241.12.0.7, web: 250.3.1.9} # service -> virtual IP (IPv4)
```

Every mistake names the field path (`dns.names.api`) and the reason.
"""

from __future__ import annotations

import re
import socket
from typing import TYPE_CHECKING, Any

from meshling.dns.message import MAX_LABEL, MAX_NAME

if TYPE_CHECKING:
    from meshling.snapshot.load import _Node
    from meshling.snapshot.model import MeshDns

MAX_UPSTREAMS = 3
MAX_TTL = 3600
# a service name as a DNS name: labels of letters, digits, '-' and '_', split by dots
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?$")
_UPSTREAM = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+)|([0-9A-Fa-f:]+))(?::(\d{1,5}))?$")


def parse_dns(node: _Node) -> MeshDns:
    """The `dns:` mapping of a snapshot."""
    from meshling.snapshot.load import _address, _duration, _int
    from meshling.snapshot.model import MeshDns

    node.mapping(("address", "port", "domain", "ttl", "upstream", "names"))
    domain = node.get("domain", _domain, "mesh")
    ttl = node.get("ttl", _duration, 30.0)
    if ttl > MAX_TTL:
        raise node.child("ttl").error(f"{ttl:g}s is longer than the {MAX_TTL}s allowed")
    upstream = tuple(_upstream(u) for u in node.items("upstream", required=False))
    if len(upstream) > MAX_UPSTREAMS:
        raise node.child("upstream").error(f"at most {MAX_UPSTREAMS} upstream servers")
    return MeshDns(
        address=node.get("address", _address, "127.0.0.1"),
        port=node.get("port", _int(0, 65535), 15053),
        domain=domain,
        ttl=int(ttl),
        upstream=upstream,
        names=node.get("names", lambda n: _names(n, domain), {}),
    )


def _domain(node: _Node) -> str:
    value = node.value
    if not isinstance(value, str) or not value.strip("."):
        raise node.error(f"expected a domain such as mesh, got {_kind(value)}")
    domain = value.strip(".").lower()
    if not all(_LABEL.match(label) and len(label) <= MAX_LABEL for label in domain.split(".")):
        raise node.error(f"invalid domain {value!r}: use labels of letters, digits, '-', '_'")
    return domain


def _names(node: _Node, domain: str) -> dict[str, str]:
    if not isinstance(node.value, dict):
        raise node.error(f"expected a mapping of services to virtual IPs, got {_kind(node.value)}")
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for service, address in node.value.items():
        child = node.child(str(service))
        if not isinstance(service, str) or not all(
            _LABEL.match(label) and len(label) <= MAX_LABEL for label in service.split(".")
        ):
            raise child.error(
                f"service {service!r} is not a DNS name: use labels of letters, digits, "
                "'-' and '_', split by dots"
            )
        if len(service) + len(domain) + 3 > MAX_NAME:
            raise child.error(f"{service}.{domain} is longer than {MAX_NAME} bytes")
        if not isinstance(address, str):
            raise child.error(f"expected an IPv4 address, got {_kind(address)}")
        try:
            ip = socket.inet_ntop(socket.AF_INET, socket.inet_pton(socket.AF_INET, address))
        except OSError:
            raise child.error(f"invalid IPv4 address {address!r}") from None
        key = service.lower()
        if key in taken:
            raise child.error(f"{service}.{domain} is already the name of {taken[key]!r}")
        taken[key] = service
        names[service] = ip
    return names


def _upstream(node: _Node) -> tuple[str, int]:
    """`10.0.0.2`, `10.0.0.2:5353`, `::1` or `[::1]:5353`."""
    value = node.value
    match = _UPSTREAM.match(value) if isinstance(value, str) else None
    if match is None:
        raise node.error(f"expected an address such as 10.0.0.2 or 127.0.0.1:5353, got {value!r}")
    address = match.group(1) or match.group(2) or match.group(3)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        address = socket.inet_ntop(family, socket.inet_pton(family, address))
    except OSError:
        raise node.error(f"invalid IP address {address!r}") from None
    port = int(match.group(4) or 53)
    if not 1 <= port <= 65535:
        raise node.error(f"port {port} is out of range [1, 65535]")
    return address, port


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
