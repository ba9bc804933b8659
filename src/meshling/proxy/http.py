"""L7 proxying of HTTP/1.1: downstream and upstream protocols and the exchange between them.

`HttpDownstream` owns one client connection and its request decoder; each
request becomes an `Exchange`, which picks a route, a cluster and an endpoint,
borrows an upstream connection from the pool and streams both bodies through,
chunk by chunk, never buffering a whole body. Flow control is symmetric: a
full write buffer on one side pauses reading on the other.

Errors the proxy produces itself carry ``x-meshling-error`` naming the reason:
400/4xx for malformed requests (connection closed, nothing forwarded), 404
``route_not_found``, 502 ``upstream_connect_failure``/``upstream_reset``/
``upstream_protocol_error``, 503 ``no_endpoint``/``own_certificate_expired``/
``circuit_breaker_max_requests`` (``_max_pending_requests``, ``_max_connections``), 504
``upstream_timeout``/``upstream_per_try_timeout``/``stream_idle_timeout``.

On a route with a Retry policy the request body is also kept as it streams (up to the
policy's ``max_body``), so that another attempt can send it again (``proxy.retry``), and
every response carries ``x-meshling-attempts``.

On a route with a ``mirror``, a copy of the request (``proxy.mirror``) is given the body
as it is forwarded, and leaves on its own once the request has arrived whole.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from itertools import count
from typing import TYPE_CHECKING, Any, cast

from meshling.http1 import (
    HOP_BY_HOP,
    Data,
    EndOfMessage,
    Informational,
    ParseError,
    RequestDecoder,
    RequestHead,
    ResponseDecoder,
    ResponseHead,
    Upgraded,
    encode_chunk,
    encode_last_chunk,
    encode_response_head,
    reason_phrase,
    strip_hop_by_hop,
)
from meshling.http1.codec import Limits
from meshling.http1.path import PathError, normalize_path
from meshling.proxy.cluster import ConnectError
from meshling.proxy.retry import ATTEMPTS_HEADER, Attempts, needs_attempt_timers, wanted
from meshling.proxy.side import Side

if TYPE_CHECKING:
    from meshling.proxy.balancer import Host
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.inbound import CallerPolicies
    from meshling.proxy.listener import ChainRuntime, ConnectionSet
    from meshling.proxy.mirror import MirrorCopy
    from meshling.snapshot.model import Endpoint, Redirect, Route
    from meshling.telemetry.metrics import HttpStats
    from meshling.tracing.hop import Hop

# Headers of this prefix are the mesh's own: a client may not set them.
INTERNAL_PREFIX = b"x-meshling-"
ERROR_HEADER = b"x-meshling-error"
# Request body bytes held while the upstream connection is being opened.
PENDING_LIMIT = 256 * 1024
# Protocols a client may switch to through the proxy: their bytes pass through opaque.
UPGRADES = frozenset({b"websocket", b"h2c"})
# the start of the HTTP/2 connection preface: a client with prior knowledge of HTTP/2
H2_PREFACE_START = b"PRI * HTTP/2.0"
# Requests queued behind the one in flight (HTTP/1.1 pipelining) before reading pauses.
PIPELINE_LIMIT = 16

# Fields the proxy writes itself, so the client's copies are dropped or merged.
_REWRITTEN = HOP_BY_HOP | {b"x-forwarded-for", b"x-forwarded-proto", b"x-request-id"}
# Connection options that name no other field.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b"upgrade"})


def _names_other_fields(fields: list[tuple[bytes, bytes]]) -> bool:
    """Does a Connection field name further hop-by-hop fields (RFC 9110 7.6.1)?"""
    for name, value in fields:
        if name == b"connection":
            for token in value.lower().split(b","):
                if token.strip(b" \t") not in _CONNECTION_OPTIONS:
                    return True
    return False


_REQUEST_IDS = count(1)
_ID_PREFIX = os.urandom(8).hex()


def _request_id() -> bytes:
    return f"{_ID_PREFIX}-{next(_REQUEST_IDS):016x}".encode()


class HttpDownstream(Side):
    """One client connection: decode requests, run one exchange at a time."""

    def __init__(self, chain: ChainRuntime, connections: ConnectionSet) -> None:
        http = chain.http
        assert http is not None
        # per-connection
        self.chain = chain
        self.http = http
        self.connections = connections
        self.stats = chain.listener_stats
        self.transport: asyncio.Transport | None = None
        self.decoder = RequestDecoder(
            Limits(
                max_request_line=http.limits.max_request_line,
                max_header_bytes=http.limits.max_header_bytes,
                max_headers=http.limits.max_headers,
            ),
            # Other upgrades (h2c) are served as plain HTTP/1.1 requests.
            upgrades=UPGRADES,
        )
        self.peer = b""
        # the client's verified SPIFFE ID, when it came over mTLS
        self.peer_identity: bytes | None = None
        # its service, on an inbound listener (the golden metrics' source); "" else
        self.source = ""
        self.permitted = True
        # the caller's RateLimit and FaultInjection rules (proxy.inbound); None: neither
        self.policies: CallerPolicies | None = None
        self.closed = False
        self.draining = False
        # no byte read yet: the first ones may be HTTP/2's preface
        self.fresh = True
        # the current request asked to switch protocols / the upstream agreed
        self.upgrade_pending = False
        self.upgraded = False
        # per-request
        self.exchange: Exchange | None = None
        self.queue: list[RequestHead | Data | EndOfMessage | Upgraded] = []
        self.head_started: float | None = None
        self.partial_head = False
        self.last_activity = 0.0
        # reading is paused while any of these holds
        self.paused_by_upstream = False
        self.paused_by_queue = False

    # -- lifecycle --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        alpn = None
        if self.chain.tls is not None:
            allowed, self.peer_identity = self.chain.tls.peer(transport)
            if not allowed:
                self.closed = True
                self.transport.abort()
                return
            ssl_object = transport.get_extra_info("ssl_object")
            alpn = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        # Requests of a caller that TrafficPermission denies are answered 403.
        self.permitted = self.chain.authorize(self.peer_identity)
        self.source = self.chain.source_of(self.peer_identity)
        if alpn == "h2":
            self._hand_over(b"")
            return
        if self.chain.inbound is not None:
            self.policies = self.chain.inbound.for_caller(self.peer_identity)
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0] if peer else "unknown").encode()
        self.stats.cx_total += 1
        self.stats.cx_active += 1
        self.connections.add(self)
        self.last_activity = time.monotonic()
        # The first request head must arrive within the header timeout too.
        self.head_started = self.last_activity
        if self.chain.draining:
            self.draining = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.stats.cx_active -= 1
        self.connections.discard(self)
        ex = self.exchange
        if ex is not None:
            ex.downstream_lost()

    # -- reading ------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.fresh:
            self.fresh = False
            if data.startswith(H2_PREFACE_START):
                self.stats.cx_total -= 1
                self.stats.cx_active -= 1
                self.connections.discard(self)
                self._hand_over(data)
                return
        self.stats.bytes_received += len(data)
        self.last_activity = now = time.monotonic()
        if self.upgraded:
            ex = self.exchange
            if ex is not None and ex.upstream is not None:
                ex.upstream.write(data)
            return
        if self.upgrade_pending:
            # Bytes of the new protocol, sent before the upstream agreed to switch.
            ex = self.exchange
            if ex is not None:
                ex.upgrade_tail += data
                if len(ex.upgrade_tail) > PENDING_LIMIT and self.transport is not None:
                    self.transport.pause_reading()
            return
        if self.exchange is None:
            if self.head_started is None:
                self.head_started = now
            self.partial_head = True
        try:
            events = self.decoder.feed(data)
        except ParseError as exc:
            self.protocol_error(exc.status, exc.reason)
            return
        if self.queue:
            # A pipelined request already waits: everything new comes after it.
            self.queue.extend(events)
        else:
            self._dispatch(events)
        if len(self.queue) > PIPELINE_LIMIT and not self.paused_by_queue:
            self.paused_by_queue = True
            self._update_reading()

    def _dispatch(self, events: list[RequestHead | Data | EndOfMessage | Upgraded]) -> None:
        for i, event in enumerate(events):
            kind = type(event)
            if kind is RequestHead:
                if self.exchange is not None:
                    # A pipelined request: it waits for the current one to finish.
                    self.queue.extend(events[i:])
                    return
                self.head_started = None
                self.partial_head = False
                policies = self.policies
                if (
                    policies is not None and self.permitted and policies.hold(self, event)  # type: ignore[arg-type]
                ):
                    # Held by a policy (a global rate-limit lease, a fault's delay): it
                    # waits like a pipelined request, and is dispatched again after.
                    self.queue.extend(events[i:])
                    return
                self._start(event)  # type: ignore[arg-type]
                if self.closed or self.transport is None or self.transport.is_closing():
                    return
            else:
                ex = self.exchange
                if ex is None:
                    continue
                if kind is Data:
                    ex.request_data(event.data)  # type: ignore[union-attr]
                elif kind is EndOfMessage:
                    ex.request_end(event.trailers)  # type: ignore[union-attr]
                else:
                    ex.request_upgrade(event.tail)  # type: ignore[union-attr]

    def _next(self) -> None:
        """The exchange ended: start the next pipelined request, or wait for one."""
        self.exchange = None
        if self.queue:
            events, self.queue = self.queue, []
            self.paused_by_queue = False
            self._update_reading()
            self._dispatch(events)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.paused_by_upstream or self.paused_by_queue:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _hand_over(self, data: bytes, upgrade: tuple[bytes, object] | None = None) -> None:
        """The client speaks HTTP/2 (prior knowledge, ALPN, or an h2c upgrade): the
        connection moves to an `H2Downstream`, with the bytes read so far."""
        from meshling.proxy.http2 import H2Downstream

        h2 = H2Downstream(self.chain, self.connections)
        self.closed = True
        transport = self.transport
        assert transport is not None
        transport.set_protocol(h2)
        h2.take_over(transport, (self.peer_identity, self.permitted), data, upgrade)  # type: ignore[arg-type]

    def _upgrade_h2c(self, head: RequestHead) -> None:
        """`Upgrade: h2c` (RFC 7540 3.2): 101, then HTTP/2 with this request as stream 1."""
        from meshling.http2.headers import HeaderError, request_head

        settings = [v for n, v in head.headers if n == b"http2-settings"]
        if len(settings) != 1:
            self.exchange = Exchange(self, head)
            self.exchange.local_reply(400, "h2c_upgrade_without_http2_settings", close=True)
            return
        block = [
            (b":method", head.method),
            (b":scheme", b"http"),
            (b":authority", head.host),
            (b":path", head.target),
            *((n, v) for n, v in head.headers if n not in HOP_BY_HOP and n != b"http2-settings"),
        ]
        self.stats.cx_total -= 1
        self.stats.cx_active -= 1
        self.connections.discard(self)
        try:
            request = request_head(block)
        except HeaderError as exc:
            self.exchange = Exchange(self, head)
            self.exchange.local_reply(400, exc.reason.replace(" ", "_"), close=True)
            return
        self.write(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
        )
        self._hand_over(b"", (settings[0], request))

    # -- requests -------------------------------------------------------------------
    def _start(self, head: RequestHead) -> None:
        chain = self.chain
        if head.upgrade == b"h2c":
            self._upgrade_h2c(head)
            return
        ex = Exchange(self, head)
        self.exchange = ex
        if not self.permitted:
            ex.local_reply(403, "permission_denied")
            return
        if self.policies is not None and self.policies.answer(ex):
            return  # refused by a rate limit (429), or aborted by a fault
        try:
            path, route = find_route(
                chain, head.host, head.method, head.path, head.headers, head.query
            )
        except PathError as exc:
            self.protocol_error(exc.status, exc.reason)
            return
        ex.path = path
        if route is None:
            ex.local_reply(404, "route_not_found")
            return
        ex.route = route
        if answered_by_route(ex, route, head, path, self.chain.tls is not None):
            return
        # a weighted route picks its cluster per request (a split, or weights shifting)
        weighted = route.weighted
        cluster = chain.clusters[route.cluster if weighted is None else weighted.pick()]
        if (
            cluster.config.protocol == "http2"
            and head.upgrade is None
            and not needs_attempt_timers(route)
            and not (route.retry is not None and route.retry.per_try_timeout)
        ):
            # carried as a stream of a multiplexed HTTP/2 connection (proxy.multiplex);
            # a route with per-try or idle timeouts keeps this path, which has them
            from meshling.proxy.multiplex import H1Bridge

            bridge = H1Bridge(self, head, path)
            self.exchange = bridge  # type: ignore[assignment]
            bridge.forward(route, cluster)
            return
        refused = cluster.admit()  # CircuitBreaker's max_requests
        if refused is not None:
            ex.local_reply(503, refused)
            return
        ex.cluster = cluster  # admitted: `finish` tells the cluster the request ended
        if (route.retry is not None or route.timeouts is not None) and head.upgrade is None:
            # Retry and Timeout policies: only their routes pay for them.
            ex.attempts = Attempts(ex, route, cluster) if wanted(route) else None
        host = ex.chosen = cluster.choose(head.headers, self.peer)
        if host is None:
            cluster.stats.no_endpoint += 1
            ex.local_reply(503, "no_endpoint")
            return
        ex.endpoint = endpoint = host.endpoint
        ex.build_upstream_head()
        if route.mirror is not None and head.upgrade is None:
            # Only mirrored routes load and pay for the copy (proxy.mirror).
            from meshling.proxy.mirror import start

            ex.mirror = start(ex, route.mirror)
        conn = cluster.take_idle(endpoint)
        if conn is not None:
            assert isinstance(conn, HttpUpstream)
            ex.attach(conn, reused=True)
        else:
            ex.connect()

    def protocol_error(self, status: int, reason: str) -> None:
        """Malformed input: answer, close, and forward nothing."""
        errors = self.stats.protocol_errors
        errors[status] = errors.get(status, 0) + 1
        ex = self.exchange
        if ex is not None and ex.response_started:
            # The response to the current request is already on its way: just stop.
            ex.abort_upstream()
            self.abort()
            return
        self.queue.clear()
        if ex is None:
            ex = self.exchange = Exchange(self, None)
        ex.local_reply(status, reason.replace(" ", "_"), close=True)

    # -- writing ------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.stats.bytes_sent += len(data)
        if self.transport is not None:
            self.transport.write(data)

    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None and ex.upstream is not None:
            ex.upstream.pause_reading()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None and ex.upstream is not None:
            ex.upstream.resume_reading()

    # -- timers, drain, close -------------------------------------------------------
    def tick(self, now: float) -> None:
        """Called about once a second: header and idle timeouts."""
        ex = self.exchange
        if ex is not None and ex.attempts is not None and not self.closed:
            ex.attempts.tick(now)  # the route's stream idle timeout
        if ex is not None or self.closed:
            return
        limits = self.http.limits
        started = self.head_started
        if started is not None and now - started > limits.header_timeout:
            if self.partial_head:
                self.protocol_error(408, "request header timeout")
            else:
                self.close()
        elif (
            started is None
            and self.http.idle_timeout
            and now - self.last_activity > self.http.idle_timeout
        ):
            self.close()

    def eof_received(self) -> bool | None:
        if self.exchange is None:
            return None
        # The client half-closed after its request: answer it, then close.
        self.draining = True
        return True

    def drain(self) -> None:
        self.draining = True
        if self.exchange is None:
            self.close()

    def is_idle(self) -> bool:
        return self.exchange is None


class Exchange:
    """One request and its response, from head received to last byte sent."""

    __slots__ = (
        "attempt_retried",
        "attempts",
        "body_in",
        "body_out",
        "chosen",
        "chunked_out",
        "cluster",
        "connect_task",
        "continue_sent",
        "downstream",
        "endpoint",
        "error",
        "finished",
        "head",
        "keep_alive",
        "mirror",
        "path",
        "pending",
        "pending_size",
        "request_done",
        "request_id",
        "response_done",
        "response_started",
        "reused",
        "route",
        "start",
        "status",
        "timer",
        "trace",
        "upgrade_tail",
        "upstream",
        "upstream_head",
    )

    def __init__(self, downstream: HttpDownstream, head: RequestHead | None) -> None:
        self.downstream = downstream
        self.head = head
        self.start = time.monotonic()
        self.path = b""
        self.route: Route | None = None
        self.cluster: ClusterRuntime | None = None
        self.endpoint: Endpoint | None = None
        # the balancer's host for the request, counted in flight on it until `finish`
        self.chosen: Host | None = None
        self.upstream: HttpUpstream | None = None
        self.upstream_head = b""
        self.connect_task: asyncio.Task[None] | None = None
        self.timer: int | None = None  # slot on the deadline wheel
        # request bytes (already framed for the upstream) waiting for a connection
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.upgrade_tail = b""
        self.request_done = False
        self.response_started = False
        self.response_done = False
        self.finished = False
        self.chunked_out = False
        # After an upgrade request the connection is either switched or finished.
        self.keep_alive = (
            head is not None
            and head.keep_alive
            and head.upgrade is None
            and not downstream.draining
            and not downstream.chain.retired
        )
        self.continue_sent = False
        self.reused = False
        self.attempt_retried = False
        # retries, per-try and idle timeouts (proxy.retry), on routes with those policies
        self.attempts: Attempts | None = None
        # the copy of the request for the route's mirror cluster (proxy.mirror), while
        # the request arrives; None on other routes
        self.mirror: MirrorCopy | None = None
        self.status = 0
        # body bytes received from the client and sent to it, and the proxy's own error
        self.body_in = 0
        self.body_out = 0
        self.error: str | None = None
        self.request_id = b""
        # the trace this request joined (meshling.tracing), while tracing is on
        self.trace: Hop | None = None

    # -- building the upstream request ------------------------------------------------
    def build_upstream_head(self) -> None:
        """Encode the request head for the upstream in one pass over the client's fields.

        Field names arrive lower-cased and values checked by the decoder (no CR, LF or
        NUL), so they are written out as they are; the fields the mesh owns are rewritten.
        """
        head = self.head
        assert head is not None
        http = self.downstream.http
        fields = head.headers
        tracer = self.downstream.chain.tracer
        if tracer is not None:
            # the caller's trace fields are replaced by the hop's own, below
            self.trace, fields = tracer.begin(fields)
        if _names_other_fields(fields):
            fields = strip_hop_by_hop(fields)
        route = self.route
        if route is not None and route.request_headers is not None:
            fields = route.request_headers.apply(fields)  # the route's HTTPRoute edits
        path = self.path
        if route is not None and route.rewrite_prefix is not None:
            # the matched prefix (of the normalised path the router saw) is replaced
            path = route.rewrite_prefix + path[len(route.match.path.value) :]
        target = path + b"?" + head.query if head.query else path
        out = [b"%b %b HTTP/1.1\r\n" % (head.method, target)]
        xff = xfp = request_id = b""
        for name, value in fields:
            if name in _REWRITTEN or name.startswith(INTERNAL_PREFIX):
                if name == b"x-forwarded-for":
                    xff = xff + b", " + value if xff else value
                elif name == b"x-request-id":
                    request_id = request_id or value
                elif name == b"x-forwarded-proto":
                    xfp = xfp or value
                continue
            out.append(b"%b: %b\r\n" % (name, value))
        peer = self.downstream.peer
        if not http.xff_append:
            xff = xfp = b""
        if not http.preserve_request_id:
            request_id = b""
        self.request_id = request_id = request_id or _request_id()
        out.append(
            b"x-forwarded-for: %b\r\nx-forwarded-proto: %b\r\nx-request-id: %b\r\n"
            % (xff + b", " + peer if xff else peer, xfp or b"http", request_id)
        )
        if tracer is not None:
            for field in self.trace.fields:  # type: ignore[union-attr]
                out.append(b"%b: %b\r\n" % field)
        identity = self.downstream.peer_identity
        if identity is not None:
            # Client copies were dropped with the other x-meshling-* fields above.
            out.append(b"x-meshling-peer-identity: %b\r\n" % identity)
        if not head.host:
            # An HTTP/1.0 request may lack Host; the upstream speaks 1.1 and needs one.
            out.append(b"host: %b\r\n" % str(self.endpoint).encode())
        if head.chunked:
            out.append(b"transfer-encoding: chunked\r\n")
        if head.upgrade is not None:
            out.append(b"connection: upgrade\r\nupgrade: %b\r\n" % head.upgrade)
        out.append(b"\r\n")
        self.upstream_head = b"".join(out)

    # -- upstream connection -------------------------------------------------------------
    def connect(self) -> None:
        self.connect_task = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        cluster = self.cluster
        endpoint = self.endpoint
        assert cluster is not None and endpoint is not None
        route = self.route
        timeouts = route.timeouts if route is not None else None
        try:
            protocol = await cluster.connect(
                endpoint,
                lambda: HttpUpstream(cluster, endpoint),
                timeouts.connect if timeouts is not None else 0.0,
            )
        except ConnectError as exc:
            self.connect_task = None
            if not self.finished:
                if exc.status == 503:
                    # the proxy would not try (its own certificate expired): say why
                    self.local_reply(503, exc.reason, close=not self.request_done)
                elif self.attempts is None or not self.attempts.failed("connect-failure"):
                    self.local_reply(502, "upstream_connect_failure", close=not self.request_done)
            return
        except asyncio.CancelledError:
            return
        self.connect_task = None
        assert isinstance(protocol, HttpUpstream)
        cluster.stats.cx_total += 1
        cluster.stats.cx_active += 1
        if self.finished:
            protocol.close()
            return
        self.attach(protocol, reused=False)

    def attach(self, conn: HttpUpstream, *, reused: bool) -> None:
        self.upstream = conn
        self.reused = reused
        conn.exchange = self
        head = self.head
        assert head is not None
        conn.decoder.expect(head.method)
        if self.pending:
            conn.write(self.upstream_head + b"".join(self.pending))
            self.pending.clear()
            self.pending_size = 0
            if self.downstream.paused_by_upstream:
                self.downstream.paused_by_upstream = False
                self.downstream._update_reading()
        else:
            conn.write(self.upstream_head)

    def send_attempt(self) -> None:
        """Send the request (head and `pending`) again, to `endpoint` (a retry)."""
        cluster = self.cluster
        endpoint = self.endpoint
        assert cluster is not None and endpoint is not None
        conn = cluster.take_idle(endpoint)
        if conn is not None:
            assert isinstance(conn, HttpUpstream)
            self.attach(conn, reused=True)
        else:
            self.connect()

    # -- request body --------------------------------------------------------------------
    def request_data(self, data: bytes) -> None:
        head = self.head
        assert head is not None
        self.body_in += len(data)
        framed = encode_chunk(data) if head.chunked else data
        if self.attempts is not None:
            self.attempts.keep(framed, len(data))
        self._send_upstream(framed)
        if self.mirror is not None:
            self.mirror.data(data)

    def request_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        head = self.head
        assert head is not None
        self.request_done = True
        attempts = self.attempts
        if head.chunked:
            last = encode_last_chunk(trailers)
            if attempts is not None:
                attempts.keep(last, 0)
            self._send_upstream(last)
        route = self.route
        if route is not None and route.timeout and not self.finished and head.upgrade is None:
            # Like Envoy's route timeout, it runs from the end of the request.
            self.timer = self.downstream.chain.deadlines.add(self, route.timeout)
        if attempts is not None and not self.finished:
            attempts.request_sent()
        mirror = self.mirror
        if mirror is not None:
            # the original is on its way: the copy leaves after it, on its own
            self.mirror = None
            mirror.send()
        if self.response_done:
            self.finish()

    def request_upgrade(self, tail: bytes) -> None:
        # The client may send bytes of the new protocol right behind the head.
        self.request_done = True
        self.upgrade_tail = tail
        self.downstream.upgrade_pending = True

    def _send_upstream(self, data: bytes) -> None:
        if self.finished:
            return
        conn = self.upstream
        if conn is not None:
            conn.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT and not self.downstream.paused_by_upstream:
            self.downstream.paused_by_upstream = True
            self.downstream._update_reading()

    # -- response ------------------------------------------------------------------------
    def upstream_data(self, data: bytes) -> None:
        conn = self.upstream
        assert conn is not None
        try:
            events = conn.decoder.feed(data)
        except ParseError:
            self.upstream_failed("upstream_protocol_error")
            return
        self._response_events(events)

    def _response_events(self, events: Sequence[object]) -> None:
        # Everything one read produced goes out in one write: head and body of a small
        # response share a segment, and the proxy makes one syscall instead of three.
        downstream = self.downstream
        out: list[bytes] = []
        for event in events:
            if self.finished:
                break
            kind = type(event)
            if kind is Data:
                data = event.data  # type: ignore[attr-defined]
                self.body_out += len(data)
                out.append(encode_chunk(data) if self.chunked_out else data)
            elif kind is ResponseHead:
                if self.attempts is not None and self.attempts.response_head(event.status):  # type: ignore[attr-defined]
                    return  # retried: this response never reaches the client
                out.append(self._response_head(event))  # type: ignore[arg-type]
                if self.status == 101:
                    downstream.write(b"".join(out))
                    out.clear()
                    self._switch_protocols()
            elif kind is EndOfMessage:
                if self.chunked_out:
                    out.append(encode_last_chunk(event.trailers))  # type: ignore[attr-defined]
                downstream.write(b"".join(out))
                out.clear()
                self.response_done = True
                if not self.request_done:
                    # The upstream answered before the request body ended: the rest of
                    # the body has nowhere to go, so the connection closes after this.
                    self.keep_alive = False
                self.finish()
            elif kind is Informational:
                status = event.status  # type: ignore[attr-defined]
                if status != 100:
                    out.append(encode_response_head(status, b"", event.headers))  # type: ignore[attr-defined]
                elif self.head is not None and self.head.expect_continue and not self.continue_sent:
                    self.continue_sent = True
                    out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif kind is Upgraded:
                # Only a 101 switches: what the upstream sent behind its head is the new protocol.
                out.append(event.tail)  # type: ignore[attr-defined]
        if out:
            downstream.write(b"".join(out) if len(out) > 1 else out[0])

    def _response_head(self, rh: ResponseHead) -> bytes:
        """The downstream response head for an upstream one (101 also switches protocols)."""
        head = self.head
        assert head is not None
        self.status = rh.status
        self.response_started = True
        if self.upstream is not None:
            self.upstream.keep_alive = rh.keep_alive
        if self.timer is not None and rh.status == 101:
            self.downstream.chain.deadlines.remove(self, self.timer)
            self.timer = None
        # Fields come from the response decoder (lower-case names; llhttp refused CR, LF
        # and NUL in values), so they are written out as they are, hop-by-hop ones left out.
        fields = rh.headers
        if _names_other_fields(fields):
            fields = strip_hop_by_hop(fields)
        route = self.route
        if route is not None and route.response_headers is not None:
            fields = route.response_headers.apply(fields)  # the route's HTTPRoute edits
        status = rh.status
        out = [b"HTTP/1.1 %d %b\r\n" % (status, rh.reason or reason_phrase(status))]
        for name, value in fields:
            if name not in HOP_BY_HOP:
                out.append(b"%b: %b\r\n" % (name, value))
        attempts = self.attempts
        if attempts is not None and attempts.policy is not None:
            out.append(b"%b: %d\r\n" % (ATTEMPTS_HEADER, attempts.count))
        if status == 101:
            out.append(b"connection: upgrade\r\n")
            if head.upgrade is not None:
                out.append(b"upgrade: %b\r\n" % head.upgrade)
            out.append(b"\r\n")
            return b"".join(out)
        bodyless = head.method == b"HEAD" or status in (204, 304) or status < 200
        if not bodyless and rh.content_length is None:
            if head.version == b"1.1":
                # Re-frame chunked or close-delimited bodies as chunked for a 1.1 client.
                self.chunked_out = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False
        if self.downstream.draining or self.downstream.chain.retired:
            self.keep_alive = False
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        elif head.version == b"1.0":
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def _switch_protocols(self) -> None:
        downstream = self.downstream
        conn = self.upstream
        assert conn is not None
        downstream.upgraded = True
        downstream.upgrade_pending = False
        conn.upgraded = True
        if downstream.transport is not None and not downstream.transport.is_closing():
            downstream.transport.resume_reading()
        if self.upgrade_tail:
            conn.write(self.upgrade_tail)
            self.upgrade_tail = b""
        # Bytes now flow raw in both directions until either side closes.

    # -- failures ------------------------------------------------------------------------
    def on_timeout(self) -> None:
        self.timer = None
        if self.finished:
            return
        if self.cluster is not None:
            self.cluster.stats.timeouts += 1
        self.abort_upstream()
        if self.response_started:
            self.status = 504
            self.error = "upstream_timeout_after_headers"
            self.downstream.abort()
            self.finish()
        else:
            self.local_reply(504, "upstream_timeout")

    def upstream_failed(self, reason: str) -> None:
        if self.finished:
            return
        self.abort_upstream()
        if self.response_started:
            # Too late for a status: the client sees the connection reset instead.
            self.error = reason + "_after_headers"
            self.downstream.abort()
            self.finish()
        else:
            self.local_reply(502, reason, close=not self.request_done)

    def upstream_lost(self, conn: HttpUpstream, exc: Exception | None) -> None:
        """The upstream connection ended while this exchange used it."""
        if self.finished or conn is not self.upstream:
            return
        self.upstream = None
        if conn.upgraded:
            self.response_done = True
            self.downstream.close()
            self.finish()
            return
        if exc is None and self.response_started:
            try:
                events = conn.decoder.feed_eof()
            except ParseError:
                events = None
            if events is not None:
                self._response_events(list(events))
                if self.finished:
                    return
        if (
            self.reused
            and not self.response_started
            and not self.attempt_retried
            and self.head is not None
            and not self.head.chunked
            and not self.head.content_length
            and self.head.upgrade is None
        ):
            # A pooled connection the upstream closed just as we reused it: the request
            # never reached the application, and it has no body, so try once on a new one.
            self.attempt_retried = True
            self.connect()
            return
        if self.attempts is not None and self.attempts.failed("reset"):
            return
        self.upstream_failed("upstream_reset")

    def downstream_lost(self) -> None:
        if self.finished:
            return
        self.abort_upstream()
        if not self.response_done:
            self.status = 499  # client closed the connection before the response ended
        self.finish()

    def abort_upstream(self) -> None:
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            conn.exchange = None
            conn.abort()

    # -- local replies and the end ----------------------------------------------------------
    def local_reply(
        self,
        status: int,
        reason: str,
        *,
        close: bool = False,
        extra: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Answer from the proxy itself, naming the reason in a header and the body;
        `extra` fields are added (a 429's rate-limit fields)."""
        self.abort_upstream()
        self.status = status
        self.error = reason
        body = reason.replace("_", " ").encode() + b"\n"
        if close or (not self.request_done and not self._request_complete()):
            self.keep_alive = False
        if self.downstream.draining or self.downstream.chain.retired:
            self.keep_alive = False
        headers = [
            (b"content-type", b"text/plain"),
            (b"content-length", str(len(body)).encode()),
            (ERROR_HEADER, reason.encode()),
            *extra,
        ]
        attempts = self.attempts
        if attempts is not None and attempts.policy is not None:
            headers.append((ATTEMPTS_HEADER, b"%d" % attempts.count))
        if not self.keep_alive:
            headers.append((b"connection", b"close"))
        self.response_started = True
        self.response_done = True
        send_body = self.head is None or self.head.method != b"HEAD"
        self.downstream.write(
            encode_response_head(status, b"", headers) + (body if send_body else b"")
        )
        self.finish()

    def respond(self, status: int, body: bytes, extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer from the proxy itself as a route says (a direct response, a redirect):
        a Content-Length framed body, text/plain when there is one."""
        self.abort_upstream()
        self.status = status
        if not self.request_done and not self._request_complete():
            self.keep_alive = False
        if self.downstream.draining or self.downstream.chain.retired:
            self.keep_alive = False
        headers = [(b"content-length", b"%d" % len(body)), *extra]
        if body:
            headers.insert(0, (b"content-type", b"text/plain"))
        if not self.keep_alive:
            headers.append((b"connection", b"close"))
        self.response_started = True
        self.response_done = True
        send_body = self.head is None or self.head.method != b"HEAD"
        self.downstream.write(
            encode_response_head(status, b"", headers) + (body if send_body else b"")
        )
        self.finish()

    def _request_complete(self) -> bool:
        head = self.head
        # A request with no body is complete once its head is in; anything else
        # is complete only when its end arrived.
        return (
            head is not None
            and not head.chunked
            and not head.content_length
            and head.upgrade is None
        )

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.downstream.chain.deadlines.remove(self, self.timer)
            self.timer = None
        attempts = self.attempts
        if attempts is not None:
            attempts.close()
            # the two refer to each other: dropping one lets reference counting free both
            self.attempts = None
        if self.mirror is not None:
            # the request never arrived whole: there is nothing complete to copy
            self.mirror.drop()
            self.mirror = None
        downstream = self.downstream
        conn = self.upstream
        if conn is not None and not conn.upgraded:
            self.upstream = None
            conn.end_exchange(self.cluster, self.endpoint, self.response_done and self.request_done)
        cluster = self.cluster
        if cluster is not None:
            # the circuit breaker's count, the balancer's, and the outcome for outlier
            # detection and latency estimates
            cluster.finished(self.chosen, self.endpoint, self.status, self.error, self.start)
        self._record()
        if conn is not None and conn.upgraded:
            return
        if downstream.exchange is self:
            if self.keep_alive and (self.request_done or self._request_complete()):
                downstream._next()
            else:
                downstream.exchange = None
                downstream.close()

    def _record(self) -> None:
        down = self.downstream
        record(self, down.chain, down.peer, down.source, down.peer_identity)


def record(
    ex: Any, chain: ChainRuntime, peer: bytes, source: str, identity: bytes | None = None
) -> HttpStats | None:
    """Count an ended exchange (HTTP/1.1 or an HTTP/2 stream) in its route's metrics (by
    the calling `source` service on an inbound listener), end its trace span and write its
    access log record (with the caller's SPIFFE `identity`, which also picks the inbound
    sinks that log it); the counters, for more of them (None with golden metrics off)."""
    route = ex.route
    duration = time.monotonic() - ex.start
    route_name = route.name if route is not None else "none"
    if ex.cluster is not None:
        cluster_name = ex.cluster.config.name  # the one picked, on a weighted route
    else:
        cluster_name = route.cluster if route is not None else "none"
    stats = None
    if chain.golden:  # the snapshot's `metrics: {enabled: false}` turns these off
        stats = chain.metrics.http_stats(chain.listener, route_name, cluster_name, source)
        stats.record(ex.status, duration)
    tracer = chain.tracer
    if tracer is not None and (ex.trace is None or ex.trace.sampled):
        tracer.end(ex, chain, peer, source, route_name, cluster_name, duration)
    taps = chain.metrics.tap
    if taps is not None:  # `meshling tap` is watching (meshling.proxy.tap)
        taps.observe(ex, chain.listener, source, route_name, cluster_name, duration)
    log = chain.access_log
    if log is not None:
        # In meshling.telemetry.logformat's record order; rendered later, off this path.
        log.log(
            (
                time.time() - duration,
                duration,
                chain.listener,
                route_name,
                cluster_name,
                ex.endpoint,
                peer,
                ex.head,
                ex.status,
                ex.body_in,
                ex.body_out,
                ex.error,
                ex.request_id,
                identity,
                source,
                chain.direction,
                chain.metrics.service,
            ),
            identity,
        )
    return stats


def find_route(
    chain: ChainRuntime,
    host: bytes,
    method: bytes,
    raw_path: bytes,
    headers: list[tuple[bytes, bytes]],
    query: bytes,
) -> tuple[bytes, Route | None]:
    """The normalised path of a request and the route it takes (None: no route);
    PathError for a path that cannot be served."""
    http = chain.http
    assert http is not None and chain.router is not None
    path = normalize_path(
        raw_path, merge_slashes=http.merge_slashes, escaped_slashes=http.escaped_slashes
    )
    return path, chain.router.route(host, method, path.decode("latin-1"), headers, query)


class HttpUpstream(Side):
    """One connection to an endpoint, used by one exchange at a time, then pooled."""

    def __init__(self, cluster: ClusterRuntime, endpoint: Endpoint) -> None:
        self.cluster = cluster
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.decoder = ResponseDecoder()
        self.exchange: Exchange | None = None
        self.idle_since = 0.0
        self.closed = False
        self.upgraded = False
        # the last response allows reuse of the connection
        self.keep_alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.cluster.stats.bytes_received += len(data)
        ex = self.exchange
        if ex is None:
            # Bytes from an idle connection belong to no request: the connection is unusable.
            self.close()
            return
        if self.upgraded:
            ex.downstream.write(data)
            return
        ex.upstream_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.cluster.stats.cx_active -= 1
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.upstream_lost(self, exc)
        else:
            self.cluster.forget(self.endpoint, self)

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def end_exchange(
        self, cluster: ClusterRuntime | None, endpoint: Endpoint | None, complete: bool
    ) -> None:
        """The exchange using the connection ended (`complete`: request and response
        whole): back to `cluster`'s pool for `endpoint` when it can be reused, else closed."""
        self.exchange = None
        # A full downstream buffer (or a paced response) may have paused its reading as
        # the response ended: an idle connection must read, to be reusable.
        self.resume_reading()
        if not (
            complete
            and self.keep_alive
            and not self.closed
            and cluster is not None
            and endpoint is not None
            and cluster.release(endpoint, self)
        ):
            self.close()

    def write(self, data: bytes) -> None:
        self.cluster.stats.bytes_sent += len(data)
        if self.transport is not None:
            self.transport.write(data)

    # the upstream's write buffer governs reading from the client
    def pause_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.downstream.paused_by_upstream = True
            ex.downstream._update_reading()

    def resume_writing(self) -> None:
        ex = self.exchange
        if ex is not None:
            ex.downstream.paused_by_upstream = False
            ex.downstream._update_reading()


def answered_by_route(ex: Any, route: Route, head: Any, path: bytes, tls: bool) -> bool:
    """Answer through `ex.respond` when the route answers itself (a direct response, a
    redirect built from `head`, the request's normalised `path` and whether it came over
    TLS); False for a route that forwards."""
    if route.direct_response is not None:
        ex.respond(route.direct_response.status, route.direct_response.body)
        return True
    if route.redirect is not None:
        location = redirect_location(route.redirect, head, path, tls)
        ex.respond(route.redirect.status, b"", [(b"location", location)])
        return True
    return False


def redirect_location(redirect: Redirect, head: RequestHead, path: bytes, tls: bool) -> bytes:
    """The `location` of a redirect: the request's URL (scheme, host, port, normalised
    path, query) with the parts the route gives replaced; a port that is the scheme's
    default is left out."""
    scheme = redirect.scheme or (b"https" if tls else b"http")
    authority = head.host
    host, port = authority, b""
    colon = authority.rfind(b":")
    if colon > authority.rfind(b"]"):
        host, port = authority[:colon], authority[colon + 1 :]
    if redirect.host is not None:
        host = redirect.host
    if redirect.port is not None:
        port = b"%d" % redirect.port
    if port and port == _DEFAULT_PORTS.get(scheme):
        port = b""
    location = redirect.path if redirect.path is not None else path
    if host:  # else (an HTTP/1.0 request without Host): a path-only reference
        location = scheme + b"://" + host + (b":" + port if port else b"") + location
    return location + b"?" + head.query if head.query else location


_DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}
