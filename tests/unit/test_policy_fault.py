"""FaultInjection: percentages on a seeded random source, header triggers, resource and
fragment validation, the conversion to the `fault:` fragment (golden files), and the
paced transport on a fake transport.

Golden files live in `src/meshling/policies/fault_injection/testdata/`:
`<case>.policies.yaml` holds resources, `<case>.<dataplane>.fault.yaml` the
`fragment(resources, "default", dataplane)` output. Run with MESHLING_UPDATE_GOLDEN=1 to
rewrite the outputs after a deliberate change, then read the diff.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.policies import policy_type
from meshling.policies.fault_injection import (
    NONE,
    FaultConfig,
    FaultInjection,
    decide,
    fragment,
    parse_resource,
)
from meshling.policies.fault_injection.decide import fires
from meshling.snapshot import SnapshotError
from meshling.snapshot.load import _Node

TESTDATA = (
    Path(__file__).parents[2] / "src" / "meshling" / "policies" / "fault_injection" / "testdata"
)
DATAPLANES: dict[str, tuple[str, dict[str, str]]] = {
    "api-zone-a": ("api", {"zone": "a"}),
    "api-zone-b": ("api", {"zone": "b"}),
}


def load(case: str) -> list[FaultInjection]:
    path = TESTDATA / f"{case}.policies.yaml"
    return [parse_resource(doc, str(path)) for doc in yaml.safe_load_all(path.read_text())]


def resource(conf: Any) -> dict[str, Any]:
    return {
        "kind": "FaultInjection",
        "metadata": {"name": "chaos", "mesh": "default"},
        "spec": {"sources": [{"service": "*"}], "destinations": [{"service": "api"}], "conf": conf},
    }


def conf_of(conf: dict[str, Any]) -> Any:
    return parse_resource(resource(conf), "f.yaml").conf


# -- decisions --------------------------------------------------------------------------------
@pytest.mark.parametrize("percentage", [0.0, 1.0, 12.5, 50.0, 99.0, 100.0])
def test_fires_about_the_percentage_of_the_time(percentage: float) -> None:
    rng = random.Random(7)
    n = 20_000
    fired = sum(fires(percentage, rng.random) for _ in range(n))
    assert fired / n * 100 == pytest.approx(percentage, abs=1.0)


def test_fires_never_draws_for_zero_or_a_hundred() -> None:
    def draw() -> float:
        raise AssertionError("no draw needed")

    assert fires(100.0, draw) and not fires(0.0, draw)


def test_decide_aborts_first_then_delays_and_paces_the_rest() -> None:
    conf = conf_of(
        {
            "abort": {"percentage": 10, "http_status": 503},
            "delay": {"percentage": 100, "value": "2s"},
            "response_bandwidth": {"limit": "8kbps"},
        }
    )
    rng = random.Random(3)
    outcomes = [decide(conf, [], rng.random) for _ in range(5000)]
    aborted = [f for f in outcomes if f.abort is not None]
    assert len(aborted) == pytest.approx(500, abs=80)
    assert all(f.abort == 503 and f.delay == 0 for f in aborted)
    rest = [f for f in outcomes if f.abort is None]
    assert all(f.delay == 2.0 and f.bytes_per_second == 1000.0 for f in rest)


def test_decide_on_a_tcp_connection_resets_instead_of_a_status() -> None:
    conf = conf_of({"abort": {"percentage": 100, "http_status": 503}})
    assert decide(conf, None, random.random).abort == 0
    assert decide(conf, [], random.random).abort == 503


def test_decide_header_trigger_is_an_exact_match_and_never_fires_on_tcp() -> None:
    conf = conf_of(
        {
            "abort": {"percentage": 100, "http_status": 418},
            "header": {"name": "X-Chaos", "value": "on"},
        }
    )
    assert decide(conf, [(b"x-chaos", b"on")], random.random).abort == 418
    assert decide(conf, [(b"x-chaos", b"On")], random.random) is NONE
    assert decide(conf, [(b"x-other", b"on")], random.random) is NONE
    assert decide(conf, None, random.random) is NONE


def test_decide_that_fires_nothing_returns_the_shared_none() -> None:
    conf = conf_of({"delay": {"percentage": 0, "value": 1}})
    assert decide(conf, [], random.random) is NONE


# -- validation -----------------------------------------------------------------------------
def test_parse_resource_reads_every_field() -> None:
    conf = conf_of(
        {
            "delay": {"percentage": 50, "value": "250ms"},
            "abort": {"percentage": 5.5, "tcp_reset": True},
            "response_bandwidth": {"limit": "1.5mbps", "percentage": 20},
            "header": {"name": "X-Chaos", "value": "1"},
        }
    )
    assert (conf.delay.percentage, conf.delay.value) == (50.0, 0.25)
    assert conf.abort.percentage == 5.5 and conf.abort.http_status is None
    assert conf.response_bandwidth.bits_per_second == 1_500_000
    assert conf.header.name == "x-chaos"


BAD = [
    ({"delay": {"percentage": 101, "value": "1s"}}, "spec.conf.delay.percentage", "0 to 100"),
    ({"delay": {"percentage": -1, "value": "1s"}}, "spec.conf.delay.percentage", "0 to 100"),
    ({"delay": {"percentage": "half", "value": "1s"}}, "spec.conf.delay.percentage", "percentage"),
    ({"delay": {"percentage": 10, "value": "-5s"}}, "spec.conf.delay.value", "negative"),
    ({"delay": {"percentage": 10, "value": 0}}, "spec.conf.delay.value", "longer than zero"),
    ({"delay": {"percentage": 10}}, "spec.conf.delay.value", "missing"),
    ({"abort": {"percentage": 10}}, "spec.conf.abort", "exactly one of"),
    (
        {"abort": {"percentage": 10, "http_status": 503, "tcp_reset": True}},
        "spec.conf.abort",
        "exactly one of",
    ),
    (
        {"abort": {"percentage": 10, "http_status": 99}},
        "spec.conf.abort.http_status",
        "out of range",
    ),
    (
        {"abort": {"percentage": 10, "tcp_reset": False}},
        "spec.conf.abort.tcp_reset",
        "must be true",
    ),
    (
        {"response_bandwidth": {"limit": "fast"}},
        "spec.conf.response_bandwidth.limit",
        "invalid bandwidth",
    ),
    (
        {"response_bandwidth": {"limit": "0kbps"}},
        "spec.conf.response_bandwidth.limit",
        "at least 8bps",
    ),
    (
        {"response_bandwidth": {"limit": 1000}},
        "spec.conf.response_bandwidth.limit",
        "invalid bandwidth",
    ),
    ({"header": {"name": "x", "value": "1"}}, "spec.conf", "at least one of"),
    (
        {"delay": {"percentage": 1, "value": 1}, "header": {"name": "x-meshling-x", "value": "1"}},
        "spec.conf.header.name",
        "mesh's own",
    ),
    (
        {"delay": {"percentage": 1, "value": 1}, "header": {"name": "x chaos", "value": "1"}},
        "spec.conf.header.name",
        "invalid header name",
    ),
    (
        {"delay": {"percentage": 1, "value": 1}, "header": {"name": "x", "value": 1}},
        "spec.conf.header.value",
        "string",
    ),
    ({"delay": {"percentage": 1, "value": 1}, "jitter": 1}, "spec.conf.jitter", "unknown"),
]


@pytest.mark.parametrize(("conf", "path", "reason"), BAD)
def test_parse_resource_rejects_nonsense_naming_the_field(
    conf: Any, path: str, reason: str
) -> None:
    with pytest.raises(SnapshotError) as err:
        parse_resource(resource(conf), "f.yaml")
    assert err.value.path == path
    assert reason in err.value.reason


# -- the fragment -----------------------------------------------------------------------------
@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
def test_fragment_matches_golden(dataplane: str) -> None:
    golden = TESTDATA / f"api.{dataplane}.fault.yaml"
    service, tags = DATAPLANES[dataplane]
    document = fragment(load("api"), "default", (service, tags))
    if os.environ.get("MESHLING_UPDATE_GOLDEN"):
        header = f"# fragment(api.policies.yaml, 'default', dataplane=({service!r}, {tags!r}))\n"
        golden.write_text(header + yaml.safe_dump(document, sort_keys=False))
    assert document == yaml.safe_load(golden.read_text())


@pytest.mark.parametrize("dataplane", sorted(DATAPLANES))
def test_golden_fragments_load_and_round_trip(dataplane: str) -> None:
    document = yaml.safe_load((TESTDATA / f"api.{dataplane}.fault.yaml").read_text())
    config = FaultConfig.from_dict(_Node("golden", "fault", document))
    assert config.to_dict() == document


def test_fragment_rule_for_a_caller() -> None:
    config = FaultConfig.from_dict(
        _Node("x", "", fragment(load("api"), "default", ("api", {"zone": "b"})))
    )
    rule = config.rule_for("spiffe://default/web")
    assert rule is not None and rule.name == "web-aborts"
    rule = config.rule_for("spiffe://default/batch")
    assert rule is not None and rule.name == "slow-on-demand"  # batch-resets is zone a only
    assert config.rule_for(None) is config.rules[-1]


def test_registry_places_fault_injection_on_the_inbound_chain() -> None:
    policy = policy_type("FaultInjection")
    assert policy is not None
    assert (policy.attach, policy.key, policy.fragment) == ("chain", "fault", fragment)


# -- the paced transport ----------------------------------------------------------------------
class FakeTransport:
    def __init__(self) -> None:
        self.sent = 0
        self.closed = False
        self.eof = False

    def write(self, data: bytes) -> None:
        self.sent += len(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def write_eof(self) -> None:
        self.eof = True

    def get_write_buffer_size(self) -> int:
        return 0


class FlowControl:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")


def test_paced_transport_sends_at_the_rate_pauses_and_closes_after_the_queue() -> None:
    from meshling.proxy.deadlines import Deadlines
    from meshling.proxy.fault import PacedTransport

    async def run() -> tuple[float, FakeTransport, FlowControl, int]:
        transport, flow = FakeTransport(), FlowControl()
        paced = PacedTransport(transport, flow, Deadlines())
        paced.pace(400_000.0)  # 400 kB/s
        started = time.monotonic()
        paced.write(b"x" * 100_000)
        paced.write(b"y" * 100_000)
        paced.close()
        assert not transport.closed
        early = transport.sent
        while not transport.closed:
            await asyncio.sleep(0.005)
        return time.monotonic() - started, transport, flow, early

    elapsed, transport, flow, early = asyncio.run(run())
    assert transport.sent == 200_000
    assert early < 20_000  # a small burst at most, not the whole write
    assert 0.45 <= elapsed <= 0.65, elapsed
    assert flow.events == ["pause", "resume"]


def test_paced_transport_unpaced_writes_pass_straight_through() -> None:
    from meshling.proxy.fault import PacedTransport

    transport = FakeTransport()
    paced = PacedTransport(transport, FlowControl(), None)  # type: ignore[arg-type]
    paced.write(b"abc")
    assert transport.sent == 3
    paced.write_eof()
    assert transport.eof
