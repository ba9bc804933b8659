"""Weighted clusters: the loader's checks and the per-request pick."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.model import WeightedClusters


def _snapshot(destination: dict[str, Any], tcp: bool = False) -> dict[str, Any]:
    clusters = [
        {"name": name, "endpoints": [{"address": "127.0.0.1", "port": 8080 + i}]}
        for i, name in enumerate(("a", "b", "c"))
    ]
    if tcp:
        chain: dict[str, Any] = {"tcp": destination}
    else:
        route = {"name": "r", **destination}
        vhost = {"name": "all", "domains": ["*"], "routes": [route]}
        chain = {"http": {"route_config": {"virtual_hosts": [vhost]}}}
    listener = {"name": "in", "port": 15001, "filter_chains": [chain]}
    return {"version": "1", "listeners": [listener], "clusters": clusters}


ROUTE = "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0].routes[0]"
TCP = "listeners[0].filter_chains[0].tcp"


def test_weighted_clusters_pick_follows_the_weights() -> None:
    split = WeightedClusters(("a", "b", "c"), (70, 20, 10))
    draw = random.Random(7).random
    counts = Counter(split.pick(draw) for _ in range(100_000))
    for name, share in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        assert counts[name] / 100_000 == pytest.approx(share, abs=0.01)


def test_weighted_clusters_weight_zero_is_never_picked() -> None:
    draws = [0.0, 0.2, 0.5, 0.999999]
    for weights, only in (((100, 0), "a"), ((0, 100), "b")):
        split = WeightedClusters(("a", "b"), weights)
        assert {split.pick(lambda d=d: d) for d in draws} == {only}
    middle = WeightedClusters(("a", "b", "c"), (50, 0, 50))
    assert {middle.pick(lambda d=d: d) for d in draws} == {"a", "c"}


@pytest.mark.parametrize("tcp", [False, True])
def test_weighted_clusters_load_into_the_route_and_tcp_filter(tcp: bool) -> None:
    weighted = [{"cluster": "a", "weight": 90}, {"cluster": "b", "weight": 10}]
    snapshot = from_dict(_snapshot({"weighted_clusters": weighted}, tcp), "s.yaml")
    chain = snapshot.listeners[0].filter_chains[0]
    if tcp:
        assert chain.tcp is not None
        target = chain.tcp.cluster, chain.tcp.weighted
    else:
        assert chain.http is not None
        route = chain.http.route_config.virtual_hosts[0].routes[0]
        target = route.cluster, route.weighted
    assert target == ("a", WeightedClusters(("a", "b"), (90, 10)))


@pytest.mark.parametrize(
    ("destination", "field", "reason"),
    [
        ({}, "", "give exactly one of cluster, weighted_clusters"),
        (
            {"cluster": "a", "weighted_clusters": [{"cluster": "a", "weight": 1}]},
            "",
            "exactly one of",
        ),
        ({"weighted_clusters": []}, ".weighted_clusters", "at least one cluster"),
        (
            {"weighted_clusters": [{"cluster": "x", "weight": 1}]},
            ".weighted_clusters[0].cluster",
            "unknown cluster 'x'",
        ),
        (
            {"weighted_clusters": [{"cluster": "a", "weight": -1}]},
            ".weighted_clusters[0].weight",
            "out of range",
        ),
        (
            {"weighted_clusters": [{"cluster": "a"}]},
            ".weighted_clusters[0].weight",
            "required field is missing",
        ),
        (
            {"weighted_clusters": [{"cluster": "a", "weight": 1}, {"cluster": "a", "weight": 2}]},
            ".weighted_clusters[1].cluster",
            "listed twice",
        ),
        (
            {"weighted_clusters": [{"cluster": "a", "weight": 0}, {"cluster": "b", "weight": 0}]},
            ".weighted_clusters",
            "every weight is 0",
        ),
        (
            {"weighted_clusters": [{"cluster": "a", "weight": 1, "share": 2}]},
            ".weighted_clusters[0].share",
            "unknown field",
        ),
    ],
)
@pytest.mark.parametrize("tcp", [False, True])
def test_weighted_clusters_invalid_field_is_named(
    destination: dict[str, Any], field: str, reason: str, tcp: bool
) -> None:
    with pytest.raises(SnapshotError) as info:
        from_dict(_snapshot(destination, tcp), "s.yaml")
    assert info.value.path == (TCP if tcp else ROUTE) + field
    assert reason in info.value.reason
