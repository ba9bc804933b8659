"""Route actions: direct responses, redirects and prefix rewrites, as the loader reads
them and as the proxy builds a redirect's `location` and a rewritten upstream path."""

from __future__ import annotations

from typing import Any

import pytest

from meshling.http1.codec import RequestHead
from meshling.proxy.http import redirect_location
from meshling.snapshot import SnapshotError, from_dict
from meshling.snapshot.model import DirectResponse, Redirect, Route

from .test_snapshot import base

ROUTE = "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0].routes[0]"


def _load_route(**fields: Any) -> Route:
    document = base()
    route = document["listeners"][0]["filter_chains"][0]["http"]["route_config"]
    route["virtual_hosts"][0]["routes"] = [{"name": "r", **fields}]
    snapshot = from_dict(document, "mesh.yaml")
    http = snapshot.listeners[0].filter_chains[0].http
    assert http is not None
    return http.route_config.virtual_hosts[0].routes[0]


def test_direct_response_route_has_no_cluster() -> None:
    route = _load_route(direct_response={"status": 503, "body": "down for maintenance"})
    assert route.direct_response == DirectResponse(503, b"down for maintenance")
    assert route.cluster == "" and route.weighted is None
    assert _load_route(direct_response={"status": 204}).direct_response == DirectResponse(204)


def test_redirect_route_defaults_to_301() -> None:
    route = _load_route(redirect={"host": "example.com", "port": 8443, "scheme": "https"})
    assert route.redirect == Redirect(301, b"https", b"example.com", 8443, None)
    assert _load_route(redirect={"path": "/b", "status": 308}).redirect == Redirect(308, path=b"/b")


def test_rewrite_on_a_forwarding_prefix_route() -> None:
    route = _load_route(
        match={"path": {"prefix": "/old/"}}, cluster="c", rewrite={"prefix": "/new/"}
    )
    assert route.rewrite_prefix == b"/new/" and route.cluster == "c"


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        ({}, ROUTE, "exactly one of cluster, weighted_clusters"),
        (
            {"cluster": "c", "direct_response": {"status": 200}},
            ROUTE,
            "give exactly one of cluster, weighted_clusters, direct_response, redirect",
        ),
        ({"direct_response": {"status": 199}}, f"{ROUTE}.direct_response.status", "range"),
        ({"direct_response": {"status": 600}}, f"{ROUTE}.direct_response.status", "range"),
        ({"direct_response": {}}, f"{ROUTE}.direct_response.status", "required"),
        (
            {"direct_response": {"status": 200, "body": "é" * 2049}},
            f"{ROUTE}.direct_response.body",
            "at most 4096 bytes, got 4098",
        ),
        ({"redirect": {"status": 300}}, f"{ROUTE}.redirect.status", "expected 301, 302"),
        ({"redirect": {"scheme": "ftp"}}, f"{ROUTE}.redirect.scheme", "must be one of"),
        ({"redirect": {"port": 0}}, f"{ROUTE}.redirect.port", "out of range"),
        ({"redirect": {"host": "a b"}}, f"{ROUTE}.redirect.host", "host name"),
        ({"redirect": {"path": "x"}}, f"{ROUTE}.redirect.path", "starting with '/'"),
        ({"redirect": {"path": "/a?b"}}, f"{ROUTE}.redirect.path", "'?'"),
        ({"redirect": {"x": 1}}, f"{ROUTE}.redirect.x", "unknown field"),
        (
            {"redirect": {}, "rewrite": {"prefix": "/x"}},
            f"{ROUTE}.rewrite",
            "needs a route forwarding",
        ),
        (
            {"cluster": "c", "match": {"path": {"exact": "/a"}}, "rewrite": {"prefix": "/x"}},
            f"{ROUTE}.rewrite",
            "needs a prefix path match, got exact",
        ),
        ({"cluster": "c", "rewrite": {}}, f"{ROUTE}.rewrite.prefix", "required"),
    ],
)
def test_route_action_invalid_field_is_named(
    fields: dict[str, Any], path: str, reason: str
) -> None:
    with pytest.raises(SnapshotError) as info:
        _load_route(**fields)
    assert info.value.path == path
    assert reason in info.value.reason


def _head(host: bytes, query: bytes = b"") -> RequestHead:
    return RequestHead(
        method=b"GET",
        target=b"/a/b" + (b"?" + query if query else b""),
        path=b"/a/b",
        query=query,
        version=b"HTTP/1.1",
        headers=[(b"host", host)],
        host=host,
        keep_alive=True,
        chunked=False,
        content_length=None,
        expect_continue=False,
        upgrade=None,
    )


@pytest.mark.parametrize(
    ("redirect", "host", "query", "tls", "location"),
    [
        (Redirect(), b"api:8080", b"", False, b"http://api:8080/a/b"),
        (Redirect(), b"api", b"x=1&y", True, b"https://api/a/b?x=1&y"),
        (Redirect(scheme=b"https"), b"api", b"q=1", False, b"https://api/a/b?q=1"),
        (Redirect(host=b"new.example"), b"api:8080", b"", False, b"http://new.example:8080/a/b"),
        (Redirect(port=9000), b"[::1]:8080", b"", False, b"http://[::1]:9000/a/b"),
        (Redirect(port=80), b"api:8080", b"", False, b"http://api/a/b"),
        (Redirect(scheme=b"https", port=443), b"api", b"", False, b"https://api/a/b"),
        (Redirect(path=b"/c"), b"api", b"k=v", False, b"http://api/c?k=v"),
        (Redirect(), b"", b"", False, b"/a/b"),
    ],
)
def test_redirect_location_keeps_what_is_not_replaced(
    redirect: Redirect, host: bytes, query: bytes, tls: bool, location: bytes
) -> None:
    assert redirect_location(redirect, _head(host, query), b"/a/b", tls) == location
