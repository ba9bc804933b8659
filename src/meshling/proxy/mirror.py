"""Request mirroring: copies of a route's requests, sent to another cluster and forgotten.

A route with a `mirror` (`snapshot.model.RequestMirror`) copies a share of its requests
(one random draw each) to an endpoint of the mirror cluster: the method, path (after a
rewrite), header fields and body of the request as it is forwarded, with Host suffixed
`-shadow` before any port (`api:8080` becomes `api-shadow:8080`, the name Envoy gives
shadows), so that the mirror's logs tell copies from real traffic. The copy's response
is read and discarded.

The caller never waits for a copy and never sees what became of it:

* the exchange hands the copy each piece of the request body as it forwards it
  (`MirrorCopy.data`, which only keeps a reference); the copy leaves on a task of its
  own once the request has arrived whole, when the original is already on its way;
* a body over `BODY_LIMIT` is not copied: a Content-Length over it is seen in the head
  and nothing is kept; a chunked body is kept until it passes the limit, then dropped;
* at most `MAX_ACTIVE` copies per mirror cluster are kept or in flight (the count is
  the proxy's, shared by every snapshot); a request over it is not copied;
* every copy has a deadline for connecting, sending and reading the whole response:
  the route's timeout, or `DEFAULT_TIMEOUT` on a route without one;
* a failure (a refused or failed connection, a reset, an invalid response, a 5xx, the
  deadline) ends the copy; it reaches neither the exchange nor the cluster's outlier
  detection, whose view stays the callers'.

Copies travel on connections opened by the cluster's `connect` (its TLS context and
peer identity check, connect timeout and connection limits), kept for the next copy in
pools of their own: an exchange never picks up a connection a copy's response may still
arrive on. Every outcome is counted per cluster (`telemetry.metrics.MirrorStats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from meshling.http1 import EndOfMessage, ParseError, ResponseDecoder, ResponseHead, Upgraded
from meshling.proxy.cluster import ConnectError, PoolKey, PoolSet
from meshling.proxy.side import Side

if TYPE_CHECKING:
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.http import Exchange
    from meshling.proxy.listener import ChainRuntime
    from meshling.snapshot.model import Endpoint, RequestMirror, Route
    from meshling.telemetry.metrics import ClusterStats, MirrorStats

log = logging.getLogger("meshling.proxy")

# the largest request body copied, in bytes
BODY_LIMIT = 64 * 1024
# copies per mirror cluster kept or in flight at once
MAX_ACTIVE = 100
# a copy's deadline on a route whose timeout is disabled
DEFAULT_TIMEOUT = 15.0
SHADOW_SUFFIX = b"-shadow"

# Fields of the forwarded head that the copy writes itself: its Host, and the framing
# of a body that it sends whole; it sends no Expect, since it never waits to send.
_REPLACED = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect"})

# the copies' idle connections, apart from the exchanges'
_POOLS = PoolSet()
# copies on their way (the loop holds its tasks only by weak references)
_SENDING: set[asyncio.Task[None]] = set()


def start(exchange: Exchange, mirror: RequestMirror) -> MirrorCopy | None:
    """The copy of an exchange's request, once its upstream head is built; None when
    this request is not copied (not drawn, or over a limit: counted)."""
    head = exchange.head
    assert head is not None
    return start_copy(
        exchange.downstream.chain,
        mirror,
        exchange.route,
        exchange.upstream_head,
        head.method,
        head.host,
        head.headers,
        exchange.downstream.peer,
        head.content_length,
        framed=head.chunked or head.content_length is not None,
    )


def start_copy(
    chain: ChainRuntime,
    mirror: RequestMirror,
    route: Route | None,
    upstream_head: bytes,
    method: bytes,
    authority: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    peer: bytes,
    length: int | None,
    *,
    framed: bool,
) -> MirrorCopy | None:
    """The copy of a request (an HTTP/1.1 exchange's, or an HTTP/2 stream's) forwarded
    with `upstream_head` (an HTTP/1.1 head); `framed`: it has a body. None when this
    request is not copied (not drawn, or over a limit: counted)."""
    percent = mirror.percent
    if percent < 100.0 and random.random() * 100.0 >= percent:
        return None
    stats = chain.metrics.mirror_stats(mirror.cluster)
    if length is not None and length > BODY_LIMIT:
        stats.count("skipped_body_too_large")
        return None
    if stats.active >= MAX_ACTIVE:
        stats.count("skipped_overflow")
        return None
    stats.active += 1
    return MirrorCopy(
        chain.clusters[mirror.cluster],
        stats,
        copy_head(upstream_head),
        method,
        authority,
        headers,
        peer,
        (route.timeout if route is not None else 0.0) or DEFAULT_TIMEOUT,
        framed=framed,
    )


def copy_head(upstream_head: bytes) -> bytes:
    """The request line and fields of a forwarded head, less those the copy replaces,
    each line ending in CRLF (the blank line that ends a head left out)."""
    lines = upstream_head.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if line and line[: line.find(b":")] not in _REPLACED:
            kept.append(line)
    kept.append(b"")
    return b"\r\n".join(kept)


def shadow_authority(authority: bytes) -> bytes:
    """`authority` with `-shadow` after its host, before any port."""
    colon = authority.rfind(b":")
    if colon > authority.rfind(b"]"):
        return authority[:colon] + SHADOW_SUFFIX + authority[colon:]
    return authority + SHADOW_SUFFIX


class MirrorCopy:
    """One request's copy while the request arrives; `send` or `drop` ends it."""

    __slots__ = (
        "authority",
        "body",
        "cluster",
        "framed",
        "head",
        "headers",
        "method",
        "peer",
        "size",
        "stats",
        "timeout",
    )

    def __init__(
        self,
        cluster: ClusterRuntime,
        stats: MirrorStats,
        head: bytes,
        method: bytes,
        authority: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        peer: bytes,
        timeout: float,
        *,
        framed: bool,
    ) -> None:
        self.cluster = cluster
        self.stats = stats
        self.head = head
        self.method = method
        self.authority = authority
        # the request's fields and the client's address, for the balancer's pick
        self.headers = headers
        self.peer = peer
        self.timeout = timeout
        # the request has a body (Content-Length or chunked): the copy sends its length
        self.framed = framed
        # the body so far; None once the copy is sent or given up (`stats.active` freed)
        self.body: list[bytes] | None = []
        self.size = 0

    def data(self, data: bytes) -> None:
        """A piece of the request body, as the exchange forwards it."""
        body = self.body
        if body is None:
            return
        self.size += len(data)
        if self.size > BODY_LIMIT:
            self._end("skipped_body_too_large")
        else:
            body.append(data)

    def send(self) -> None:
        """The request arrived whole: send the copy, on a task of its own."""
        body = self.body
        if body is None:
            return
        cluster = self.cluster
        endpoint = cluster.pick(self.headers, self.peer)
        if endpoint is None:
            self._end("skipped_no_endpoint")
            return
        self.body = None
        request = self.request(endpoint, b"".join(body))
        # a copy without a body may go again on a new connection if a pooled one was
        # closed under it, as the exchange does for its own requests
        task = asyncio.ensure_future(
            _deliver(cluster, endpoint, request, self.method, not body, self.timeout, self.stats)
        )
        _SENDING.add(task)
        task.add_done_callback(_SENDING.discard)

    def request(self, endpoint: Endpoint, body: bytes) -> bytes:
        """The copy's bytes for `endpoint`: head, shadow Host, length, body."""
        authority = self.authority or str(endpoint).encode()
        out = [self.head, b"host: %b\r\n" % shadow_authority(authority)]
        if self.framed:
            out.append(b"content-length: %d\r\n" % len(body))
        out.append(b"\r\n")
        out.append(body)
        return b"".join(out)

    def drop(self) -> None:
        """The exchange ended before its request arrived whole: nothing is sent."""
        if self.body is not None:
            self._end("skipped_incomplete")

    def _end(self, outcome: str) -> None:
        self.body = None
        self.stats.active -= 1
        self.stats.count(outcome)


class MirrorFailure(Exception):
    """A copy that got no complete response; `answered`: some of one arrived."""

    def __init__(self, reason: str, *, answered: bool) -> None:
        super().__init__(reason)
        self.answered = answered


async def _deliver(
    cluster: ClusterRuntime,
    endpoint: Endpoint,
    request: bytes,
    method: bytes,
    retriable: bool,
    timeout: float,
    stats: MirrorStats,
) -> None:
    outcome = "failed"
    try:
        async with asyncio.timeout(timeout):
            status = await _exchange(cluster, endpoint, request, method, retriable)
        outcome = "sent" if status < 500 else "failed"
    except TimeoutError:
        outcome = "timeout"
    except (ConnectError, MirrorFailure) as exc:
        log.debug("mirror to %s (%s): %s", cluster.config.name, endpoint, exc)
    except Exception:
        # a copy's trouble is its own: logged, never the caller's
        log.exception("mirror to %s (%s) failed", cluster.config.name, endpoint)
    finally:
        stats.active -= 1
        stats.count(outcome)


async def _exchange(
    cluster: ClusterRuntime, endpoint: Endpoint, request: bytes, method: bytes, retriable: bool
) -> int:
    """Send a copy and read its response; its status."""
    conn = _take(cluster, endpoint)
    if conn is not None:
        try:
            return await _round_trip(cluster, endpoint, conn, request, method)
        except MirrorFailure as exc:
            if exc.answered or not retriable:
                raise
    return await _round_trip(cluster, endpoint, await _open(cluster, endpoint), request, method)


async def _round_trip(
    cluster: ClusterRuntime,
    endpoint: Endpoint,
    conn: MirrorUpstream,
    request: bytes,
    method: bytes,
) -> int:
    try:
        status = await conn.request(request, method)
    except BaseException:
        conn.abort()  # failed, or out of time: whatever may still arrive is unwanted
        raise
    if not (
        conn.keep_alive
        and conn.usable()
        and _POOLS.pool(conn.key).put(conn, _POOLS.clock(), cluster.config.max_idle_per_endpoint)
    ):
        conn.close()
    return status


def _take(cluster: ClusterRuntime, endpoint: Endpoint) -> MirrorUpstream | None:
    tls = cluster.tls
    if tls is not None and tls.own.expired(time.time()):
        return None  # `connect` refuses, and counts
    conn = _POOLS.pool((endpoint, cluster.config.tls)).take(
        _POOLS.clock(), cluster.config.idle_timeout
    )
    return cast("MirrorUpstream | None", conn)


async def _open(cluster: ClusterRuntime, endpoint: Endpoint) -> MirrorUpstream:
    key: PoolKey = (endpoint, cluster.config.tls)
    made: list[MirrorUpstream] = []

    def factory() -> MirrorUpstream:
        conn = MirrorUpstream(cluster.stats, key)
        made.append(conn)
        return conn

    try:
        return cast(MirrorUpstream, await cluster.connect(endpoint, factory))
    except BaseException:
        for conn in made:
            conn.abort()  # a connection that came up just as the deadline passed
        raise


class MirrorUpstream(Side):
    """One connection to an endpoint of a mirror cluster, carrying a copy at a time."""

    def __init__(self, stats: ClusterStats, key: PoolKey) -> None:
        self.stats = stats
        self.key = key
        self.decoder = ResponseDecoder()
        # resolved with the status when the response to the copy in flight has ended
        self.waiter: asyncio.Future[int] | None = None
        self.status = 0
        self.answered = False
        self.keep_alive = False
        self.closed = False
        self.counted = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.counted = True
        self.stats.cx_total += 1
        self.stats.cx_active += 1

    def request(self, data: bytes, method: bytes) -> asyncio.Future[int]:
        waiter = self.waiter = asyncio.get_running_loop().create_future()
        if not self.usable():
            waiter.set_exception(MirrorFailure("connection closed", answered=False))
            return waiter
        self.status = 0
        self.answered = False
        self.keep_alive = False
        self.decoder.expect(method)
        self.stats.bytes_sent += len(data)
        assert self.transport is not None
        self.transport.write(data)
        return waiter

    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        self.stats.bytes_received += len(data)
        waiter = self.waiter
        if waiter is None or waiter.done():
            # bytes on an idle connection answer nothing sent: the connection is unusable
            self.close()
            return
        self.answered = True
        try:
            events = self.decoder.feed(data)
        except ParseError as exc:
            waiter.set_exception(MirrorFailure(f"invalid response: {exc.reason}", answered=True))
            return
        self._events(events, waiter)

    def _events(self, events: Sequence[object], waiter: asyncio.Future[int]) -> None:
        for event in events:
            if isinstance(event, ResponseHead):
                self.status = event.status
                self.keep_alive = event.keep_alive
            elif isinstance(event, EndOfMessage):
                self.waiter = None
                waiter.set_result(self.status)
                return
            elif isinstance(event, Upgraded):
                waiter.set_exception(MirrorFailure("switched protocols", answered=True))
                return

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.counted:
            self.stats.cx_active -= 1
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            with contextlib.suppress(ParseError):
                self._events(self.decoder.feed_eof(), waiter)  # a body ended by the close
            if not waiter.done():
                waiter.set_exception(MirrorFailure("upstream reset", answered=self.answered))
        pool = _POOLS.pools.get(self.key)
        if pool is not None:
            pool.discard(self)
