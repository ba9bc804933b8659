"""DNS messages on the wire (RFC 1035): reading queries, writing answers. No I/O.

Only what a stub resolver sends is read: a header, questions (names may be compressed,
RFC 1035 4.1.4), and whatever records follow, of which only the EDNS0 OPT record
(RFC 6891) means anything here: its UDP payload size says how large an answer over UDP
may be. Everything else is skipped, never trusted: a pointer must point backwards (so
names cannot loop), a name is at most 255 bytes, and a message that ends early or has
bytes left over is malformed. `parse` raises `MessageError` for all of it, with the
client's id when the header was readable, so the responder can still answer FORMERR.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

# record types and classes (RFC 1035 3.2.2, RFC 3596, RFC 6891)
TYPE_A: Final = 1
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
TYPE_ANY: Final = 255
CLASS_IN: Final = 1
CLASS_ANY: Final = 255
# header flags
FLAG_QR: Final = 0x8000
FLAG_AA: Final = 0x0400
FLAG_TC: Final = 0x0200
FLAG_RD: Final = 0x0100
FLAG_RA: Final = 0x0080
OPCODE_QUERY: Final = 0
# response codes
NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
# the largest answer over UDP without EDNS0 (RFC 1035 4.2.1), and the size this
# responder offers with it (the DNS flag day 2020 value: no IP fragmentation)
CLASSIC_UDP_SIZE: Final = 512
EDNS_UDP_SIZE: Final = 1232
MAX_NAME: Final = 255
MAX_LABEL: Final = 63

_HEADER = struct.Struct("!HHHHHH")
_QUESTION_TAIL = struct.Struct("!HH")
_RECORD_TAIL = struct.Struct("!HHIH")


class MessageError(ValueError):
    """A message that cannot be read: why, and the sender's id when the header was there."""

    def __init__(self, reason: str, message_id: int | None = None, flags: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.message_id = message_id
        self.flags = flags


@dataclass(frozen=True, slots=True)
class Question:
    """What is asked: a name (lower case, dot-separated, without the final dot; "" for
    the root), a record type and a class."""

    name: str
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class Record:
    """A resource record as read: its data is left as bytes (names in it not expanded)."""

    name: str
    rtype: int
    ttl: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Message:
    """A parsed message: the header fields a responder needs, its questions, and the
    EDNS0 UDP payload size (None: the sender did not use EDNS0)."""

    id: int
    flags: int
    questions: tuple[Question, ...]
    edns_size: int | None = None
    # the EDNS version the sender asked for (0 is the only one there is)
    edns_version: int = 0
    # the answer section's records: (owner name, type, TTL, data); a query has none
    answers: tuple[Record, ...] = ()

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def recursion_desired(self) -> bool:
        return bool(self.flags & FLAG_RD)

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    def udp_limit(self) -> int:
        """How many bytes an answer over UDP may have for this sender."""
        if self.edns_size is None:
            return CLASSIC_UDP_SIZE
        return max(CLASSIC_UDP_SIZE, min(self.edns_size, EDNS_UDP_SIZE))


def read_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at `offset` and the offset just after it (after the first pointer, for
    a compressed name). Labels are lower-cased; a label holding a dot or a byte outside
    printable ASCII is refused (no name this responder serves has one, and it keeps
    names unambiguous as text)."""
    labels: list[str] = []
    length = 0
    end: int | None = None
    position = offset
    # every pointer must go strictly backwards, so at most len(data) of them
    lowest = offset
    while True:
        if position >= len(data):
            raise MessageError("name runs past the end of the message")
        size = data[position]
        if size & 0xC0 == 0xC0:
            if position + 1 >= len(data):
                raise MessageError("name pointer runs past the end of the message")
            target = ((size & 0x3F) << 8) | data[position + 1]
            if target >= lowest:
                raise MessageError("name pointer does not point backwards")
            if end is None:
                end = position + 2
            lowest = target
            position = target
            continue
        if size & 0xC0:
            raise MessageError(f"unknown label type 0x{size & 0xC0:02x}")
        if size == 0:
            break
        raw = data[position + 1 : position + 1 + size]
        if len(raw) != size:
            raise MessageError("label runs past the end of the message")
        length += size + 1
        if length + 1 > MAX_NAME:
            raise MessageError(f"name longer than {MAX_NAME} bytes")
        if any(b <= 0x20 or b >= 0x7F or b == 0x2E for b in raw):
            raise MessageError("label holds a dot, a space or a byte outside printable ASCII")
        labels.append(raw.decode("ascii").lower())
        position += 1 + size
    return ".".join(labels), (position + 1 if end is None else end)


def encode_name(name: str) -> bytes:
    """A name (dot-separated, final dot optional) in wire form, uncompressed."""
    out = bytearray()
    for label in name.rstrip(".").split(".") if name.strip(".") else ():
        raw = label.encode("ascii")
        if not 0 < len(raw) <= MAX_LABEL:
            raise ValueError(f"invalid label {label!r} in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME:
        raise ValueError(f"name {name!r} is longer than {MAX_NAME} bytes")
    return bytes(out)


def parse(data: bytes) -> Message:
    """Read a whole message; `MessageError` says why one cannot be read."""
    if len(data) < _HEADER.size:
        raise MessageError(f"message of {len(data)} bytes is shorter than a header")
    message_id, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    try:
        offset = _HEADER.size
        questions = []
        for _ in range(qdcount):
            name, offset = read_name(data, offset)
            if offset + _QUESTION_TAIL.size > len(data):
                raise MessageError("question runs past the end of the message")
            qtype, qclass = _QUESTION_TAIL.unpack_from(data, offset)
            offset += _QUESTION_TAIL.size
            questions.append(Question(name, qtype, qclass))
        edns_size = None
        edns_version = 0
        answers = []
        for index in range(ancount + nscount + arcount):
            name, offset = read_name(data, offset)
            if offset + _RECORD_TAIL.size > len(data):
                raise MessageError("record runs past the end of the message")
            rtype, rclass, ttl, rdlength = _RECORD_TAIL.unpack_from(data, offset)
            offset += _RECORD_TAIL.size + rdlength
            if offset > len(data):
                raise MessageError("record data runs past the end of the message")
            if index < ancount:
                answers.append(Record(name, rtype, ttl, data[offset - rdlength : offset]))
            if rtype == TYPE_OPT:
                if index < ancount + nscount or name or edns_size is not None:
                    raise MessageError("OPT record out of place (RFC 6891 6.1.1)")
                # the class field is the sender's UDP payload size; the TTL field holds
                # the extended rcode, then the version
                edns_size = rclass
                edns_version = (ttl >> 16) & 0xFF
        if offset != len(data):
            raise MessageError(f"{len(data) - offset} bytes after the last record")
    except MessageError as exc:
        raise MessageError(exc.reason, message_id, flags) from None
    return Message(message_id, flags, tuple(questions), edns_size, edns_version, tuple(answers))


def query(
    name: str,
    qtype: int = TYPE_A,
    message_id: int = 0,
    *,
    edns_size: int | None = None,
    edns_version: int = 0,
    recursion_desired: bool = True,
) -> bytes:
    """A standard query for one name, as a stub resolver sends it (with an OPT record
    when `edns_size` is given)."""
    flags = FLAG_RD if recursion_desired else 0
    additional = 0 if edns_size is None else 1
    out = _HEADER.pack(message_id, flags, 1, 0, 0, additional)
    out += encode_name(name) + _QUESTION_TAIL.pack(qtype, CLASS_IN)
    if edns_size is not None:
        out += b"\x00" + _RECORD_TAIL.pack(TYPE_OPT, edns_size, edns_version << 16, 0)
    return out


def peek_id(data: bytes) -> int | None:
    """The id of a message, if it has a header."""
    return int.from_bytes(data[:2], "big") if len(data) >= 2 else None


def with_id(data: bytes, message_id: int) -> bytes:
    """The same message with another id (a forwarded query, its relayed answer)."""
    return message_id.to_bytes(2, "big") + data[2:]


def _opt_record(size: int = EDNS_UDP_SIZE, extended_rcode: int = 0) -> bytes:
    return b"\x00" + _RECORD_TAIL.pack(TYPE_OPT, size, extended_rcode << 24, 0)


def response(
    query: Message,
    rcode: int,
    answers: tuple[tuple[str, int, int, bytes], ...] = (),
    *,
    authoritative: bool = True,
    recursion_available: bool = True,
) -> bytes:
    """An answer to `query`: its id, RD and first question echoed, `answers` as
    (name, type, ttl, rdata) records of class IN, and an OPT record if the query had
    one. Only the low 4 bits of `rcode` fit the header; higher ones go into the OPT
    record (BADVERS is 16)."""
    flags = FLAG_QR | (query.opcode << 11) | (query.flags & FLAG_RD) | (rcode & 0xF)
    if authoritative:
        flags |= FLAG_AA
    if recursion_available:
        flags |= FLAG_RA
    body = bytearray()
    question = query.questions[0] if query.questions else None
    if question is not None:
        body += encode_name(question.name) + _QUESTION_TAIL.pack(question.qtype, question.qclass)
    for name, rtype, ttl, rdata in answers:
        if question is not None and name == question.name:
            # a pointer to the question's name, right after the header
            body += b"\xc0\x0c"
        else:
            body += encode_name(name)
        body += _RECORD_TAIL.pack(rtype, CLASS_IN, ttl, len(rdata)) + rdata
    additional = 0
    if query.edns_size is not None:
        body += _opt_record(extended_rcode=rcode >> 4)
        additional = 1
    header = _HEADER.pack(
        query.id, flags, 1 if question is not None else 0, len(answers), 0, additional
    )
    return header + bytes(body)


def error_response(message_id: int, flags: int, rcode: int) -> bytes:
    """An answer with no question to a message that could not be read (FORMERR)."""
    out_flags = FLAG_QR | (flags & 0x7800) | (flags & FLAG_RD) | FLAG_RA | rcode
    return _HEADER.pack(message_id, out_flags, 0, 0, 0, 0)


def truncate(answer: bytes, limit: int) -> bytes:
    """`answer` if it fits in `limit` bytes, else its header and question with TC set
    and no records, telling the client to ask again over TCP (RFC 1035 4.2.1)."""
    if len(answer) <= limit:
        return answer
    message_id, flags, qdcount, _, _, _ = _HEADER.unpack_from(answer)
    offset = _HEADER.size
    for _ in range(qdcount):
        _, offset = read_name(answer, offset)
        offset += _QUESTION_TAIL.size
    header = _HEADER.pack(message_id, flags | FLAG_TC, qdcount, 0, 0, 0)
    return header + answer[_HEADER.size : offset]


def ipv4_rdata(address: str) -> bytes:
    """An A record's data: the address's four bytes."""
    parts = address.split(".")
    if len(parts) != 4:
        raise ValueError(f"not an IPv4 address: {address!r}")
    return bytes(int(p) for p in parts)
