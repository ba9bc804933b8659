"""The load balancer's decisions: pickers, the latency estimate, the hash ring and request
keys, as pure functions.

Randomness and time are parameters (`rnd() -> [0, 1)`, `now`), so tests run them with a
seeded generator and a fake clock. The proxy's balancer (`proxy/balancer.py`) calls these
with its endpoint states; every pick is O(1) except a ring lookup, which is a bisection.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from hashlib import blake2b
from math import exp
from typing import TypeVar

H = TypeVar("H")

# Cost floor of an endpoint without a latency estimate yet: its requests in flight still
# count, so a new endpoint is not sent everything until its first answer arrives.
EWMA_FLOOR = 1e-6


def two_choices(n: int, rnd: Callable[[], float]) -> tuple[int, int]:
    """Two different indices out of `n` (at least 2), uniformly."""
    i = int(rnd() * n)
    j = int(rnd() * (n - 1))
    return i, (j + 1 if j >= i else j)


def p2c(hosts: Sequence[H], rnd: Callable[[], float], cost: Callable[[H], float]) -> H:
    """The power of two choices: of two endpoints picked at random, the cheaper (the
    first on a tie)."""
    n = len(hosts)
    if n == 1:
        return hosts[0]
    i, j = two_choices(n, rnd)
    a, b = hosts[i], hosts[j]
    return b if cost(b) < cost(a) else a


def ewma_observe(estimate: float, stamp: float, rtt: float, now: float, decay: float) -> float:
    """The latency estimate after one observation (peak-sensitive): a slower answer is
    taken in full at once, a faster one moves the estimate by the weight that the time
    since the last observation took off the old one."""
    if rtt >= estimate:
        return rtt
    old = exp(-(now - stamp) / decay)
    return estimate * old + rtt * (1.0 - old)


def ewma_cost(estimate: float, stamp: float, now: float, decay: float, active: int) -> float:
    """An endpoint's cost: its estimate, decayed towards zero since the last observation
    (so an endpoint that stopped being picked is tried again), times requests in flight
    plus one."""
    decayed = estimate * exp(-(now - stamp) / decay) if estimate else 0.0
    return max(decayed, EWMA_FLOOR) * (active + 1)


def hash64(data: bytes) -> int:
    """A stable 64-bit hash: the same on every proxy and in every process, so callers
    agree on where a key goes."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def points_per_endpoint(ring_size: int, endpoints: int) -> int:
    """How many points each endpoint gets for a ring of at least `ring_size` points over
    all of a cluster's `endpoints` (usable or not)."""
    return max(1, -(-ring_size // max(1, endpoints)))


def build_ring(names: Sequence[bytes], per: int) -> tuple[list[int], list[int]]:
    """A hash ring of `per` points for each of `names` (endpoint addresses): sorted point
    hashes, and the index of the name owning each.

    A point's hash depends only on its endpoint's name, and `per` stays the same while
    endpoints leave and return (it comes from the cluster's endpoints, see
    `points_per_endpoint`), so an endpoint leaving takes only its own points away: only
    its keys move, and they come back when it does.
    """
    if not names:
        return [], []
    points = sorted(
        (hash64(b"%b#%d" % (name, i)), owner)
        for owner, name in enumerate(names)
        for i in range(per)
    )
    return [p for p, _ in points], [owner for _, owner in points]


def ring_lookup(points: list[int], owners: list[int], key: int) -> int:
    """The owner of the first point at or after `key`, wrapping around the ring."""
    i = bisect_left(points, key)
    return owners[i if i < len(points) else 0]


def header_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of a header (names lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def cookie_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """A cookie's value from the request's Cookie headers, or None."""
    for key, value in headers:
        if key == b"cookie":
            for pair in value.split(b";"):
                cookie, sep, found = pair.strip().partition(b"=")
                if sep and cookie == name:
                    return found
    return None


def prefer_zone(hosts: Sequence[H], local: Callable[[H], bool]) -> Sequence[H]:
    """The hosts of the local zone if there is any, else all of them."""
    mine = [h for h in hosts if local(h)]
    return mine or hosts
