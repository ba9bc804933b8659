"""Garbage never crashes the DNS codec or the zone: every input is a decision."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from meshling.dns import message
from meshling.dns.message import MessageError
from meshling.dns.zone import Drop, Forward, Reply, Zone

ZONE = Zone("mesh", {"api": "241.1.2.3"})
LABELS = st.from_regex(r"\A[a-zA-Z0-9_-]{1,20}\Z")


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_any_bytes_give_a_decision(data: bytes) -> None:
    decision = ZONE.decide(data)
    assert isinstance(decision, Reply | Forward | Drop)
    if isinstance(decision, Reply):
        # whatever we answer is itself a well-formed message
        answer = message.parse(decision.data)
        assert answer.is_response and answer.id == message.peek_id(data)
        assert len(message.truncate(decision.data, decision.udp_limit)) <= max(
            decision.udp_limit, len(decision.data)
        )


@settings(max_examples=1500, deadline=None)
@given(st.binary(min_size=12, max_size=80), st.integers(0, 600), st.binary(max_size=8))
def test_fuzz_mutated_queries_never_crash(prefix: bytes, cut: int, tail: bytes) -> None:
    good = message.query("api.mesh", message.TYPE_A, 1, edns_size=1232)
    for data in (good[:cut] + tail, prefix + good[12:], good[:12] + prefix):
        with contextlib.suppress(MessageError):
            message.parse(data)
        assert isinstance(ZONE.decide(data), Reply | Forward | Drop)


@settings(max_examples=500, deadline=None)
@given(st.lists(LABELS, min_size=1, max_size=4), st.sampled_from([1, 28, 255, 16, 15]))
def test_fuzz_valid_queries_in_the_domain_are_answered(labels: list[str], qtype: int) -> None:
    name = ".".join(labels) + ".mesh"
    decision = ZONE.decide(message.query(name, qtype, 99))
    assert isinstance(decision, Reply)
    answer = message.parse(decision.data)
    assert answer.id == 99 and answer.questions[0].name == name.lower()
    if name.lower() == "api.mesh":
        assert answer.rcode == message.NOERROR
        assert bool(answer.answers) == (qtype in (1, 255))
    else:
        assert answer.rcode == message.NXDOMAIN and decision.result == "nxdomain"
