"""Route selection by host, path, method and headers."""

from __future__ import annotations

from typing import Any

from meshling.proxy.router import Router, matches
from meshling.snapshot import from_dict
from meshling.snapshot.model import HeaderEdits, RouteConfig, RouteMatch


def router(virtual_hosts: list[dict[str, Any]]) -> Router:
    document = {
        "version": "1",
        "listeners": [
            {
                "name": "in",
                "port": 1,
                "filter_chains": [{"http": {"route_config": {"virtual_hosts": virtual_hosts}}}],
            }
        ],
        "clusters": [{"name": n} for n in ("a", "b", "c", "d")],
    }
    http = from_dict(document).listeners[0].filter_chains[0].http
    assert http is not None
    config: RouteConfig = http.route_config
    return Router(config)


def route(name: str, cluster: str, **match: Any) -> dict[str, Any]:
    return {"name": name, "cluster": cluster, "match": match}


def test_router_virtual_host_precedence() -> None:
    r = router(
        [
            {"name": "exact", "domains": ["api.example.com"], "routes": [route("e", "a")]},
            {"name": "suffix", "domains": ["*.example.com"], "routes": [route("s", "b")]},
            {"name": "longer", "domains": ["*.deep.example.com"], "routes": [route("l", "c")]},
            {"name": "any", "domains": ["*"], "routes": [route("any", "d")]},
        ]
    )
    pick = lambda host: r.route(host, b"GET", "/", []).name  # noqa: E731
    assert pick(b"api.example.com") == "e"
    assert pick(b"API.Example.com:8080") == "e"
    assert pick(b"x.example.com") == "s"
    assert pick(b"x.deep.example.com") == "l"
    assert pick(b"example.com") == "any"
    assert pick(b"other") == "any"


def test_router_path_kinds_first_match_wins() -> None:
    r = router(
        [
            {
                "name": "v",
                "domains": ["*"],
                "routes": [
                    route("exact", "a", path={"exact": "/health"}),
                    route("regex", "b", path={"regex": r"/users/\d+"}),
                    route("prefix", "c", path={"prefix": "/users/"}),
                    route("rest", "d"),
                ],
            }
        ]
    )
    pick = lambda path: r.route(b"h", b"GET", path, []).name  # noqa: E731
    assert pick("/health") == "exact"
    assert pick("/health/x") == "rest"
    assert pick("/users/42") == "regex"
    assert pick("/users/42/x") == "prefix"
    assert pick("/users/bob") == "prefix"
    assert pick("/") == "rest"


def test_router_method_and_header_matches() -> None:
    r = router(
        [
            {
                "name": "v",
                "domains": ["*"],
                "routes": [
                    route("canary", "a", headers=[{"name": "X-Canary", "exact": "1"}]),
                    route("writes", "b", methods=["post", "PUT"]),
                    route(
                        "nobot",
                        "c",
                        headers=[{"name": "user-agent", "prefix": "bot", "invert": True}],
                    ),
                    route("rest", "d"),
                ],
            }
        ]
    )
    assert r.route(b"h", b"GET", "/", [(b"x-canary", b"1")]).name == "canary"  # type: ignore[union-attr]
    assert r.route(b"h", b"POST", "/", []).name == "writes"  # type: ignore[union-attr]
    assert r.route(b"h", b"GET", "/", [(b"user-agent", b"curl")]).name == "nobot"  # type: ignore[union-attr]
    assert r.route(b"h", b"GET", "/", [(b"user-agent", b"botty")]).name == "rest"  # type: ignore[union-attr]


def test_router_no_virtual_host_means_no_route() -> None:
    r = router([{"name": "only", "domains": ["a.local"], "routes": [route("x", "a")]}])
    assert r.route(b"b.local", b"GET", "/", []) is None
    r2 = router(
        [{"name": "v", "domains": ["*"], "routes": [route("x", "a", path={"prefix": "/api/"})]}]
    )
    assert r2.route(b"h", b"GET", "/other", []) is None


def _query_route(query: list[dict[str, object]]) -> RouteMatch:
    from meshling.snapshot.load import _Node, _route_match

    return _route_match(_Node("s.yaml", "match", {"query": query}))


def test_router_query_parameters_match_decoded_values() -> None:
    beta = _query_route([{"name": "beta", "present": True}])
    assert matches(beta, b"GET", "/", [], b"beta")
    assert matches(beta, b"GET", "/", [], b"a=1&beta=")
    assert not matches(beta, b"GET", "/", [], b"")
    assert not matches(beta, b"GET", "/", [], b"betamax=1")
    version = _query_route([{"name": "v", "exact": "2 beta"}, {"name": "u", "regex": "[0-9]+"}])
    assert matches(version, b"GET", "/", [], b"v=1&v=2+beta&u=42")
    assert matches(version, b"GET", "/", [], b"u=7&v=2%20beta")
    assert not matches(version, b"GET", "/", [], b"v=2+beta&u=4x")
    prefix = _query_route([{"name": "tenant", "prefix": "eu-"}])
    assert matches(prefix, b"GET", "/", [], b"tenant=eu-west")
    assert not matches(prefix, b"GET", "/", [], b"tenant=us-east")


def test_header_edits_remove_then_set_then_add() -> None:
    edits = HeaderEdits(
        add=((b"x-tag", b"b"),), set=((b"x-version", b"2"),), remove=frozenset({b"server"})
    )
    fields = [(b"server", b"s"), (b"x-version", b"1"), (b"x-tag", b"a"), (b"x-version", b"0")]
    assert edits.apply(fields) == [(b"x-tag", b"a"), (b"x-version", b"2"), (b"x-tag", b"b")]
    assert fields[0] == (b"server", b"s")  # the input is left as it was
