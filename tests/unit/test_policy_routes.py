"""HTTPRoute and TCPRoute: resource validation, their fragments (golden files), and the
subset cluster names of their backends.

Golden files live in `src/meshling/policies/{http_route,tcp_route}/testdata/`:
`<case>.resource.yaml` holds a resource, `<case>.fragment.yaml` its `fragment()`. Run
with MESHLING_UPDATE_GOLDEN=1 to rewrite the fragments after a deliberate change.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import http_route, policy_type, tcp_route
from meshling.policies.backends import Backend, subset_cluster, subset_of
from meshling.snapshot import SnapshotError

POLICIES = Path(__file__).parents[2] / "src" / "meshling" / "policies"
GOLDENS = sorted(
    p
    for folder in ("http_route", "tcp_route")
    for p in (POLICIES / folder / "testdata").glob("*.resource.yaml")
)

HTTP_ROUTE: dict[str, Any] = {
    "kind": "HTTPRoute",
    "metadata": {"name": "web-to-api", "mesh": "default"},
    "spec": {
        "sources": [{"service": "web"}],
        "destinations": [{"service": "api"}],
        "conf": {"rules": [{"backends": [{"service": "api"}]}]},
    },
}
TCP_ROUTE: dict[str, Any] = {
    "kind": "TCPRoute",
    "metadata": {"name": "api-to-db", "mesh": "default"},
    "spec": {
        "sources": [{"service": "api"}],
        "destinations": [{"service": "db"}],
        "conf": {"backends": [{"service": "db"}]},
    },
}


@pytest.mark.parametrize("path", GOLDENS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_route_fragment_matches_golden(path: Path) -> None:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    policy = policy_type(document["kind"])
    assert policy is not None and policy.fragment is not None
    fragment = policy.fragment(policy.parse_resource(document, str(path)))
    golden = path.with_name(path.name.replace(".resource.", ".fragment."))
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        golden.write_text(yaml.safe_dump(fragment, sort_keys=False))
    assert fragment == yaml.safe_load(golden.read_text(encoding="utf-8"))


def test_http_route_rules_keep_their_order_and_matches() -> None:
    path = POLICIES / "http_route" / "testdata" / "canary.resource.yaml"
    route = http_route.parse_resource(yaml.safe_load(path.read_text()), str(path))
    assert [len(rule.matches) for rule in route.rules] == [3, 1, 1, 1, 1, 0]
    assert route.rules[2].rewrite == {"prefix": "/new/"}
    assert route.rules[3].backends == () and route.rules[3].redirect is not None
    assert route.rules[4].direct_response == {"status": 403, "body": "internal only"}
    assert route.rules[5].backends == (
        Backend("api", {"version": "v1"}, 90),
        Backend("api", {"version": "v2"}, 10),
    )


def test_subset_cluster_names_round_trip() -> None:
    assert subset_cluster("api", {}) == "api"
    name = subset_cluster("api", {"zone": "a", "version": "v2"})
    assert name == "api~version=v2~zone=a"
    assert subset_of(name) == ("api", {"version": "v2", "zone": "a"})
    assert subset_of("api") == ("api", {})


def _http_error(conf: Any) -> SnapshotError:
    document = copy.deepcopy(HTTP_ROUTE)
    document["spec"]["conf"] = conf
    with pytest.raises(SnapshotError) as caught:
        http_route.parse_resource(document, "route.yaml")
    return caught.value


def _tcp_error(conf: Any) -> SnapshotError:
    document = copy.deepcopy(TCP_ROUTE)
    document["spec"]["conf"] = conf
    with pytest.raises(SnapshotError) as caught:
        tcp_route.parse_resource(document, "route.yaml")
    return caught.value


API = {"service": "api"}


@pytest.mark.parametrize(
    ("conf", "path", "reason"),
    [
        ({}, "spec.conf.rules", "non-empty list of rules"),
        ({"rules": [], "x": 1}, "spec.conf.x", "unknown field"),
        ({"rules": [{}]}, "spec.conf.rules[0]", "exactly one of backends, direct_response"),
        (
            {"rules": [{"backends": [API], "redirect": {}}]},
            "spec.conf.rules[0]",
            "got backends, redirect",
        ),
        (
            {"rules": [{"direct_response": {"status": 700}}]},
            "spec.conf.rules[0].direct_response.status",
            "out of range [200, 599]",
        ),
        (
            {"rules": [{"direct_response": {"status": 200, "body": "x" * 4097}}]},
            "spec.conf.rules[0].direct_response.body",
            "at most 4096 bytes",
        ),
        (
            {"rules": [{"redirect": {"status": 305}}]},
            "spec.conf.rules[0].redirect.status",
            "expected 301, 302, 303, 307 or 308",
        ),
        (
            {"rules": [{"redirect": {"host": "a/b"}}]},
            "spec.conf.rules[0].redirect.host",
            "expected a host name",
        ),
        (
            {"rules": [{"redirect": {"path": "/a b"}}]},
            "spec.conf.rules[0].redirect.path",
            "without spaces",
        ),
        (
            {"rules": [{"redirect": {}, "rewrite": {"prefix": "/x"}}]},
            "spec.conf.rules[0].rewrite",
            "needs backends",
        ),
        (
            {"rules": [{"backends": [API], "rewrite": {"prefix": "x"}}]},
            "spec.conf.rules[0].rewrite.prefix",
            "starting with '/'",
        ),
        (
            {
                "rules": [
                    {
                        "backends": [API],
                        "matches": [{"path": {"exact": "/a"}}],
                        "rewrite": {"prefix": "/b"},
                    }
                ]
            },
            "spec.conf.rules[0].matches[0].path",
            "needs prefix path matches",
        ),
        ({"rules": [{"backends": []}]}, "spec.conf.rules[0].backends", "non-empty list"),
        (
            {"rules": [{"backends": [API], "matches": [{"path": {"prefix": "v2"}}]}]},
            "spec.conf.rules[0].matches[0].path.prefix",
            "must start with '/'",
        ),
        (
            {"rules": [{"backends": [API], "matches": [{"methods": ["G T"]}]}]},
            "spec.conf.rules[0].matches[0].methods[0]",
            "invalid method",
        ),
        (
            {"rules": [{"backends": [API], "matches": [{"headers": [{"name": "x"}]}]}]},
            "spec.conf.rules[0].matches[0].headers[0]",
            "exactly one of",
        ),
        (
            {"rules": [{"backends": [{"service": "api", "weight": -1}]}]},
            "spec.conf.rules[0].backends[0].weight",
            "out of range",
        ),
        (
            {"rules": [{"backends": [{"service": "api", "weight": 0}]}]},
            "spec.conf.rules[0].backends",
            "every weight is 0",
        ),
        (
            {"rules": [{"backends": [API, {"service": "api", "weight": 3}]}]},
            "spec.conf.rules[0].backends[1]",
            "listed twice",
        ),
        (
            {"rules": [{"backends": [{"service": "api", "tags": {"example.com/v": "1"}}]}]},
            "spec.conf.rules[0].backends[0].tags",
            "not a valid cluster name",
        ),
        (
            {"rules": [{"backends": [{"service": "a b"}]}]},
            "spec.conf.rules[0].backends[0].service",
            "invalid service name",
        ),
        (
            {"rules": [{"backends": [API], "matches": [{"query": [{"name": "q"}]}]}]},
            "spec.conf.rules[0].matches[0].query[0]",
            "exactly one of",
        ),
        (
            {"rules": [{"backends": [API], "request_headers": {"set": {"host": "x"}}}]},
            "spec.conf.rules[0].request_headers.set.host",
            "set by the proxy",
        ),
        (
            {"rules": [{"backends": [API], "response_headers": {"remove": ["x-meshling-a"]}}]},
            "spec.conf.rules[0].response_headers.remove[0]",
            "set by the proxy",
        ),
        (
            {"rules": [{"backends": [API], "request_headers": {"append": {}}}]},
            "spec.conf.rules[0].request_headers.append",
            "unknown field",
        ),
        (
            {"rules": [{"backends": [API], "request_headers": {"add": {"x-a": "\n"}}}]},
            "spec.conf.rules[0].request_headers.add.x-a",
            "without CR, LF or NUL",
        ),
        (
            {
                "rules": [
                    {"backends": [API], "request_headers": {"set": {"x-a": "1"}, "remove": ["X-A"]}}
                ]
            },
            "spec.conf.rules[0].request_headers.remove",
            "also set",
        ),
        (
            {"rules": [{"backends": [{"service": "api", "share": 1}]}]},
            "spec.conf.rules[0].backends[0].share",
            "unknown field",
        ),
    ],
)
def test_http_route_invalid_field_is_named(conf: Any, path: str, reason: str) -> None:
    error = _http_error(conf)
    assert error.path == path
    assert reason in error.reason


@pytest.mark.parametrize(
    ("conf", "path", "reason"),
    [
        ({}, "spec.conf.backends", "required field is missing"),
        ({"backends": [], "rules": []}, "spec.conf.rules", "unknown field"),
        ({"backends": [{"tags": {"v": "1"}}]}, "spec.conf.backends[0].service", "missing"),
        ({"backends": [{"service": "db", "weight": "x"}]}, "spec.conf.backends[0].weight", "int"),
    ],
)
def test_tcp_route_invalid_field_is_named(conf: Any, path: str, reason: str) -> None:
    error = _tcp_error(conf)
    assert error.path == path
    assert reason in error.reason


@pytest.mark.parametrize("document", [HTTP_ROUTE, TCP_ROUTE], ids=["HTTPRoute", "TCPRoute"])
def test_route_destination_selects_a_service_only(document: dict[str, Any]) -> None:
    bad = copy.deepcopy(document)
    bad["spec"]["destinations"] = [{"service": "api", "tags": {"version": "v2"}}]
    policy = policy_type(bad["kind"])
    assert policy is not None
    with pytest.raises(SnapshotError) as caught:
        policy.parse_resource(bad, "route.yaml")
    assert caught.value.path == "spec.destinations[0].tags"
