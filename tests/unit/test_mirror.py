"""Request mirroring: the route's `mirror` as the loader reads it, the HTTPRoute's as the
policy and the builder turn it into a route and a cluster, and the copy's decisions (the
draw, the limits, the bytes it sends) without sockets."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest

from meshling.controlplane.builder import build
from meshling.http1.codec import RequestHead
from meshling.policies import http_route
from meshling.policies.backends import Backend
from meshling.proxy import mirror
from meshling.proxy.mirror import BODY_LIMIT, MAX_ACTIVE, MirrorCopy, copy_head, shadow_authority
from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.model import Endpoint, RequestMirror, Route
from meshling.telemetry.metrics import Metrics, MirrorStats

from .test_builder_policies import cluster, load, named, tls_paths
from .test_snapshot import base

ROUTE = "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0].routes[0]"


def _load_route(**fields: Any) -> Route:
    document = base()
    document["clusters"].append(
        {"name": "shadow", "endpoints": [{"address": "127.0.0.1", "port": 9090}]}
    )
    route_config = document["listeners"][0]["filter_chains"][0]["http"]["route_config"]
    route_config["virtual_hosts"][0]["routes"] = [{"name": "r", **fields}]
    snapshot = from_dict(document, "mesh.yaml")
    http = snapshot.listeners[0].filter_chains[0].http
    assert http is not None
    return http.route_config.virtual_hosts[0].routes[0]


# -- the snapshot


def test_mirror_loads_with_every_request_by_default() -> None:
    assert _load_route(cluster="c").mirror is None
    route = _load_route(cluster="c", mirror={"cluster": "shadow"})
    assert route.mirror == RequestMirror("shadow", 100.0)
    route = _load_route(
        weighted_clusters=[{"cluster": "c", "weight": 1}], mirror={"cluster": "c", "percent": 12.5}
    )
    assert route.mirror == RequestMirror("c", 12.5)
    assert _load_route(cluster="c", mirror={"cluster": "shadow", "percent": 0}).mirror == (
        RequestMirror("shadow", 0.0)
    )


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        (
            {"cluster": "c", "mirror": {"cluster": "nope"}},
            f"{ROUTE}.mirror.cluster",
            "unknown cluster 'nope' (defined: c, shadow)",
        ),
        ({"cluster": "c", "mirror": {}}, f"{ROUTE}.mirror.cluster", "required field"),
        ({"cluster": "c", "mirror": "shadow"}, f"{ROUTE}.mirror", "expected a mapping"),
        (
            {"cluster": "c", "mirror": {"cluster": "shadow", "percent": 101}},
            f"{ROUTE}.mirror.percent",
            "out of range [0, 100]",
        ),
        (
            {"cluster": "c", "mirror": {"cluster": "shadow", "percent": -1}},
            f"{ROUTE}.mirror.percent",
            "out of range [0, 100]",
        ),
        (
            {"cluster": "c", "mirror": {"cluster": "shadow", "percent": "30%"}},
            f"{ROUTE}.mirror.percent",
            "expected a percentage from 0 to 100, got a string",
        ),
        (
            {"cluster": "c", "mirror": {"cluster": "shadow", "percent": True}},
            f"{ROUTE}.mirror.percent",
            "got a boolean",
        ),
        (
            {"cluster": "c", "mirror": {"cluster": "shadow", "fraction": 1}},
            f"{ROUTE}.mirror.fraction",
            "unknown field (known fields: cluster, percent)",
        ),
        (
            {"direct_response": {"status": 200}, "mirror": {"cluster": "shadow"}},
            f"{ROUTE}.mirror",
            "a mirror needs a route forwarding to a cluster",
        ),
        (
            {"redirect": {}, "mirror": {"cluster": "shadow"}},
            f"{ROUTE}.mirror",
            "a mirror needs a route forwarding to a cluster",
        ),
    ],
)
def test_mirror_invalid_field_is_named(fields: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(SnapshotError) as info:
        _load_route(**fields)
    assert info.value.path == path
    assert reason in info.value.reason


# -- the HTTPRoute policy

API = {"service": "api"}
HTTP_ROUTE: dict[str, Any] = {
    "kind": "HTTPRoute",
    "metadata": {"name": "web-to-api", "mesh": "default"},
    "spec": {
        "sources": [{"service": "web"}],
        "destinations": [{"service": "api"}],
        "conf": {"rules": [{"backends": [API]}]},
    },
}


def _http_route(rule: dict[str, Any]) -> http_route.HTTPRoute:
    document = copy.deepcopy(HTTP_ROUTE)
    document["spec"]["conf"]["rules"] = [rule]
    return http_route.parse_resource(document, "route.yaml")


def test_http_route_mirror_becomes_the_rules_mirror_cluster() -> None:
    policy = _http_route(
        {"backends": [API], "mirror": {"backend": {"service": "api", "tags": {"version": "v2"}}}}
    )
    rule_mirror = policy.rules[0].mirror
    assert rule_mirror == http_route.HTTPRouteMirror(Backend("api", {"version": "v2"}), 100.0)
    (rule,) = http_route.fragment(policy)["rules"]
    assert rule["mirror"] == {"cluster": "api~version=v2", "percent": 100}
    policy = _http_route(
        {"backends": [API], "mirror": {"backend": {"service": "api-next"}, "percent": 0.5}}
    )
    assert http_route.fragment(policy)["rules"][0]["mirror"] == {
        "cluster": "api-next",
        "percent": 0.5,
    }


RULE = "spec.conf.rules[0]"


@pytest.mark.parametrize(
    ("rule", "path", "reason"),
    [
        ({"backends": [API], "mirror": {}}, f"{RULE}.mirror.backend", "required field"),
        (
            {"backends": [API], "mirror": {"backend": {"service": "api", "weight": 2}}},
            f"{RULE}.mirror.backend.weight",
            "unknown field (known fields: service, tags)",
        ),
        (
            {"backends": [API], "mirror": {"backend": {"tags": {"v": "1"}}}},
            f"{RULE}.mirror.backend.service",
            "required field",
        ),
        (
            {"backends": [API], "mirror": {"backend": {"service": "a b"}}},
            f"{RULE}.mirror.backend.service",
            "invalid service name",
        ),
        (
            {"backends": [API], "mirror": {"backend": {"service": "api", "tags": {"a/b": "1"}}}},
            f"{RULE}.mirror.backend.tags",
            "not a valid cluster name",
        ),
        (
            {"backends": [API], "mirror": {"backend": API, "percent": 150}},
            f"{RULE}.mirror.percent",
            "out of range [0, 100]",
        ),
        (
            {"backends": [API], "mirror": {"backend": API, "share": 1}},
            f"{RULE}.mirror.share",
            "unknown field",
        ),
        ({"redirect": {}, "mirror": {"backend": API}}, f"{RULE}.mirror", "needs backends"),
    ],
)
def test_http_route_mirror_invalid_field_is_named(
    rule: dict[str, Any], path: str, reason: str
) -> None:
    with pytest.raises(SnapshotError) as info:
        _http_route(rule)
    assert info.value.path == path
    assert reason in info.value.reason


def test_build_mirror_backend_becomes_a_cluster_of_its_instances() -> None:
    mesh, dataplanes, policies = load()
    web = build(named(dataplanes, "web"), mesh, dataplanes, policies, tls_paths("web"))
    # the golden HTTPRoute mirrors 5% of its split to the api instances in zone b
    shadow = cluster(web, "api~zone=b")
    assert [e["address"] for e in shadow["endpoints"]] == [named(dataplanes, "api-2").address]
    assert shadow["tls"] == cluster(web, "api")["tls"]  # api's identity
    http = from_dict(web).listeners[1].filter_chains[0].http
    assert http is not None
    routes = http.route_config.virtual_hosts[0].routes
    assert [r.mirror for r in routes] == [None, None, RequestMirror("api~zone=b", 5.0), None]


# -- the copy, without sockets


def test_shadow_authority_suffixes_the_host_before_the_port() -> None:
    assert shadow_authority(b"api") == b"api-shadow"
    assert shadow_authority(b"api.example:8080") == b"api.example-shadow:8080"
    assert shadow_authority(b"[::1]:80") == b"[::1]-shadow:80"
    assert shadow_authority(b"[::1]") == b"[::1]-shadow"


def test_copy_head_leaves_out_what_the_copy_writes_itself() -> None:
    forwarded = (
        b"POST /api/x?y=1 HTTP/1.1\r\nhost: shop:8080\r\nexpect: 100-continue\r\n"
        b"transfer-encoding: chunked\r\nx-hosted: yes\r\nx-request-id: r1\r\n\r\n"
    )
    assert copy_head(forwarded) == (
        b"POST /api/x?y=1 HTTP/1.1\r\nx-hosted: yes\r\nx-request-id: r1\r\n"
    )


class FakeCluster:
    def __init__(self, endpoint: Endpoint | None) -> None:
        self.endpoint = endpoint

    def pick(self, headers: Any = None, peer: bytes = b"") -> Endpoint | None:
        return self.endpoint


def _copy(stats: MirrorStats, *, framed: bool = True, endpoint: Endpoint | None = None) -> Any:
    stats.active += 1  # as `start` does for every copy it makes
    return MirrorCopy(
        FakeCluster(endpoint),  # type: ignore[arg-type]
        stats,
        b"PUT /a HTTP/1.1\r\nx-a: 1\r\n",
        b"PUT",
        b"shop:8080",
        [],
        b"127.0.0.1",
        1.0,
        framed=framed,
    )


def test_copy_request_carries_the_shadow_host_and_the_whole_body() -> None:
    stats = MirrorStats()
    body_copy = _copy(stats)
    body_copy.data(b"hello ")
    body_copy.data(b"world")
    assert body_copy.request(Endpoint("127.0.0.1", 9090), b"hello world") == (
        b"PUT /a HTTP/1.1\r\nx-a: 1\r\nhost: shop-shadow:8080\r\n"
        b"content-length: 11\r\n\r\nhello world"
    )
    assert _copy(stats, framed=False).request(Endpoint("127.0.0.1", 9090), b"") == (
        b"PUT /a HTTP/1.1\r\nx-a: 1\r\nhost: shop-shadow:8080\r\n\r\n"
    )


def test_copy_over_the_body_limit_is_given_up_and_counted() -> None:
    stats = MirrorStats()
    body_copy = _copy(stats)
    body_copy.data(b"x" * BODY_LIMIT)
    assert body_copy.body is not None and stats.active == 1
    body_copy.data(b"x")
    assert body_copy.body is None  # nothing more is kept
    assert stats.active == 0 and stats.outcomes == {"skipped_body_too_large": 1}
    body_copy.data(b"more")
    body_copy.send()
    body_copy.drop()
    assert stats.active == 0 and stats.outcomes == {"skipped_body_too_large": 1}


def test_copy_of_an_unfinished_request_or_without_endpoint_is_not_sent() -> None:
    stats = MirrorStats()
    _copy(stats).drop()
    _copy(stats, endpoint=None).send()
    assert stats.active == 0
    assert stats.outcomes == {"skipped_incomplete": 1, "skipped_no_endpoint": 1}


def _exchange(metrics: Metrics, content_length: int | None = None) -> Any:
    head = RequestHead(
        method=b"POST",
        target=b"/a",
        path=b"/a",
        query=b"",
        version=b"HTTP/1.1",
        headers=[(b"host", b"shop")],
        host=b"shop",
        keep_alive=True,
        chunked=False,
        content_length=content_length,
        expect_continue=False,
        upgrade=None,
    )
    chain = SimpleNamespace(metrics=metrics, clusters={"shadow": FakeCluster(None)})
    return SimpleNamespace(
        downstream=SimpleNamespace(chain=chain, peer=b"127.0.0.1"),
        head=head,
        route=None,
        upstream_head=b"POST /a HTTP/1.1\r\nhost: shop\r\n\r\n",
    )


def test_start_draws_the_share_and_keeps_to_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    metrics = Metrics()
    stats = metrics.mirror_stats("shadow")
    draws = iter([0.299, 0.3, 0.0])
    monkeypatch.setattr(mirror.random, "random", lambda: next(draws))
    policy = RequestMirror("shadow", 30.0)
    first = mirror.start(_exchange(metrics), policy)
    assert first is not None and first.timeout == mirror.DEFAULT_TIMEOUT
    assert mirror.start(_exchange(metrics), policy) is None  # drawn out: not counted
    assert stats.active == 1 and stats.outcomes == {}
    every = RequestMirror("shadow")
    assert mirror.start(_exchange(metrics, content_length=BODY_LIMIT + 1), every) is None
    assert stats.outcomes == {"skipped_body_too_large": 1}
    copies = [mirror.start(_exchange(metrics, content_length=BODY_LIMIT), every)]
    while stats.active < MAX_ACTIVE:
        copies.append(mirror.start(_exchange(metrics), every))
    assert mirror.start(_exchange(metrics), every) is None
    assert stats.outcomes == {"skipped_body_too_large": 1, "skipped_overflow": 1}
    assert mirror.start(_exchange(metrics), RequestMirror("shadow", 0.0)) is None
