"""HTTP/2 proxying: client connections, multiplexed upstream connections, and the streams.

An HTTP/2 client connection (prior knowledge in cleartext, an `h2c` upgrade, or ALPN
"h2" on a TLS port) is an `H2Downstream`: the `h2` library's state machine, fed with the
bytes that arrive, and every request stream becomes an `H2Exchange`. The exchange routes
like an HTTP/1.1 one (the same router, clusters, balancer, circuit breaker, timeouts and
Retry policy) and forwards the stream:

- to an HTTP/2 upstream (`Cluster.protocol` "http2", or "downstream" for a client that
  speaks HTTP/2): a stream on an `H2Upstream`, one long-lived connection per endpoint
  carrying up to its peer's concurrency limit of streams at once, so connections and
  handshakes stay flat as load grows (`Multiplexed` finds or opens one);
- to an HTTP/1.1 upstream: a request on a pooled `HttpUpstream`, framed with
  Content-Length or chunked, trailers included.

Flow control runs end to end: bytes a client sends are acknowledged (WINDOW_UPDATE) only
once the upstream side took them, and bytes of a response are acknowledged to the
upstream (or read from an HTTP/1.1 upstream) only while the client's side keeps up, so
a slow reader on either side holds at most the windows' worth of bytes in the proxy.

gRPC calls (`content-type: application/grpc…`) get gRPC answers from the proxy itself
(`:status` 200 with `grpc-status`), honour `grpc-timeout`, and are retried on the gRPC
statuses a Retry policy names; their `grpc-status` is counted in the metrics.

Abuse (`meshling.http2.guard`): SETTINGS_MAX_CONCURRENT_STREAMS, window sizes and
SETTINGS_MAX_HEADER_LIST_SIZE are announced and enforced by `h2`; Rapid Reset and
control-frame floods are counted per connection, and the offender gets GOAWAY
(ENHANCE_YOUR_CALM). While the client does not read what the proxy writes (PING
acknowledgements included), the proxy stops reading from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    InformationalResponseReceived,
    PingAckReceived,
    PingReceived,
    PriorityUpdated,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    UnknownFrameReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from meshling.http1 import HOP_BY_HOP, Data, EndOfMessage, ParseError, ResponseHead
from meshling.http1.path import PathError
from meshling.http2 import grpc
from meshling.http2.guard import FloodGuard
from meshling.http2.headers import (
    HeaderError,
    RequestHead2,
    request_head,
    response_fields,
    to_http2,
)
from meshling.proxy.cluster import ConnectError
from meshling.proxy.side import Side

if TYPE_CHECKING:
    from meshling.policies.fault_injection.decide import Faults
    from meshling.proxy.balancer import Host
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.http import HttpUpstream
    from meshling.proxy.inbound import CallerPolicies
    from meshling.proxy.listener import ChainRuntime, ConnectionSet
    from meshling.proxy.mirror import MirrorCopy
    from meshling.proxy.ratelimit import Refusal
    from meshling.proxy.retry import RouteRetries
    from meshling.snapshot.model import Endpoint, Http2Limits, HttpFilter, Route
    from meshling.tracing.hop import Hop

log = logging.getLogger("meshling.proxy")

# a stream's bytes waiting for window (or for a slow transport) above which its source
# is no longer acknowledged or read, and below which it is again
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
# streams of one upstream connection, at most (and the peer's own limit)
UPSTREAM_STREAMS = 256
# receive window of each upstream stream (the connection's is four times as large)
UPSTREAM_WINDOW = 1 << 20
# a connection told to go away, or drained, is closed this long after its last stream
GRACE = 5.0
# `h2` enforces this many times the stream limit a client is told (see take_over)
STREAMS_ENFORCED = 4
# streams of an upstream connection before the peer's SETTINGS say its limit (RFC 9113
# recommends a limit of at least 100)
INITIAL_STREAMS = 100
# the PING that follows a draining connection's GOAWAY
DRAIN_PING = b"draining"

_INTERNAL = b"x-meshling-"
_MESH_FIELDS = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"})


def _server_config() -> H2Configuration:
    # Clients' header blocks are checked; what the proxy sends it built itself from
    # checked fields, so `h2` does not check (or rewrite) them again.
    return H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        split_outbound_cookies=False,
    )


class Connection(H2Connection):
    """`h2`'s connection, except that a graceful GOAWAY (NO_ERROR) from the peer does not
    end it at once.

    `h2` closes its whole state machine on any GOAWAY, which would cut off the streams
    the peer promised to finish (those up to its last stream id): a proxy restarting in
    place, or an upstream shutting down, would reset requests it was about to answer.
    Here such a GOAWAY only reports `ConnectionTerminated`; the proxy opens no new stream
    on the connection and closes it once its streams are done. Any other GOAWAY still
    ends the connection at once."""

    def _receive_goaway_frame(self, frame: GoAwayFrame) -> tuple[list[Any], list[Any]]:
        if frame.error_code != ErrorCodes.NO_ERROR:
            return super()._receive_goaway_frame(frame)
        event = ConnectionTerminated()
        event.error_code = ErrorCodes.NO_ERROR
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


class Outbox:
    """Bytes of one stream waiting for flow-control window, and how the stream ends."""

    __slots__ = ("chunks", "end", "owner", "size", "trailers")

    def __init__(self, owner: Any) -> None:
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.end = False
        self.trailers: list[tuple[bytes, bytes]] | None = None
        # told `drained()` when the backlog falls below LOW_WATER again
        self.owner = owner


class H2Side(Side):
    """An HTTP/2 connection of either direction: `h2`'s state, bytes out, and each
    stream's data waiting for window."""

    def __init__(self, config: H2Configuration) -> None:
        self.h2 = Connection(config)
        self.transport: asyncio.Transport | None = None
        self.outboxes: dict[int, Outbox] = {}
        self.closed = False
        self.write_paused = False
        self.flush_pending = False

    # -- writing ------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.wrote(len(data))
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)

    def mark(self) -> None:
        """Frames were queued: write them once the current callback is done, together
        with whatever else it queues (one TLS record and one syscall, not one each)."""
        if not self.flush_pending:
            self.flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        self.flush_pending = False
        self.flush()

    def wrote(self, size: int) -> None:
        """Count bytes written (a subclass's counters)."""

    def close(self) -> None:
        """Close after what was written, and what `h2` still holds, is sent."""
        self.flush()
        super().close()

    def send(self, sid: int, data: bytes, owner: Any, end: bool = False) -> int:
        """Send body bytes on a stream as its window allows; the bytes still waiting
        (HIGH_WATER or more: stop feeding this stream until `owner.drained()`)."""
        box = self.outboxes.get(sid)
        if box is None:
            box = self.outboxes[sid] = Outbox(owner)
        if data:
            box.chunks.append(data)
            box.size += len(data)
        box.end = box.end or end
        self._pump(sid, box)
        self.mark()
        return HIGH_WATER if self.write_paused else box.size

    def finish_stream(
        self, sid: int, owner: Any, trailers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """End a stream after its waiting bytes, with trailers if any."""
        box = self.outboxes.get(sid)
        if box is None:
            box = self.outboxes[sid] = Outbox(owner)
        box.end = True
        box.trailers = trailers
        self._pump(sid, box)
        self.mark()

    def _pump(self, sid: int, box: Outbox) -> None:
        h2 = self.h2
        try:
            chunks = box.chunks
            while chunks:
                window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = chunks[0]
                if len(chunk) > window:
                    h2.send_data(sid, chunk[:window])
                    chunks[0] = chunk[window:]
                    box.size -= window
                    continue
                chunks.popleft()
                box.size -= len(chunk)
                last = not chunks and box.end and box.trailers is None
                h2.send_data(sid, chunk, end_stream=last)
                if last:
                    del self.outboxes[sid]
                    return
            if not chunks and box.end:
                del self.outboxes[sid]
                if box.trailers is not None:
                    h2.send_headers(sid, box.trailers, end_stream=True)
                else:
                    h2.end_stream(sid)
                return
        except (StreamClosedError, ProtocolError):
            # the stream was reset (or the connection ended) with bytes still waiting
            self.outboxes.pop(sid, None)
            return
        if box.size < LOW_WATER and not self.write_paused:
            box.owner.drained(self)

    def window_updated(self, sid: int) -> None:
        if sid:
            box = self.outboxes.get(sid)
            if box is not None:
                self._pump(sid, box)
        else:
            for stream, box in list(self.outboxes.items()):
                self._pump(stream, box)
        self.mark()

    def drop_stream(self, sid: int, code: ErrorCodes | None = ErrorCodes.CANCEL) -> None:
        """Forget a stream's waiting bytes; reset it when `code` is given."""
        self.outboxes.pop(sid, None)
        if code is not None:
            with contextlib.suppress(StreamClosedError, ProtocolError, KeyError):
                self.h2.reset_stream(sid, code)
            self.mark()

    # -- flow control of the transport ----------------------------------------------------
    def pause_writing(self) -> None:
        # The peer is not reading: nothing more is read from it either (so that a flood
        # of PINGs cannot pile up their acknowledgements), and no stream is fed.
        self.write_paused = True
        self.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resume_reading()
        for box in list(self.outboxes.values()):
            if box.size < LOW_WATER:
                box.owner.drained(self)


class H2Downstream(H2Side):
    """One HTTP/2 client connection: its streams, limits and abuse budgets."""

    def __init__(self, chain: ChainRuntime, connections: ConnectionSet) -> None:
        super().__init__(_server_config())
        http = chain.http
        assert http is not None
        self.chain = chain
        self.http = http
        self.connections = connections
        self.stats = chain.listener_stats
        self.limits: Http2Limits = http.http2
        self.guard = FloodGuard(self.limits, time.monotonic())
        self.streams: dict[int, H2Exchange] = {}
        # streams whose request the client has not ended (answered or not)
        self.client_open: set[int] = set()
        self.peer = b""
        self.peer_identity: bytes | None = None
        self.permitted = True
        # the caller's RateLimit and FaultInjection rules (proxy.inbound); None: neither
        self.policies: CallerPolicies | None = None
        # its service, on an inbound listener (the golden metrics' source); "" else
        self.source = ""
        self.tls = chain.tls is not None
        self.draining = False
        # the client answered the PING sent after our GOAWAY: it opens no more streams
        self.drain_acked = False
        self.going_away = False
        self.last_activity = 0.0
        self.idle_since: float | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.take_over(transport, None, b"")

    def take_over(
        self,
        transport: asyncio.BaseTransport,
        identity: tuple[bytes | None, bool] | None,
        data: bytes,
        upgrade: tuple[bytes, RequestHead2] | None = None,
    ) -> None:
        """Start serving `transport`: a new connection, or one an HTTP/1.1 protocol
        hands over (its caller already checked, `identity`; the bytes it read, `data`;
        an h2c upgrade's settings and request, `upgrade`)."""
        self.transport = cast(asyncio.Transport, transport)
        chain = self.chain
        if identity is None:
            if chain.tls is not None:
                allowed, self.peer_identity = chain.tls.peer(transport)
                if not allowed:
                    self.closed = True
                    self.transport.abort()
                    return
            self.permitted = chain.authorize(self.peer_identity)
        else:
            self.peer_identity, self.permitted = identity
        if chain.inbound is not None:
            self.policies = chain.inbound.for_caller(self.peer_identity)
        self.source = chain.source_of(self.peer_identity)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0] if peer else "unknown").encode()
        self.stats.cx_total += 1
        self.stats.cx_active += 1
        self.connections.add(self)
        self.last_activity = self.idle_since = time.monotonic()
        limits = self.limits
        h2 = self.h2
        # the values the first SETTINGS frame announces
        announced = {
            SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        }
        h2.local_settings = Settings(client=False, initial_values=announced)
        if upgrade is not None:
            settings, _head = upgrade
            h2.initiate_upgrade_connection(settings)
        else:
            h2.initiate_connection()
        # A client may open streams before our SETTINGS reach it (it then assumes no
        # limit): `h2` would end the whole connection for one stream over the limit.
        # It is told the limit, but enforces a far larger one; the streams over the
        # announced limit are refused one by one (REFUSED_STREAM, to be sent again), as
        # RFC 9113 5.1.2 has it, and count against the client's reset budget.
        h2.local_settings = Settings(
            client=False,
            initial_values={
                **announced,
                SettingCodes.MAX_CONCURRENT_STREAMS: STREAMS_ENFORCED
                * limits.max_concurrent_streams,
            },
        )
        h2.decoder.max_header_list_size = limits.max_header_list_size
        extra = limits.connection_window - 65535
        if extra > 0:
            h2.increment_flow_control_window(extra)
        self.flush()
        if chain.draining:
            self.drain()
        if upgrade is not None:
            # the request that asked for the upgrade is stream 1, its body already ended
            self._request(1, upgrade[1], ended=True)
        if data:
            self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.cx_active -= 1
        self.connections.discard(self)
        for ex in list(self.streams.values()):
            ex.downstream_lost()
        self.streams.clear()

    # -- reading --------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.stats.bytes_received += len(data)
        self.last_activity = now = time.monotonic()
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            # `h2` queued a GOAWAY naming the error; say it, then close
            errors = self.stats.protocol_errors
            errors[400] = errors.get(400, 0) + 1
            log.debug("HTTP/2 protocol error from %s: %s", self.peer.decode(), exc)
            self.flush()
            self.close_now()
            return
        guard = self.guard
        for event in events:
            if isinstance(event, DataReceived):
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    ex.request_data(event.data, event.flow_controlled_length)
                else:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if not event.data and not event.stream_ended and guard.control(now):
                    self._calm_down()
                    return
            elif isinstance(event, RequestReceived):
                self._received_head(event)
            elif isinstance(event, StreamEnded):
                self.client_open.discard(event.stream_id)
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    ex.request_end(None)
            elif isinstance(event, TrailersReceived):
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    ex.request_end(list(event.headers))
            elif isinstance(event, WindowUpdated):
                self.window_updated(event.stream_id)
            elif isinstance(event, StreamReset):
                self.client_open.discard(event.stream_id)
                ex = self.streams.pop(event.stream_id, None)
                self.outboxes.pop(event.stream_id, None)
                if ex is not None:
                    answered = ex.response_done
                    ex.downstream_reset()
                    if not answered and guard.reset(now):
                        self._calm_down()
                        return
            elif isinstance(
                event,
                (
                    PingReceived,
                    RemoteSettingsChanged,
                    PriorityUpdated,
                    UnknownFrameReceived,
                ),
            ):
                if guard.control(now):
                    self._calm_down()
                    return
            elif isinstance(event, PingAckReceived):
                if event.ping_data == DRAIN_PING and self.draining:
                    self._drain_acked()
            elif isinstance(event, ConnectionTerminated):
                self.going_away = True
                if not self.streams:
                    self.close()
        self.flush()

    def _received_head(self, event: RequestReceived) -> None:
        sid = event.stream_id
        self.guard.opened_stream(time.monotonic())
        if self.going_away or self.draining:
            # streams opened after our GOAWAY are refused; the client may retry them
            self.drop_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        # streams count until both sides ended them, answered or not (RFC 9113 5.1.2)
        open_streams = len(self.streams) + len(self.client_open.difference(self.streams))
        if open_streams >= self.limits.max_concurrent_streams:
            self.drop_stream(sid, ErrorCodes.REFUSED_STREAM)
            if self.guard.reset(time.monotonic()):
                self._calm_down()
            return
        try:
            head = request_head(list(event.headers))
        except HeaderError as exc:
            errors = self.stats.protocol_errors
            errors[400] = errors.get(400, 0) + 1
            log.debug("HTTP/2 request refused: %s", exc.reason)
            self.drop_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        ended = event.stream_ended is not None
        if not ended:
            self.client_open.add(sid)
        self._request(sid, head, ended=ended)

    def _request(self, sid: int, head: RequestHead2, *, ended: bool) -> None:
        self.idle_since = None
        if self.chain.retired and not self.draining:
            self.drain()  # this stream is served; the next ones come on a new connection
        ex = H2Exchange(self, sid, head)
        self.streams[sid] = ex
        # a request that ended with its head goes upstream as one HEADERS frame
        ex.request_done = ended
        ex.begin()

    def _calm_down(self) -> None:
        """An abusive client: GOAWAY (ENHANCE_YOUR_CALM), and the connection ends."""
        reason = self.guard.tripped or "abuse"
        log.info("HTTP/2 client %s sent too much (%s): GOAWAY", self.peer.decode(), reason)
        self.stats.abuse[reason] = self.stats.abuse.get(reason, 0) + 1
        # What the flood made `h2` queue (acknowledgements of every frame in the last
        # read) is dropped: the offender gets the GOAWAY alone.
        self.h2.data_to_send()
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush()
        self.close_now()

    def close_now(self) -> None:
        """Abort every stream, and close after what was written is sent."""
        for ex in list(self.streams.values()):
            ex.downstream_lost()
        self.streams.clear()
        self.outboxes.clear()
        self.close()

    # -- the streams' end -----------------------------------------------------------------
    def stream_done(self, ex: H2Exchange) -> None:
        if self.streams.get(ex.sid) is ex:
            del self.streams[ex.sid]
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.going_away or self.drain_acked:
                self.close()

    def ack(self, sid: int, size: int) -> None:
        """`size` bytes of a stream's body were taken upstream: the client may send more."""
        if size:
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.h2.acknowledge_received_data(size, sid)
            self.mark()

    def hold(self, sid: int) -> None:
        """The upstream does not take a stream's body for now (its bytes stay
        unacknowledged, so the client's window closes)."""

    def end_now(self, sid: int, trailers: list[tuple[bytes, bytes]]) -> None:
        """End a stream at once with trailers, dropping what waits to be sent."""
        self.outboxes.pop(sid, None)
        with contextlib.suppress(StreamClosedError, ProtocolError):
            self.h2.send_headers(sid, trailers, end_stream=True)
        self.mark()

    def write_stream(self, sid: int, block: list[tuple[bytes, bytes]], end: bool) -> None:
        try:
            self.h2.send_headers(sid, block, end_stream=end)
        except (StreamClosedError, ProtocolError):
            return
        self.mark()

    def wrote(self, size: int) -> None:
        self.stats.bytes_sent += size

    # -- timers, drain, close -------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.chain.retired and not self.draining:
            # A reload replaced the chain (new permissions, routes, policies): the client
            # is told to go away and comes back on a new connection, which gets the new one.
            self.drain()
        idle = self.idle_since
        if idle is None or self.closed:
            return
        if (self.going_away or self.draining) and now - idle > GRACE:
            self.close()
        elif self.http.idle_timeout and now - idle > self.http.idle_timeout:
            self.drain()

    def drain(self) -> None:
        """GOAWAY: streams under way finish, new ones are refused, then the connection
        closes."""
        if self.draining or self.closed:
            return
        self.draining = True
        # Written by hand: `h2` closes its whole state machine when it sends a GOAWAY,
        # which would cut off the streams still being answered. The last stream id
        # tells the client which of its requests will be answered; later ones it may
        # safely send again elsewhere (and they are refused here).
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.h2.highest_inbound_stream_id
        frame.error_code = ErrorCodes.NO_ERROR
        self.flush()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame.serialize())
        # Streams the client opened before it read the GOAWAY are still on their way
        # (and are refused, to be sent again elsewhere): the connection stays open until
        # the client answers a PING sent after the GOAWAY, so that none of them finds the
        # connection gone. `tick` closes it after GRACE if no answer comes.
        with contextlib.suppress(ProtocolError):
            self.h2.ping(DRAIN_PING)
        self.flush()

    def _drain_acked(self) -> None:
        self.drain_acked = True
        if not self.streams:
            self.close()

    def is_idle(self) -> bool:
        return not self.streams


class Sink(Protocol):
    """Where an `H2Exchange` sends its response, and what it knows of its client: an
    HTTP/2 client connection (`H2Downstream`), or one HTTP/1.1 request carried over
    HTTP/2 upstream (`proxy.multiplex.H1Bridge`)."""

    @property
    def chain(self) -> ChainRuntime: ...
    @property
    def http(self) -> HttpFilter: ...
    @property
    def peer(self) -> bytes: ...
    @property
    def peer_identity(self) -> bytes | None: ...
    @property
    def permitted(self) -> bool: ...
    @property
    def tls(self) -> bool: ...
    @property
    def policies(self) -> CallerPolicies | None: ...
    @property
    def source(self) -> str: ...

    def write_stream(self, sid: int, block: list[tuple[bytes, bytes]], end: bool) -> None: ...
    def send(self, sid: int, data: bytes, owner: Any, end: bool = False) -> int: ...
    def finish_stream(
        self, sid: int, owner: Any, trailers: list[tuple[bytes, bytes]] | None = None
    ) -> None: ...
    def end_now(self, sid: int, trailers: list[tuple[bytes, bytes]]) -> None: ...
    def drop_stream(self, sid: int, code: ErrorCodes | None = ErrorCodes.CANCEL) -> None: ...
    def ack(self, sid: int, size: int) -> None: ...
    def hold(self, sid: int) -> None: ...
    def stream_done(self, ex: H2Exchange) -> None: ...


class H2Exchange:
    """One request stream of an HTTP/2 client and its way upstream."""

    __slots__ = (
        "attempt",
        "attempt_start",
        "body_in",
        "body_out",
        "budget",
        "chosen",
        "cluster",
        "connect_task",
        "down",
        "endpoint",
        "error",
        "finished",
        "grpc_status",
        "h1_chunked",
        "head",
        "is_grpc",
        "kept",
        "kept_size",
        "mirror",
        "path",
        "pending",
        "refused_retried",
        "request_done",
        "request_id",
        "request_trailers",
        "response_done",
        "response_started",
        "route",
        "sid",
        "start",
        "status",
        "timer",
        "trace",
        "tried",
        "unacked_down",
        "unacked_up",
        "up",
        "up_paused",
        "up_sid",
        "upstream_h2",
    )

    def __init__(self, down: Sink, sid: int, head: RequestHead2) -> None:
        self.down = down
        self.sid = sid
        self.head = head
        self.start = self.attempt_start = time.monotonic()
        self.is_grpc = head.grpc
        self.path = b""
        self.route: Route | None = None
        self.cluster: ClusterRuntime | None = None
        self.chosen: Host | None = None
        self.endpoint: Endpoint | None = None
        # the upstream: an H2Upstream and the stream on it, or an HttpUpstream
        self.up: H2Upstream | HttpUpstream | None = None
        self.up_sid = 0
        self.upstream_h2 = False
        self.connect_task: asyncio.Task[None] | None = None
        self.timer: int | None = None
        # a stream the upstream never processed was sent again once, on a new connection
        self.refused_retried = False
        self.request_done = False
        self.request_trailers: list[tuple[bytes, bytes]] | None = None
        self.response_started = False
        self.response_done = False
        self.finished = False
        self.status = 0
        self.grpc_status: int | None = None
        self.error: str | None = None
        self.request_id = b""
        # the trace this request joined (meshling.tracing), while tracing is on
        self.trace: Hop | None = None
        self.body_in = 0
        self.body_out = 0
        # flow-controlled bytes received and not yet acknowledged, each way
        self.unacked_down = 0
        self.unacked_up = 0
        self.up_paused = False
        self.h1_chunked = False
        # body bytes received before the upstream stream opened
        self.pending: list[bytes] = []
        # a retried route's request body, kept to send again; None: nothing kept
        self.kept: list[bytes] | None = None
        self.kept_size = 0
        # the copy of the request for the route's mirror cluster (proxy.mirror)
        self.mirror: MirrorCopy | None = None
        self.attempt = 1
        self.tried: set[Endpoint] | None = None
        # the route's retry budget and counters, shared with its HTTP/1.1 exchanges
        self.budget: RouteRetries | None = None

    # -- routing ------------------------------------------------------------------------------
    def begin(self) -> None:
        down = self.down
        head = self.head
        if not down.permitted:
            self.local_reply(403, "permission_denied")
            return
        policies = down.policies
        if policies is not None:
            # a rate limit or a fault may refuse, abort or hold the stream first
            policies.stream(head.headers, self._admitted)
            return
        self.route_request()

    def _admitted(self, refusal: Refusal | None, faults: Faults) -> None:
        if self.finished:
            return  # the client gave up while the stream was held
        if refusal is not None:
            self.local_reply(429, "rate_limited", list(refusal.headers()))
        elif faults.abort is not None:
            if faults.abort:
                self.local_reply(faults.abort, "fault_abort")
            else:
                self.error = "fault_abort"
                self.down.drop_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
                self.finish()
        else:
            self.route_request()

    def route_request(self) -> None:
        """Route the request and send it on, or answer it as its route says."""
        down = self.down
        chain = down.chain
        head = self.head
        from meshling.proxy.http import answered_by_route, find_route

        try:
            path, route = find_route(
                chain, head.authority, head.method, head.path, head.headers, head.query
            )
        except PathError as exc:
            self.local_reply(exc.status, exc.reason.replace(" ", "_"))
            return
        self.path = path
        if route is None:
            self.local_reply(404, "route_not_found")
            return
        self.route = route
        if answered_by_route(self, route, head, path, down.tls):
            return
        weighted = route.weighted
        self.forward(route, chain.clusters[route.cluster if weighted is None else weighted.pick()])

    def forward(self, route: Route, cluster: ClusterRuntime) -> None:
        """Send the routed request to `cluster`: admission, endpoint, timer, upstream."""
        down = self.down
        head = self.head
        refused = cluster.admit()
        if refused is not None:
            self.local_reply(503, refused)
            return
        self.cluster = cluster
        if route.retry is not None and route.retry.max_attempts > 1:
            self.kept = []
            plan = self.budget = _retries(self, route, cluster)
            if plan.budget is not None:
                plan.budget.deposit(self.start)
        host = self.chosen = cluster.choose(head.headers, down.peer)
        if host is None:
            cluster.stats.no_endpoint += 1
            self.local_reply(503, "no_endpoint")
            return
        self.endpoint = host.endpoint
        if route.mirror is not None:
            self._start_mirror(route)
        timeout = self._timeout(route)
        if timeout:
            # unlike HTTP/1.1's, it runs from the request's start: a gRPC deadline is the
            # caller's whole budget
            self.timer = down.chain.deadlines.add(self, timeout)
        self.connect()

    def _start_mirror(self, route: Route) -> None:
        """A copy for the route's mirror cluster, sent over HTTP/1.1 like every copy."""
        from meshling.proxy.mirror import start_copy

        assert route.mirror is not None
        head = self.head
        fields = b"".join(
            b"%b: %b\r\n" % (name, value)
            for name, value in self._upstream_fields()
            if name not in HOP_BY_HOP
        )
        self.mirror = start_copy(
            self.down.chain,
            route.mirror,
            route,
            b"%b %b HTTP/1.1\r\n%b" % (head.method, self._target(), fields),
            head.method,
            head.authority,
            head.headers,
            self.down.peer,
            head.content_length,
            framed=not self.request_done or head.content_length is not None,
        )
        if self.mirror is not None and self.request_done:
            self.mirror.send()
            self.mirror = None

    def _timeout(self, route: Route) -> float:
        timeout = route.timeout
        if self.is_grpc:
            for name, value in self.head.headers:
                if name == b"grpc-timeout":
                    deadline = grpc.parse_timeout(value)
                    if deadline is not None and (not timeout or deadline < timeout):
                        timeout = deadline
                    break
        return timeout

    # -- the upstream ---------------------------------------------------------------------------
    def connect(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        protocol = cluster.config.protocol
        self.upstream_h2 = protocol == "http2" or protocol == "downstream"
        endpoint = self.endpoint
        assert endpoint is not None
        # The usual case needs no task: a connection with room, or an idle pooled one.
        if self.upstream_h2:
            open_conn = with_room(cluster, endpoint)
            if open_conn is not None:
                self._open_h2(open_conn)
                return
        else:
            idle = cluster.take_idle(endpoint)
            if idle is not None:
                self._open_h1(cast("HttpUpstream", idle))
                return
        self.connect_task = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        cluster = self.cluster
        endpoint = self.endpoint
        assert cluster is not None and endpoint is not None
        route = self.route
        timeouts = route.timeouts if route is not None else None
        connect_timeout = timeouts.connect if timeouts is not None else 0.0
        try:
            if self.upstream_h2:
                conn: H2Upstream | HttpUpstream = await multiplexed(
                    cluster, endpoint, connect_timeout
                )
            else:
                # (`connect` already looked for an idle connection to take)
                from meshling.proxy.http import HttpUpstream

                made = await cluster.connect(
                    endpoint, lambda: HttpUpstream(cluster, endpoint), connect_timeout
                )
                conn = cast(HttpUpstream, made)
                cluster.stats.cx_total += 1
                cluster.stats.cx_active += 1
        except ConnectError as exc:
            self.connect_task = None
            if not self.finished:
                if exc.status == 503:
                    self.local_reply(503, exc.reason)
                elif not self._retry(0, "connect-failure"):
                    self.local_reply(502, "upstream_connect_failure")
            return
        except asyncio.CancelledError:
            return
        self.connect_task = None
        if self.finished:
            if not self.upstream_h2:
                conn.close()
            return
        if isinstance(conn, H2Upstream):
            self._open_h2(conn)
        else:
            self._open_h1(conn)

    def _upstream_fields(self) -> list[tuple[bytes, bytes]]:
        """The request's regular fields for the upstream: the route's edits, and the
        mesh's own fields (forwarding, request id, the caller's identity) rewritten."""
        down = self.down
        http = down.http
        fields = self.head.headers
        route = self.route
        if route is not None and route.request_headers is not None:
            fields = route.request_headers.apply(fields)
        tracer = down.chain.tracer
        if tracer is not None:
            # the caller's trace fields are replaced by the hop's own (one hop for every
            # attempt and the mirror's copy)
            hop, fields = tracer.begin(fields)
            if self.trace is None:
                self.trace = hop
        out: list[tuple[bytes, bytes]] = []
        xff = xfp = request_id = b""
        for name, value in fields:
            if name in _MESH_FIELDS or name.startswith(_INTERNAL):
                if name == b"x-forwarded-for":
                    xff = xff + b", " + value if xff else value
                elif name == b"x-request-id":
                    request_id = request_id or value
                elif name == b"x-forwarded-proto":
                    xfp = xfp or value
                continue
            out.append((name, value))
        if not http.xff_append:
            xff = xfp = b""
        if not http.preserve_request_id or not request_id:
            from meshling.proxy.http import _request_id

            # one id for the request, whatever else (a mirror's copy) is built from it
            request_id = self.request_id or _request_id()
        self.request_id = request_id
        peer = down.peer
        out.append((b"x-forwarded-for", xff + b", " + peer if xff else peer))
        out.append((b"x-forwarded-proto", xfp or (b"https" if down.tls else b"http")))
        out.append((b"x-request-id", request_id))
        if down.peer_identity is not None:
            out.append((b"x-meshling-peer-identity", down.peer_identity))
        if self.trace is not None:
            out.extend(self.trace.fields)
        return out

    def _target(self) -> bytes:
        path = self.path
        route = self.route
        if route is not None and route.rewrite_prefix is not None:
            path = route.rewrite_prefix + path[len(route.match.path.value) :]
        return path + b"?" + self.head.query if self.head.query else path

    def _open_h2(self, conn: H2Upstream) -> None:
        head = self.head
        block = [
            (b":method", head.method),
            (b":scheme", b"https" if self.cluster and self.cluster.tls else b"http"),
            (b":authority", head.authority or str(self.endpoint).encode()),
            (b":path", self._target()),
            *to_http2(self._upstream_fields()),
        ]
        bodyless = self.request_done and not self.body_in and self.request_trailers is None
        sid = conn.open_stream(self, block, end=bodyless)
        if sid is None:
            self.up = None
            if not self._retry(0, "reset"):
                self.local_reply(502, "upstream_reset")
            return
        self.up = conn
        self.up_sid = sid
        for chunk in self._body_so_far():
            conn.send(sid, chunk, self)
        if self.request_done and not bodyless:
            conn.finish_stream(sid, self, self.request_trailers)
        self.drained(conn)

    def _body_so_far(self) -> list[bytes]:
        """What to send of the body as an attempt starts: what arrived while the first
        attempt connected, or, for a retry, the whole body as it was kept."""
        if self.attempt > 1:
            return self.kept or []
        pending, self.pending = self.pending, []
        return pending

    def _open_h1(self, conn: HttpUpstream) -> None:
        head = self.head
        self.up = conn
        conn.exchange = self  # type: ignore[assignment]
        conn.decoder.expect(head.method)
        lines = [b"%b %b HTTP/1.1\r\n" % (head.method, self._target())]
        lines.append(b"host: %b\r\n" % (head.authority or str(self.endpoint).encode()))
        for name, value in self._upstream_fields():
            if name != b"te":
                lines.append(b"%b: %b\r\n" % (name, value))
        # A body of unknown length is chunked; a request that ended with its head has none.
        bodyless = self.request_done and not self.body_in and self.request_trailers is None
        self.h1_chunked = head.content_length is None and not bodyless
        if self.h1_chunked:
            lines.append(b"transfer-encoding: chunked\r\n")
        lines.append(b"\r\n")
        conn.write(b"".join(lines))
        for chunk in self._body_so_far():
            conn.write(self._frame(chunk))
        if self.request_done:
            self._h1_end()
        self._update_reading()

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if self.h1_chunked else data

    def _h1_end(self) -> None:
        conn = self.up
        if conn is None or self.upstream_h2 or not self.h1_chunked:
            return
        from meshling.http1 import encode_last_chunk

        cast("HttpUpstream", conn).write(encode_last_chunk(self.request_trailers or []))

    # -- the request body -------------------------------------------------------------------------
    def request_data(self, data: bytes, flow: int) -> None:
        if self.finished or not data:
            # an empty DATA frame (often the one that ends the stream) carries nothing:
            # a zero-length chunk would end an HTTP/1.1 body
            self.down.ack(self.sid, flow)
            return
        self.body_in += len(data)
        if self.mirror is not None:
            self.mirror.data(data)
        kept = self.kept
        if kept is not None:
            route = self.route
            assert route is not None and route.retry is not None
            if self.kept_size + len(data) <= route.retry.max_body:
                kept.append(data)
                self.kept_size += len(data)
            else:
                self.kept = None  # too large to send again: not retried
        up = self.up
        if up is None:
            self.unacked_down += flow  # acknowledged once an upstream takes it
            if self.unacked_down >= HIGH_WATER:
                self.down.hold(self.sid)
            if self.attempt == 1:
                self.pending.append(data)
            return
        if self.upstream_h2:
            backlog = cast(H2Upstream, up).send(self.up_sid, data, self)
        else:
            h1 = cast("HttpUpstream", up)
            h1.write(self._frame(data))
            backlog = HIGH_WATER if self.up_paused else 0
        if backlog < HIGH_WATER:
            self.down.ack(self.sid, flow)
        else:
            self.unacked_down += flow
            self.down.hold(self.sid)

    def request_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.request_done:
            return
        self.request_done = True
        self.request_trailers = trailers
        mirror = self.mirror
        if mirror is not None:
            self.mirror = None
            mirror.send()
        up = self.up
        if up is None or self.finished:
            return
        if self.upstream_h2:
            cast(H2Upstream, up).finish_stream(self.up_sid, self, trailers)
        else:
            self._h1_end()

    def drained(self, side: object) -> None:
        """A side's backlog for this stream fell below LOW_WATER: feed it again."""
        if side is self.down:
            # the client reads again: acknowledge the upstream's bytes, or read them
            up = self.up
            if up is None:
                return
            if self.upstream_h2 and self.unacked_up:
                h2up = cast(H2Upstream, up)
                with contextlib.suppress(StreamClosedError, ProtocolError):
                    h2up.h2.acknowledge_received_data(self.unacked_up, self.up_sid)
                self.unacked_up = 0
                h2up.mark()
            elif not self.upstream_h2:
                cast("HttpUpstream", up).resume_reading()
        else:
            # the upstream takes bytes again: so does the client's side
            self.down.ack(self.sid, self.unacked_down)
            self.unacked_down = 0

    # -- the response from an HTTP/2 upstream ---------------------------------------------------
    def up_response(self, block: list[tuple[bytes, bytes]], ended: bool) -> None:
        status, fields = response_fields(block)
        grpc_status = grpc.status_of(fields) if ended and self.is_grpc else None
        if self._retry(status, None, grpc_status):
            return
        if ended:
            self.grpc_status = grpc_status
        self._send_head(status, fields, ended)

    def up_data(self, data: bytes, flow: int) -> None:
        if self.finished:
            return
        self.body_out += len(data)
        backlog = self.down.send(self.sid, data, self)
        up = cast(H2Upstream, self.up)
        if backlog < HIGH_WATER:
            up.h2.acknowledge_received_data(flow, self.up_sid)
        else:
            self.unacked_up += flow

    def up_end(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        if self.finished:
            return
        if trailers is not None and self.is_grpc:
            self.grpc_status = grpc.status_of(trailers)
        self.response_done = True
        self.down.finish_stream(self.sid, self, trailers)
        self.finish()

    def up_reset(self, code: int) -> None:
        """The upstream reset the stream, or its connection ended under it."""
        if self.finished:
            return
        self.up = None
        if not self.response_started:
            if (
                code == ErrorCodes.REFUSED_STREAM
                and not self.refused_retried
                and self.request_done
                and not self.body_in
            ):
                # Never processed by the peer (its GOAWAY's last stream id was lower, or it
                # refused the stream): sending it again is its first delivery.
                self.refused_retried = True
                self.connect()
                return
            if not self._retry(0, "reset"):
                self.local_reply(502, "upstream_reset")
            return
        self.error = "upstream_reset_after_headers"
        self.down.drop_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
        self.finish()

    # -- the response from an HTTP/1.1 upstream (HttpUpstream calls these) ----------------------
    @property
    def downstream(self) -> H2Exchange:
        return self

    @property
    def paused_by_upstream(self) -> bool:
        return self.up_paused

    @paused_by_upstream.setter
    def paused_by_upstream(self, paused: bool) -> None:
        self.up_paused = paused

    def _update_reading(self) -> None:
        if not self.up_paused:
            self.drained(None)

    def upstream_data(self, data: bytes) -> None:
        conn = cast("HttpUpstream", self.up)
        try:
            events = conn.decoder.feed(data)
        except ParseError:
            self._up1_failed("upstream_protocol_error")
            return
        self._h1_events(events)

    def _h1_events(self, events: Any) -> None:
        conn = cast("HttpUpstream", self.up)
        for event in events:
            if self.finished:
                return
            kind = type(event)
            if kind is Data:
                self.body_out += len(event.data)
                if self.down.send(self.sid, event.data, self) >= HIGH_WATER:
                    conn.pause_reading()
            elif kind is ResponseHead:
                conn.keep_alive = event.keep_alive
                if self._retry(event.status, None):
                    return
                fields = [(n, v) for n, v in event.headers if n not in HOP_BY_HOP]
                self._send_head(event.status, fields, False)
            elif kind is EndOfMessage:
                self.response_done = True
                trailers = list(event.trailers) or None
                if trailers is not None and self.is_grpc:
                    self.grpc_status = grpc.status_of(trailers)
                self.down.finish_stream(self.sid, self, trailers)
                self.finish()

    def upstream_lost(self, conn: HttpUpstream, exc: Exception | None) -> None:
        if self.finished or conn is not self.up:
            return
        if exc is None and self.response_started:
            try:
                events = conn.decoder.feed_eof()
            except ParseError:
                events = None
            if events is not None:
                self._h1_events(list(events))
                if self.finished:
                    return
        self.up = None
        if not self.response_started and self._retry(0, "reset"):
            return
        self._up1_failed("upstream_reset")

    def _up1_failed(self, reason: str) -> None:
        self._abort_upstream()
        if self.response_started:
            self.error = reason + "_after_headers"
            self.down.drop_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
            self.finish()
        else:
            self.local_reply(502, reason)

    # -- sending the response ------------------------------------------------------------------------
    def _send_head(self, status: int, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        route = self.route
        if route is not None and route.response_headers is not None:
            fields = route.response_headers.apply(fields)
        self.status = status
        self.response_started = True
        block = [(b":status", b"%d" % status), *to_http2(fields)]
        if self.attempt > 1 or (route is not None and route.retry is not None):
            block.append((b"x-meshling-attempts", b"%d" % self.attempt))
        self.down.write_stream(self.sid, block, end)
        if end:
            self.response_done = True
            self.finish()

    def local_reply(
        self, status: int, reason: str, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer from the proxy itself: the gRPC way for a gRPC call, else a text body
        naming the reason, with `x-meshling-error`."""
        self._abort_upstream()
        self.status = status
        self.error = reason
        self.response_started = self.response_done = True
        if self.is_grpc:
            block = grpc.local_reply(status, reason)
            self.grpc_status = grpc.status_of(block)
            self.down.write_stream(self.sid, block, True)
        else:
            body = reason.replace("_", " ").encode() + b"\n"
            block = [
                (b":status", b"%d" % status),
                (b"content-type", b"text/plain"),
                (b"content-length", b"%d" % len(body)),
                (b"x-meshling-error", reason.encode()),
                *(extra or ()),
            ]
            if self.attempt > 1:
                block.append((b"x-meshling-attempts", b"%d" % self.attempt))
            self.down.write_stream(self.sid, block, self.head.method == b"HEAD")
            if self.head.method != b"HEAD":
                self.down.send(self.sid, body, self, end=True)
        self._request_rest()
        self.finish()

    def respond(
        self, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        """Answer as a route says (a direct response, a redirect)."""
        self.status = status
        self.response_started = self.response_done = True
        block = [
            (b":status", b"%d" % status),
            (b"content-length", b"%d" % len(body)),
            *(extra or ()),
        ]
        if body:
            block.append((b"content-type", b"text/plain"))
        send_body = bool(body) and self.head.method != b"HEAD"
        self.down.write_stream(self.sid, block, not send_body)
        if send_body:
            self.down.send(self.sid, body, self, end=True)
        self._request_rest()
        self.finish()

    def _request_rest(self) -> None:
        """The response is complete before the request: the rest of the request is read
        and dropped (acknowledged as it arrives, so the client can finish its upload and
        read the answer; some clients do not take RST_STREAM NO_ERROR for an answer)."""
        if not self.request_done:
            self.request_done = True
            self.down.ack(self.sid, self.unacked_down)
            self.unacked_down = 0

    # -- retries --------------------------------------------------------------------------------------
    def _retry(self, status: int, failure: str | None, grpc_status: int | None = None) -> bool:
        """Start another attempt for this outcome, when the route's Retry policy, the
        request and the budget allow one."""
        route = self.route
        cluster = self.cluster
        if route is None or route.retry is None or cluster is None or self.response_started:
            return False
        policy = route.retry
        from meshling.policies.retry.decide import backoff, should_retry

        retriable = False
        if grpc_status is not None and self.is_grpc:
            retriable = (
                any(grpc.RETRY_CONDITIONS.get(c) == grpc_status for c in policy.retry_on)
                and self.attempt < policy.max_attempts
            )
        if not retriable:
            if failure is None and status < 500 and status not in policy.statuses:
                return False
            retriable = should_retry(
                policy,
                self.head.method,
                self.attempt,
                status,
                failure,  # type: ignore[arg-type]
                replayable=self.kept is not None,
            )
        if not retriable or not self.request_done or self.kept is None:
            return False
        plan = self.budget
        assert plan is not None
        if plan.budget is not None and not plan.budget.withdraw(time.monotonic()):
            if plan.stats is not None:
                plan.stats.budget_exhausted += 1
            return False
        if plan.stats is not None:
            plan.stats.retries += 1
        self._abort_upstream()
        if self.endpoint is not None:
            if self.tried is None:
                self.tried = set()
            self.tried.add(self.endpoint)
            cluster.report(
                self.endpoint, status or 502, failure, time.monotonic() - self.attempt_start
            )
        self.attempt += 1
        delay = backoff(self.attempt - 1, policy.backoff.base, policy.backoff.max, random.random)
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self._next_attempt)
        return True

    def _next_attempt(self) -> None:
        if self.finished:
            return
        cluster = self.cluster
        assert cluster is not None
        host = cluster.choose_other(self.chosen, self.tried or ())
        if host is None:
            self.local_reply(503, "no_endpoint")
            return
        self.chosen = host
        self.endpoint = host.endpoint
        self.attempt_start = time.monotonic()
        self.response_started = False
        self.connect()

    # -- failures and the end -------------------------------------------------------------------------
    def on_timeout(self) -> None:
        self.timer = None
        if self.finished:
            return
        if self.cluster is not None:
            self.cluster.stats.timeouts += 1
        if self.response_started:
            self.error = "upstream_timeout_after_headers"
            self.status = 504 if not self.is_grpc else self.status
            if self.is_grpc:
                # the deadline passed mid-response: end the call with its status
                self._abort_upstream()
                self.grpc_status = grpc.DEADLINE_EXCEEDED
                self.down.end_now(
                    self.sid, [(b"grpc-status", b"4"), (b"grpc-message", b"deadline exceeded")]
                )
                self._request_rest()
            else:
                self._abort_upstream()
                self.down.drop_stream(self.sid, ErrorCodes.CANCEL)
            self.finish()
            return
        self.local_reply(504, "upstream_timeout")

    def downstream_reset(self) -> None:
        """The client reset the stream."""
        if self.finished:
            return
        self._abort_upstream()
        if not self.response_done:
            self.status = 499
        self.finish()

    def downstream_lost(self) -> None:
        self.downstream_reset()

    def _abort_upstream(self) -> None:
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        up = self.up
        if up is None:
            return
        self.up = None
        if self.upstream_h2:
            cast(H2Upstream, up).cancel(self.up_sid)
        else:
            h1 = cast("HttpUpstream", up)
            h1.exchange = None
            h1.abort()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        down = self.down
        request_complete = self.request_done
        if self.mirror is not None:
            self.mirror.drop()
            self.mirror = None
        if self.response_done:
            self._request_rest()
        if self.timer is not None:
            down.chain.deadlines.remove(self, self.timer)
            self.timer = None
        up = self.up
        if up is not None:
            self.up = None
            if self.upstream_h2:
                h2up = cast(H2Upstream, up)
                if request_complete:
                    h2up.stream_closed(self.up_sid)
                else:
                    h2up.cancel(self.up_sid)  # answered early: the rest is not wanted
            else:
                cast("HttpUpstream", up).end_exchange(
                    self.cluster, self.endpoint, self.response_done and request_complete
                )
        cluster = self.cluster
        if cluster is not None:
            cluster.finished(self.chosen, self.endpoint, self.status, self.error, self.start)
        self._record()
        down.stream_done(self)

    def _record(self) -> None:
        from meshling.proxy.http import record

        down = self.down
        stats = record(self, down.chain, down.peer, down.source, down.peer_identity)
        if self.is_grpc and stats is not None:
            stats.grpc(self.grpc_status)


def _retries(ex: H2Exchange, route: Route, cluster: ClusterRuntime) -> RouteRetries:
    """The route's retry budget and counters, shared with its HTTP/1.1 exchanges."""
    from meshling.proxy.retry import RouteRetries

    plan = cluster.retries.get(route.name)
    if plan is None or plan.route is not route:
        policy = route.retry
        assert policy is not None
        from meshling.policies.retry.decide import RetryBudget

        b = policy.budget
        chain = ex.down.chain
        stats = chain.metrics.retry_stats(chain.listener, route.name, cluster.config.name)
        plan = cluster.retries[route.name] = RouteRetries(
            route, RetryBudget(b.ratio, b.min_per_second, b.ttl), stats
        )
    return plan


# -- upstream connections -----------------------------------------------------------------------


class H2Upstream(H2Side):
    """One multiplexed HTTP/2 connection to an endpoint, shared by many exchanges."""

    def __init__(self, cluster: ClusterRuntime, endpoint: Endpoint) -> None:
        super().__init__(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
                split_outbound_cookies=False,
            )
        )
        self.cluster = cluster
        self.endpoint = endpoint
        self.stats = cluster.stats
        self.streams: dict[int, H2Exchange] = {}
        self.going_away = False
        self.idle_since = time.monotonic()
        # the peer's first SETTINGS arrived
        self.settled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        h2 = self.h2
        h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: UPSTREAM_WINDOW,
                SettingCodes.MAX_CONCURRENT_STREAMS: 100,
            },
        )
        h2.initiate_connection()
        h2.increment_flow_control_window(UPSTREAM_WINDOW * 4)
        self.flush()

    def wrote(self, size: int) -> None:
        self.stats.bytes_sent += size

    def usable(self) -> bool:
        return (
            not self.closed
            and not self.going_away
            and self.transport is not None
            and not self.transport.is_closing()
        )

    def has_room(self) -> bool:
        # until the peer's first SETTINGS arrive, `h2` knows no limit
        peer = self.h2.remote_settings.max_concurrent_streams if self.settled else INITIAL_STREAMS
        return self.usable() and len(self.streams) < min(peer, UPSTREAM_STREAMS)

    def open_stream(
        self, ex: H2Exchange, block: list[tuple[bytes, bytes]], end: bool
    ) -> int | None:
        if not self.usable():
            return None
        sid = self.h2.get_next_available_stream_id()
        try:
            self.h2.send_headers(sid, block, end_stream=end)
        except ProtocolError:
            return None
        self.streams[sid] = ex
        self.mark()
        return sid

    def cancel(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self.drop_stream(sid, ErrorCodes.CANCEL)
        self._maybe_idle()

    def stream_closed(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self.outboxes.pop(sid, None)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.streams:
            self.idle_since = time.monotonic()
            if self.going_away:
                self.close()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.debug("HTTP/2 upstream %s: protocol error: %s", self.endpoint, exc)
            self.flush()
            self.abort()
            return
        for event in events:
            if isinstance(event, DataReceived):
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    ex.up_data(event.data, event.flow_controlled_length)
                else:
                    with contextlib.suppress(StreamClosedError, ProtocolError):
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
            elif isinstance(event, ResponseReceived):
                ex = self.streams.get(event.stream_id)
                if ex is not None:
                    ended = event.stream_ended is not None
                    if ended:
                        self.streams.pop(event.stream_id, None)
                    ex.up_response(list(event.headers), ended)
            elif isinstance(event, TrailersReceived):
                ex = self.streams.pop(event.stream_id, None)
                if ex is not None:
                    ex.up_end(list(event.headers))
            elif isinstance(event, StreamEnded):
                ex = self.streams.pop(event.stream_id, None)
                if ex is not None:
                    ex.up_end(None)
            elif isinstance(event, StreamReset):
                ex = self.streams.pop(event.stream_id, None)
                self.outboxes.pop(event.stream_id, None)
                if ex is not None:
                    ex.up_reset(event.error_code)
            elif isinstance(event, WindowUpdated):
                self.window_updated(event.stream_id)
            elif isinstance(event, ConnectionTerminated):
                self.going_away = True
                last = event.last_stream_id or 0
                for sid in [s for s in self.streams if s > last]:
                    # never processed by the peer: safe to try elsewhere
                    ex = self.streams.pop(sid)
                    ex.up_reset(ErrorCodes.REFUSED_STREAM)
            elif isinstance(event, RemoteSettingsChanged):
                self.settled = True
            elif isinstance(event, InformationalResponseReceived):
                pass
        self.flush()
        if not self.streams and self.going_away:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.cx_active -= 1
        pool = self.cluster.pools.multiplexed.get((self.endpoint, self.cluster.config.tls))
        if pool is not None and self in pool:
            pool.remove(self)
        streams, self.streams = self.streams, {}
        for ex in streams.values():
            ex.up_reset(ErrorCodes.CONNECT_ERROR)


def with_room(cluster: ClusterRuntime, endpoint: Endpoint) -> H2Upstream | None:
    """An open connection to `endpoint` with room for another stream, if there is one
    (none while the proxy's own certificate is expired: `connect` refuses and says so)."""
    tls = cluster.tls
    if tls is not None and tls.own.expired(time.time()):
        return None
    conns = cluster.pools.multiplexed.get((endpoint, cluster.config.tls))
    if conns:
        for conn in conns:
            if conn.has_room():
                return cast(H2Upstream, conn)
    return None


async def multiplexed(cluster: ClusterRuntime, endpoint: Endpoint, timeout: float) -> H2Upstream:
    """A connection to `endpoint` with room for another stream: one already open, the
    one being opened, or a new one (a ConnectError if it cannot be made)."""
    pools = cluster.pools
    key = (endpoint, cluster.config.tls)
    while True:
        found = with_room(cluster, endpoint)
        if found is not None:
            return found
        opening = pools.opening.get(key)
        if opening is None:
            break
        await asyncio.shield(opening)
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    pools.opening[key] = future
    try:
        made = await cluster.connect(
            endpoint, lambda: H2Upstream(cluster, endpoint), timeout, http2=True
        )
        conn = cast(H2Upstream, made)
        cluster.stats.cx_total += 1
        cluster.stats.cx_active += 1
        pools.multiplexed.setdefault(key, []).append(conn)
        return conn
    finally:
        del pools.opening[key]
        future.set_result(None)
