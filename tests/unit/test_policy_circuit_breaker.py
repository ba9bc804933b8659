"""CircuitBreaker: resource validation, the cluster fragment (golden files), and the
outlier decisions on a fake clock.

Golden files live in `src/meshling/policies/circuit_breaker/testdata/`: each
`<case>.resource.yaml` converts into `<case>.fragment.yaml`. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite the fragments after a deliberate change.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import policy_type
from meshling.policies.circuit_breaker import (
    CircuitBreakerConfig,
    OutlierDetection,
    fragment,
    parse_resource,
)
from meshling.policies.circuit_breaker.decide import (
    FAILURE_5XX,
    GATEWAY_FAILURE,
    NEUTRAL,
    SUCCESS,
    OutlierState,
    classify,
    due_back,
    eject,
    may_eject,
    record,
    restore,
)
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import from_dict

TESTDATA = (
    Path(__file__).parents[2] / "src" / "meshling" / "policies" / "circuit_breaker" / "testdata"
)
CASES = sorted(p.name.split(".")[0] for p in TESTDATA.glob("*.resource.yaml"))


def resource(conf: Any, **spec: Any) -> dict[str, Any]:
    return {
        "kind": "CircuitBreaker",
        "metadata": {"name": "cb", "mesh": "default"},
        "spec": {
            "sources": [{"service": "*"}],
            "destinations": [{"service": "api"}],
            "conf": conf,
            **spec,
        },
    }


def snapshot_with(fragment_doc: Any) -> dict[str, Any]:
    return {
        "version": "1",
        "listeners": [
            {
                "name": "in",
                "port": 0,
                "filter_chains": [{"tcp": {"cluster": "api"}}],
            }
        ],
        "clusters": [
            {
                "name": "api",
                "endpoints": [{"address": "127.0.0.1", "port": 8080}],
                "circuit_breaker": fragment_doc,
            }
        ],
    }


# -- golden files: resource -> fragment -> snapshot


@pytest.mark.parametrize("case", CASES)
def test_fragment_matches_golden(case: str) -> None:
    document = yaml.safe_load((TESTDATA / f"{case}.resource.yaml").read_text())
    got = fragment(parse_resource(document, f"{case}.resource.yaml"))
    golden = TESTDATA / f"{case}.fragment.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = f"# fragment({case}.resource.yaml): clusters[].circuit_breaker\n"
        golden.write_text(header + yaml.safe_dump(got, sort_keys=False))
    assert got == yaml.safe_load(golden.read_text())


@pytest.mark.parametrize("case", CASES)
def test_snapshot_loader_reads_golden_fragment(case: str) -> None:
    golden = yaml.safe_load((TESTDATA / f"{case}.fragment.yaml").read_text())
    snapshot = from_dict(snapshot_with(golden))
    config = snapshot.clusters["api"].circuit_breaker
    assert config is not None
    assert config.to_dict() == golden
    document = yaml.safe_load((TESTDATA / f"{case}.resource.yaml").read_text())
    assert config == parse_resource(document, "x").conf


def test_registry_places_fragment_under_the_cluster() -> None:
    policy = policy_type("CircuitBreaker")
    assert policy is not None
    assert (policy.attach, policy.key, policy.fragment) == ("cluster", "circuit_breaker", fragment)


def test_defaults_are_envoys_limits_and_no_outlier_detection() -> None:
    config = parse_resource(resource({}), "x").conf
    assert config == CircuitBreakerConfig(1024, 1024, 1024, None)


# -- bad input names the field


@pytest.mark.parametrize(
    ("conf", "path", "words"),
    [
        ({"max_requests": 0}, "spec.conf.max_requests", "out of range"),
        ({"max_connections": -1}, "spec.conf.max_connections", "out of range"),
        ({"max_pending_requests": "many"}, "spec.conf.max_pending_requests", "integer"),
        ({"max_retries": 3}, "spec.conf.max_retries", "unknown field"),
        (
            {"outlier_detection": {"interval": "-5s"}},
            "spec.conf.outlier_detection.interval",
            "duration",
        ),
        (
            {"outlier_detection": {"interval": 0}},
            "spec.conf.outlier_detection.interval",
            "longer than 0",
        ),
        (
            {"outlier_detection": {"base_ejection_time": "0s"}},
            "spec.conf.outlier_detection.base_ejection_time",
            "longer than 0",
        ),
        (
            {"outlier_detection": {"max_ejection_percent": 150}},
            "spec.conf.outlier_detection.max_ejection_percent",
            "0 to 100",
        ),
        (
            {"outlier_detection": {"max_ejection_percent": 0.5}},
            "spec.conf.outlier_detection.max_ejection_percent",
            "percentage",
        ),
        (
            {"outlier_detection": {"consecutive_5xx": 0}},
            "spec.conf.outlier_detection",
            "never ejects",
        ),
        (
            {"outlier_detection": {"base_ejection_time": "1m", "max_ejection_time": "10s"}},
            "spec.conf.outlier_detection.max_ejection_time",
            "shorter than base_ejection_time",
        ),
        ("tight", "spec.conf", "mapping"),
    ],
)
def test_bad_conf_names_the_field(conf: Any, path: str, words: str) -> None:
    with pytest.raises(SnapshotError) as err:
        parse_resource(resource(conf), "cb.yaml")
    assert err.value.path == path
    assert words in err.value.reason


def test_missing_conf_and_tagged_destination_are_refused() -> None:
    document = resource({})
    del document["spec"]["conf"]
    with pytest.raises(SnapshotError) as err:
        parse_resource(document, "cb.yaml")
    assert err.value.path == "spec.conf"
    document = resource({}, destinations=[{"service": "api", "tags": {"v": "2"}}])
    with pytest.raises(SnapshotError) as err:
        parse_resource(document, "cb.yaml")
    assert err.value.path == "spec.destinations[0].tags"


def test_snapshot_errors_name_the_cluster_field() -> None:
    with pytest.raises(SnapshotError) as err:
        from_dict(snapshot_with({"max_requests": 0}))
    assert err.value.path == "clusters[0].circuit_breaker.max_requests"


# -- decisions


@pytest.mark.parametrize(
    ("status", "error", "outcome"),
    [
        (200, None, SUCCESS),
        (404, None, SUCCESS),
        (500, None, FAILURE_5XX),
        (501, None, FAILURE_5XX),
        (502, None, GATEWAY_FAILURE),
        (503, None, GATEWAY_FAILURE),
        (504, None, GATEWAY_FAILURE),
        (502, "upstream_connect_failure", GATEWAY_FAILURE),
        (504, "upstream_timeout", GATEWAY_FAILURE),
        (200, "upstream_reset_after_headers", GATEWAY_FAILURE),
        (503, "circuit_breaker_max_connections", NEUTRAL),
        (503, "own_certificate_expired", NEUTRAL),
        (499, None, NEUTRAL),
        (0, None, NEUTRAL),
    ],
)
def test_classify(status: int, error: str | None, outcome: int) -> None:
    assert classify(status, error) == outcome


def test_record_counts_consecutive_failures_and_resets_on_success() -> None:
    conf = OutlierDetection(consecutive_5xx=3)
    state = OutlierState()
    assert not record(state, FAILURE_5XX, conf)
    assert not record(state, GATEWAY_FAILURE, conf)
    assert not record(state, SUCCESS, conf)  # resets
    assert not record(state, FAILURE_5XX, conf)
    assert not record(state, NEUTRAL, conf)  # neither counts nor resets
    assert not record(state, FAILURE_5XX, conf)
    assert record(state, FAILURE_5XX, conf)


def test_record_gateway_failures_alone() -> None:
    conf = OutlierDetection(consecutive_5xx=0, consecutive_gateway_failures=2)
    state = OutlierState()
    assert not record(state, GATEWAY_FAILURE, conf)
    assert not record(state, FAILURE_5XX, conf)  # a plain 5xx breaks the gateway streak
    assert not record(state, GATEWAY_FAILURE, conf)
    assert record(state, GATEWAY_FAILURE, conf)


def test_ejection_time_grows_with_repeat_offences_up_to_the_maximum() -> None:
    conf = OutlierDetection(base_ejection_time=10.0, max_ejection_time=35.0, interval=100.0)
    state = OutlierState()
    now = 1000.0
    durations = []
    for _ in range(5):
        durations.append(eject(state, now, conf))
        now = state.ejected_until
        assert due_back(state, now) and not due_back(state, now - 0.001)
        restore(state, now)
        now += 1.0  # offends again soon after coming back
    assert durations == [10.0, 20.0, 30.0, 35.0, 35.0]


def test_ejection_count_decays_while_the_endpoint_stays_in() -> None:
    conf = OutlierDetection(base_ejection_time=10.0, max_ejection_time=300.0, interval=30.0)
    state = OutlierState()
    eject(state, 0.0, conf)
    restore(state, 10.0)
    eject(state, 11.0, conf)  # second offence: 20 s
    assert state.ejected_until == 31.0
    restore(state, 31.0)
    # 65 s later: two whole intervals forgiven, the count falls from 2 to 0
    assert eject(state, 96.0, conf) == 10.0


def test_max_ejection_percent_is_never_exceeded() -> None:
    assert may_eject(0, 3, 34)  # 1 of 3 is 33%
    assert not may_eject(1, 3, 34)  # 2 of 3 would be 67%
    assert not may_eject(0, 3, 10)
    assert may_eject(4, 10, 50) and not may_eject(5, 10, 50)
    assert may_eject(2, 3, 100) and not may_eject(3, 3, 100)
