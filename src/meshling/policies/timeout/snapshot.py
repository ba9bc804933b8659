"""The `timeout:` fragment of a route (and of a TCP chain), and its conversion from a
Timeout resource.

A route's `timeout` is either a duration, the total time for the upstream to answer
(`timeout: 15s`, as before the Timeout policy), or this fragment, a mapping:

```yaml
timeout:
  connect: 500ms   # opening a connection to an endpoint (0: the cluster's connect_timeout)
  request: 15s     # total, from the end of the request to the end of the response (504)
  per_try: 2s      # each attempt, up to its response head (504, or a retry)
  idle: 30s        # no byte in either direction for this long (504, or a reset)
```

`timeout: 15s` and `timeout: {request: 15s}` are the same route. A TCP chain takes the
same fragment under `tcp.timeout`: `idle` becomes the chain's idle timeout and `connect`
its connect timeout; `request` and `per_try`, which need requests, are not used there.
The control plane's builder places the fragment of the Timeout that governs a (source,
destination) pair under the outbound route (`routes[].timeout`) or, for a TCP outbound,
under its chain (`tcp.timeout`); `fragment(resource)` is exactly what the loader reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshling.policies.timeout.schema import Timeout
    from meshling.snapshot.load import _Node

FIELDS = ("connect", "request", "per_try", "idle")
# the route's total timeout when neither a duration nor `request` is given
DEFAULT_REQUEST = 15.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long each phase of a request to a route may take; 0 disables a timeout."""

    # seconds to open a TCP connection to an endpoint; 0: the cluster's connect_timeout
    connect: float = 0.0
    # seconds from the end of the request to the end of the response, over every attempt
    request: float = DEFAULT_REQUEST
    # seconds for each attempt, from its start to its response head; 0: only `request`
    per_try: float = 0.0
    # seconds without a byte in either direction before the stream is given up; checked
    # on the proxy's one-second tick, so it fires up to two seconds late
    idle: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's form, as `from_dict` reads it (every field, durations as text)."""
        return {name: format_duration(getattr(self, name)) for name in FIELDS}

    @classmethod
    def from_dict(cls, node: _Node) -> Timeouts:
        """Validate a `timeout:` mapping; errors name its field path."""
        node.mapping(FIELDS)
        timeouts = cls(
            connect=node.get("connect", _duration, 0.0),
            request=node.get("request", _duration, DEFAULT_REQUEST),
            per_try=node.get("per_try", _duration, 0.0),
            idle=node.get("idle", _duration, 0.0),
        )
        if timeouts.per_try and timeouts.request and timeouts.per_try > timeouts.request:
            raise node.child("per_try").error(
                f"per_try ({format_duration(timeouts.per_try)}) is longer than request "
                f"({format_duration(timeouts.request)}), which bounds every attempt together: "
                "shorten per_try or lengthen request"
            )
        return timeouts


def fragment(resource: Timeout) -> dict[str, Any]:
    """The `timeout:` fragment of the routes a Timeout governs."""
    return resource.conf.to_dict()


def format_duration(seconds: float) -> str:
    """A duration as the loader reads it: "250ms", "15s", "1500ms", "0s"."""
    millis = round(seconds * 1000)
    if abs(millis / 1000 - seconds) > 1e-9:
        return f"{seconds}s"
    if millis % 1000 == 0:
        return f"{millis // 1000}s"
    return f"{millis}ms"


def _duration(node: _Node) -> float:
    """The snapshot loader's duration: seconds, or text such as 250ms, 2s, 5m.

    The loader is imported when a fragment is read, not with the policy registry, which
    the snapshot model's fragments are part of.
    """
    from meshling.snapshot.load import _duration as parse

    return parse(node)
