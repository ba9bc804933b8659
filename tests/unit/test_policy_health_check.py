"""HealthCheck: resource validation, the cluster fragment (golden files), the health
state machine and panic.

Golden files live in `src/meshling/policies/health_check/testdata/`: each
`<case>.resource.yaml` converts into `<case>.fragment.yaml`. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite the fragments after a deliberate change.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import policy_type
from meshling.policies.health_check import HealthCheckConfig, fragment, parse_resource
from meshling.policies.health_check.decide import HealthState, observe, panic, status_passes
from meshling.policies.health_check.snapshot import GrpcCheck
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import _Node, from_dict

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "policies" / "health_check" / "testdata"
CASES = sorted(p.name.split(".")[0] for p in TESTDATA.glob("*.resource.yaml"))


def resource(conf: Any) -> dict[str, Any]:
    return {
        "kind": "HealthCheck",
        "metadata": {"name": "hc", "mesh": "default"},
        "spec": {
            "sources": [{"service": "*"}],
            "destinations": [{"service": "api"}],
            "conf": conf,
        },
    }


def snapshot_with(fragment_doc: Any) -> dict[str, Any]:
    return {
        "version": "1",
        "listeners": [{"name": "in", "port": 0, "filter_chains": [{"tcp": {"cluster": "api"}}]}],
        "clusters": [
            {
                "name": "api",
                "endpoints": [{"address": "127.0.0.1", "port": 8080}],
                "health_check": fragment_doc,
            }
        ],
    }


@pytest.mark.parametrize("case", CASES)
def test_fragment_matches_golden(case: str) -> None:
    document = yaml.safe_load((TESTDATA / f"{case}.resource.yaml").read_text())
    got = fragment(parse_resource(document, f"{case}.resource.yaml"))
    golden = TESTDATA / f"{case}.fragment.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = f"# fragment({case}.resource.yaml): clusters[].health_check\n"
        golden.write_text(header + yaml.safe_dump(got, sort_keys=False))
    assert got == yaml.safe_load(golden.read_text())


@pytest.mark.parametrize("case", CASES)
def test_snapshot_loader_reads_golden_fragment(case: str) -> None:
    golden = yaml.safe_load((TESTDATA / f"{case}.fragment.yaml").read_text())
    config = from_dict(snapshot_with(golden)).clusters["api"].health_check
    assert config is not None
    assert config.to_dict() == golden
    document = yaml.safe_load((TESTDATA / f"{case}.resource.yaml").read_text())
    assert config == parse_resource(document, "x").conf


def test_registry_places_fragment_under_the_cluster() -> None:
    policy = policy_type("HealthCheck")
    assert policy is not None
    assert (policy.attach, policy.key, policy.fragment) == ("cluster", "health_check", fragment)


def test_http_check_defaults() -> None:
    config = parse_resource(resource({"http": {"path": "/ready"}}), "x").conf
    assert config == HealthCheckConfig(http_path="/ready")
    assert config.expected_statuses == ((200, 299),)


@pytest.mark.parametrize(
    ("conf", "path", "words"),
    [
        ({}, "spec.conf", "exactly one of http, tcp"),
        ({"http": {"path": "/"}, "tcp": {}}, "spec.conf", "exactly one of http, tcp"),
        ({"tcp": {}, "grpc": {}}, "spec.conf", "exactly one of http, tcp, grpc"),
        ({"grpc": {"port": 9090}}, "spec.conf.grpc.port", "unknown field"),
        ({"grpc": {"service": 7}}, "spec.conf.grpc.service", "expected a service name"),
        ({"grpc": {"service": "a\nb"}}, "spec.conf.grpc.service", "control characters"),
        ({"grpc": {"service": "s" * 1025}}, "spec.conf.grpc.service", "longer than 1024"),
        ({"grpc": {"authority": ""}}, "spec.conf.grpc.authority", "non-empty string"),
        ({"grpc": {"authority": "a b"}}, "spec.conf.grpc.authority", "invalid authority"),
        ({"grpc": {"authority": "u@h"}}, "spec.conf.grpc.authority", "invalid authority"),
        ({"grpc": {"authority": "h/x"}}, "spec.conf.grpc.authority", "invalid authority"),
        ({"grpc": "svc"}, "spec.conf.grpc", "expected a mapping"),
        ({"tcp": {"send": "ping"}}, "spec.conf.tcp.send", "unknown field"),
        ({"http": {}}, "spec.conf.http.path", "required"),
        ({"http": {"path": "healthz"}}, "spec.conf.http.path", "invalid path"),
        ({"http": {"path": "/a b"}}, "spec.conf.http.path", "invalid path"),
        (
            {"http": {"path": "/", "expected_statuses": [99]}},
            "spec.conf.http.expected_statuses[0]",
            "100 to 599",
        ),
        (
            {"http": {"path": "/", "expected_statuses": ["399-200"]}},
            "spec.conf.http.expected_statuses[0]",
            "empty range",
        ),
        (
            {"http": {"path": "/", "expected_statuses": []}},
            "spec.conf.http.expected_statuses",
            "at least one",
        ),
        ({"tcp": {}, "interval": "-1s"}, "spec.conf.interval", "duration"),
        ({"tcp": {}, "interval": 0}, "spec.conf.interval", "longer than 0"),
        ({"tcp": {}, "timeout": "0ms"}, "spec.conf.timeout", "longer than 0"),
        (
            {"tcp": {}, "interval": "1s", "timeout": "2s"},
            "spec.conf.timeout",
            "longer than the interval",
        ),
        ({"tcp": {}, "healthy_threshold": 0}, "spec.conf.healthy_threshold", "out of range"),
        ({"tcp": {}, "unhealthy_threshold": 0}, "spec.conf.unhealthy_threshold", "out of range"),
        ({"tcp": {}, "panic_threshold": 101}, "spec.conf.panic_threshold", "0 to 100"),
        ({"tcp": {}, "panic_threshold": 0.5}, "spec.conf.panic_threshold", "percentage"),
    ],
)
def test_bad_conf_names_the_field(conf: Any, path: str, words: str) -> None:
    with pytest.raises(SnapshotError) as err:
        parse_resource(resource(conf), "hc.yaml")
    assert err.value.path == path
    assert words in err.value.reason


def test_snapshot_errors_name_the_cluster_field() -> None:
    with pytest.raises(SnapshotError) as err:
        from_dict(snapshot_with({"tcp": {}, "unhealthy_threshold": -2}))
    assert err.value.path == "clusters[0].health_check.unhealthy_threshold"


def test_grpc_check_defaults() -> None:
    config = parse_resource(resource({"grpc": {}}), "x").conf
    assert config == HealthCheckConfig(grpc=GrpcCheck())
    assert (config.grpc, config.http_path) == (GrpcCheck("", None), None)
    assert config.to_dict()["grpc"] == {"service": ""}


def test_grpc_check_service_and_authority() -> None:
    conf = {"grpc": {"service": "shop.v1.Orders", "authority": "[::1]:8443"}}
    config = parse_resource(resource(conf), "x").conf
    assert config.grpc == GrpcCheck("shop.v1.Orders", "[::1]:8443")
    assert HealthCheckConfig.from_dict(_Node("x", "", config.to_dict())) == config


def test_snapshot_grpc_errors_name_the_cluster_field() -> None:
    with pytest.raises(SnapshotError) as err:
        from_dict(snapshot_with({"grpc": {"authority": "a b"}}))
    assert err.value.path == "clusters[0].health_check.grpc.authority"
    assert "invalid authority" in err.value.reason


# -- the state machine


def run(results: str, healthy: int = 2, unhealthy: int = 3) -> str:
    """Feed check results ('+' pass, '-' fail); the health after each ('H' or 'U')."""
    state = HealthState()
    out = []
    for r in results:
        state = observe(state, r == "+", healthy, unhealthy)
        out.append("H" if state.healthy else "U")
    return "".join(out)


def test_first_check_decides_at_once() -> None:
    assert run("-") == "U"
    assert run("+") == "H"


def test_thresholds_need_results_in_a_row() -> None:
    # healthy: three failures in a row to go; a pass in between starts over
    assert run("+--+---") == "HHHHHHU"
    # unhealthy: two passes in a row to come back; a failure in between starts over
    assert run("-+-++") == "UUUUH"


def test_panic_threshold() -> None:
    assert not panic(5, 10, 50)
    assert panic(4, 10, 50)
    assert not panic(1, 10, 0)
    assert panic(0, 10, 0)  # none usable: use them all rather than none
    assert not panic(0, 0, 50)  # no endpoints: nothing to panic about


def test_expected_statuses() -> None:
    ranges = ((200, 200), (300, 399))
    assert status_passes(200, ranges) and status_passes(302, ranges)
    assert not status_passes(204, ranges) and not status_passes(500, ranges)


def test_builder_carries_a_grpc_check_into_the_callers_cluster() -> None:
    from .test_builder_policies import build_all, cluster, load, named

    mesh, dataplanes, policies = load()
    old = named(policies, "db-health")
    conf = HealthCheckConfig(timeout=0.5, grpc=GrpcCheck("db.v1.Store", "db.internal"))
    policies = [p for p in policies if p is not old] + [dataclasses.replace(old, conf=conf)]
    document = build_all(mesh, dataplanes, policies)["api-1"]
    assert cluster(document, "db")["health_check"]["grpc"] == {
        "service": "db.v1.Store",
        "authority": "db.internal",
    }
    assert from_dict(document).clusters["db"].health_check == conf
