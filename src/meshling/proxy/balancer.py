"""Endpoint choice at run time: each endpoint's standing, and the picker over the usable ones.

Three objects, from the longest-lived:

* `HostRegistry` (one per proxy) keeps a `HostGroup` per cluster name for as long as the
  cluster is in the running snapshot;
* `HostGroup` keeps a `Host` per endpoint: requests in flight, the latency estimate,
  outlier detection's counts and ejection, the active health check's state. Every
  snapshot's runtime of the cluster shares them, so a reload neither forgives an ejected
  endpoint nor forgets what it has learnt, and requests still running on the old
  snapshot report to the same hosts;
* `Balancer` (one per `ClusterRuntime`) holds the snapshot's policies and the usable
  hosts: not ejected, healthy unless in panic, of the local zone when preferred. The
  usable tuple is computed again only when something changed (the group's `generation`)
  or an ejection is due to end, so a pick is O(1) (a bisection for a ring hash) and
  touches at most two hosts.

The decisions themselves (who is ejected for how long, health, panic, the pickers) are
the policies' `decide` modules; this module calls them with the monotonic clock.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING

from meshling.policies.circuit_breaker.decide import (
    GATEWAY_FAILURE,
    SUCCESS,
    OutlierState,
    classify,
    due_back,
    eject,
    may_eject,
    record,
    restore,
)
from meshling.policies.health_check.decide import HealthState, panic
from meshling.policies.load_balancing.decide import (
    build_ring,
    cookie_value,
    ewma_cost,
    ewma_observe,
    hash64,
    header_value,
    points_per_endpoint,
    ring_lookup,
    two_choices,
)

if TYPE_CHECKING:
    from meshling.snapshot.model import Cluster, Endpoint
    from meshling.telemetry.metrics import ClusterStats

log = logging.getLogger("meshling.proxy")

ROUND_ROBIN, RANDOM, LEAST_REQUEST, EWMA, RING_HASH = range(5)
_KINDS = {
    "round_robin": ROUND_ROBIN,
    "random": RANDOM,
    "least_request": LEAST_REQUEST,
    "ewma": EWMA,
    "ring_hash": RING_HASH,
}
# A failed request counts as an answer this slow (seconds) in the latency estimate, so an
# endpoint that fails fast does not look fast.
EWMA_FAILURE_RTT = 1.0


class Host:
    """One endpoint of a cluster, as the balancer, outlier detection and checks see it."""

    __slots__ = (
        "active",
        "endpoint",
        "estimate",
        "health",
        "last_check",
        "name",
        "outlier",
        "stamp",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        # the endpoint's name on a hash ring
        self.name = str(endpoint).encode()
        # requests in flight from this proxy (least request, ewma)
        self.active = 0
        # latency estimate in seconds, and when it was last updated (ewma)
        self.estimate = 0.0
        self.stamp = 0.0
        self.outlier = OutlierState()
        self.health = HealthState()
        # when the last active check of it started (a new checker continues the rhythm)
        self.last_check = 0.0

    def __repr__(self) -> str:
        return f"Host({self.endpoint})"


class HostGroup:
    """The hosts of one cluster name, shared by every snapshot's runtime of the cluster."""

    __slots__ = ("generation", "hosts", "name", "stats")

    def __init__(self, name: str, stats: ClusterStats) -> None:
        self.name = name
        self.stats = stats
        self.hosts: dict[Endpoint, Host] = {}
        # bumped by every change to which hosts are usable; balancers compare it
        self.generation = 0

    def sync(self, endpoints: Iterable[Endpoint]) -> tuple[Host, ...]:
        """The hosts of these endpoints, existing ones kept with their state."""
        hosts = self.hosts
        found = []
        for endpoint in endpoints:
            host = hosts.get(endpoint)
            if host is None:
                host = hosts[endpoint] = Host(endpoint)
            found.append(host)
        return tuple(found)

    def retain(self, endpoints: Iterable[Endpoint]) -> None:
        """Forget the hosts of endpoints the running snapshot no longer has."""
        keep = set(endpoints)
        for endpoint, host in list(self.hosts.items()):
            if endpoint not in keep:
                del self.hosts[endpoint]
                if host.outlier.ejected_until:
                    self.stats.ejections_active -= 1
        self.generation += 1

    def tick(self, now: float) -> None:
        """Bring back ejected hosts whose time is up, even if no request comes to notice."""
        for host in self.hosts.values():
            if due_back(host.outlier, now):
                self.restore(host, now)

    def restore(self, host: Host, now: float) -> None:
        restore(host.outlier, now)
        self.stats.ejections_active -= 1
        self.generation += 1
        log.info("outlier detection: %s of cluster %s is back", host.endpoint, self.name)


class HostRegistry:
    """Every cluster's hosts, by cluster name, for as long as the cluster runs."""

    def __init__(self) -> None:
        self.groups: dict[str, HostGroup] = {}

    def group(self, name: str, stats: ClusterStats) -> HostGroup:
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = HostGroup(name, stats)
        return group

    def retain(self, clusters: dict[str, Cluster]) -> None:
        """After a snapshot is applied: drop what it no longer has."""
        for name in list(self.groups):
            cluster = clusters.get(name)
            if cluster is None:
                self.groups[name].retain(())
                del self.groups[name]
            else:
                self.groups[name].retain(cluster.endpoints)

    def tick(self, now: float) -> None:
        for group in self.groups.values():
            group.tick(now)


class Balancer:
    """One snapshot's endpoint choice for one cluster."""

    __slots__ = (
        "_cookie",
        "_generation",
        "_header",
        "_next",
        "_next_return",
        "_owners",
        "_points",
        "_ring_hosts",
        "available",
        "clock",
        "decay",
        "group",
        "health_check",
        "hosts",
        "kind",
        "outlier",
        "ring_size",
        "rnd",
        "stats",
        "zone",
    )

    def __init__(
        self,
        config: Cluster,
        group: HostGroup,
        zone: str | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rnd: Callable[[], float] = random.random,
    ) -> None:
        self.group = group
        self.stats = group.stats
        self.hosts = group.sync(config.endpoints)
        self.clock = clock
        self.rnd = rnd
        lb = config.load_balancing
        self.kind = _KINDS[lb.policy] if lb is not None else ROUND_ROBIN
        self.decay = lb.decay if lb is not None else 10.0
        self.ring_size = lb.ring_size if lb is not None else 1024
        hash_on = lb.hash_on if lb is not None else None
        self._header = hash_on.header.encode() if hash_on and hash_on.header else None
        self._cookie = hash_on.cookie.encode() if hash_on and hash_on.cookie else None
        # only with prefer_local_zone, and only if the proxy knows its zone
        self.zone = zone if lb is not None and lb.prefer_local_zone else None
        cb = config.circuit_breaker
        self.outlier = cb.outlier_detection if cb is not None else None
        self.health_check = config.health_check
        self.available: tuple[Host, ...] = ()
        self._generation = -1  # the first pick computes `available`
        self._next_return = 0.0  # when the first ejection ends; 0.0: none
        self._next = 0
        self._ring_hosts: tuple[Host, ...] | None = None
        self._points: list[int] = []
        self._owners: list[int] = []

    # -- choice ------------------------------------------------------------------------
    def pick(
        self, headers: Sequence[tuple[bytes, bytes]] | None = None, peer: bytes = b""
    ) -> Host | None:
        """The host for a request (its headers) or connection (the client's address)."""
        if self._generation != self.group.generation or (
            self._next_return and self.clock() >= self._next_return
        ):
            self._refresh()
        available = self.available
        n = len(available)
        if n == 0:
            return None
        kind = self.kind
        if kind == ROUND_ROBIN:
            i = self._next
            if i >= n:
                i = 0
            self._next = i + 1
            return available[i]
        if n == 1:
            return available[0]
        if kind == LEAST_REQUEST:
            # p2c(), inlined: this runs for every request
            i, j = two_choices(n, self.rnd)
            a, b = available[i], available[j]
            return b if b.active < a.active else a
        if kind == EWMA:
            now = self.clock()
            decay = self.decay
            i, j = two_choices(n, self.rnd)
            a, b = available[i], available[j]
            cost_a = ewma_cost(a.estimate, a.stamp, now, decay, a.active)
            return b if ewma_cost(b.estimate, b.stamp, now, decay, b.active) < cost_a else a
        if kind == RING_HASH:
            return self._ring_pick(available, headers, peer)
        return available[int(self.rnd() * n)]

    def pick_other(self, tried: Collection[Endpoint]) -> Host | None:
        """The host for a retry: the balancer's choice unless that endpoint was already
        tried by this request, then the least busy of the usable ones not tried yet (two
        random choices would keep drawing a fast-failing endpoint, the one with least in
        flight). When every usable endpoint was tried, the balancer's choice."""
        host = self.pick()
        if host is None or host.endpoint not in tried:
            return host
        others = [h for h in self.available if h.endpoint not in tried]
        if not others:
            return host
        if self.kind in (LEAST_REQUEST, EWMA):
            return min(others, key=lambda h: h.active)
        return others[int(self.rnd() * len(others))]

    def _ring_pick(
        self,
        available: tuple[Host, ...],
        headers: Sequence[tuple[bytes, bytes]] | None,
        peer: bytes,
    ) -> Host:
        if self._header is not None:
            key = header_value(headers, self._header) if headers is not None else None
        elif self._cookie is not None:
            key = cookie_value(headers, self._cookie) if headers is not None else None
        else:
            key = peer or None
        if key is None:
            # No key, no affinity: any endpoint will do, and the miss is counted.
            self.stats.hash_fallbacks += 1
            return available[int(self.rnd() * len(available))]
        return available[ring_lookup(self._points, self._owners, hash64(key))]

    # -- outcomes ----------------------------------------------------------------------
    def report(self, host: Host, status: int, error: str | None, latency: float) -> None:
        """The outcome of one request (or connection) to a host: `status` as the client
        got it, the proxy's own `error` if any, `latency` in seconds."""
        outlier = self.outlier
        if (
            outlier is not None
            and self.kind != EWMA
            and error is None
            and status < 500
            and status != 499
            and status != 0
        ):
            # `classify` says SUCCESS and `record` resets the counts in a row, inlined:
            # this is nearly every request. (An ejected host's counts are already zero.)
            state = host.outlier
            if state.consecutive_5xx:
                state.consecutive_5xx = 0
            if state.consecutive_gateway:
                state.consecutive_gateway = 0
            return
        if self.kind == EWMA or outlier is not None:
            outcome = classify(status, error)
            if self.kind == EWMA and outcome in (SUCCESS, GATEWAY_FAILURE):
                now = self.clock()
                rtt = latency if outcome == SUCCESS else max(latency, EWMA_FAILURE_RTT)
                host.estimate = ewma_observe(host.estimate, host.stamp, rtt, now, self.decay)
                host.stamp = now
            # an ejected host's late answers are not held against it again
            if (
                outlier is not None
                and not host.outlier.ejected_until
                and record(host.outlier, outcome, outlier)
            ):
                self._eject(host)

    def _eject(self, host: Host) -> None:
        outlier = self.outlier
        assert outlier is not None
        stats = self.stats
        ejected = sum(1 for h in self.hosts if h.outlier.ejected_until)
        if not may_eject(ejected, len(self.hosts), outlier.max_ejection_percent):
            stats.ejections_skipped += 1
            return
        failures = host.outlier.consecutive_5xx
        duration = eject(host.outlier, self.clock(), outlier)
        stats.ejections_total += 1
        stats.ejections_active += 1
        self.group.generation += 1
        log.warning(
            "outlier detection: %s of cluster %s ejected for %.1fs after %d failures in a row",
            host.endpoint,
            self.group.name,
            duration,
            failures,
        )

    # -- the usable hosts ----------------------------------------------------------------
    def _refresh(self) -> None:
        now = self.clock()
        hosts = self.hosts
        group = self.group
        next_return = 0.0
        for host in hosts:
            until = host.outlier.ejected_until
            if until:
                if until <= now:
                    group.restore(host, now)
                elif not next_return or until < next_return:
                    next_return = until
        check = self.health_check
        usable = [
            h for h in hosts if not h.outlier.ejected_until and (check is None or h.health.healthy)
        ]
        # Too few usable endpoints (below the panic threshold, or none at all): use them
        # all rather than overload the few or fail every request.
        in_panic = panic(len(usable), len(hosts), check.panic_threshold if check else 0)
        candidates: Sequence[Host] = hosts if in_panic else usable
        self.stats.panic = int(in_panic)
        zone = self.zone
        if zone is not None:
            local = [h for h in candidates if h.endpoint.zone == zone]
            candidates = local or candidates
        self.available = tuple(candidates)
        self._generation = group.generation
        self._next_return = next_return
        if self.kind == RING_HASH and self.available != self._ring_hosts:
            self._ring_hosts = self.available
            self._points, self._owners = build_ring(
                [h.name for h in self.available],
                points_per_endpoint(self.ring_size, len(hosts)),
            )
