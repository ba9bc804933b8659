"""The proxy's DNS responder: UDP and TCP on one address, mesh names answered here,
everything else relayed upstream.

The decisions are `dns.zone`'s; this module only moves bytes. A forwarded query goes
upstream under a fresh random id (clients' ids may collide, and a random id and source
port make a forged answer hard to slip in), from its own socket, to each upstream in
turn until one answers within `UPSTREAM_TIMEOUT`; the answer goes back under the
client's id. Forwards in flight are bounded: past `MAX_IN_FLIGHT` a query is answered
SERVFAIL at once rather than queued, so a flood cannot grow the proxy's memory. A query
that came over UDP is forwarded over UDP and its answer relayed even when truncated
(TC): the client asks again over TCP, which is forwarded over TCP.

Loaded only when the snapshot has a `dns:` section.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
from typing import TYPE_CHECKING, Final

from meshling.dns import message
from meshling.dns.upstream import Server, read_resolv_conf
from meshling.dns.zone import Drop, Forward, Reply, Result, Zone

if TYPE_CHECKING:
    from meshling.snapshot.model import MeshDns
    from meshling.telemetry.metrics import Metrics

log = logging.getLogger("meshling.dns")

# how long one upstream gets to answer before the next one is asked
UPSTREAM_TIMEOUT: Final = 2.0
# forwards waiting for an upstream at once; more are refused (SERVFAIL)
MAX_IN_FLIGHT: Final = 256
# a TCP client that sends nothing for this long is disconnected (RFC 7766 6.2.3)
TCP_IDLE_TIMEOUT: Final = 10.0
# TCP connections served at once; more are closed as they arrive
MAX_TCP_CONNECTIONS: Final = 128
_LENGTH = struct.Struct("!H")


class UpstreamError(Exception):
    """No upstream answered."""


class DnsServer:
    """One responder, bound to (address, port) for UDP and TCP."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        if metrics.dns_queries is None:
            metrics.dns_queries = {"mesh": 0, "forwarded": 0, "nxdomain": 0, "error": 0}
        self.queries = metrics.dns_queries
        self.zone = Zone()
        self.upstream: tuple[Server, ...] = ()
        self.address: tuple[str, int] | None = None
        # /etc/resolv.conf's nameservers, for a snapshot that names no upstream
        self._host_resolvers: tuple[Server, ...] | None = None
        self.in_flight = 0
        # I/O
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._tcp_writers: set[asyncio.StreamWriter] = set()

    # -- configuration ----------------------------------------------------------------
    def binds(self, config: MeshDns) -> bool:
        """Does this responder already listen where `config` says?"""
        return self.address == (config.address, config.port) or (
            config.port == 0 and self.address is not None and self.address[0] == config.address
        )

    def configure(self, config: MeshDns) -> None:
        """Take a snapshot's names and upstreams; queries already forwarded finish as
        they started."""
        self.zone = Zone(config.domain, config.names, config.ttl)
        if config.upstream:
            self.upstream = config.upstream
            return
        if self._host_resolvers is None:
            # read once, at start: later the file may name the proxy itself
            own = [self.address] if self.address is not None else []
            self._host_resolvers = read_resolv_conf(exclude=own)
        self.upstream = self._host_resolvers

    # -- start and stop ---------------------------------------------------------------
    async def start(self, config: MeshDns) -> None:
        """Bind UDP and TCP (OSError if the address is taken) and take `config`."""
        loop = asyncio.get_running_loop()
        udp, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self),
            local_addr=(config.address, config.port),
            reuse_port=True,
        )
        port = udp.get_extra_info("sockname")[1]
        try:
            self._tcp = await asyncio.start_server(
                self._serve_tcp, config.address, port, reuse_address=True, reuse_port=True
            )
        except OSError:
            udp.close()
            raise
        self._udp = udp
        self.address = (config.address, port)
        self.configure(config)
        log.info("DNS on %s:%d (udp, tcp), domain %s", config.address, port, self.zone.domain)

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for writer in list(self._tcp_writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()

    # -- queries ----------------------------------------------------------------------
    def count(self, result: Result) -> None:
        self.queries[result] += 1

    def udp_query(self, data: bytes, client: tuple[str, int]) -> None:
        decision = self.zone.decide(data)
        if isinstance(decision, Reply):
            self.count(decision.result)
            self._send_udp(message.truncate(decision.data, decision.udp_limit), client)
        elif isinstance(decision, Forward):
            if self.in_flight >= MAX_IN_FLIGHT or not self.upstream:
                self.count("error")
                self._send_udp(message.response(decision.query, message.SERVFAIL), client)
                return
            # counted now, not when the task first runs: a burst of datagrams is read
            # before any of its forwards starts
            self.in_flight += 1
            task = asyncio.ensure_future(self._forward_udp(data, decision, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self.count("error")
            log.debug("dropped a DNS message from %s: %s", client, decision.reason)

    def _send_udp(self, data: bytes, client: tuple[str, int]) -> None:
        if self._udp is not None:
            self._udp.sendto(data, client)

    async def _forward_udp(self, data: bytes, decision: Forward, client: tuple[str, int]) -> None:
        try:
            answer = await self._ask_upstream(data, tcp=False)
        except UpstreamError:
            self.count("error")
            self._send_udp(message.response(decision.query, message.SERVFAIL), client)
            return
        finally:
            self.in_flight -= 1
        try:
            relayed = message.truncate(answer, decision.udp_limit)
        except message.MessageError:
            self.count("error")
            self._send_udp(message.response(decision.query, message.SERVFAIL), client)
            return
        self.count("forwarded")
        self._send_udp(relayed, client)

    async def _ask_upstream(self, data: bytes, *, tcp: bool) -> bytes:
        """The first answer of the upstreams, asked in turn, under the client's id."""
        client_id = message.peek_id(data) or 0
        for server in self.upstream:
            upstream_id = secrets.randbelow(1 << 16)
            query = message.with_id(data, upstream_id)
            try:
                exchange = _exchange_tcp if tcp else _exchange_udp
                answer = await asyncio.wait_for(exchange(server, query), UPSTREAM_TIMEOUT)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                log.debug("upstream %s:%d: %r", server[0], server[1], exc)
                continue
            return message.with_id(answer, client_id)
        raise UpstreamError("no upstream answered")

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tcp_writers) >= MAX_TCP_CONNECTIONS:
            writer.close()
            return
        self._tcp_writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_TIMEOUT)
                    data = await asyncio.wait_for(
                        reader.readexactly(_LENGTH.unpack(head)[0]), TCP_IDLE_TIMEOUT
                    )
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    return
                answer = await self._tcp_answer(data)
                if answer is None:
                    return
                writer.write(_LENGTH.pack(len(answer)) + answer)
                await writer.drain()
        except OSError:
            return
        finally:
            self._tcp_writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _tcp_answer(self, data: bytes) -> bytes | None:
        """The answer to one query over TCP; None to close the connection."""
        decision = self.zone.decide(data)
        if isinstance(decision, Reply):
            self.count(decision.result)
            return decision.data
        if isinstance(decision, Drop):
            self.count("error")
            return None
        if self.in_flight >= MAX_IN_FLIGHT or not self.upstream:
            self.count("error")
            return message.response(decision.query, message.SERVFAIL)
        self.in_flight += 1
        try:
            answer = await self._ask_upstream(data, tcp=True)
        except UpstreamError:
            self.count("error")
            return message.response(decision.query, message.SERVFAIL)
        finally:
            self.in_flight -= 1
        self.count("forwarded")
        return answer


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server.udp_query(data, addr)

    def error_received(self, exc: Exception) -> None:
        # an ICMP error for an answer sent earlier: nothing to do for that client
        log.debug("DNS: %r", exc)


def _is_answer_to(answer: bytes, query: bytes) -> bool:
    """Does `answer` answer `query`: its id, the QR bit, and the same question bytes
    (compared without case: a resolver may randomise it, RFC draft 0x20)?"""
    if len(answer) < len(query) or answer[:2] != query[:2] or not answer[2] & 0x80:
        return False
    try:
        _, end = message.read_name(query, 12)
    except message.MessageError:
        return True  # not a question of ours to check: the id is all there is
    end += 4
    return answer[4:6] == query[4:6] and answer[12:end].lower() == query[12:end].lower()


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self, query: bytes, answered: asyncio.Future[bytes]) -> None:
        self.query = query
        self.answered = answered

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # anything but the answer (a late one to an earlier id, a forgery) is ignored
        if not self.answered.done() and _is_answer_to(data, self.query):
            self.answered.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: no server there
        if not self.answered.done():
            self.answered.set_exception(exc)


async def _exchange_udp(server: Server, query: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    answered: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _UpstreamUdp(query, answered), remote_addr=server
    )
    try:
        transport.sendto(query)
        return await answered
    finally:
        transport.close()


async def _exchange_tcp(server: Server, query: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(server[0], server[1])
    try:
        writer.write(_LENGTH.pack(len(query)) + query)
        await writer.drain()
        while True:
            head = await reader.readexactly(2)
            answer = await reader.readexactly(_LENGTH.unpack(head)[0])
            if _is_answer_to(answer, query):
                return answer
    finally:
        writer.close()
