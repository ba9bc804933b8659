"""RateLimit: token buckets and the global lease on a fake clock, resource and fragment
validation, the conversion to the `rate_limit:` fragment (golden files), and the rules'
order by caller.

Golden files live in `src/meshling/policies/rate_limit/testdata/`: `<case>.policies.yaml`
holds resources, `<case>.<dataplane>.rate_limit.yaml` the `fragment(resources, "default",
dataplane)` output for the dataplanes of `DATAPLANES`. Run with MESHLING_UPDATE_GOLDEN=1
to rewrite the outputs after a deliberate change, then read the diff.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import policy_type
from meshling.policies.rate_limit import (
    RateLimit,
    RateLimitConfig,
    fragment,
    parse_resource,
)
from meshling.policies.rate_limit.decide import Buckets, GlobalLease, TokenBucket, retry_after
from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.load import _Node

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "policies" / "rate_limit" / "testdata"
DATAPLANES: dict[str, tuple[str, dict[str, str]]] = {
    "api-v2": ("api", {"version": "v2"}),
    "api-v1": ("api", {"version": "v1"}),
    "db": ("db", {}),
}


def load(case: str) -> list[RateLimit]:
    path = TESTDATA / f"{case}.policies.yaml"
    return [parse_resource(doc, str(path)) for doc in yaml.safe_load_all(path.read_text())]


# -- the token bucket ------------------------------------------------------------------
def test_token_bucket_starts_full_and_spends_one_token_a_request() -> None:
    bucket = TokenBucket(rate=10.0, capacity=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.remaining() == 0
    assert bucket.wait() == pytest.approx(0.1)


def test_token_bucket_refills_at_its_rate_up_to_its_capacity() -> None:
    bucket = TokenBucket(rate=10.0, capacity=3, now=0.0)
    for _ in range(3):
        bucket.take(0.0)
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)
    assert not bucket.take(0.1)
    # a long quiet spell fills it to capacity, no further
    assert [bucket.take(60.0) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_admits_the_rate_over_time() -> None:
    bucket = TokenBucket(rate=100.0, capacity=1, now=0.0)
    admitted = sum(bucket.take(i * 0.001) for i in range(10_000))  # 1000/s for 10 s
    assert admitted == pytest.approx(1000, abs=2)


def test_buckets_keep_one_bucket_per_source() -> None:
    buckets = Buckets(rate=1.0, capacity=2)
    web = buckets.get("spiffe://default/web", 0.0)
    assert web.take(0.0) and web.take(0.0) and not web.take(0.0)
    billing = buckets.get("spiffe://default/billing", 0.0)
    assert billing.take(0.0)  # a bucket of its own
    assert buckets.get("spiffe://default/web", 0.0) is web


def test_buckets_are_bounded_dropping_the_least_recently_used() -> None:
    buckets = Buckets(rate=1.0, capacity=1, size=3)
    first = buckets.get("a", 0.0)
    buckets.get("b", 0.0)
    buckets.get("c", 0.0)
    assert buckets.get("a", 0.0) is first  # used: now the most recent
    buckets.get("d", 0.0)  # drops b
    assert len(buckets) == 3
    assert set(buckets.buckets) == {"a", "c", "d"}
    for i in range(10_000):
        buckets.get(f"flood-{i}", 0.0)
    assert len(buckets) == 3


def test_retry_after_rounds_up_to_whole_seconds_at_least_one() -> None:
    assert [retry_after(s) for s in (0.0, 0.01, 1.0, 1.2, 59.9)] == [1, 1, 1, 2, 60]


# -- the global lease --------------------------------------------------------------------
def test_global_lease_waits_for_the_first_lease_then_spends_it_locally() -> None:
    lease = GlobalLease(batch=5, ttl=1.0)
    assert lease.take(0.0) == "wait"
    assert lease.want(0.0) == 5
    assert lease.want(0.0) == 0  # one lease request at a time
    assert lease.take(0.0) == "wait"
    assert lease.granted(5, 0.0, 0.001) == (2, 0)
    assert [lease.take(0.002) for _ in range(3)] == ["admit"] * 3
    assert lease.tokens == 0
    # half a batch spent: the next lease is asked for while tokens are left
    lease.tokens = 2
    assert lease.want(0.003) == 5


def test_global_lease_refuses_without_asking_while_the_shared_bucket_is_empty() -> None:
    lease = GlobalLease(batch=5, ttl=1.0)
    lease.take(0.0)
    lease.take(0.0)
    lease.take(0.0)
    lease.want(0.0)
    # one token granted, the bucket has the next in 0.2 s: one waiter passes, two refused
    assert lease.granted(1, 0.2, 0.001) == (1, 2)
    assert lease.take(0.1) == "refuse"
    assert lease.reset_after(0.1) == pytest.approx(0.101)
    assert lease.want(0.1) == 0
    assert lease.take(0.25) == "wait"
    assert lease.want(0.25) == 5


def test_global_lease_tokens_expire() -> None:
    lease = GlobalLease(batch=5, ttl=1.0)
    lease.take(0.0)
    lease.want(0.0)
    lease.granted(5, 0.0, 0.0)
    assert lease.take(0.5) == "admit"
    assert lease.take(1.5) == "wait"  # leased a second ago: gone
    assert lease.tokens == 0


def test_global_lease_degrades_when_redis_fails_and_backs_off() -> None:
    lease = GlobalLease(batch=5, ttl=1.0, min_backoff=0.5, max_backoff=2.0)
    lease.take(0.0)
    lease.take(0.0)
    lease.want(0.0)
    assert lease.failed(0.1) == (2, True)  # the waiting requests pass; an outage starts
    assert lease.take(0.2) == "admit"  # the local limit alone
    assert lease.want(0.2) == 0  # not before the backoff
    assert lease.want(0.6) == 5
    assert lease.failed(0.7) == (0, False)  # the same outage
    assert lease.retry_at == pytest.approx(1.7)
    lease.want(1.7)
    lease.failed(1.8)
    lease.want(3.8)
    lease.failed(3.9)
    assert lease.retry_at == pytest.approx(5.9)  # capped at max_backoff
    lease.want(5.9)
    assert lease.granted(5, 0.0, 6.0) == (0, 0)
    assert not lease.degraded and lease.backoff == 0.5
    assert lease.take(6.0) == "admit"


# -- resources -------------------------------------------------------------------------------
def resource(conf: Any, **spec: Any) -> dict[str, Any]:
    return {
        "kind": "RateLimit",
        "metadata": {"name": "api-limit", "mesh": "default"},
        "spec": {
            "sources": [{"service": "*"}],
            "destinations": [{"service": "api"}],
            "conf": conf,
            **spec,
        },
    }


def test_parse_resource_reads_every_field() -> None:
    limit = parse_resource(
        resource(
            {
                "local": {"requests": 100, "interval": "1s", "burst": 150},
                "per_source": True,
                "global": {"redis": "redis://10.0.0.1:6380/2", "requests": 600, "interval": "1m"},
                "tcp": {"connections": 20, "interval": "500ms"},
            }
        ),
        "r.yaml",
    )
    conf = limit.conf
    assert conf.local is not None and (conf.local.count, conf.local.interval) == (100, 1.0)
    assert conf.local.burst == 150 and conf.per_source
    assert conf.tcp is not None and conf.tcp.burst == 20 and conf.tcp.interval == 0.5
    g = conf.global_limit
    assert g is not None and g.requests == 600 and g.interval == 60.0
    assert g.burst == 60 and g.key == "default/api-limit"  # defaults


BAD = [
    ({"local": {"requests": 5, "interval": "-1s"}}, "spec.conf.local.interval", "negative"),
    ({"local": {"requests": 5, "interval": -2}}, "spec.conf.local.interval", "negative"),
    ({"local": {"requests": 5, "interval": 0}}, "spec.conf.local.interval", "longer than zero"),
    ({"local": {"requests": 0, "interval": "1s"}}, "spec.conf.local.requests", "at least 1"),
    (
        {"local": {"requests": 5, "interval": "1s", "burst": 0}},
        "spec.conf.local.burst",
        "at least 1",
    ),
    ({"local": {"requests": 2.5, "interval": "1s"}}, "spec.conf.local.requests", "integer"),
    ({"local": {"requests": 5}}, "spec.conf.local.interval", "missing"),
    ({"local": {"requests": 5, "interval": "1s", "rate": 3}}, "spec.conf.local.rate", "unknown"),
    ({"tcp": {"requests": 5, "interval": "1s"}}, "spec.conf.tcp.requests", "unknown"),
    ({}, "spec.conf", "at least one of"),
    (
        {"per_source": True, "global": {"redis": "redis://h", "requests": 1, "interval": 1}},
        "spec.conf.global",
        "needs a local",
    ),
    (
        {"per_source": "yes", "local": {"requests": 1, "interval": 1}},
        "spec.conf.per_source",
        "true or false",
    ),
    (
        {
            "local": {"requests": 1, "interval": 1},
            "global": {"redis": "http://h:1", "requests": 1, "interval": 1},
        },
        "spec.conf.global.redis",
        "Redis URL",
    ),
    (
        {
            "local": {"requests": 1, "interval": 1},
            "global": {"redis": "redis://h:99999", "requests": 1, "interval": 1},
        },
        "spec.conf.global.redis",
        "out of range",
    ),
    (
        {
            "local": {"requests": 1, "interval": 1},
            "global": {"redis": "redis://h", "requests": 1, "interval": 1, "key": "a b"},
        },
        "spec.conf.global.key",
        "invalid key",
    ),
]


@pytest.mark.parametrize(("conf", "path", "reason"), BAD)
def test_parse_resource_rejects_nonsense_naming_the_field(
    conf: Any, path: str, reason: str
) -> None:
    with pytest.raises(SnapshotError) as err:
        parse_resource(resource(conf), "r.yaml")
    assert err.value.path == path
    assert reason in err.value.reason


def test_parse_resource_rejects_tag_sources_and_other_kinds() -> None:
    doc = resource({"local": {"requests": 1, "interval": 1}})
    doc["spec"]["sources"] = [{"service": "web", "tags": {"version": "v1"}}]
    with pytest.raises(SnapshotError) as err:
        parse_resource(doc, "r.yaml")
    assert err.value.path == "spec.sources[0].tags"
    doc = resource({"local": {"requests": 1, "interval": 1}})
    doc["kind"] = "FaultInjection"
    with pytest.raises(SnapshotError) as err:
        parse_resource(doc, "r.yaml")
    assert err.value.path == "kind"
    doc = resource({"local": {"requests": 1, "interval": 1}})
    del doc["spec"]["conf"]
    with pytest.raises(SnapshotError) as err:
        parse_resource(doc, "r.yaml")
    assert err.value.path == "spec.conf"


# -- the fragment ---------------------------------------------------------------------------
@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
def test_fragment_matches_golden(dataplane: str) -> None:
    golden = TESTDATA / f"api.{dataplane}.rate_limit.yaml"
    service, tags = DATAPLANES[dataplane]
    document = fragment(load("api"), "default", (service, tags))
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = f"# fragment(api.policies.yaml, 'default', dataplane=({service!r}, {tags!r}))\n"
        golden.write_text(header + yaml.safe_dump(document, sort_keys=False))
    assert document == yaml.safe_load(golden.read_text())


@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
def test_golden_fragments_load_and_round_trip(dataplane: str) -> None:
    document = yaml.safe_load((TESTDATA / f"api.{dataplane}.rate_limit.yaml").read_text())
    config = RateLimitConfig.from_dict(_Node("golden", "rate_limit", document))
    assert config.to_dict() == document


def test_fragment_orders_named_callers_before_anyone_and_splits_mixed_sources() -> None:
    config = RateLimitConfig.from_dict(
        _Node("x", "", fragment(load("api"), "default", ("api", {"version": "v2"})))
    )
    names = [(r.name, r.identities) for r in config.rules]
    assert names == [
        ("jobs", ("spiffe://default/batch", "spiffe://default/cron")),
        ("jobs", ("*",)),
        ("web-to-api", ("spiffe://default/web",)),
        ("everyone", ("*",)),
    ]
    # the most specific destination wins for web too: jobs' "*" holds it first
    rule = config.rule_for("spiffe://default/web")
    assert rule is not None and rule.name == "jobs"
    assert config.rule_for(None) is config.rules[1]  # plaintext: only "*" holds it
    v1 = RateLimitConfig.from_dict(
        _Node("x", "", fragment(load("api"), "default", ("api", {"version": "v1"})))
    )
    rule = v1.rule_for("spiffe://default/web")
    assert rule is not None and rule.name == "web-to-api"
    rule = v1.rule_for("spiffe://default/billing")
    assert rule is not None and rule.name == "everyone"


def test_fragment_in_a_snapshot_loads_and_bad_rules_name_their_field() -> None:
    doc = {
        "version": "1",
        "listeners": [
            {
                "name": "in",
                "port": 0,
                "filter_chains": [
                    {
                        "http": {
                            "route_config": {
                                "virtual_hosts": [{"name": "a", "domains": ["*"], "routes": []}]
                            }
                        },
                        "rate_limit": fragment(load("api"), "default", ("api", {"version": "v2"})),
                    }
                ],
            }
        ],
    }
    snapshot = from_dict(doc, "snap.yaml")
    chain = snapshot.listeners[0].filter_chains[0]
    assert chain.rate_limit is not None and len(chain.rate_limit.rules) == 4
    bad = copy.deepcopy(doc)
    bad["listeners"][0]["filter_chains"][0]["rate_limit"]["rules"][1]["local"]["requests"] = 7
    with pytest.raises(SnapshotError) as err:
        from_dict(bad, "snap.yaml")
    assert err.value.path == "listeners[0].filter_chains[0].rate_limit.rules[1].name"
    bad = copy.deepcopy(doc)
    bad["listeners"][0]["filter_chains"][0]["rate_limit"]["rules"][0]["identities"] = ["web"]
    with pytest.raises(SnapshotError) as err:
        from_dict(bad, "snap.yaml")
    assert err.value.path == "listeners[0].filter_chains[0].rate_limit.rules[0].identities[0]"


def test_registry_places_rate_limit_on_the_inbound_chain() -> None:
    policy = policy_type("RateLimit")
    assert policy is not None
    assert (policy.attach, policy.key, policy.fragment) == ("chain", "rate_limit", fragment)
