"""The DNS wire codec: names (compressed or not), queries, answers, truncation."""

from __future__ import annotations

import struct

import pytest

from meshling.dns import message
from meshling.dns.message import MessageError


def test_message_query_round_trips_through_parse() -> None:
    parsed = message.parse(message.query("Api.Mesh.", message.TYPE_AAAA, 0x1234))
    assert parsed.id == 0x1234
    assert parsed.recursion_desired and not parsed.is_response
    assert parsed.opcode == message.OPCODE_QUERY
    assert parsed.questions == (message.Question("api.mesh", message.TYPE_AAAA, 1),)
    assert parsed.edns_size is None
    assert parsed.udp_limit() == 512


def test_message_edns_opt_sets_the_udp_limit_within_bounds() -> None:
    big = message.parse(message.query("a.mesh", edns_size=4096))
    assert big.edns_size == 4096 and big.udp_limit() == message.EDNS_UDP_SIZE
    small = message.parse(message.query("a.mesh", edns_size=100))
    assert small.udp_limit() == 512
    assert message.parse(message.query("a.mesh", edns_size=1232, edns_version=1)).edns_version == 1


def test_message_reads_a_compressed_name_in_a_record() -> None:
    header = struct.pack("!HHHHHH", 7, 0x8180, 1, 1, 0, 0)
    question = message.encode_name("api.mesh") + struct.pack("!HH", 1, 1)
    # the answer's owner: "www" then a pointer to "api.mesh" at offset 12
    owner = b"\x03www\xc0\x0c"
    record = owner + struct.pack("!HHIH", 1, 1, 30, 4) + bytes([240, 0, 0, 1])
    parsed = message.parse(header + question + record)
    assert parsed.answers == (message.Record("www.api.mesh", 1, 30, bytes([240, 0, 0, 1])),)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x01\x00", "shorter than a header"),
        (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x03api", "past the end"),
        # a pointer to itself
        (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x0c\x00\x01\x00\x01", "backwards"),
        # a pointer forwards
        (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\xc0\x20\x00\x01\x00\x01", "backwards"),
        (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x40abc\x00\x00\x01\x00\x01", "label type"),
        (message.query("api.mesh", message_id=1) + b"\x00", "after the last record"),
        (struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0) + b"\x03a.b\x00\x00\x01\x00\x01", "dot"),
        (
            struct.pack("!HHHHHH", 1, 0, 0, 1, 0, 0)
            + b"\x00"
            + struct.pack("!HHIH", 41, 512, 0, 0),
            "OPT record out of place",
        ),
    ],
)
def test_message_parse_refuses_malformed_messages(data: bytes, reason: str) -> None:
    with pytest.raises(MessageError, match=reason) as caught:
        message.parse(data)
    # the id is kept for a FORMERR answer whenever the header was there
    assert caught.value.message_id == (1 if len(data) >= 12 else None)


def test_message_name_longer_than_255_bytes_is_refused() -> None:
    name = ".".join(["a" * 63] * 4)  # 4 * 64 + 1 = 257 bytes on the wire
    raw = b"".join(bytes([63]) + b"a" * 63 for _ in range(4)) + b"\x00"
    data = struct.pack("!HHHHHH", 9, 0, 1, 0, 0, 0) + raw + b"\x00\x01\x00\x01"
    with pytest.raises(MessageError, match="longer than 255"):
        message.parse(data)
    with pytest.raises(ValueError, match="longer than 255"):
        message.encode_name(name)


def test_message_response_echoes_id_rd_and_question_and_points_to_it() -> None:
    q = message.parse(message.query("api.mesh", message.TYPE_A, 77, edns_size=1232))
    data = message.response(q, message.NOERROR, (("api.mesh", 1, 30, bytes([241, 2, 3, 4])),))
    assert b"\xc0\x0c" in data  # the answer's owner is a pointer to the question
    a = message.parse(data)
    assert a.id == 77 and a.is_response and a.recursion_desired and a.rcode == 0
    assert a.flags & message.FLAG_AA
    assert a.questions == q.questions
    assert a.answers == (message.Record("api.mesh", 1, 30, bytes([241, 2, 3, 4])),)
    assert a.edns_size == message.EDNS_UDP_SIZE


def test_message_truncate_keeps_the_question_and_sets_tc() -> None:
    q = message.parse(message.query("api.mesh", message.TYPE_A, 5))
    answers = tuple(("api.mesh", 1, 30, bytes([240, 0, 0, i])) for i in range(60))
    data = message.response(q, message.NOERROR, answers)
    assert len(data) > 512
    cut = message.truncate(data, 512)
    parsed = message.parse(cut)
    assert parsed.flags & message.FLAG_TC and parsed.answers == ()
    assert parsed.questions == q.questions and parsed.id == 5
    small = message.response(q, message.NOERROR, answers[:1])
    assert message.truncate(small, 512) is small


def test_message_with_id_changes_only_the_id() -> None:
    data = message.query("x.example", message.TYPE_A, 1)
    other = message.with_id(data, 0xBEEF)
    assert message.peek_id(other) == 0xBEEF and other[2:] == data[2:]
    assert message.peek_id(b"\x01") is None


def test_message_error_response_is_a_bare_header_with_the_rcode() -> None:
    data = message.error_response(0x4242, message.FLAG_RD, message.FORMERR)
    parsed = message.parse(data)
    assert parsed.id == 0x4242 and parsed.rcode == message.FORMERR and parsed.questions == ()
