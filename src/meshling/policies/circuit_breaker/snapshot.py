"""The `circuit_breaker:` fragment of a cluster, and its conversion from a CircuitBreaker.

```yaml
clusters:
  - name: api
    endpoints: [...]
    circuit_breaker:
      max_connections: 1024        # open + opening upstream connections
      max_pending_requests: 1024   # requests waiting for a connection to open
      max_requests: 1024           # requests in flight to the cluster
      outlier_detection:           # optional: take failing endpoints out for a while
        consecutive_5xx: 5
        consecutive_gateway_failures: 0
        interval: 10s
        base_ejection_time: 30s
        max_ejection_time: 300s
        max_ejection_percent: 50
```

A request over a limit is answered at once with 503 and `x-meshling-error` naming the
limit (`circuit_breaker_max_requests`, `circuit_breaker_max_pending_requests`,
`circuit_breaker_max_connections`); a TCP connection over a limit is closed. The limits
count across every snapshot the proxy runs, so a reload does not reset them.

Outlier detection counts each endpoint's consecutive failures. A 5xx response, and every
failure the proxy met itself on the way (connect failure, reset, timeout, malformed
response), is a 5xx; 502, 503, 504 and the proxy's own failures are also *gateway*
failures. Any other response resets both counts (a non-gateway 5xx resets the gateway
count). When a count reaches its threshold the endpoint is ejected for
`base_ejection_time` times the number of times it was ejected (capped by
`max_ejection_time`); that number falls by one for every `interval` the endpoint then
stays in, so a repeat offender stays out longer and a reformed one is forgiven. An
ejection that would leave more than `max_ejection_percent` of the cluster's endpoints
ejected does not happen. The control plane's builder places a CircuitBreaker's
`fragment(resource)` under the cluster of the destination service (`clusters[].
circuit_breaker`); it is exactly what `CircuitBreakerConfig.from_dict` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshling.policies.circuit_breaker.schema import CircuitBreaker
    from meshling.snapshot.load import _Node

DEFAULT_LIMIT = 1024


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """When an endpoint is taken out of the load balancer for failing, and for how long."""

    # 5xx responses (and local failures) in a row that eject an endpoint; 0: never
    consecutive_5xx: int = 5
    # gateway failures (502, 503, 504, connect failures, resets, timeouts) in a row that
    # eject an endpoint; 0: never
    consecutive_gateway_failures: int = 0
    # seconds an endpoint must stay in for its ejection count to fall by one
    interval: float = 10.0
    # seconds of the first ejection; the n-th in a row lasts n times as long
    base_ejection_time: float = 30.0
    # the longest an ejection lasts, however many came before
    max_ejection_time: float = 300.0
    # at most this share (0-100) of the cluster's endpoints is ejected at any time
    max_ejection_percent: int = 50

    def to_dict(self) -> dict[str, Any]:
        return {
            "consecutive_5xx": self.consecutive_5xx,
            "consecutive_gateway_failures": self.consecutive_gateway_failures,
            "interval": self.interval,
            "base_ejection_time": self.base_ejection_time,
            "max_ejection_time": self.max_ejection_time,
            "max_ejection_percent": self.max_ejection_percent,
        }

    @classmethod
    def from_dict(cls, node: _Node) -> OutlierDetection:
        node.mapping(
            (
                "consecutive_5xx",
                "consecutive_gateway_failures",
                "interval",
                "base_ejection_time",
                "max_ejection_time",
                "max_ejection_percent",
            )
        )
        config = cls(
            consecutive_5xx=node.get("consecutive_5xx", _count, 5),
            consecutive_gateway_failures=node.get("consecutive_gateway_failures", _count, 0),
            interval=node.get("interval", positive_duration, 10.0),
            base_ejection_time=node.get("base_ejection_time", positive_duration, 30.0),
            max_ejection_time=node.get("max_ejection_time", positive_duration, 300.0),
            max_ejection_percent=node.get("max_ejection_percent", percent, 50),
        )
        if not config.consecutive_5xx and not config.consecutive_gateway_failures:
            raise node.error(
                "outlier detection that never ejects: give consecutive_5xx or "
                "consecutive_gateway_failures a value above 0, or drop outlier_detection"
            )
        if config.max_ejection_time < config.base_ejection_time:
            raise node.child("max_ejection_time").error(
                f"{config.max_ejection_time:g}s is shorter than base_ejection_time "
                f"({config.base_ejection_time:g}s)"
            )
        return config


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """Limits on what a cluster is asked to carry at once, and outlier detection."""

    # upstream connections open or opening; a request needing one more gets 503
    max_connections: int = DEFAULT_LIMIT
    # requests waiting for an upstream connection to open
    max_pending_requests: int = DEFAULT_LIMIT
    # requests in flight to the cluster, from routing to the last byte of the response
    max_requests: int = DEFAULT_LIMIT
    # None: endpoints are never ejected for failing
    outlier_detection: OutlierDetection | None = None

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's form, as `from_dict` reads it."""
        document: dict[str, Any] = {
            "max_connections": self.max_connections,
            "max_pending_requests": self.max_pending_requests,
            "max_requests": self.max_requests,
        }
        if self.outlier_detection is not None:
            document["outlier_detection"] = self.outlier_detection.to_dict()
        return document

    @classmethod
    def from_dict(cls, node: _Node) -> CircuitBreakerConfig:
        """Validate a `circuit_breaker:` mapping; errors name its field path."""
        node.mapping(
            ("max_connections", "max_pending_requests", "max_requests", "outlier_detection")
        )
        return cls(
            max_connections=node.get("max_connections", _limit, DEFAULT_LIMIT),
            max_pending_requests=node.get("max_pending_requests", _limit, DEFAULT_LIMIT),
            max_requests=node.get("max_requests", _limit, DEFAULT_LIMIT),
            outlier_detection=node.get("outlier_detection", OutlierDetection.from_dict, None),
        )


def fragment(resource: CircuitBreaker) -> dict[str, Any]:
    """The `circuit_breaker:` fragment of the cluster a CircuitBreaker governs."""
    return resource.conf.to_dict()


# The loader's parsers are imported when used: the snapshot model refers to this module,
# so importing it must not import the loader.


def _limit(node: _Node) -> int:
    return integer(node, 1, 1_000_000)


def _count(node: _Node) -> int:
    return integer(node, 0, 1_000_000)


def integer(node: _Node, lo: int, hi: int) -> int:
    """A whole number from `lo` to `hi`."""
    from meshling.snapshot.load import _int

    return _int(lo, hi)(node)


def positive_duration(node: _Node) -> float:
    """A duration above zero (a number of seconds, or 250ms, 10s, 5m, 1h)."""
    from meshling.snapshot.load import _duration

    seconds = _duration(node)
    if seconds <= 0:
        raise node.error(f"must be longer than 0, got {node.value!r}")
    return seconds


def percent(node: _Node) -> int:
    """A whole percentage, 0 to 100."""
    value = node.value
    if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise node.error(f"expected a percentage from 0 to 100, got {value!r}")
    if not 0 <= value <= 100:
        raise node.error(f"a percentage is from 0 to 100, got {value}")
    return value
