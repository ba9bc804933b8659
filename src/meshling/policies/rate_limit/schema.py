"""The RateLimit resource: how many requests (HTTP) or connections (TCP) an inbound admits.

```yaml
kind: RateLimit
metadata: {name: api-limit, mesh: default}
spec:
  sources: [{service: web}]           # the callers, by service; {service: "*"}: any caller
  destinations: [{service: api}]      # the dataplanes whose inbounds are limited
  conf:
    local: {requests: 100, interval: 1s, burst: 150}   # HTTP requests, per proxy
    per_source: true                  # one local bucket per caller identity
    global:                           # shared by every proxy with the same key
      redis: redis://127.0.0.1:6379/0
      requests: 300
      interval: 1s
      key: api                        # default: "<mesh>/<name>"
    tcp: {connections: 20, interval: 1s}               # TCP connections, per proxy
```

Each limit is a token bucket: `requests` (or `connections`) tokens per `interval`, at most
`burst` held (default: one interval's worth), one taken per request or connection. The
local and TCP buckets live in each proxy; the global one lives in Redis and is shared
(see `proxy/ratelimit.py` for how proxies lease its tokens in batches). A request must
pass the local limit and then the global one. A global limit needs a local one: it is
what each proxy enforces alone, and all that is enforced while Redis is unreachable.

`parse_resource` raises `SnapshotError(source, field path, reason)` for anything wrong,
like every resource; the same conf parser reads the snapshot fragment's rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshling.policies.inbound import (
    Envelope,
    flag,
    integer,
    parse_envelope,
    positive_duration,
    text,
)

if TYPE_CHECKING:
    from meshling.policies.matching import Selector
    from meshling.snapshot.load import _Node

KIND = "RateLimit"
CONF_FIELDS = ("local", "per_source", "global", "tcp")
MAX_COUNT = 1_000_000_000
# Redis keys and metric labels: plain characters only
_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,200}$")
_REDIS_URL = re.compile(
    r"^(redis|rediss)://([^/?#]*@)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(/\d{1,5})?$"
)


@dataclass(frozen=True, slots=True)
class Limit:
    """A token bucket: `count` tokens per `interval`, at most `burst` held at once."""

    # requests (HTTP) or connections (TCP) admitted per interval, on average
    count: int
    # the interval, in seconds
    interval: float
    # the bucket's size: the most admitted at once after a quiet spell
    burst: int

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.count / self.interval

    def to_dict(self, unit: str) -> dict[str, Any]:
        return {unit: self.count, "interval": self.interval, "burst": self.burst}


@dataclass(frozen=True, slots=True)
class GlobalLimit:
    """A token bucket in Redis, shared by every proxy that names the same `key`."""

    # where the bucket lives: redis://[user:password@]host[:port][/db] (rediss:// for TLS)
    redis: str
    # requests admitted per interval, by all the proxies together
    requests: int
    # the interval, in seconds
    interval: float
    # the shared bucket's size; small by default (a tenth of `requests`), so that the
    # total over any stretch of time stays close to the rate
    burst: int
    # the Redis key (under "meshling:ratelimit:"); proxies with the same key share a limit
    key: str

    @property
    def rate(self) -> float:
        return self.requests / self.interval

    def to_dict(self) -> dict[str, Any]:
        return {
            "redis": self.redis,
            "requests": self.requests,
            "interval": self.interval,
            "burst": self.burst,
            "key": self.key,
        }


@dataclass(frozen=True, slots=True)
class RateLimitConf:
    """What one RateLimit enforces (`spec.conf`); at least one of local, global, tcp."""

    # HTTP requests per proxy; also the limit that remains while Redis is unreachable
    local: Limit | None = None
    # one local (and TCP) bucket per caller identity instead of one for all callers; the
    # number of buckets is bounded (the least recently used is dropped)
    per_source: bool = False
    # HTTP requests across proxies, in Redis
    global_limit: GlobalLimit | None = None
    # TCP connections per proxy (a connection over the limit is closed at once)
    tcp: Limit | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.local is not None:
            out["local"] = self.local.to_dict("requests")
        out["per_source"] = self.per_source
        if self.global_limit is not None:
            out["global"] = self.global_limit.to_dict()
        if self.tcp is not None:
            out["tcp"] = self.tcp.to_dict("connections")
        return out


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A RateLimit resource: which callers of which dataplanes, and the limits."""

    # unique within the mesh; names the rule in the snapshot, metrics and logs
    name: str
    # the mesh the policy belongs to
    mesh: str
    # the callers, by service ("*": any caller, plaintext ones included)
    sources: tuple[Selector, ...]
    # the dataplanes whose inbounds the policy limits
    destinations: tuple[Selector, ...]
    # the limits
    conf: RateLimitConf


def parse_resource(document: Any, source: str) -> RateLimit:
    """Validate a parsed YAML/JSON document and build the RateLimit it describes."""
    envelope: Envelope
    envelope, conf = parse_envelope(document, source, KIND)
    conf.mapping(CONF_FIELDS)
    return RateLimit(
        name=envelope.name,
        mesh=envelope.mesh,
        sources=envelope.sources,
        destinations=envelope.destinations,
        conf=parse_conf(conf, default_key=f"{envelope.mesh}/{envelope.name}"),
    )


def parse_conf(node: _Node, default_key: str) -> RateLimitConf:
    """The limits of `node` (its keys already checked against `CONF_FIELDS` and more)."""
    local = node.get("local", lambda n: _limit(n, "requests"), None)
    tcp = node.get("tcp", lambda n: _limit(n, "connections"), None)
    global_limit = node.get("global", lambda n: _global(n, default_key), None)
    per_source = node.get("per_source", flag, False)
    if local is None and tcp is None and global_limit is None:
        raise node.error("give at least one of local, global, tcp")
    if global_limit is not None and local is None:
        raise node.child("global").error(
            "a global limit needs a local one: `local` is what each proxy enforces on its "
            "own, and all that is enforced while Redis is unreachable"
        )
    if per_source and local is None and tcp is None:
        raise node.child("per_source").error("per_source applies to local and tcp: give one")
    return RateLimitConf(local=local, per_source=per_source, global_limit=global_limit, tcp=tcp)


def _count(node: _Node) -> int:
    if isinstance(node.value, int) and not isinstance(node.value, bool) and node.value <= 0:
        raise node.error(
            f"must be at least 1, got {node.value} (to refuse everything, use TrafficPermission)"
        )
    return integer(node, 1, MAX_COUNT)


def _limit(node: _Node, unit: str) -> Limit:
    node.mapping((unit, "interval", "burst"))
    count = node.need(unit, _count)
    interval = node.need("interval", positive_duration)
    burst = node.get("burst", _count, count)
    return Limit(count=count, interval=interval, burst=burst)


def _redis_url(node: _Node) -> str:
    value = text(node)
    if not _REDIS_URL.match(value):
        raise node.error(f"expected a Redis URL such as redis://127.0.0.1:6379/0, got {value!r}")
    port = value.rsplit(":", 1)[-1].split("/")[0]
    if port.isdigit() and not 1 <= int(port) <= 65535:
        raise node.error(f"port {port} is out of range [1, 65535]")
    return value


def _key(node: _Node) -> str:
    value = text(node)
    if not _KEY.match(value):
        raise node.error(f"invalid key {value!r}: use letters, digits and '_.:/-'")
    return value


def _global(node: _Node, default_key: str) -> GlobalLimit:
    node.mapping(("redis", "requests", "interval", "burst", "key"))
    requests = node.need("requests", _count)
    interval = node.need("interval", lambda n: positive_duration(n, 3600.0))
    if requests / interval > 1_000_000:
        raise node.child("requests").error("more than a million requests a second: no limit")
    burst = node.get("burst", _count, max(1, requests // 10))
    return GlobalLimit(
        redis=node.need("redis", _redis_url),
        requests=requests,
        interval=interval,
        burst=burst,
        key=node.get("key", _key, default_key),
    )
