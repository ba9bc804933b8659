"""The `health_check:` fragment of a cluster, and its conversion from a HealthCheck.

```yaml
clusters:
  - name: api
    endpoints: [...]
    health_check:
      interval: 5s               # between two checks of one endpoint
      timeout: 1s                # a check that takes longer fails
      healthy_threshold: 2       # passes in a row that bring an unhealthy endpoint back
      unhealthy_threshold: 3     # failures in a row that take a healthy endpoint out
      panic_threshold: 50        # below this % of usable endpoints, use them all
      http: {path: /healthz, expected_statuses: [200, "300-399"]}   # or
      # tcp: {}                  # the connection opening is the check, or
      # grpc: {service: api.v1.Orders, authority: api}   # grpc.health.v1.Health/Check
```

The proxy checks every endpoint of the cluster on its own, starting when the snapshot
is applied and stopping when it is replaced or the proxy drains. An endpoint starts
healthy (traffic flows before the first round), and its first check decides at once;
after that it takes `unhealthy_threshold` failures in a row to take it out and
`healthy_threshold` passes in a row to bring it back. An HTTP check is `GET <path>` with
`Host: <cluster name>`, answered by a status in `expected_statuses` (default 200-299).
A gRPC check is the standard `grpc.health.v1.Health/Check` call over HTTP/2 for
`service` (empty, the default, asks about the server as a whole), with `:authority`
`authority` (default the cluster name); it passes when the answer is `SERVING`.
Unhealthy endpoints leave the load balancer; when fewer than `panic_threshold` percent of
the endpoints are usable (healthy and not ejected by outlier detection) the balancer
ignores health and uses them all, so that a bad check cannot take a whole service down.
`fragment(resource)` is exactly what `HealthCheckConfig.from_dict` reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.circuit_breaker.snapshot import integer, percent, positive_duration

if TYPE_CHECKING:
    from meshling.policies.health_check.schema import HealthCheck
    from meshling.snapshot.load import _Node

_RANGE = re.compile(r"^([1-5]\d\d)-([1-5]\d\d)$")
# a path that fits in a request line as it is written
_PATH = re.compile(r"^/[!-~]*$")
# host, host:port or [v6]:port, as an HTTP/2 :authority carries it (no userinfo)
_AUTHORITY = re.compile(r"^[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]{1,255}$")
# a gRPC service name as the health protocol carries it (bytes on the wire)
_SERVICE_BYTES = 1024


@dataclass(frozen=True, slots=True)
class GrpcCheck:
    """A gRPC health check: `grpc.health.v1.Health/Check` for one service."""

    # the service asked about; "" asks about the server as a whole
    service: str = ""
    # the call's :authority; None: the cluster's name
    authority: str | None = None

    def to_dict(self) -> dict[str, Any]:
        document: dict[str, Any] = {"service": self.service}
        if self.authority is not None:
            document["authority"] = self.authority
        return document


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    """How the proxy checks each endpoint of a cluster, and what it does with the results."""

    # seconds between two checks of one endpoint
    interval: float = 10.0
    # seconds a check may take; a slower one fails
    timeout: float = 1.0
    # passes in a row that make an unhealthy endpoint healthy again
    healthy_threshold: int = 2
    # failures in a row that make a healthy endpoint unhealthy
    unhealthy_threshold: int = 3
    # below this percentage of usable endpoints the balancer uses every endpoint
    panic_threshold: int = 50
    # the HTTP check's path; None: a TCP check (a connection that opens passes)
    http_path: str | None = None
    # the statuses that pass an HTTP check, as inclusive ranges
    expected_statuses: tuple[tuple[int, int], ...] = ((200, 299),)
    # a gRPC check instead of HTTP or TCP (then `http_path` is None)
    grpc: GrpcCheck | None = None

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's form, as `from_dict` reads it."""
        document: dict[str, Any] = {
            "interval": self.interval,
            "timeout": self.timeout,
            "healthy_threshold": self.healthy_threshold,
            "unhealthy_threshold": self.unhealthy_threshold,
            "panic_threshold": self.panic_threshold,
        }
        if self.grpc is not None:
            document["grpc"] = self.grpc.to_dict()
        elif self.http_path is None:
            document["tcp"] = {}
        else:
            document["http"] = {
                "path": self.http_path,
                "expected_statuses": [
                    lo if lo == hi else f"{lo}-{hi}" for lo, hi in self.expected_statuses
                ],
            }
        return document

    @classmethod
    def from_dict(cls, node: _Node) -> HealthCheckConfig:
        """Validate a `health_check:` mapping; errors name its field path."""
        node.mapping(
            (
                "interval",
                "timeout",
                "healthy_threshold",
                "unhealthy_threshold",
                "panic_threshold",
                "http",
                "tcp",
                "grpc",
            )
        )
        if sum(node.has(kind) for kind in ("http", "tcp", "grpc")) != 1:
            raise node.error("give exactly one of http, tcp, grpc")
        path = None
        grpc = None
        statuses: tuple[tuple[int, int], ...] = ((200, 299),)
        if node.has("http"):
            http = node.child("http").mapping(("path", "expected_statuses"))
            path = http.need("path", _path)
            given = tuple(_statuses(s) for s in http.items("expected_statuses", required=False))
            if http.has("expected_statuses") and not given:
                raise http.child("expected_statuses").error(
                    "give at least one status, or leave the field out for 200-299"
                )
            statuses = given or statuses
        elif node.has("grpc"):
            grpc = _grpc(node.child("grpc"))
        else:
            tcp = node.child("tcp")
            if tcp.value != {}:
                tcp.mapping(())
        config = cls(
            interval=node.get("interval", positive_duration, 10.0),
            timeout=node.get("timeout", positive_duration, 1.0),
            healthy_threshold=node.get("healthy_threshold", _threshold, 2),
            unhealthy_threshold=node.get("unhealthy_threshold", _threshold, 3),
            panic_threshold=node.get("panic_threshold", percent, 50),
            http_path=path,
            expected_statuses=statuses,
            grpc=grpc,
        )
        if config.timeout > config.interval:
            raise node.child("timeout").error(
                f"{config.timeout:g}s is longer than the interval ({config.interval:g}s): "
                "a check would still run when the next one is due"
            )
        return config


def fragment(resource: HealthCheck) -> dict[str, Any]:
    """The `health_check:` fragment of the cluster a HealthCheck governs."""
    return resource.conf.to_dict()


def _threshold(node: _Node) -> int:
    return integer(node, 1, 1000)


def _path(node: _Node) -> str:
    from meshling.snapshot.load import _str

    value = _str(node)
    if not _PATH.match(value) or len(value) > 2048:
        raise node.error(
            f"invalid path {value!r}: it starts with '/' and has no spaces or control characters"
        )
    return value


def _grpc(node: _Node) -> GrpcCheck:
    node.mapping(("service", "authority"))
    return GrpcCheck(
        service=node.get("service", _service, ""),
        authority=node.get("authority", _authority, None),
    )


def _service(node: _Node) -> str:
    from meshling.snapshot.load import _kind

    value = node.value
    if not isinstance(value, str):
        raise node.error(
            f'expected a service name (a string; "" for the whole server), got {_kind(value)}'
        )
    if any(c < " " or c == "\x7f" for c in value):
        raise node.error(f"invalid service name {value!r}: it has control characters")
    if len(value.encode()) > _SERVICE_BYTES:
        raise node.error(f"service name is longer than {_SERVICE_BYTES} bytes")
    return value


def _authority(node: _Node) -> str:
    from meshling.snapshot.load import _str

    value = _str(node)
    if not _AUTHORITY.match(value):
        raise node.error(
            f"invalid authority {value!r}: give a host or host:port, without spaces, "
            "'/', '?', '#' or '@'"
        )
    return value


def _statuses(node: _Node) -> tuple[int, int]:
    from meshling.snapshot.load import _kind

    value = node.value
    if isinstance(value, int) and not isinstance(value, bool):
        if not 100 <= value <= 599:
            raise node.error(f"a status is from 100 to 599, got {value}")
        return (value, value)
    if isinstance(value, str) and (m := _RANGE.match(value.strip())):
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise node.error(f"an empty range {value!r}: write the lower status first")
        return (lo, hi)
    raise node.error(
        f'expected a status (200) or a range ("200-399"), got {_kind(value)} {value!r}'
    )
