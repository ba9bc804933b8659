"""Property tests for the HTTP/1.1 codec.

* Valid requests, encoded and cut into pieces anywhere, decode to what was encoded.
* A client and a server codec talk through a fake link: the requests and responses each
  side decodes are the ones the other encoded, and the wire holds what HTTP/1.1 says.
* Arbitrary bytes, and valid messages with a few bytes changed, raise nothing but
  ParseError, finish quickly, and give the same verdict however they are split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshling.http1 import (
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
    encode_request_head,
    encode_response_head,
)

Headers = list[tuple[bytes, bytes]]

# ------------------------------------------------------------------------ strategies

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_PCHAR = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@%"
# Fields the decoder interprets; generated messages add them deliberately, not by chance.
_FRAMING = {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade"}

names = (
    st.text(_TCHAR, min_size=1, max_size=20)
    .map(str.encode)
    .filter(lambda n: n.lower() not in _FRAMING)
)
# Field values: visible ASCII and obs-text, inner spaces and tabs, no edge whitespace.
values = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c <= 126 or c >= 128).strip(b" \t")
)
fields = st.lists(st.tuples(names, values), max_size=8)
segments = st.text(_PCHAR, max_size=12).map(str.encode)
paths = st.lists(segments, min_size=1, max_size=5).map(lambda s: b"/" + b"/".join(s))
queries = st.one_of(st.just(b""), st.text(_PCHAR + "/?", max_size=20).map(str.encode))
methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"QUERY"])
bodies = st.binary(max_size=300)


@st.composite
def chunkings(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """Cut ``body`` into non-empty chunks at drawn points."""
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(body) - 1)), max_size=6))))
    edges = [0, *(c for c in cuts if c < len(body)), len(body)]
    return [body[a:b] for a, b in pairwise(edges) if b > a]


@dataclass
class Message:
    """A request or response as a test means it: what to encode and what to expect."""

    head: bytes  # encoded start line and fields
    body: bytes
    chunks: list[bytes] | None  # None: Content-Length (or no body)
    trailers: Headers

    def wire(self) -> bytes:
        if self.chunks is None:
            return self.head + self.body
        return (
            self.head
            + b"".join(encode_chunk(c) for c in self.chunks)
            + (encode_last_chunk(self.trailers))
        )


@st.composite
def requests(draw: st.DrawFn) -> tuple[Message, RequestHead]:
    method = draw(methods)
    path = draw(paths)
    query = draw(queries)
    target = path + (b"?" + query if query else b"")
    host = draw(st.sampled_from([b"example.com", b"svc.ns.svc.cluster.local:8080", b"[::1]:80"]))
    extra = draw(fields)
    body = draw(bodies)
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    if framing == "none":
        body = b""
    headers: Headers = [(b"Host", host), *extra]
    chunks = trailers = None
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
    elif framing == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
        chunks = draw(chunkings(body))
        trailers = draw(fields)
    close = draw(st.booleans())
    if close:
        headers.append((b"Connection", b"close"))
    expected_headers = [(n.lower(), v) for n, v in headers]
    head = RequestHead(
        method=method,
        target=target,
        path=path,
        query=query,
        version=b"1.1",
        headers=expected_headers,
        host=host,
        keep_alive=not close,
        chunked=chunks is not None,
        content_length=len(body) if framing == "length" else None,
        expect_continue=False,
        upgrade=None,
    )
    message = Message(encode_request_head(method, target, headers), body, chunks, trailers or [])
    return message, head


def expected_events(message: Message, head: object) -> list[object]:
    events: list[object] = [head]
    if message.body:
        events.append(Data(message.body))
    events.append(EndOfMessage([(n.lower(), v) for n, v in message.trailers]))
    return events


def merged(events: Sequence[object]) -> list[object]:
    out: list[object] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        elif isinstance(event, Data) and not event.data:
            continue
        else:
            out.append(event)
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in pairwise(edges)]


def feed_pieces(decoder: RequestDecoder | ResponseDecoder, pieces: list[bytes]) -> list[object]:
    """Feed ``pieces``; after an upgrade, the rest is passthrough and joins the tail."""
    events: list[object] = []
    for i, piece in enumerate(pieces):
        events += decoder.feed(piece)
        if events and isinstance(events[-1], Upgraded):
            events[-1] = Upgraded(events[-1].tail + b"".join(pieces[i + 1 :]))
            break
    return events


# ------------------------------------------------------------------------ properties


@given(requests(), st.lists(st.integers(0, 10_000), max_size=12))
def test_request_decoder_decodes_split_requests_like_whole_ones(
    drawn: tuple[Message, RequestHead], cuts: list[int]
) -> None:
    message, head = drawn
    data = message.wire()
    whole = merged(RequestDecoder().feed(data))
    assert whole == expected_events(message, head)
    assert merged(feed_pieces(RequestDecoder(), split(data, cuts))) == whole


@given(st.lists(requests(), min_size=1, max_size=4), st.lists(st.integers(0, 10_000), max_size=12))
def test_request_decoder_decodes_pipelined_requests_in_order(
    drawn: list[tuple[Message, RequestHead]], cuts: list[int]
) -> None:
    expected: list[object] = []
    for message, head in drawn:
        expected += expected_events(message, head)
        if not head.keep_alive:
            break  # what follows "Connection: close" is ignored
    data = b"".join(message.wire() for message, _ in drawn)
    events = merged(feed_pieces(RequestDecoder(), split(data, cuts)))
    assert events == expected


# A response a test server sends: status, fields, body and how it is framed.
@st.composite
def responses(draw: st.DrawFn, method: bytes) -> tuple[bytes, list[object]]:
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500, 503]))
    extra = draw(fields)
    body = draw(bodies)
    framing = draw(st.sampled_from(["length", "chunked"]))
    informational = draw(st.booleans())
    headers: Headers = list(extra)
    no_body = method == b"HEAD" or status in (204, 304)
    wire = b""
    events: list[object] = []
    if informational:
        wire += encode_response_head(100, b"", [])
        events.append(Informational(100, []))
    trailers: Headers = []
    if framing == "length":
        headers.append((b"Content-Length", b"%d" % len(body)))
        head = encode_response_head(status, b"", headers)
        wire += head + (b"" if no_body else body)
    else:
        headers.append((b"Transfer-Encoding", b"chunked"))
        trailers = draw(fields)
        wire += encode_response_head(status, b"", headers)
        if not no_body:
            chunks = draw(chunkings(body))
            wire += b"".join(encode_chunk(c) for c in chunks) + encode_last_chunk(trailers)
    lowered = [(n.lower(), v) for n, v in headers]
    reason = encode_response_head(status, b"", []).split(b" ", 2)[2][:-4]
    events.append(
        ResponseHead(
            status=status,
            reason=reason,
            version=b"1.1",
            headers=lowered,
            keep_alive=True,
            chunked=framing == "chunked" and not no_body,
            content_length=len(body) if framing == "length" and not no_body else None,
        )
    )
    if body and not no_body:
        events.append(Data(body))
    events.append(EndOfMessage([] if no_body else [(n.lower(), v) for n, v in trailers]))
    return wire, events


class Link:
    """One direction of a fake connection: bytes written, read back in drawn sizes."""

    def __init__(self, sizes: list[int]) -> None:
        self.buffer = bytearray()
        self.wire = bytearray()  # everything ever written, to check what was sent
        self.sizes = sizes or [65536]

    def write(self, data: bytes) -> None:
        self.buffer += data
        self.wire += data

    def read_all(self) -> list[bytes]:
        pieces = []
        i = 0
        while self.buffer:
            n = max(1, self.sizes[i % len(self.sizes)])
            pieces.append(bytes(self.buffer[:n]))
            del self.buffer[:n]
            i += 1
        return pieces


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(requests(), min_size=1, max_size=3),
    st.data(),
    st.lists(st.integers(1, 50), max_size=5),
    st.lists(st.integers(1, 50), max_size=5),
)
def test_codec_round_trips_between_client_and_server_through_a_link(
    drawn: list[tuple[Message, RequestHead]],
    data: st.DataObject,
    up_sizes: list[int],
    down_sizes: list[int],
) -> None:
    upstream, downstream = Link(up_sizes), Link(down_sizes)
    server, client = RequestDecoder(), ResponseDecoder()
    for message, head in drawn:
        # The client encodes a request and sends it.
        client.expect(head.method)
        upstream.write(message.wire())
        sent_at = len(upstream.wire) - len(message.wire())
        request_line = head.method + b" " + head.target + b" HTTP/1.1\r\n"
        assert bytes(upstream.wire[sent_at:]).startswith(request_line)

        # The server decodes exactly that request.
        received: list[object] = []
        for piece in upstream.read_all():
            received += server.feed(piece)
        assert merged(received) == expected_events(message, head)

        # The server answers; the client decodes exactly that response.
        wire, expected = data.draw(responses(head.method))
        downstream.write(wire)
        answered: list[object] = []
        for piece in downstream.read_all():
            answered += client.feed(piece)
        assert merged(answered) == expected
        assert bytes(downstream.wire).endswith(wire)
        if not head.keep_alive:
            break
    assert client.feed_eof() == []


# Bytes the fuzzing starts from: valid messages of each kind, to be mutated.
_SEEDS = [
    b"GET /a?b HTTP/1.1\r\nHost: h\r\nX: y\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3;e=1\r\nabc\r\n0\r\nT: v\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nxx",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil close",
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)) * draw(st.integers(1, 2)))
    interesting = b'\r\n :;,\t\x00\x7f\xff0123456789abcdefABCDEFxX-+"\\/?#@'
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.one_of(st.sampled_from(list(interesting)), st.integers(0, 255)))
        if action == "insert" or at == len(data):
            data.insert(at, byte)
        elif action == "replace":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


def verdict(make: type[RequestDecoder] | type[ResponseDecoder], pieces: list[bytes]) -> object:
    """The merged events, or ("error", status); nothing else may escape."""
    decoder = make()
    if isinstance(decoder, ResponseDecoder):
        for _ in range(4):
            decoder.expect(b"GET")
    try:
        events = feed_pieces(decoder, pieces)
        if isinstance(decoder, ResponseDecoder) and not (
            events and isinstance(events[-1], Upgraded)
        ):
            events += decoder.feed_eof()
    except ParseError as error:
        assert error.status in (400, 405, 414, 417, 431, 501, 502, 505)
        return "error"
    return merged(events)


@settings(max_examples=300, deadline=2000)
@given(
    st.one_of(st.binary(max_size=400), mutated()),
    st.lists(st.integers(0, 10_000), max_size=8),
)
def test_decoders_raise_only_parse_error_on_any_input(data: bytes, cuts: list[int]) -> None:
    for make in (RequestDecoder, ResponseDecoder):
        whole = verdict(make, [data])
        # Accepted or refused alike, however the bytes were split.
        assert verdict(make, split(data, cuts)) == whole
