"""The `retry:` fragment of a route, and its conversion from a Retry resource.

```yaml
retry:
  max_attempts: 3                         # the first attempt included
  retry_on: [5xx, connect-failure, reset] # see CONDITIONS
  status_codes: [409]                     # further statuses to retry
  methods: [GET, HEAD, OPTIONS, PUT, DELETE, TRACE]   # "*": every method
  per_try_timeout: 1s                     # 0: the route's timeout.per_try, if any
  backoff: {base: 25ms, max: 250ms}       # full jitter, doubling per retry
  budget: {ratio: 0.2, min_per_second: 10, ttl: 10s}
  max_body: 65536                         # request bytes kept for replay
```

Every field has a default, so `retry: {}` is a route retried the default way. The
control plane's builder places the fragment of the Retry that governs a (source,
destination) pair under the outbound route (`routes[].retry`); `fragment(resource)` is
exactly what `RetryPolicy.from_dict` reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshling.policies.timeout.snapshot import _duration, format_duration

if TYPE_CHECKING:
    from meshling.policies.retry.schema import Retry
    from meshling.snapshot.load import _Node

# What makes an attempt worth retrying:
CONDITIONS = (
    "5xx",  # any 5xx response, and an attempt that timed out (counted as a 504)
    "gateway-error",  # 502, 503 or 504, and an attempt that timed out
    "connect-failure",  # no connection to the endpoint: the request never left the proxy
    "reset",  # the connection ended before a response head arrived
    # a gRPC call that ended with this grpc-status before any message of its answer
    # (`meshling.http2.grpc.RETRY_CONDITIONS`); gRPC calls are retried whatever `methods`
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
)
DEFAULT_CONDITIONS = ("5xx", "connect-failure", "reset")
# RFC 9110 9.2.2: repeating these has the effect of doing it once
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
ANY_METHOD = "*"
MAX_ATTEMPTS = 10
DEFAULT_MAX_BODY = 64 * 1024
MAX_BODY_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Backoff:
    """The pause before retry n: uniform in [0, min(max, base * 2^(n-1))) (full jitter)."""

    # seconds; the first retry waits up to this long
    base: float = 0.025
    # seconds; no pause is longer
    max: float = 0.25

    def to_dict(self) -> dict[str, Any]:
        return {"base": format_duration(self.base), "max": format_duration(self.max)}

    @classmethod
    def from_dict(cls, node: _Node) -> Backoff:
        node.mapping(("base", "max"))
        base = node.get("base", _duration, 0.025)
        backoff = cls(base=base, max=node.get("max", _duration, max(0.25, base)))
        if backoff.max < backoff.base:
            raise node.child("max").error(
                f"max ({format_duration(backoff.max)}) is shorter than base "
                f"({format_duration(backoff.base)}): make it at least as long"
            )
        return backoff


@dataclass(frozen=True, slots=True)
class Budget:
    """Retries as a share of requests, plus a floor: with every attempt failing, an
    upstream sees at most (1 + ratio) times the requests, plus min_per_second each second."""

    # retries allowed per request, from 0 to 1 (0.2: one retry per five requests)
    ratio: float = 0.2
    # retries allowed each second beyond the ratio, so a quiet route still retries
    min_per_second: int = 10
    # seconds a request's share stays available to retries
    ttl: float = 10.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "min_per_second": self.min_per_second,
            "ttl": format_duration(self.ttl),
        }

    @classmethod
    def from_dict(cls, node: _Node) -> Budget:
        node.mapping(("ratio", "min_per_second", "ttl"))
        ttl = node.get("ttl", _duration, 10.0)
        if not 1.0 <= ttl <= 60.0:
            raise node.child("ttl").error(f"ttl {format_duration(ttl)} is out of range [1s, 60s]")
        return cls(
            ratio=node.get("ratio", _ratio, 0.2),
            min_per_second=node.get("min_per_second", _count(0, 100_000), 10),
            ttl=ttl,
        )


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how a route retries a failed attempt."""

    # attempts in all, the first included (1: never retry)
    max_attempts: int = 3
    # the conditions (`CONDITIONS`) under which an attempt is retried
    retry_on: tuple[str, ...] = DEFAULT_CONDITIONS
    # response statuses retried besides those of `retry_on`
    status_codes: tuple[int, ...] = ()
    # methods that may be retried after the request was sent (upper case, or "*");
    # a connect failure is retried whatever the method, since nothing was sent
    methods: tuple[str, ...] = IDEMPOTENT_METHODS
    # seconds per attempt, to its response head; 0: the route's timeout.per_try
    per_try_timeout: float = 0.0
    # the pause between attempts
    backoff: Backoff = Backoff()
    # the share of retries the route's upstream may see
    budget: Budget = Budget()
    # request body bytes kept to send again; a larger body is not retried
    max_body: int = DEFAULT_MAX_BODY
    # derived, for one lookup per decision
    conditions: frozenset[str] = field(init=False, repr=False, compare=False)
    statuses: frozenset[int] = field(init=False, repr=False, compare=False)
    # None: any method
    method_set: frozenset[bytes] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "conditions", frozenset(self.retry_on))
        object.__setattr__(self, "statuses", frozenset(self.status_codes))
        methods = (
            None if ANY_METHOD in self.methods else frozenset(m.encode() for m in self.methods)
        )
        object.__setattr__(self, "method_set", methods)

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's form, as `from_dict` reads it (every field)."""
        return {
            "max_attempts": self.max_attempts,
            "retry_on": list(self.retry_on),
            "status_codes": list(self.status_codes),
            "methods": list(self.methods),
            "per_try_timeout": format_duration(self.per_try_timeout),
            "backoff": self.backoff.to_dict(),
            "budget": self.budget.to_dict(),
            "max_body": self.max_body,
        }

    @classmethod
    def from_dict(cls, node: _Node) -> RetryPolicy:
        """Validate a `retry:` mapping (or a Retry's `conf`); errors name its field path."""
        if node.value is None:
            return cls()
        node.mapping(
            (
                "max_attempts",
                "retry_on",
                "status_codes",
                "methods",
                "per_try_timeout",
                "backoff",
                "budget",
                "max_body",
            )
        )
        retry_on = _unique_list(node, "retry_on", _condition)
        methods = _unique_list(node, "methods", _method)
        if methods is not None and not methods:
            raise node.child("methods").error('give at least one method, or "*" for every method')
        if methods is not None and ANY_METHOD in methods and len(methods) > 1:
            raise node.child("methods").error('"*" already allows every method: list it alone')
        status_codes = _unique_list(node, "status_codes", _status) or ()
        if retry_on is not None and not retry_on and not status_codes:
            raise node.child("retry_on").error(
                "nothing would be retried: give at least one condition "
                f"({', '.join(CONDITIONS)}) or status_codes"
            )
        return cls(
            max_attempts=node.get("max_attempts", _count(1, MAX_ATTEMPTS), 3),
            retry_on=DEFAULT_CONDITIONS if retry_on is None else retry_on,
            status_codes=status_codes,
            methods=IDEMPOTENT_METHODS if methods is None else methods,
            per_try_timeout=node.get("per_try_timeout", _duration, 0.0),
            backoff=node.get("backoff", Backoff.from_dict, Backoff()),
            budget=node.get("budget", Budget.from_dict, Budget()),
            max_body=node.get("max_body", _count(0, MAX_BODY_LIMIT), DEFAULT_MAX_BODY),
        )


def fragment(resource: Retry) -> dict[str, Any]:
    """The `retry:` fragment of the routes a Retry governs."""
    return resource.conf.to_dict()


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _count(lo: int, hi: int) -> Any:
    def parse(node: _Node) -> int:
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise node.error(f"expected a whole number, got {_kind(value)}")
        if not lo <= value <= hi:
            raise node.error(f"{value} is out of range [{lo}, {hi}]")
        return value

    return parse


def _ratio(node: _Node) -> float:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise node.error(f"expected a number from 0 to 1, got {_kind(value)}")
    if not 0.0 <= value <= 1.0:
        raise node.error(
            f"ratio {value} is out of range [0, 1]: it is retries per request "
            "(0.2 lets one request in five be retried)"
        )
    # the budget counts in thousandths of a retry
    return round(float(value), 3)


def _condition(node: _Node) -> str:
    if node.value not in CONDITIONS:
        raise node.error(
            f"unknown retry condition {node.value!r} (known: {', '.join(CONDITIONS)}; "
            "list other statuses under status_codes)"
        )
    return str(node.value)


def _status(node: _Node) -> int:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise node.error(f"expected an HTTP status from 100 to 599, got {value!r}")
    if value < 400:
        raise node.error(f"status {value} is not an error: only 4xx and 5xx can be retried")
    return value


def _method(node: _Node) -> str:
    value = node.value
    if not isinstance(value, str) or not value:
        raise node.error(f"expected a method such as GET, got {_kind(value)}")
    if value == ANY_METHOD:
        return value
    if not value.isascii() or not value.isalpha():
        raise node.error(f'invalid method {value!r}: use a name such as GET or POST, or "*"')
    return value.upper()


def _unique_list(node: _Node, key: str, parse: Any) -> tuple[Any, ...] | None:
    """A list of distinct values, or None when the field is absent."""
    if not node.has(key):
        return None
    items: list[Any] = []
    for item in node.items(key):
        value = parse(item)
        if value in items:
            raise item.error(f"{value!r} is listed twice")
        items.append(value)
    return tuple(items)
