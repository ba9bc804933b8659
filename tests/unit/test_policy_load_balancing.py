"""LoadBalancing: resource validation, the cluster fragment (golden files), and the
pickers, latency estimate and hash ring with seeded randomness and a fake clock.

Golden files live in `src/meshling/policies/load_balancing/testdata/`: each
`<case>.resource.yaml` converts into `<case>.fragment.yaml`. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite the fragments after a deliberate change.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import policy_type
from meshling.policies.load_balancing import HashOn, LoadBalancingConfig, fragment, parse_resource
from meshling.policies.load_balancing.decide import (
    build_ring,
    cookie_value,
    ewma_cost,
    ewma_observe,
    hash64,
    header_value,
    p2c,
    points_per_endpoint,
    ring_lookup,
    two_choices,
)
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import from_dict

TESTDATA = (
    Path(__file__).parents[2] / "src" / "meshling" / "policies" / "load_balancing" / "testdata"
)
CASES = sorted(p.name.split(".")[0] for p in TESTDATA.glob("*.resource.yaml"))


def resource(conf: Any) -> dict[str, Any]:
    return {
        "kind": "LoadBalancing",
        "metadata": {"name": "lb", "mesh": "default"},
        "spec": {
            "sources": [{"service": "*"}],
            "destinations": [{"service": "api"}],
            "conf": conf,
        },
    }


def snapshot_with(fragment_doc: Any, **extra: Any) -> dict[str, Any]:
    return {
        "version": "1",
        "listeners": [{"name": "in", "port": 0, "filter_chains": [{"tcp": {"cluster": "api"}}]}],
        "clusters": [
            {
                "name": "api",
                "endpoints": [{"address": "127.0.0.1", "port": 8080, "zone": "eu-1a"}],
                "load_balancing": fragment_doc,
            }
        ],
        **extra,
    }


@pytest.mark.parametrize("case", CASES)
def test_fragment_matches_golden(case: str) -> None:
    document = yaml.safe_load((TESTDATA / f"{case}.resource.yaml").read_text())
    got = fragment(parse_resource(document, f"{case}.resource.yaml"))
    golden = TESTDATA / f"{case}.fragment.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = f"# fragment({case}.resource.yaml): clusters[].load_balancing\n"
        golden.write_text(header + yaml.safe_dump(got, sort_keys=False))
    assert got == yaml.safe_load(golden.read_text())


@pytest.mark.parametrize("case", CASES)
def test_snapshot_loader_reads_golden_fragment(case: str) -> None:
    golden = yaml.safe_load((TESTDATA / f"{case}.fragment.yaml").read_text())
    config = from_dict(snapshot_with(golden)).clusters["api"].load_balancing
    assert config is not None
    assert config.to_dict() == golden
    document = yaml.safe_load((TESTDATA / f"{case}.resource.yaml").read_text())
    assert config == parse_resource(document, "x").conf


def test_registry_places_fragment_under_the_cluster() -> None:
    policy = policy_type("LoadBalancing")
    assert policy is not None
    assert (policy.attach, policy.key, policy.fragment) == ("cluster", "load_balancing", fragment)


def test_snapshot_zone_and_endpoint_zone() -> None:
    snapshot = from_dict(snapshot_with({"policy": "random"}, zone="eu-1a"))
    assert snapshot.zone == "eu-1a"
    assert snapshot.clusters["api"].endpoints[0].zone == "eu-1a"
    with pytest.raises(SnapshotError) as err:
        from_dict(snapshot_with({}, zone="no spaces"))
    assert err.value.path == "zone"


def test_hash_on_forms() -> None:
    def conf(hash_on: Any) -> LoadBalancingConfig:
        return parse_resource(resource({"policy": "ring_hash", "hash_on": hash_on}), "x").conf

    assert conf({"header": "X-User"}).hash_on == HashOn(header="x-user")
    assert conf({"cookie": "session"}).hash_on == HashOn(cookie="session")
    assert conf({"source_ip": True}).hash_on == HashOn(source_ip=True)


@pytest.mark.parametrize(
    ("conf", "path", "words"),
    [
        ({"policy": "fastest"}, "spec.conf.policy", "must be one of"),
        ({"policy": "maglev"}, "spec.conf.policy", "ring_hash"),
        ({"policy": "ring_hash"}, "spec.conf.hash_on", "needs a key"),
        ({"policy": "ring_hash", "hash_on": {}}, "spec.conf.hash_on", "exactly one"),
        (
            {"policy": "ring_hash", "hash_on": {"header": "a", "cookie": "b"}},
            "spec.conf.hash_on",
            "exactly one",
        ),
        (
            {"policy": "ring_hash", "hash_on": {"header": "bad header"}},
            "spec.conf.hash_on.header",
            "invalid header",
        ),
        (
            {"policy": "ring_hash", "hash_on": {"source_ip": False}},
            "spec.conf.hash_on.source_ip",
            "selects no key",
        ),
        (
            {"policy": "ring_hash", "hash_on": {"source_ip": True}, "ring_size": 0},
            "spec.conf.ring_size",
            "out of range",
        ),
        ({"policy": "random", "hash_on": {"header": "a"}}, "spec.conf.hash_on", "only used"),
        ({"policy": "least_request", "decay": "5s"}, "spec.conf.decay", "only used"),
        ({"policy": "ewma", "decay": "-5s"}, "spec.conf.decay", "duration"),
        ({"policy": "ewma", "decay": 0}, "spec.conf.decay", "longer than 0"),
        ({"prefer_local_zone": "yes"}, "spec.conf.prefer_local_zone", "true or false"),
    ],
)
def test_bad_conf_names_the_field(conf: Any, path: str, words: str) -> None:
    with pytest.raises(SnapshotError) as err:
        parse_resource(resource(conf), "lb.yaml")
    assert err.value.path == path
    assert words in err.value.reason


def test_snapshot_errors_name_the_cluster_field() -> None:
    with pytest.raises(SnapshotError) as err:
        from_dict(snapshot_with({"policy": "ring_hash"}))
    assert err.value.path == "clusters[0].load_balancing.hash_on"


# -- pickers


def test_two_choices_are_distinct_and_uniform() -> None:
    rnd = random.Random(1).random
    seen: Counter[tuple[int, int]] = Counter()
    for _ in range(30000):
        i, j = two_choices(4, rnd)
        assert i != j
        seen[(min(i, j), max(i, j))] += 1
    assert len(seen) == 6
    assert all(4000 < n < 6000 for n in seen.values())  # 5000 each


def test_p2c_prefers_the_cheaper_of_two() -> None:
    rnd = random.Random(7).random
    load = {"a": 0, "b": 5, "c": 10}
    picks = Counter(p2c(["a", "b", "c"], rnd, load.__getitem__) for _ in range(9000))
    # "c" loses every pair it is in; "a" wins every pair it is in (2 of 3 pairs)
    assert picks["c"] == 0
    assert 5500 < picks["a"] < 6500 and 2500 < picks["b"] < 3500


def test_ewma_is_peak_sensitive_and_decays() -> None:
    assert ewma_observe(0.01, 0.0, 0.5, 1.0, 10.0) == 0.5  # a slow answer counts at once
    slower = ewma_observe(0.5, 0.0, 0.01, 1.0, 10.0)  # a fast one pulls down slowly
    assert 0.45 < slower < 0.5
    much_later = ewma_observe(0.5, 0.0, 0.01, 100.0, 10.0)
    assert much_later == pytest.approx(0.01, abs=1e-4)
    # the cost decays towards zero with time since the last answer, times load
    assert ewma_cost(0.5, 0.0, 0.0, 10.0, 0) == 0.5
    assert ewma_cost(0.5, 0.0, 0.0, 10.0, 3) == 2.0
    assert ewma_cost(0.5, 0.0, 100.0, 10.0, 0) < 0.001
    # without an estimate, requests in flight still count
    assert ewma_cost(0.0, 0.0, 0.0, 10.0, 2) > ewma_cost(0.0, 0.0, 0.0, 10.0, 0)


def test_hash64_is_stable() -> None:
    # the same on every proxy and in every process
    assert hash64(b"user-42") == 12029086546990375023
    assert hash64(b"user-42") != hash64(b"user-43")


def names(n: int) -> list[bytes]:
    return [b"10.0.0.%d:8080" % i for i in range(n)]


def test_ring_spreads_keys_evenly() -> None:
    points, owners = build_ring(names(4), points_per_endpoint(1024, 4))
    assert len(points) == 1024 and points == sorted(points)
    counts = Counter(ring_lookup(points, owners, hash64(b"k%d" % i)) for i in range(20000))
    assert all(3500 < n < 6500 for n in counts.values())  # 5000 each


def test_ring_moves_only_the_leaving_endpoints_keys() -> None:
    before = names(5)
    after = before[:2] + before[3:]  # endpoint 2 leaves
    # the points per endpoint come from the cluster's endpoints, and stay
    per = points_per_endpoint(1024, len(before))
    ring_before = build_ring(before, per)
    ring_after = build_ring(after, per)
    keys = [hash64(b"key-%d" % i) for i in range(10000)]
    moved = 0
    for key in keys:
        was = before[ring_lookup(*ring_before, key)]
        now = after[ring_lookup(*ring_after, key)]
        if was != now:
            moved += 1
            assert was == before[2]  # only the leaving endpoint's keys move
    assert 1000 < moved < 3000  # about 1/5 of them


def test_request_keys() -> None:
    headers = [(b"x-user", b"42"), (b"cookie", b"a=1; session=abc; b=2"), (b"x-user", b"43")]
    assert header_value(headers, b"x-user") == b"42"
    assert header_value(headers, b"x-other") is None
    assert cookie_value(headers, b"session") == b"abc"
    assert cookie_value(headers, b"sess") is None
    assert cookie_value([], b"session") is None
