"""Timeout: resource validation, the route fragment (golden files), and the two forms of
a route's `timeout` in a snapshot (a duration, or the fragment), and a TCP chain's.

Golden files live in `src/meshling/policies/timeout/testdata/`: `<case>.resource.yaml`
holds a resource, `<case>.fragment.yaml` its `fragment()`. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite the fragments after a deliberate change.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import policy_type
from meshling.policies.timeout import Timeouts, fragment, parse_resource
from meshling.policies.timeout.snapshot import format_duration
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import _Node, from_dict
from meshling.snapshot.model import Route, TcpFilter

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "policies" / "timeout" / "testdata"
CASES = sorted(p.name.removesuffix(".resource.yaml") for p in TESTDATA.glob("*.resource.yaml"))

RESOURCE: dict[str, Any] = {
    "kind": "Timeout",
    "metadata": {"name": "web-to-api", "mesh": "default"},
    "spec": {
        "sources": [{"service": "web"}],
        "destinations": [{"service": "api"}],
        "conf": {"request": "5s"},
    },
}


def error(conf: Any) -> SnapshotError:
    document = copy.deepcopy(RESOURCE)
    document["spec"]["conf"] = conf
    with pytest.raises(SnapshotError) as caught:
        parse_resource(document, "timeout.yaml")
    return caught.value


def snapshot_route(route: dict[str, Any]) -> Route:
    snapshot = from_dict(
        {
            "version": "1",
            "listeners": [
                {
                    "name": "out",
                    "port": 0,
                    "filter_chains": [
                        {
                            "http": {
                                "route_config": {
                                    "virtual_hosts": [
                                        {
                                            "name": "api",
                                            "domains": ["*"],
                                            "routes": [{"name": "api", "cluster": "api", **route}],
                                        }
                                    ]
                                }
                            }
                        }
                    ],
                }
            ],
            "clusters": [{"name": "api", "endpoints": []}],
        },
        "snapshot.yaml",
    )
    http = snapshot.listeners[0].filter_chains[0].http
    assert http is not None
    return http.route_config.virtual_hosts[0].routes[0]


def tcp_chain(tcp: dict[str, Any]) -> TcpFilter:
    snapshot = from_dict(
        {
            "version": "1",
            "listeners": [
                {"name": "db", "port": 0, "filter_chains": [{"tcp": {"cluster": "db", **tcp}}]}
            ],
            "clusters": [{"name": "db", "endpoints": []}],
        },
        "snapshot.yaml",
    )
    chain = snapshot.listeners[0].filter_chains[0].tcp
    assert chain is not None
    return chain


@pytest.mark.parametrize("case", CASES)
def test_timeout_golden_fragments(case: str) -> None:
    source = TESTDATA / f"{case}.resource.yaml"
    resource = parse_resource(yaml.safe_load(source.read_text()), str(source))
    got = fragment(resource)
    golden = TESTDATA / f"{case}.fragment.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        golden.write_text(yaml.safe_dump(got, sort_keys=False))
    assert got == yaml.safe_load(golden.read_text())
    # the fragment, placed on a route, is read back as the same timeouts
    route = snapshot_route({"timeout": got})
    assert route.timeouts == resource.conf
    assert route.timeout == resource.conf.request


def test_timeout_registered_on_the_route() -> None:
    registered = policy_type("Timeout")
    assert registered is not None
    assert (registered.attach, registered.key) == ("route", "timeout")
    resource = registered.parse_resource(RESOURCE, "timeout.yaml")
    assert registered.fragment is not None
    assert registered.fragment(resource)["request"] == "5s"


def test_timeout_route_duration_and_mapping_forms() -> None:
    plain = snapshot_route({"timeout": "15s"})
    assert (plain.timeout, plain.timeouts) == (15.0, None)
    mapped = snapshot_route({"timeout": {"request": "15s"}})
    assert mapped.timeout == 15.0
    assert mapped.timeouts == Timeouts(request=15.0)
    assert snapshot_route({}).timeout == 15.0
    assert snapshot_route({"timeout": {"idle": "30s"}}).timeout == 15.0  # the default request
    assert snapshot_route({"timeout": 0}).timeout == 0.0


@pytest.mark.parametrize(
    ("timeout", "path", "words"),
    [
        (
            {"request": "-1s"},
            "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0]"
            ".routes[0].timeout.request",
            "invalid duration",
        ),
        (
            {"per_try": "3s", "request": "2s"},
            "listeners[0].filter_chains[0].http.route_config"
            ".virtual_hosts[0].routes[0].timeout.per_try",
            "longer than request",
        ),
        (
            {"total": "3s"},
            "listeners[0].filter_chains[0].http.route_config.virtual_hosts[0]"
            ".routes[0].timeout.total",
            "unknown field",
        ),
    ],
)
def test_timeout_route_fragment_errors_name_the_field(
    timeout: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(SnapshotError) as caught:
        snapshot_route({"timeout": timeout})
    assert caught.value.path == path
    assert words in caught.value.reason


@pytest.mark.parametrize(
    ("conf", "path", "words"),
    [
        ({"connect": -1}, "spec.conf.connect", "out of range"),
        ({"request": "soon"}, "spec.conf.request", "invalid duration"),
        ({"idle": "-5m"}, "spec.conf.idle", "invalid duration"),
        ({"per_try": "10s", "request": "1s"}, "spec.conf.per_try", "longer than request"),
        ({"retry": "1s"}, "spec.conf.retry", "unknown field"),
        ("5s", "spec.conf", "expected a mapping"),
    ],
)
def test_timeout_rejects_nonsense_naming_the_field(conf: Any, path: str, words: str) -> None:
    exc = error(conf)
    assert exc.path == path
    assert words in exc.reason


def test_timeout_destination_tags_refused() -> None:
    document = copy.deepcopy(RESOURCE)
    document["spec"]["destinations"] = [{"service": "api", "tags": {"zone": "a"}}]
    with pytest.raises(SnapshotError) as caught:
        parse_resource(document, "timeout.yaml")
    assert caught.value.path == "spec.destinations[0].tags"


def test_timeout_tcp_chain_takes_idle_and_connect() -> None:
    chain = tcp_chain({"timeout": {"idle": "5m", "connect": "250ms"}})
    assert (chain.idle_timeout, chain.connect_timeout) == (300.0, 0.25)
    # a fragment without idle keeps the chain's own
    chain = tcp_chain({"idle_timeout": "10m", "timeout": Timeouts().to_dict()})
    assert (chain.idle_timeout, chain.connect_timeout) == (600.0, 0.0)
    assert tcp_chain({}).connect_timeout == 0.0


def test_timeout_tcp_chain_refuses_two_idle_timeouts() -> None:
    with pytest.raises(SnapshotError) as caught:
        tcp_chain({"idle_timeout": "10m", "timeout": {"idle": "5m"}})
    assert caught.value.path == "listeners[0].filter_chains[0].tcp.timeout.idle"
    with pytest.raises(SnapshotError) as caught:
        tcp_chain({"timeout": "5m"})
    assert caught.value.path == "listeners[0].filter_chains[0].tcp.timeout"


def test_timeout_fragment_round_trips() -> None:
    timeouts = Timeouts(connect=0.5, request=2.5, per_try=0.125, idle=90)
    assert Timeouts.from_dict(_Node("t", "timeout", timeouts.to_dict())) == timeouts


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (0.25, "250ms"), (15, "15s"), (1.5, "1500ms"), (90, "90s"), (0.0001, "0.0001s")],
)
def test_timeout_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
