"""The mesh zone: what the proxy's DNS responder answers itself, and what it passes on.

A decision is a pure function of the query's bytes and the table of virtual IPs:

* a message that cannot be read: FORMERR (with the client's id, when there is one);
  a response, or something too short to answer, is dropped (answering a response
  could make two responders bounce messages forever);
* an opcode other than QUERY: NOTIMP; not exactly one question: FORMERR; an EDNS
  version other than 0: BADVERS (RFC 6891 6.1.3);
* a name in the mesh domain (`<service>.<domain>`, any case): for a service of the
  table, its virtual IP as an A record (also for ANY), and an empty NOERROR answer for
  every other type, AAAA included, so that a client asking for both gets its IPv4
  address at once instead of waiting; the domain itself exists (NOERROR, empty); any
  other name in the domain is NXDOMAIN; a class other than IN (or ANY): NOTIMP;
* anything else goes upstream, as the client sent it.

Only `<service>.<domain>` is served, not `<service>.<mesh>.<domain>`: a proxy sees the
services of its own mesh only, and service names may hold dots, so a mesh label would
make names ambiguous rather than more precise.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from meshling.dns import message
from meshling.dns.message import Message, MessageError

# what became of a query, as the responder's metrics count it
Result = Literal["mesh", "nxdomain", "forwarded", "error"]
# RFC 6891: an extended rcode, 16, of which the header holds the low 4 bits
BADVERS: Final = 16


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer the client with `data` (before any truncation to its UDP limit)."""

    data: bytes
    result: Result
    # the most bytes an answer over UDP may have for this client
    udp_limit: int = message.CLASSIC_UDP_SIZE


@dataclass(frozen=True, slots=True)
class Forward:
    """Pass the query upstream; relay the answer."""

    query: Message
    udp_limit: int = message.CLASSIC_UDP_SIZE


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing (a response, or too few bytes to answer)."""

    reason: str


Decision = Reply | Forward | Drop


@dataclass(frozen=True, slots=True)
class Zone:
    """The mesh domain and its names: `names` maps services to IPv4 virtual IPs."""

    domain: str = "mesh"
    names: Mapping[str, str] = field(default_factory=dict)
    ttl: int = 30
    # lower-cased fully qualified name -> the A record's data
    _records: dict[str, bytes] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        domain = self.domain.strip(".").lower()
        object.__setattr__(self, "domain", domain)
        records: dict[str, bytes] = {}
        # sorted: two services told apart only by case keep the same winner everywhere
        for service in sorted(self.names):
            key = f"{service.lower()}.{domain}"
            records.setdefault(key, message.ipv4_rdata(self.names[service]))
        object.__setattr__(self, "_records", records)

    def contains(self, name: str) -> bool:
        """Is `name` (lower case, no final dot) the domain or below it?"""
        return name == self.domain or name.endswith("." + self.domain)

    def decide(self, data: bytes) -> Decision:
        try:
            query = message.parse(data)
        except MessageError as exc:
            if exc.message_id is None:
                return Drop(exc.reason)
            if exc.flags & message.FLAG_QR:
                return Drop("a response, not a query")
            return Reply(
                message.error_response(exc.message_id, exc.flags, message.FORMERR), "error"
            )
        if query.is_response:
            return Drop("a response, not a query")
        limit = query.udp_limit()
        if query.opcode != message.OPCODE_QUERY:
            return Reply(message.response(query, message.NOTIMP, authoritative=False), "error")
        if len(query.questions) != 1:
            return Reply(message.response(query, message.FORMERR, authoritative=False), "error")
        if query.edns_size is not None and query.edns_version != 0:
            return Reply(message.response(query, BADVERS, authoritative=False), "error", limit)
        question = query.questions[0]
        if not self.contains(question.name):
            return Forward(query, limit)
        return self._answer(query, limit)

    def _answer(self, query: Message, limit: int) -> Reply:
        question = query.questions[0]
        if question.qclass not in (message.CLASS_IN, message.CLASS_ANY):
            return Reply(message.response(query, message.NOTIMP), "error", limit)
        rdata = self._records.get(question.name)
        if rdata is None:
            if question.name == self.domain:
                return Reply(message.response(query, message.NOERROR), "mesh", limit)
            return Reply(message.response(query, message.NXDOMAIN), "nxdomain", limit)
        answers: tuple[tuple[str, int, int, bytes], ...] = ()
        if question.qtype in (message.TYPE_A, message.TYPE_ANY):
            answers = ((question.name, message.TYPE_A, self.ttl, rdata),)
        return Reply(message.response(query, message.NOERROR, answers), "mesh", limit)
