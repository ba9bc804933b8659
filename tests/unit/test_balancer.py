"""The proxy's balancer: usable endpoints under outlier detection, health and zones,
and the pickers over them, on a fake clock with seeded randomness."""

from __future__ import annotations

import random
from collections import Counter

from meshling.policies.circuit_breaker import CircuitBreakerConfig, OutlierDetection
from meshling.policies.health_check import HealthCheckConfig
from meshling.policies.health_check.decide import HealthState
from meshling.policies.load_balancing import HashOn, LoadBalancingConfig
from meshling.proxy.balancer import Balancer, HostGroup, HostRegistry
from meshling.snapshot.model import Cluster, Endpoint
from meshling.telemetry.metrics import ClusterStats


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def endpoints(n: int, zones: tuple[str | None, ...] = ()) -> tuple[Endpoint, ...]:
    return tuple(
        Endpoint(f"10.0.0.{i}", 8080, zones[i] if i < len(zones) else None) for i in range(n)
    )


def balancer(
    n: int = 3,
    *,
    lb: LoadBalancingConfig | None = None,
    outlier: OutlierDetection | None = None,
    health: HealthCheckConfig | None = None,
    zones: tuple[str | None, ...] = (),
    zone: str | None = None,
    group: HostGroup | None = None,
    clock: Clock | None = None,
    seed: int = 1,
) -> Balancer:
    config = Cluster(
        "api",
        endpoints(n, zones),
        circuit_breaker=CircuitBreakerConfig(outlier_detection=outlier) if outlier else None,
        health_check=health,
        load_balancing=lb,
    )
    return Balancer(
        config,
        group or HostGroup("api", ClusterStats()),
        zone,
        clock=clock or Clock(),
        rnd=random.Random(seed).random,
    )


def addresses(b: Balancer, n: int = 6) -> list[str]:
    picks = []
    for _ in range(n):
        host = b.pick()
        assert host is not None
        picks.append(host.endpoint.address)
    return picks


def test_balancer_round_robin_in_turn() -> None:
    assert addresses(balancer(3)) == ["10.0.0.0", "10.0.0.1", "10.0.0.2"] * 2


def test_balancer_no_endpoints_picks_none() -> None:
    assert balancer(0).pick() is None


def test_balancer_random_is_uniform() -> None:
    b = balancer(4, lb=LoadBalancingConfig(policy="random"))
    counts = Counter(addresses(b, 8000))
    assert all(1700 < n < 2300 for n in counts.values())


def test_balancer_least_request_avoids_busy_hosts() -> None:
    b = balancer(3, lb=LoadBalancingConfig(policy="least_request"))
    b.hosts[0].active = 10  # busy
    counts = Counter(addresses(b, 3000))
    assert counts["10.0.0.0"] == 0
    assert 1200 < counts["10.0.0.1"] < 1800


def test_balancer_ewma_prefers_the_fast_host() -> None:
    clock = Clock()
    b = balancer(2, lb=LoadBalancingConfig(policy="ewma"), clock=clock)
    fast, slow = b.hosts
    for _ in range(5):
        b.report(fast, 200, None, 0.002)
        b.report(slow, 200, None, 0.200)
        clock.now += 0.1
    counts = Counter(addresses(b, 100))
    assert counts == {"10.0.0.0": 100}
    # under load the fast host's cost grows with its requests in flight
    fast.active = 200
    assert b.pick() is slow


def test_balancer_ewma_counts_failures_as_slow() -> None:
    clock = Clock()
    b = balancer(2, lb=LoadBalancingConfig(policy="ewma"), clock=clock)
    failing, ok = b.hosts
    b.report(failing, 502, "upstream_connect_failure", 0.0001)
    b.report(ok, 200, None, 0.05)
    assert addresses(b, 10) == ["10.0.0.1"] * 10


def test_balancer_outlier_ejects_and_returns_after_the_ejection_time() -> None:
    clock = Clock()
    outlier = OutlierDetection(consecutive_5xx=3, base_ejection_time=30.0, max_ejection_percent=50)
    b = balancer(3, outlier=outlier, clock=clock)
    bad = b.hosts[1]
    for _ in range(3):
        b.report(bad, 500, None, 0.01)
    assert b.stats.ejections_total == 1 and b.stats.ejections_active == 1
    assert "10.0.0.1" not in addresses(b, 10)
    clock.now += 29.9
    assert "10.0.0.1" not in addresses(b, 10)
    clock.now += 0.2
    assert "10.0.0.1" in addresses(b, 3)
    assert b.stats.ejections_active == 0
    # a second offence soon after: twice as long
    for _ in range(3):
        b.report(bad, 503, None, 0.01)
    assert bad.outlier.ejected_until == clock.now + 60.0


def test_balancer_outlier_never_ejects_more_than_max_percent() -> None:
    outlier = OutlierDetection(consecutive_5xx=1, max_ejection_percent=50)
    b = balancer(4, outlier=outlier)
    for host in b.hosts:
        b.report(host, 500, None, 0.01)
    assert b.stats.ejections_active == 2
    assert b.stats.ejections_skipped == 2
    assert len({a for a in addresses(b, 8)}) == 2


def test_balancer_outlier_ignores_neutral_outcomes_and_success_resets() -> None:
    b = balancer(2, outlier=OutlierDetection(consecutive_5xx=2))
    host = b.hosts[0]
    b.report(host, 500, None, 0.01)
    b.report(host, 503, "circuit_breaker_max_connections", 0.0)
    b.report(host, 499, None, 0.01)
    b.report(host, 200, None, 0.01)
    b.report(host, 500, None, 0.01)
    assert b.stats.ejections_total == 0


def test_host_group_tick_returns_ejected_hosts_without_traffic() -> None:
    clock = Clock()
    registry = HostRegistry()
    stats = ClusterStats()
    group = registry.group("api", stats)
    b = balancer(2, outlier=OutlierDetection(consecutive_5xx=1), group=group, clock=clock)
    b.report(b.hosts[0], 500, None, 0.01)
    assert stats.ejections_active == 1
    registry.tick(clock.now + 31.0)
    assert stats.ejections_active == 0
    assert b.hosts[0].outlier.ejected_until == 0.0


def test_balancer_unhealthy_hosts_leave_and_panic_brings_them_back() -> None:
    health = HealthCheckConfig(panic_threshold=50)
    b = balancer(4, health=health)
    b.hosts[0].health = HealthState(healthy=False, fresh=False)
    b.group.generation += 1  # as the checker does on a change
    assert "10.0.0.0" not in addresses(b, 9)
    assert b.stats.panic == 0
    for host in b.hosts[1:3]:
        host.health = HealthState(healthy=False, fresh=False)
    b.group.generation += 1
    # one of four usable (25% < 50%): panic, every host takes traffic
    assert set(addresses(b, 8)) == {"10.0.0.0", "10.0.0.1", "10.0.0.2", "10.0.0.3"}
    assert b.stats.panic == 1


def test_balancer_ignores_health_without_a_health_check() -> None:
    b = balancer(2)
    b.hosts[0].health = HealthState(healthy=False, fresh=False)
    assert "10.0.0.0" in addresses(b, 2)


def test_balancer_prefers_the_local_zone_while_it_is_usable() -> None:
    zones = ("a", "b", "a", "b")
    lb = LoadBalancingConfig(prefer_local_zone=True)
    b = balancer(4, lb=lb, zones=zones, zone="b", outlier=OutlierDetection(consecutive_5xx=1))
    assert set(addresses(b, 8)) == {"10.0.0.1", "10.0.0.3"}
    b.report(b.hosts[1], 500, None, 0.0)
    assert set(addresses(b, 8)) == {"10.0.0.3"}
    b.report(b.hosts[3], 500, None, 0.0)  # the zone is out: the others take over
    assert set(addresses(b, 8)) == {"10.0.0.0", "10.0.0.2"}
    # without prefer_local_zone, zones do not matter
    b = balancer(4, zones=zones, zone="b")
    assert len(set(addresses(b, 8))) == 4


def test_balancer_ring_hash_is_sticky_and_falls_back_when_the_key_is_missing() -> None:
    lb = LoadBalancingConfig(policy="ring_hash", hash_on=HashOn(header="x-user"))
    b = balancer(5, lb=lb)
    for user in (b"alice", b"bob", b"carol"):
        first = b.pick([(b"x-user", user)])
        assert all(b.pick([(b"x-user", user)]) is first for _ in range(20))
    assert b.stats.hash_fallbacks == 0
    assert b.pick([(b"x-other", b"1")]) is not None
    assert b.pick(None) is not None
    assert b.stats.hash_fallbacks == 2


def test_balancer_ring_hash_moves_only_the_ejected_hosts_keys() -> None:
    lb = LoadBalancingConfig(policy="ring_hash", hash_on=HashOn(cookie="s"))
    b = balancer(5, lb=lb, outlier=OutlierDetection(consecutive_5xx=1))

    def owners() -> list[Endpoint]:
        picks = []
        for i in range(3000):
            host = b.pick([(b"cookie", b"s=%d" % i)])
            assert host is not None
            picks.append(host.endpoint)
        return picks

    before = owners()
    gone = b.hosts[2]
    b.report(gone, 500, None, 0.0)
    after = owners()
    moved = [i for i in range(3000) if before[i] != after[i]]
    assert all(before[i] == gone.endpoint for i in moved)
    assert 300 < len(moved) < 900  # about a fifth


def test_balancer_ring_hash_on_source_ip() -> None:
    lb = LoadBalancingConfig(policy="ring_hash", hash_on=HashOn(source_ip=True))
    b = balancer(4, lb=lb)
    first = b.pick(None, b"192.0.2.7")
    assert all(b.pick(None, b"192.0.2.7") is first for _ in range(10))


def test_host_state_survives_a_new_snapshot_and_removed_hosts_are_forgotten() -> None:
    registry = HostRegistry()
    stats = ClusterStats()
    group = registry.group("api", stats)
    outlier = OutlierDetection(consecutive_5xx=1)
    old = balancer(3, outlier=outlier, group=group)
    old.report(old.hosts[0], 500, None, 0.0)
    new = balancer(3, group=group, outlier=outlier)
    assert new.hosts[0] is old.hosts[0] and new.hosts[0].outlier.ejected_until
    assert "10.0.0.0" not in addresses(new, 4)
    registry.retain({"api": Cluster("api", endpoints(3)[1:])})
    assert stats.ejections_active == 0
    assert set(group.hosts) == set(endpoints(3)[1:])
    registry.retain({})
    assert registry.groups == {}
