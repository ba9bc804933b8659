"""The mesh zone's decisions: answer, NXDOMAIN, empty, forward, error or drop."""

from __future__ import annotations

import struct

import pytest

from meshling.dns import message
from meshling.dns.upstream import nameservers
from meshling.dns.zone import BADVERS, Drop, Forward, Reply, Zone

ZONE = Zone("mesh", {"api": "241.1.2.3", "Web.Front": "250.0.0.9"}, ttl=30)


def _reply(data: bytes, zone: Zone = ZONE) -> tuple[Reply, message.Message]:
    decision = zone.decide(data)
    assert isinstance(decision, Reply), decision
    return decision, message.parse(decision.data)


def test_zone_answers_a_service_with_its_virtual_ip() -> None:
    decision, answer = _reply(message.query("api.mesh", message.TYPE_A, 11))
    assert decision.result == "mesh"
    assert answer.id == 11 and answer.rcode == message.NOERROR
    assert answer.flags & message.FLAG_AA
    assert answer.answers == (
        message.Record("api.mesh", message.TYPE_A, 30, bytes([241, 1, 2, 3])),
    )


def test_zone_names_are_case_insensitive_and_may_hold_dots() -> None:
    _, answer = _reply(message.query("WEB.front.MESH.", message.TYPE_A))
    assert answer.answers[0].data == bytes([250, 0, 0, 9])
    assert answer.questions[0].name == "web.front.mesh"


def test_zone_aaaa_for_a_known_name_is_an_empty_noerror() -> None:
    decision, answer = _reply(message.query("api.mesh", message.TYPE_AAAA))
    assert decision.result == "mesh"
    assert answer.rcode == message.NOERROR and answer.answers == ()


def test_zone_any_gets_the_a_record() -> None:
    _, answer = _reply(message.query("api.mesh", message.TYPE_ANY))
    assert [r.rtype for r in answer.answers] == [message.TYPE_A]


def test_zone_unknown_name_in_the_domain_is_nxdomain() -> None:
    decision, answer = _reply(message.query("nope.mesh", message.TYPE_A))
    assert decision.result == "nxdomain" and answer.rcode == message.NXDOMAIN
    # a name below a service is not the service
    _, below = _reply(message.query("x.api.mesh", message.TYPE_A))
    assert below.rcode == message.NXDOMAIN


def test_zone_the_domain_itself_exists_without_records() -> None:
    decision, answer = _reply(message.query("mesh", message.TYPE_A))
    assert decision.result == "mesh"
    assert answer.rcode == message.NOERROR and answer.answers == ()


def test_zone_forwards_names_outside_the_domain() -> None:
    for name in ("example.com", "mesh.example.com", "notmesh"):
        decision = ZONE.decide(message.query(name, message.TYPE_A, 3, edns_size=4096))
        assert isinstance(decision, Forward), name
        assert decision.query.id == 3 and decision.udp_limit == message.EDNS_UDP_SIZE


def test_zone_ttl_is_configurable() -> None:
    _, answer = _reply(message.query("api.mesh"), Zone("mesh", {"api": "241.1.2.3"}, ttl=5))
    assert answer.answers[0].ttl == 5


def test_zone_other_domain() -> None:
    zone = Zone("svc.internal.", {"api": "241.1.2.3"})
    _, answer = _reply(message.query("api.svc.internal"), zone)
    assert answer.answers[0].data == bytes([241, 1, 2, 3])
    assert isinstance(zone.decide(message.query("api.mesh")), Forward)


def test_zone_malformed_query_with_a_header_is_formerr_with_its_id() -> None:
    data = message.query("api.mesh")[:-2]
    data = message.with_id(data, 0x3131)
    decision, answer = _reply(data)
    assert decision.result == "error"
    assert answer.id == 0x3131 and answer.rcode == message.FORMERR


def test_zone_drops_responses_and_headerless_garbage() -> None:
    response = message.response(message.parse(message.query("api.mesh")), message.NOERROR)
    assert isinstance(ZONE.decide(response), Drop)
    assert isinstance(ZONE.decide(b"\x01"), Drop)
    # a malformed response is dropped too, not answered
    assert isinstance(ZONE.decide(response + b"\x00"), Drop)


def test_zone_other_opcodes_are_notimp() -> None:
    data = bytearray(message.query("api.mesh"))
    data[2] |= 2 << 3  # opcode 2 (STATUS)
    decision, answer = _reply(bytes(data))
    assert decision.result == "error" and answer.rcode == message.NOTIMP


def test_zone_not_exactly_one_question_is_formerr() -> None:
    data = struct.pack("!HHHHHH", 8, 0x0100, 0, 0, 0, 0)
    _, answer = _reply(data)
    assert answer.rcode == message.FORMERR and answer.id == 8
    one = message.query("api.mesh")
    two = struct.pack("!HHHHHH", 8, 0x0100, 2, 0, 0, 0) + one[12:] + one[12:]
    _, answer = _reply(two)
    assert answer.rcode == message.FORMERR


def test_zone_class_other_than_in_is_notimp() -> None:
    data = bytearray(message.query("api.mesh"))
    data[-2:] = (3).to_bytes(2, "big")  # CHAOS
    _, answer = _reply(bytes(data))
    assert answer.rcode == message.NOTIMP


def test_zone_edns_version_above_zero_is_badvers() -> None:
    _, answer = _reply(message.query("api.mesh", edns_size=1232, edns_version=1))
    # the header holds BADVERS's low bits (0), the OPT record its high ones
    assert answer.rcode == BADVERS & 0xF and answer.edns_size is not None
    tail = message.response(message.parse(message.query("a.mesh", edns_size=512)), BADVERS)
    assert tail[-11:][5:6] == bytes([BADVERS >> 4])


def test_zone_case_twins_keep_one_winner() -> None:
    zone = Zone("mesh", {"API": "241.0.0.1", "api": "241.0.0.2"})
    _, answer = _reply(message.query("api.mesh"), zone)
    assert answer.answers[0].data == bytes([241, 0, 0, 1])  # "API" sorts first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nameserver 10.0.0.2\nnameserver 10.0.0.3\n", (("10.0.0.2", 53), ("10.0.0.3", 53))),
        ("# nameserver 1.1.1.1\n; x\nsearch a b\nnameserver ::1\n", (("::1", 53),)),
        ("nameserver bogus\nnameserver\nnameserver 10.0.0.2 extra\n", (("10.0.0.2", 53),)),
        (
            "".join(f"nameserver 10.0.0.{i}\n" for i in range(1, 6)),
            tuple((f"10.0.0.{i}", 53) for i in (1, 2, 3)),
        ),
        ("nameserver 127.0.0.1\nnameserver 127.0.0.1\n", (("127.0.0.1", 53),)),
    ],
)
def test_upstream_nameservers_of_resolv_conf(
    text: str, expected: tuple[tuple[str, int], ...]
) -> None:
    assert nameservers(text) == expected


def test_upstream_nameservers_leave_out_the_responder_itself() -> None:
    text = "nameserver 127.0.0.1\nnameserver 10.0.0.2\n"
    assert nameservers(text, exclude=[("127.0.0.1", 53)]) == (("10.0.0.2", 53),)
