"""The responder's forwarding: only the answer to the query sent is relayed, under the
client's id, and a dead upstream makes way for the next one."""

from __future__ import annotations

import asyncio
import socket

from meshling.dns import message
from meshling.dns.server import DnsServer, _is_answer_to
from meshling.snapshot.model import MeshDns
from meshling.telemetry.metrics import Metrics


def test_server_is_answer_to_checks_id_qr_and_question() -> None:
    query = message.query("www.example", message.TYPE_A, 0x1111)
    parsed = message.parse(query)
    answer = message.response(parsed, message.NOERROR)
    assert _is_answer_to(answer, query)
    assert not _is_answer_to(message.with_id(answer, 0x2222), query)
    assert not _is_answer_to(query, query)  # not a response
    other = message.response(message.parse(message.query("evil.example", 1, 0x1111)), 0)
    assert not _is_answer_to(other, query)
    # a resolver may randomise the case of the name (0x20): still the same question
    upper = message.response(message.parse(message.query("WWW.example", 1, 0x1111)), 0)
    assert _is_answer_to(upper, query)


class _Upstream(asyncio.DatagramProtocol):
    """Answers every query twice: first a forgery (another id, another address), then
    properly."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.seen: list[int] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        query = message.parse(data)
        self.seen.append(query.id)
        name = query.questions[0].name
        forged = message.response(query, message.NOERROR, ((name, 1, 60, bytes([6, 6, 6, 6])),))
        self.transport.sendto(message.with_id(forged, (query.id + 1) & 0xFFFF), addr)
        good = message.response(query, message.NOERROR, ((name, 1, 60, bytes([192, 0, 2, 1])),))
        self.transport.sendto(good, addr)


async def _forward_through(upstreams: list[tuple[str, int]]) -> tuple[message.Message, Metrics]:
    metrics = Metrics()
    server = DnsServer(metrics)
    await server.start(MeshDns(port=0, upstream=tuple(upstreams), names={"api": "241.0.0.1"}))
    assert server.address is not None
    loop = asyncio.get_running_loop()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    try:
        client.connect(server.address)
        client.send(message.query("www.example", message.TYPE_A, 0x4242))
        data = await asyncio.wait_for(loop.sock_recv(client, 4096), 10)
    finally:
        client.close()
        server.close()
    return message.parse(data), metrics


def test_server_relays_the_real_answer_under_the_client_id() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        upstream = _Upstream()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: upstream, local_addr=("127.0.0.1", 0)
        )
        try:
            answer, metrics = await _forward_through([transport.get_extra_info("sockname")])
        finally:
            transport.close()
        assert answer.id == 0x4242 and answer.answers[0].data == bytes([192, 0, 2, 1])
        assert len(upstream.seen) == 1
        assert metrics.dns_queries == {"mesh": 0, "forwarded": 1, "nxdomain": 0, "error": 0}

    asyncio.run(run())


def test_server_skips_an_upstream_that_refuses() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        # nothing listens there: ICMP port unreachable, at once
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
            hole.bind(("127.0.0.1", 0))
            dead = hole.getsockname()
        upstream = _Upstream()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: upstream, local_addr=("127.0.0.1", 0)
        )
        try:
            started = loop.time()
            answer, _ = await _forward_through([dead, transport.get_extra_info("sockname")])
            assert loop.time() - started < 1.5  # no wait for the dead one's timeout
        finally:
            transport.close()
        assert answer.rcode == message.NOERROR and answer.id == 0x4242

    asyncio.run(run())
