"""The `load_balancing:` fragment of a cluster, and its conversion from a LoadBalancing.

```yaml
clusters:
  - name: api
    endpoints: [{address: 10.0.0.1, port: 8080, zone: eu-1a}, ...]
    load_balancing:
      policy: ewma              # round_robin | random | least_request | ewma | ring_hash
      hash_on: {header: x-user} # ring_hash only: {header: NAME} | {cookie: NAME} | {source_ip: true}
      ring_size: 1024           # ring_hash only: points on the ring over all the endpoints
      decay: 10s                # ewma only: how fast old latencies are forgotten
      prefer_local_zone: true   # endpoints in the proxy's own `zone` first, while any is usable
```

* `round_robin` takes the usable endpoints in turn;
* `random` picks one uniformly;
* `least_request` picks two at random and sends to the one with fewer requests in
  flight from this proxy (the power of two choices);
* `ewma` picks two at random and sends to the cheaper, cost being a peak-sensitive moving
  average of the endpoint's latency (a slower answer counts in full at once, faster ones
  pull it down over `decay`; with no answers it decays towards 0 so an idle endpoint is
  tried again) times its requests in flight plus one;
* `ring_hash` maps a request's key (a header, a cookie, or the client's address) onto a
  ring of `ring_size` points, so the same key reaches the same endpoint, and an endpoint
  leaving moves only its own share of the keys. A request without the key (no such
  header or cookie) goes to a random endpoint, and is counted
  (`meshling_lb_hash_fallbacks`).

Only usable endpoints are picked: not ejected by outlier detection, not failing a health
check (unless in panic). With `prefer_local_zone`, endpoints whose `zone` is the proxy's
own (`zone:` at the top of the snapshot) are the only candidates while at least one of
them is usable; the others take over when none is. `fragment(resource)` is exactly what
`LoadBalancingConfig.from_dict` reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from meshling.policies.circuit_breaker.snapshot import integer, positive_duration

if TYPE_CHECKING:
    from meshling.policies.load_balancing.schema import LoadBalancing
    from meshling.snapshot.load import _Node

Policy = Literal["round_robin", "random", "least_request", "ewma", "ring_hash"]
POLICIES: tuple[Policy, ...] = ("round_robin", "random", "least_request", "ewma", "ring_hash")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True, slots=True)
class HashOn:
    """Where a ring hash finds a request's key: exactly one field is set."""

    # a request header, lower-case
    header: str | None = None
    # a cookie of the request
    cookie: str | None = None
    # the client's IP address (for TCP as for HTTP)
    source_ip: bool = False

    def to_dict(self) -> dict[str, Any]:
        if self.header is not None:
            return {"header": self.header}
        if self.cookie is not None:
            return {"cookie": self.cookie}
        return {"source_ip": True}

    @classmethod
    def from_dict(cls, node: _Node) -> HashOn:
        node.mapping(("header", "cookie", "source_ip"))
        given = [k for k in ("header", "cookie", "source_ip") if node.has(k)]
        if len(given) != 1:
            raise node.error("give exactly one of header, cookie, source_ip")
        if given == ["source_ip"]:
            if not node.need("source_ip", _bool):
                raise node.child("source_ip").error(
                    "source_ip: false selects no key: give header, cookie or source_ip: true"
                )
            return cls(source_ip=True)
        key = given[0]
        name = node.need(key, _str)
        if not _TOKEN.match(name):
            raise node.child(key).error(f"invalid {key} name {name!r}")
        return cls(header=name.lower()) if key == "header" else cls(cookie=name)


@dataclass(frozen=True, slots=True)
class LoadBalancingConfig:
    """How a cluster's proxy picks an endpoint for each request or connection."""

    # the algorithm: round_robin, random, least_request, ewma, ring_hash
    policy: Policy = "round_robin"
    # ring_hash: where the request's key comes from (required for ring_hash)
    hash_on: HashOn | None = None
    # ring_hash: points on the ring over all endpoints (more: a more even spread)
    ring_size: int = 1024
    # ewma: seconds over which a latency observation loses most of its weight
    decay: float = 10.0
    # endpoints of the proxy's own zone first, while any of them is usable
    prefer_local_zone: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The snapshot's form, as `from_dict` reads it."""
        document: dict[str, Any] = {"policy": self.policy}
        if self.hash_on is not None:
            document["hash_on"] = self.hash_on.to_dict()
            document["ring_size"] = self.ring_size
        if self.policy == "ewma":
            document["decay"] = self.decay
        document["prefer_local_zone"] = self.prefer_local_zone
        return document

    @classmethod
    def from_dict(cls, node: _Node) -> LoadBalancingConfig:
        """Validate a `load_balancing:` mapping; errors name its field path."""
        node.mapping(("policy", "hash_on", "ring_size", "decay", "prefer_local_zone"))
        default: Policy = "round_robin"
        policy = node.get("policy", _policy, default)
        if policy == "ring_hash" and not node.has("hash_on"):
            raise node.child("hash_on").error(
                "ring_hash needs a key: {header: NAME}, {cookie: NAME} or {source_ip: true}"
            )
        for key in ("hash_on", "ring_size"):
            if policy != "ring_hash" and node.has(key):
                raise node.child(key).error(f"only used by policy ring_hash, not {policy}")
        if policy != "ewma" and node.has("decay"):
            raise node.child("decay").error(f"only used by policy ewma, not {policy}")
        return cls(
            policy=policy,
            hash_on=node.get("hash_on", HashOn.from_dict, None),
            ring_size=node.get("ring_size", lambda n: integer(n, 1, 1 << 20), 1024),
            decay=node.get("decay", positive_duration, 10.0),
            prefer_local_zone=node.get("prefer_local_zone", _bool, False),
        )


def fragment(resource: LoadBalancing) -> dict[str, Any]:
    """The `load_balancing:` fragment of the cluster a LoadBalancing governs."""
    return resource.conf.to_dict()


def _bool(node: _Node) -> bool:
    from meshling.snapshot.load import _bool

    return _bool(node)


def _str(node: _Node) -> str:
    from meshling.snapshot.load import _str

    return _str(node)


def _policy(node: _Node) -> Policy:
    for policy in POLICIES:
        if node.value == policy:
            return policy
    if node.value == "maglev":
        raise node.error("maglev is not available: ring_hash gives the same key the same endpoint")
    raise node.error(f"must be one of {', '.join(POLICIES)}, got {node.value!r}")
