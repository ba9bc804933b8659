"""Retry: resource validation, the route fragment (golden files), and the decisions —
retriable or not, backoff, budget — on a fake clock and a fake random source.

Golden files live in `src/meshling/policies/retry/testdata/`: `<case>.resource.yaml`
holds a resource, `<case>.fragment.yaml` its `fragment()`. Run with
MESHLING_UPDATE_GOLDEN=1 to rewrite the fragments after a deliberate change, then read
the diff.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshling.policies import policy_type
from meshling.policies.retry import (
    Backoff,
    Budget,
    RetryBudget,
    RetryPolicy,
    backoff,
    fragment,
    parse_resource,
    retriable,
    should_retry,
)
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import _Node, from_dict

TESTDATA = Path(__file__).parents[2] / "src" / "meshling" / "policies" / "retry" / "testdata"
CASES = sorted(p.name.removesuffix(".resource.yaml") for p in TESTDATA.glob("*.resource.yaml"))

RESOURCE: dict[str, Any] = {
    "kind": "Retry",
    "metadata": {"name": "web-to-api", "mesh": "default"},
    "spec": {
        "sources": [{"service": "web"}],
        "destinations": [{"service": "api"}],
        "conf": {"max_attempts": 3},
    },
}


def policy(**conf: Any) -> RetryPolicy:
    return RetryPolicy.from_dict(_Node("test", "retry", conf))


def error(conf: dict[str, Any]) -> SnapshotError:
    document = copy.deepcopy(RESOURCE)
    document["spec"]["conf"] = conf
    with pytest.raises(SnapshotError) as caught:
        parse_resource(document, "retry.yaml")
    return caught.value


# -- the resource ------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_retry_golden_fragments(case: str) -> None:
    source = TESTDATA / f"{case}.resource.yaml"
    resource = parse_resource(yaml.safe_load(source.read_text()), str(source))
    got = fragment(resource)
    golden = TESTDATA / f"{case}.fragment.yaml"
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        golden.write_text(yaml.safe_dump(got, sort_keys=False))
    assert got == yaml.safe_load(golden.read_text())
    # what the builder places, the proxy's loader reads back to the same policy
    assert RetryPolicy.from_dict(_Node("golden", "retry", got)) == resource.conf


def test_retry_fragment_runs_in_a_snapshot() -> None:
    conf = parse_resource(RESOURCE, "retry.yaml").conf
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
                                            "routes": [
                                                {
                                                    "name": "api",
                                                    "cluster": "api",
                                                    "retry": conf.to_dict(),
                                                }
                                            ],
                                        }
                                    ]
                                }
                            }
                        }
                    ],
                }
            ],
            "clusters": [{"name": "api", "endpoints": []}],
        }
    )
    http = snapshot.listeners[0].filter_chains[0].http
    assert http is not None
    route = http.route_config.virtual_hosts[0].routes[0]
    assert route.retry == conf
    assert route.timeout == 15.0 and route.timeouts is None


def test_retry_registered_on_the_route() -> None:
    registered = policy_type("Retry")
    assert registered is not None
    assert (registered.attach, registered.key) == ("route", "retry")
    assert registered.fragment is fragment
    resource = registered.parse_resource(RESOURCE, "retry.yaml")
    assert registered.fragment(resource)["max_attempts"] == 3


def test_retry_defaults() -> None:
    conf = policy()
    assert conf.max_attempts == 3
    assert conf.retry_on == ("5xx", "connect-failure", "reset")
    assert conf.methods == ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE")
    assert conf.backoff == Backoff(0.025, 0.25)
    assert conf.budget == Budget(0.2, 10, 10.0)
    assert conf.max_body == 64 * 1024


@pytest.mark.parametrize(
    ("conf", "path", "words"),
    [
        ({"max_attempts": 0}, "spec.conf.max_attempts", "out of range [1, 10]"),
        ({"max_attempts": "3"}, "spec.conf.max_attempts", "whole number"),
        ({"retry_on": ["5xx", "timeouts"]}, "spec.conf.retry_on[1]", "known: 5xx, gateway-error"),
        ({"retry_on": ["reset", "reset"]}, "spec.conf.retry_on[1]", "twice"),
        ({"retry_on": []}, "spec.conf.retry_on", "nothing would be retried"),
        ({"status_codes": [200]}, "spec.conf.status_codes[0]", "not an error"),
        ({"status_codes": [700]}, "spec.conf.status_codes[0]", "100 to 599"),
        ({"methods": ["GET", "*"]}, "spec.conf.methods", "list it alone"),
        ({"methods": []}, "spec.conf.methods", "at least one method"),
        ({"methods": ["GE T"]}, "spec.conf.methods[0]", "invalid method"),
        ({"per_try_timeout": "-1s"}, "spec.conf.per_try_timeout", "invalid duration"),
        ({"per_try_timeout": -1}, "spec.conf.per_try_timeout", "out of range"),
        ({"backoff": {"base": "1s", "max": "10ms"}}, "spec.conf.backoff.max", "shorter than base"),
        ({"backoff": {"jitter": 1}}, "spec.conf.backoff.jitter", "unknown field"),
        ({"budget": {"ratio": 1.5}}, "spec.conf.budget.ratio", "out of range [0, 1]"),
        ({"budget": {"ratio": -0.1}}, "spec.conf.budget.ratio", "out of range [0, 1]"),
        ({"budget": {"min_per_second": -1}}, "spec.conf.budget.min_per_second", "out of range"),
        ({"budget": {"ttl": "100ms"}}, "spec.conf.budget.ttl", "[1s, 60s]"),
        ({"max_body": 1 << 30}, "spec.conf.max_body", "out of range"),
        ({"retries": 3}, "spec.conf.retries", "unknown field"),
    ],
)
def test_retry_rejects_nonsense_naming_the_field(
    conf: dict[str, Any], path: str, words: str
) -> None:
    exc = error(conf)
    assert exc.path == path
    assert words in exc.reason
    assert exc.source == "retry.yaml"


def test_retry_destination_tags_refused() -> None:
    document = copy.deepcopy(RESOURCE)
    document["spec"]["destinations"] = [{"service": "api", "tags": {"version": "v2"}}]
    with pytest.raises(SnapshotError) as caught:
        parse_resource(document, "retry.yaml")
    assert caught.value.path == "spec.destinations[0].tags"


def test_retry_conf_required_and_a_mapping() -> None:
    document = copy.deepcopy(RESOURCE)
    document["spec"]["conf"] = [1]
    with pytest.raises(SnapshotError) as caught:
        parse_resource(document, "retry.yaml")
    assert caught.value.path == "spec.conf"


# -- decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_on", "codes", "status", "failure", "expected"),
    [
        (["5xx"], [], 500, None, True),
        (["5xx"], [], 503, None, True),
        (["5xx"], [], 404, None, False),
        (["gateway-error"], [], 500, None, False),
        (["gateway-error"], [], 502, None, True),
        (["gateway-error"], [], 504, None, True),
        (["reset"], [], 0, "reset", True),
        (["5xx"], [], 0, "reset", False),
        (["connect-failure"], [], 0, "connect-failure", True),
        (["5xx"], [], 0, "connect-failure", False),
        ([], [409], 409, None, True),
        ([], [409], 503, None, False),
    ],
)
def test_retry_retriable_conditions(
    retry_on: list[str], codes: list[int], status: int, failure: Any, expected: bool
) -> None:
    conf = policy(retry_on=retry_on, status_codes=codes)
    assert retriable(conf, status, failure) is expected


def test_retry_should_retry_stops_at_max_attempts() -> None:
    conf = policy(max_attempts=3)
    assert should_retry(conf, b"GET", 1, 503)
    assert should_retry(conf, b"GET", 2, 503)
    assert not should_retry(conf, b"GET", 3, 503)


def test_retry_should_retry_idempotent_methods_only_by_default() -> None:
    conf = policy()
    for method in (b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"):
        assert should_retry(conf, method, 1, 503)
    assert not should_retry(conf, b"POST", 1, 503)
    assert not should_retry(conf, b"PATCH", 1, 0, "reset")
    # nothing was sent: a connect failure is retried whatever the method
    assert should_retry(conf, b"POST", 1, 0, "connect-failure")
    assert should_retry(policy(methods=["*"]), b"POST", 1, 503)
    assert should_retry(policy(methods=["post"]), b"POST", 1, 503)


def test_retry_should_retry_needs_the_body_kept() -> None:
    assert not should_retry(policy(), b"PUT", 1, 503, replayable=False)
    assert not should_retry(policy(), b"PUT", 1, 0, "connect-failure", replayable=False)


def test_retry_backoff_full_jitter_doubles_to_the_cap() -> None:
    top = lambda: 0.999999  # noqa: E731
    assert backoff(1, 0.025, 0.25, lambda: 0.0) == 0.0
    assert backoff(1, 0.025, 0.25, lambda: 0.5) == pytest.approx(0.0125)
    assert [round(backoff(n, 0.025, 0.25, top), 4) for n in range(1, 7)] == [
        0.025,
        0.05,
        0.1,
        0.2,
        0.25,
        0.25,
    ]
    assert backoff(500, 0.025, 0.25, top) < 0.25  # no overflow for large attempt numbers


@given(st.integers(1, 50), st.floats(0, 1, exclude_max=True))
def test_retry_backoff_within_bounds(attempt: int, r: float) -> None:
    delay = backoff(attempt, 0.01, 1.0, lambda: r)
    assert 0 <= delay < min(1.0, 0.01 * 2 ** (attempt - 1)) + 1e-12


# -- the budget, on a fake clock ----------------------------------------------------------


def test_retry_budget_ratio_of_requests() -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=0, ttl=10)
    for i in range(10):
        budget.deposit(i * 0.01)
    assert budget.available(0.1) == pytest.approx(2.0)
    assert budget.withdraw(0.1)
    assert budget.withdraw(0.1)
    assert not budget.withdraw(0.1)
    for _ in range(5):
        budget.deposit(0.2)
    assert budget.withdraw(0.2)
    assert not budget.withdraw(0.2)


def test_retry_budget_deposits_expire_after_ttl() -> None:
    budget = RetryBudget(ratio=0.5, min_per_second=0, ttl=10)
    for _ in range(4):
        budget.deposit(0.0)
    assert budget.available(9.9) == pytest.approx(2.0)
    assert budget.available(11.5) == 0  # the slot of 0.0 is older than ttl
    assert not budget.withdraw(11.5)


def test_retry_budget_floor_per_second() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=3, ttl=10)
    assert [budget.withdraw(5.0) for _ in range(4)] == [True, True, True, False]
    assert not budget.withdraw(5.2)  # 0.6 of a retry refilled
    assert budget.withdraw(5.34)  # one whole retry refilled since the last ask
    assert [budget.withdraw(20.0) for _ in range(4)] == [True, True, True, False]  # refilled


def test_retry_budget_zero_allows_nothing() -> None:
    budget = RetryBudget(ratio=0.0, min_per_second=0, ttl=10)
    budget.deposit(0)
    assert not budget.withdraw(0)


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
    floor=st.integers(0, 20),
    ttl=st.sampled_from([1.0, 10.0]),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=400),
    retries_per_request=st.integers(1, 5),
)
def test_retry_budget_bounds_retries_of_an_always_failing_upstream(
    ratio: float, floor: int, ttl: float, gaps: list[float], retries_per_request: int
) -> None:
    """With every attempt failing, retries over T seconds and N requests stay within
    ratio*N + floor*(T + 1), whatever the arrival pattern."""
    budget = RetryBudget(ratio, floor, ttl)
    now = 100.0
    start = now
    retries = 0
    for gap in gaps:
        now += gap
        budget.deposit(now)
        for _ in range(retries_per_request):
            if not budget.withdraw(now):
                break
            retries += 1
    seconds = now - start
    assert retries <= ratio * len(gaps) + floor * (seconds + 1) + 1e-9
