"""HTTP/1.1 requests carried over multiplexed HTTP/2 connections (`Cluster.protocol`
"http2").

An app speaks HTTP/1.1 to its proxy over as many connections as it likes; between
proxies, its requests become streams of one long-lived HTTP/2 connection per peer (the
`H2Upstream`s of `proxy.http2`), and the peer's inbound turns them back into HTTP/1.1
for its app, as Linkerd does. Connection count and TLS handshakes between proxies then
stay flat however many connections the apps open.

An `H1Bridge` is one such request: to the client connection (`HttpDownstream`) it is
the exchange under way (request events go in, flow control and errors come back), and
to the `H2Exchange` that routes and forwards it, it is the sink the response goes to,
framed again as HTTP/1.1 (Content-Length when the upstream gave one, else chunked for a
1.1 client, or close-delimited for a 1.0 one). Requests that switch protocols (a
WebSocket upgrade) keep the HTTP/1.1 path: their bytes cannot become an HTTP/2 stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from meshling.http1 import HOP_BY_HOP, encode_chunk, encode_last_chunk, reason_phrase
from meshling.http2.headers import RequestHead2, response_fields
from meshling.proxy.http2 import HIGH_WATER, H2Exchange

if TYPE_CHECKING:
    from h2.errors import ErrorCodes

    from meshling.http1 import RequestHead
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.http import HttpDownstream
    from meshling.proxy.listener import ChainRuntime
    from meshling.snapshot.model import HttpFilter, Route


class H1Bridge:
    """One HTTP/1.1 request of a client connection, forwarded as an HTTP/2 stream."""

    __slots__ = (
        "chunked",
        "downstream",
        "ex",
        "head1",
        "keep_alive",
        "paused",
        "request_ended",
        "response_done",
        "response_started",
    )

    # what HttpDownstream looks for on an exchange: no Retry/Timeout attempts of its own
    attempts = None

    def __init__(self, downstream: HttpDownstream, head: RequestHead, path: bytes) -> None:
        self.downstream = downstream
        self.head1 = head
        self.keep_alive = (
            head.keep_alive and not downstream.draining and not downstream.chain.retired
        )
        self.chunked = False
        self.paused = False
        self.request_ended = False
        self.response_started = False
        self.response_done = False
        fields = [(n, v) for n, v in head.headers if n not in HOP_BY_HOP]
        self.ex = H2Exchange(
            self,
            1,
            RequestHead2(
                method=head.method,
                scheme=b"https" if downstream.chain.tls is not None else b"http",
                authority=head.host,
                path=head.path,
                query=head.query,
                headers=fields,
                content_length=head.content_length,
                version=head.version,
            ),
        )
        self.ex.path = path
        if not head.chunked and not head.content_length:
            # no body: the request is whole with its head (one HEADERS frame upstream)
            self.ex.request_done = True

    def forward(self, route: Route, cluster: ClusterRuntime) -> None:
        self.ex.route = route
        self.ex.forward(route, cluster)

    # -- what the H2Exchange knows of its client ---------------------------------------
    @property
    def chain(self) -> ChainRuntime:
        return self.downstream.chain

    @property
    def http(self) -> HttpFilter:
        return self.downstream.http

    @property
    def peer(self) -> bytes:
        return self.downstream.peer

    @property
    def peer_identity(self) -> bytes | None:
        return self.downstream.peer_identity

    @property
    def permitted(self) -> bool:
        return self.downstream.permitted

    @property
    def tls(self) -> bool:
        return self.downstream.chain.tls is not None

    @property
    def source(self) -> str:
        return self.downstream.source

    @property
    def policies(self) -> None:
        """The client connection's rate limits and faults were applied before routing."""
        return None

    # -- the response, framed as HTTP/1.1 ----------------------------------------------
    def write_stream(self, sid: int, block: list[tuple[bytes, bytes]], end: bool) -> None:
        status, fields = response_fields(block)
        head = self.head1
        self.response_started = True
        bodyless = head.method == b"HEAD" or status in (204, 304) or status < 200
        sized = False
        out = [b"HTTP/1.1 %d %b\r\n" % (status, reason_phrase(status))]
        for name, value in fields:
            if name not in HOP_BY_HOP:
                if name == b"content-length":
                    sized = True
                out.append(b"%b: %b\r\n" % (name, value))
        if not sized and not bodyless:
            if end:
                out.append(b"content-length: 0\r\n")
            elif head.version == b"1.1":
                self.chunked = True
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # a 1.0 client reads to the connection's end
        downstream = self.downstream
        if downstream.draining or downstream.chain.retired:
            self.keep_alive = False
        if not self.keep_alive:
            out.append(b"connection: close\r\n")
        elif head.version == b"1.0":
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        downstream.write(b"".join(out))
        if end:
            self.response_done = True

    def send(self, sid: int, data: bytes, owner: Any, end: bool = False) -> int:
        if data:
            self.downstream.write(encode_chunk(data) if self.chunked else data)
        if end:
            self.finish_stream(sid, owner)
        return HIGH_WATER if self.paused else 0

    def finish_stream(
        self, sid: int, owner: Any, trailers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        if self.response_done:
            return
        self.response_done = True
        if self.chunked:
            self.downstream.write(encode_last_chunk(trailers or []))

    def end_now(self, sid: int, trailers: list[tuple[bytes, bytes]]) -> None:
        self.finish_stream(sid, None, trailers)

    def drop_stream(self, sid: int, code: ErrorCodes | None = None) -> None:
        """The response broke off: the client sees its connection reset."""
        if self.response_started and not self.response_done:
            self.keep_alive = False
            self.downstream.abort()

    def ack(self, sid: int, size: int) -> None:
        downstream = self.downstream
        if downstream.paused_by_upstream:
            downstream.paused_by_upstream = False
            downstream._update_reading()

    def hold(self, sid: int) -> None:
        downstream = self.downstream
        if not downstream.paused_by_upstream:
            downstream.paused_by_upstream = True
            downstream._update_reading()

    def stream_done(self, ex: H2Exchange) -> None:
        downstream = self.downstream
        if cast(object, downstream.exchange) is not self:
            return
        if self.keep_alive and self.request_ended and self.response_done:
            downstream._next()
        else:
            downstream.exchange = None
            downstream.close()

    # -- what HttpDownstream asks of the exchange under way ------------------------------
    def request_data(self, data: bytes) -> None:
        self.ex.request_data(data, len(data))

    def request_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.request_ended = True
        self.ex.request_end(list(trailers) or None)

    def request_upgrade(self, tail: bytes) -> None:
        raise AssertionError("an upgrade request is never bridged")

    def downstream_lost(self) -> None:
        self.ex.downstream_lost()

    def abort_upstream(self) -> None:
        self.ex._abort_upstream()

    def local_reply(
        self, status: int, reason: str, *, close: bool = False, extra: Any = ()
    ) -> None:
        if close:
            self.keep_alive = False
        self.ex.local_reply(status, reason, list(extra))

    @property
    def upstream(self) -> H1Bridge:
        """The client's write buffer governs how fast the upstream stream is read."""
        return self

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        self.ex.drained(self)
