"""Unit tests for the HTTP/1.1 codec: the strict rules, event sequences and encoders.

Every refusal is checked twice, with the bytes fed at once and one byte at a time, and
must give the same status both ways: a decoder whose verdict depends on how TCP split
the bytes would be a smuggling vector of its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import pytest

from meshling.http1 import (
    HOP_BY_HOP,
    Data,
    EndOfMessage,
    Informational,
    Limits,
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
    strip_hop_by_hop,
)

# ---------------------------------------------------------------------------- helpers


def decode(data: bytes, *, step: int = 0, **kwargs: Any) -> list[object]:
    """Decode requests from ``data`` at once (step 0) or in pieces of ``step`` bytes."""
    decoder = RequestDecoder(**kwargs)
    if not step:
        return list(decoder.feed(data))
    events: list[object] = []
    for i in range(0, len(data), step):
        events += decoder.feed(data[i : i + step])
        if events and isinstance(events[-1], Upgraded):
            break
    return events


def merged(events: Sequence[object]) -> list[object]:
    """Join adjacent Data events, so that differently split inputs compare equal."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(out[-1].data + event.data)
        else:
            out.append(event)
    return out


def refusal(data: bytes, **kwargs: Any) -> ParseError:
    """The ParseError for ``data``, checked to be the same at once and byte by byte."""
    with pytest.raises(ParseError) as whole:
        decode(data, **kwargs)
    with pytest.raises(ParseError) as bytewise:
        decode(data, step=1, **kwargs)
    assert (bytewise.value.status, bytewise.value.reason) == (
        whole.value.status,
        whole.value.reason,
    )
    reason = whole.value.reason
    assert reason and reason == reason.lower() and reason.isascii()
    assert all(c.isalnum() or c in " -./" for c in reason)
    return whole.value


def status(data: bytes, **kwargs: Any) -> int:
    return refusal(data, **kwargs).status


def head_of(data: bytes, **kwargs: Any) -> RequestHead:
    events = decode(data, **kwargs)
    assert merged(decode(data, step=1, **kwargs)) == merged(events)
    assert isinstance(events[0], RequestHead)
    return events[0]


def request(*lines: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    """A GET with exactly the given field lines (b"Name: value"), Host included or not."""
    start = b"GET / " + version
    return b"\r\n".join([start, *lines]) + b"\r\n\r\n" + body


def with_host(*lines: bytes, method: bytes = b"POST", body: bytes = b"") -> bytes:
    """A request with a valid Host, the given field lines, then ``body``."""
    return b"\r\n".join([method + b" / HTTP/1.1", b"Host: example.com", *lines]) + (
        b"\r\n\r\n" + body
    )


def respond(data: bytes, *methods: bytes, step: int = 0, eof: bool = False) -> list[object]:
    decoder = ResponseDecoder()
    for method in methods or (b"GET",):
        decoder.expect(method)
    events: list[object] = []
    if step:
        for i in range(0, len(data), step):
            events += decoder.feed(data[i : i + step])
            if events and isinstance(events[-1], Upgraded):
                break
    else:
        events += decoder.feed(data)
    if eof:
        events += decoder.feed_eof()
    return events


def response_status(data: bytes, *methods: bytes) -> int:
    with pytest.raises(ParseError) as whole:
        respond(data, *methods)
    with pytest.raises(ParseError) as bytewise:
        respond(data, *methods, step=1)
    assert bytewise.value.status == whole.value.status
    return whole.value.status


GET = b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n"


# ----------------------------------------------------------------- request: the basics


def test_request_decoder_decodes_a_get() -> None:
    events = decode(GET)
    assert events == [
        RequestHead(
            method=b"GET",
            target=b"/index.html?q=1",
            path=b"/index.html",
            query=b"q=1",
            version=b"1.1",
            headers=[(b"host", b"example.com"), (b"accept", b"*/*")],
            host=b"example.com",
            keep_alive=True,
            chunked=False,
            content_length=None,
            expect_continue=False,
            upgrade=None,
        ),
        EndOfMessage([]),
    ]


def test_request_decoder_gives_the_same_events_whatever_the_split() -> None:
    data = GET + with_host(b"Content-Length: 5", body=b"hello") + GET
    whole = merged(decode(data))
    for step in (1, 2, 3, 7, 64):
        assert merged(decode(data, step=step)) == whole


def test_request_decoder_events_are_frozen_and_equal_to_constructed_ones() -> None:
    head, end = decode(GET)
    assert isinstance(head, RequestHead)
    assert head == dataclasses.replace(head)
    assert end == EndOfMessage()
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.method = b"POST"  # type: ignore[misc]
    (data,) = [
        e for e in decode(with_host(b"Content-Length: 2", body=b"hi")) if isinstance(e, Data)
    ]
    assert data == Data(b"hi") and type(data.data) is bytes


def test_request_decoder_lowercases_names_and_strips_ows() -> None:
    head = head_of(request(b"Host: h", b"X-Mixed-Case:   a  b \t", b"X-Empty:", b"X-Empty2:  "))
    assert head.headers == [
        (b"host", b"h"),
        (b"x-mixed-case", b"a  b"),
        (b"x-empty", b""),
        (b"x-empty2", b""),
    ]


def test_request_decoder_keeps_repeated_fields_in_order() -> None:
    head = head_of(request(b"Host: h", b"Cookie: a=1", b"X: 1", b"Cookie: b=2"))
    assert head.headers == [(b"host", b"h"), (b"cookie", b"a=1"), (b"x", b"1"), (b"cookie", b"b=2")]


def test_request_decoder_accepts_bytearray_and_memoryview() -> None:
    assert RequestDecoder().feed(bytearray(GET)) == decode(GET)
    assert RequestDecoder().feed(memoryview(GET)) == decode(GET)


def test_request_decoder_returns_nothing_for_an_incomplete_head() -> None:
    decoder = RequestDecoder()
    assert decoder.feed(GET[:-1]) == []
    assert decoder.feed(b"") == []
    assert decoder.feed(GET[-1:]) == decode(GET)


def test_request_decoder_decodes_pipelined_requests_in_one_feed() -> None:
    events = decode(GET + with_host(b"Content-Length: 3", body=b"abc") + GET)
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "RequestHead",
        "EndOfMessage",
        "RequestHead",
        "Data",
        "EndOfMessage",
        "RequestHead",
        "EndOfMessage",
    ]


def test_request_decoder_ignores_empty_lines_before_a_request() -> None:
    assert decode(b"\r\n\r\n" + GET) == decode(GET)
    decoder = RequestDecoder()
    decoder.feed(with_host(b"Content-Length: 1", body=b"x\r"))
    assert decoder.feed(b"\n" + GET) == decode(GET)


def test_request_decoder_without_length_or_coding_has_no_body() -> None:
    # The bytes after the head are the next request, not a body.
    events = decode(GET + GET)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage, RequestHead, EndOfMessage]
    assert events[0].content_length is None  # type: ignore[attr-defined]


def test_request_decoder_allows_a_body_on_get() -> None:
    events = decode(with_host(b"Content-Length: 4", method=b"GET", body=b"data"))
    assert events[1:] == [Data(b"data"), EndOfMessage([])]
    assert events[0].content_length == 4  # type: ignore[attr-defined]


def test_request_decoder_reports_content_length_zero_without_data() -> None:
    events = decode(with_host(b"Content-Length: 0"))
    assert events[0].content_length == 0  # type: ignore[attr-defined]
    assert events[1:] == [EndOfMessage([])]


def test_request_decoder_accepts_the_largest_content_length() -> None:
    head = head_of(with_host(b"Content-Length: 9223372036854775807"))
    assert head.content_length == 2**63 - 1


def test_request_decoder_decodes_chunked_body_and_trailers() -> None:
    body = b"5\r\nhello\r\n6;name=value\r\n world\r\n0\r\nX-Checksum: abc\r\nX-Other: 1 \r\n\r\n"
    events = decode(with_host(b"Transfer-Encoding: chunked", body=body) + GET)
    head = events[0]
    assert isinstance(head, RequestHead) and head.chunked and head.content_length is None
    assert merged(events)[1:4] == [
        Data(b"hello world"),
        EndOfMessage([(b"x-checksum", b"abc"), (b"x-other", b"1")]),
        *decode(GET)[:1],
    ]
    for step in (1, 2, 5):
        assert merged(
            decode(with_host(b"Transfer-Encoding: chunked", body=body) + GET, step=step)
        ) == merged(events)


def test_request_decoder_accepts_chunked_in_any_case() -> None:
    assert head_of(with_host(b"Transfer-Encoding: Chunked", body=b"0\r\n\r\n")).chunked


def test_request_decoder_decodes_empty_chunked_body() -> None:
    events = decode(with_host(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"))
    assert events[1:] == [EndOfMessage([])]


def test_request_decoder_keep_alive_follows_version_and_connection() -> None:
    assert head_of(request(b"Host: h")).keep_alive
    assert not head_of(request(b"Host: h", b"Connection: close")).keep_alive
    assert not head_of(request(b"Host: h", b"Connection: keep-alive, Close")).keep_alive
    assert not head_of(request(version=b"HTTP/1.0")).keep_alive
    assert head_of(request(b"Connection: Keep-Alive", version=b"HTTP/1.0")).keep_alive


def test_request_decoder_ignores_bytes_after_connection_close() -> None:
    decoder = RequestDecoder()
    events = decoder.feed(request(b"Host: h", b"Connection: close") + b"GET / HTTP/1.1\r\n")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert decoder.feed(b"anything at all\r\n\r\n") == []


def test_request_decoder_http10_needs_no_host() -> None:
    head = head_of(request(version=b"HTTP/1.0"))
    assert head.host == b"" and head.version == b"1.0"


def test_request_decoder_accepts_valid_hosts() -> None:
    for host in (b"example.com", b"example.com:8080", b"[::1]:443", b"10.0.0.1", b""):
        assert head_of(request(b"Host: " + host)).host == host


def test_request_decoder_absolute_form_takes_host_from_the_target() -> None:
    head = head_of(b"GET http://api.example.com:8080/a/b?c=d HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (head.host, head.path, head.query) == (b"api.example.com:8080", b"/a/b", b"c=d")
    assert head.target == b"http://api.example.com:8080/a/b?c=d"
    head = head_of(b"GET HTTPS://h HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (head.host, head.path, head.query) == (b"h", b"/", b"")


def test_request_decoder_accepts_asterisk_for_options() -> None:
    head = head_of(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (head.path, head.query) == (b"*", b"")


def test_request_decoder_accepts_extension_methods_llhttp_knows() -> None:
    assert head_of(b"PURGE /x HTTP/1.1\r\nHost: h\r\n\r\n").method == b"PURGE"


def test_request_decoder_reports_expect_continue() -> None:
    head = head_of(with_host(b"Expect: 100-Continue", b"Content-Length: 1", body=b"x"))
    assert head.expect_continue
    # RFC 9110 10.1.1: ignored in HTTP/1.0.
    assert not head_of(request(b"Expect: 100-continue", version=b"HTTP/1.0")).expect_continue


def test_request_decoder_switches_on_upgrade() -> None:
    data = request(b"Host: h", b"Connection: keep-alive, Upgrade", b"Upgrade: WebSocket")
    events = decode(data + b"\x81\x05hello")
    assert [type(e) for e in events] == [RequestHead, Upgraded]
    assert events[0].upgrade == b"websocket"  # type: ignore[attr-defined]
    assert events[1] == Upgraded(b"\x81\x05hello")
    # The tail is what arrived with the piece that completed the head.
    split = decode(data + b"\x81\x05hello", step=len(data) + 2)
    assert split == [events[0], Upgraded(b"\x81\x05")]


def test_request_decoder_refuses_to_feed_after_upgrade() -> None:
    decoder = RequestDecoder()
    decoder.feed(request(b"Host: h", b"Connection: upgrade", b"Upgrade: websocket"))
    with pytest.raises(RuntimeError):
        decoder.feed(b"more")


def test_request_decoder_needs_connection_upgrade_to_switch() -> None:
    events = decode(request(b"Host: h", b"Upgrade: websocket") + GET)
    assert events[0].upgrade is None  # type: ignore[attr-defined]
    assert len(events) == 4


def test_request_decoder_treats_upgrade_with_body_as_plain_request() -> None:
    for framing, body in (
        (b"Content-Length: 3", b"abc"),
        (b"Transfer-Encoding: chunked", b"3\r\nabc\r\n0\r\n\r\n"),
    ):
        data = with_host(b"Connection: Upgrade", b"Upgrade: h2c", framing, body=body) + GET
        events = merged(decode(data))
        assert merged(decode(data, step=1)) == events
        assert events[0].upgrade is None  # type: ignore[attr-defined]
        assert events[1:3] == [Data(b"abc"), EndOfMessage([])]
        assert events[3:] == decode(GET)


def test_request_decoder_switches_only_to_listed_upgrades() -> None:
    data = request(b"Host: h", b"Connection: upgrade", b"Upgrade: h2c") + GET
    events = decode(data, upgrades=[b"websocket"])
    assert events[0].upgrade is None  # type: ignore[attr-defined]
    assert events[2:] == decode(GET)
    assert isinstance(decode(data, upgrades=[b"h2c"])[-1], Upgraded)


def test_request_decoder_stays_dead_after_an_error() -> None:
    decoder = RequestDecoder()
    with pytest.raises(ParseError) as first:
        decoder.feed(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ParseError) as again:
        decoder.feed(GET)
    assert again.value is first.value


# ------------------------------------------------------------- request: body framing


@pytest.mark.parametrize(
    "lines",
    [
        (b"Content-Length: 3", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: chunked", b"Content-Length: 3"),
    ],
    ids=["cl-then-te", "te-then-cl"],
)
def test_request_decoder_rejects_content_length_with_transfer_encoding(
    lines: tuple[bytes, ...],
) -> None:
    error = refusal(with_host(*lines, body=b"0\r\n\r\n"))
    assert (error.status, error.reason) == (400, "content-length with transfer-encoding")


@pytest.mark.parametrize(
    "lines",
    [
        (b"Content-Length: 5", b"Content-Length: 5"),
        (b"Content-Length: 5", b"Content-Length: 6"),
        (b"Content-Length: 5, 5",),
        (b"Content-Length: +5",),
        (b"Content-Length: -5",),
        (b"Content-Length: 5 5",),
        (b"Content-Length: 0x5",),
        (b"Content-Length: 5.0",),
        (b"Content-Length:",),
        (b"Content-Length: 9223372036854775808",),
        (b"Content-Length: 18446744073709551615",),
        (b"Content-Length: 99999999999999999999999",),
    ],
    ids=[
        "twice-same",
        "twice-different",
        "list",
        "plus-sign",
        "minus-sign",
        "inner-space",
        "hex",
        "decimal-point",
        "empty",
        "2-pow-63",
        "2-pow-64-minus-1",
        "overflow",
    ],
)
def test_request_decoder_rejects_bad_content_length(lines: tuple[bytes, ...]) -> None:
    assert status(with_host(*lines, body=b"hello")) == 400


@pytest.mark.parametrize(
    "value",
    [b"gzip", b"gzip, chunked", b"deflate,chunked", b"identity", b"compress"],
)
def test_request_decoder_rejects_unknown_transfer_coding_with_501(value: bytes) -> None:
    assert status(with_host(b"Transfer-Encoding: " + value, body=b"0\r\n\r\n")) == 501


@pytest.mark.parametrize(
    "lines",
    [
        (b"Transfer-Encoding: chunked ,",),
        (b"Transfer-Encoding: ,chunked",),
        (b"Transfer-Encoding: xchunked",),
        (b"Transfer-Encoding: chunkedx",),
        (b"Transfer-Encoding: chunked;q=1",),
        (b"Transfer-Encoding: chunked, chunked",),
        (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: chunked, gzip",),
        (b"Transfer-Encoding:\r\n chunked",),
        (b'Transfer-Encoding: "chunked"',),
        (b"Transfer-Encoding:",),
    ],
    ids=[
        "trailing-comma",
        "leading-comma",
        "prefixed",
        "suffixed",
        "parameter",
        "listed-twice",
        "two-fields",
        "not-last",
        "obs-fold",
        "quoted",
        "empty",
    ],
)
def test_request_decoder_rejects_disguised_chunked_with_400(lines: tuple[bytes, ...]) -> None:
    assert status(with_host(*lines, body=b"0\r\n\r\n")) == 400


def test_request_decoder_rejects_transfer_encoding_in_http10() -> None:
    data = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert status(data) == 400


@pytest.mark.parametrize(
    "body",
    [
        b"z\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"10000000000000000\r\nhello\r\n0\r\n\r\n",
        b"8000000000000000\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\n0\r\n\r\n",
        b"5\r\nhelloXY0\r\n\r\n",
        b"5\rhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\n\r\n",
        b"5\r\nhello\r\n0\r\n\n",
        b"5\r\nhello\r\n0\r\nX: y\n\r\n",
        b"5\r\nhello\r\n0\r\nX: y\r\n z\r\n\r\n",
        b"5\r\nhello\r\n0\r\nbad name: y\r\n\r\n",
        b"5;\r\nhello\r\n0\r\n\r\n",
        b'5;a="x\r\ny"\r\nhello\r\n0\r\n\r\n',
    ],
    ids=[
        "non-hex",
        "negative",
        "plus",
        "hex-prefix",
        "empty-size",
        "space-after",
        "space-before",
        "overflow-2-pow-64",
        "over-2-pow-63",
        "bare-lf-after-size",
        "bare-lf-after-data",
        "no-crlf-after-data",
        "bare-cr-after-size",
        "bare-lf-after-last-chunk",
        "bare-lf-ending-trailers",
        "bare-lf-in-trailer",
        "obs-fold-in-trailer",
        "bad-trailer-name",
        "empty-extension",
        "crlf-in-extension",
    ],
)
def test_request_decoder_rejects_bad_chunked_framing(body: bytes) -> None:
    assert status(with_host(b"Transfer-Encoding: chunked", body=body)) == 400


def test_request_decoder_accepts_chunk_extensions_and_leading_zeros() -> None:
    body = b'005;a=b;c="d e"\r\nhello\r\n0000\r\n\r\n'
    events = decode(with_host(b"Transfer-Encoding: chunked", body=body))
    assert merged(events[1:]) == [Data(b"hello"), EndOfMessage([])]


def test_request_decoder_limits_chunk_lines() -> None:
    body = b"5;" + b"a" * 5000 + b"\r\nhello\r\n0\r\n\r\n"
    assert status(with_host(b"Transfer-Encoding: chunked", body=body)) == 400


def test_request_decoder_limits_trailers() -> None:
    trailers = b"".join(b"X-%d: v\r\n" % i for i in range(5))
    body = b"0\r\n" + trailers + b"\r\n"
    data = with_host(b"Transfer-Encoding: chunked", body=body)
    assert status(data, limits=Limits(max_headers=4)) == 431
    assert status(data, limits=Limits(max_header_bytes=40)) == 431
    assert len(decode(data, limits=Limits(max_headers=5))[-1].trailers) == 5  # type: ignore[attr-defined]


# ---------------------------------------------------------------- request: head syntax


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\nHost: h\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\r\n\n",
        b"GET / HTTP/1.1\nHost: h\n\n",
        b"GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n",
    ],
    ids=["request-line", "field-line", "end-of-head", "everywhere", "bare-cr"],
)
def test_request_decoder_rejects_bare_line_endings(data: bytes) -> None:
    assert status(data) == 400


@pytest.mark.parametrize(
    "value",
    [b"a\x00b", b"a\rb", b"a\x01b", b"a\x7fb", b"a\x1bb"],
    ids=["nul", "cr", "soh", "del", "esc"],
)
def test_request_decoder_rejects_control_characters_in_values(value: bytes) -> None:
    assert status(request(b"Host: h", b"X: " + value)) == 400


def test_request_decoder_accepts_obs_text_and_tab_in_values() -> None:
    head = head_of(request(b"Host: h", b"X: caf\xc3\xa9\tok"))
    assert head.headers[1] == (b"x", b"caf\xc3\xa9\tok")


@pytest.mark.parametrize(
    "lines",
    [
        (b"Host: h", b"X: a", b" folded"),
        (b"Host: h", b"X: a", b"\tfolded"),
        (b" Host: h",),
        (b"\tHost: h",),
    ],
    ids=["space", "tab", "space-on-first-line", "tab-on-first-line"],
)
def test_request_decoder_rejects_obs_fold(lines: tuple[bytes, ...]) -> None:
    assert status(request(*lines)) == 400


@pytest.mark.parametrize(
    "line",
    [b"Host : h", b"Host\t: h", b": h", b"A(b: h", b"X\x80: h", b"X y: h", b'X"y: h', b"Xy"],
    ids=[
        "space-before-colon",
        "tab-before-colon",
        "empty-name",
        "paren",
        "non-ascii",
        "space",
        "quote",
        "no-colon",
    ],
)
def test_request_decoder_rejects_bad_field_names(line: bytes) -> None:
    # A malformed Host line stands in for Host; any other goes after a good Host.
    lines = (line,) if line.startswith(b"Host") else (b"Host: h", line)
    assert status(request(*lines)) == 400


def test_request_decoder_rejects_missing_host_in_http11() -> None:
    error = refusal(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n")
    assert (error.status, error.reason) == (400, "missing host")


def test_request_decoder_rejects_several_hosts() -> None:
    assert status(request(b"Host: a", b"Host: a")) == 400
    assert status(request(b"Host: a", b"Host: b")) == 400
    assert status(request(b"Host: a", b"Host: b", version=b"HTTP/1.0")) == 400


@pytest.mark.parametrize(
    "host",
    [b"a b", b"a/b", b"a@b", b"a\\b", b"a?b", b"a#b", b"a:b:c", b"[::1", b"a:80x", b'a"b', b"a<b"],
)
def test_request_decoder_rejects_invalid_host(host: bytes) -> None:
    assert status(request(b"Host: " + host)) == 400


@pytest.mark.parametrize(
    "line",
    [b"GET / HTTP/2.0", b"GET / HTTP/1.2", b"GET / HTTP/0.9", b"GET / HTTP/3.0"],
)
def test_request_decoder_rejects_unknown_versions_with_505(line: bytes) -> None:
    assert status(line + b"\r\nHost: h\r\n\r\n") == 505


@pytest.mark.parametrize(
    "line",
    [
        b"GET / RTSP/1.0",
        b"GET / http/1.1",
        b"GET / HTTP/1.1 ",
        b"GET /  HTTP/1.1",
        b"GET  / HTTP/1.1",
        b" GET / HTTP/1.1",
        b"GET\t/ HTTP/1.1",
        b"GET /",
        b"GET / HTTP/11",
        b"GET /a b HTTP/1.1",
    ],
    ids=[
        "rtsp",
        "lowercase-http",
        "trailing-space",
        "two-spaces-after-target",
        "two-spaces-after-method",
        "leading-space",
        "tab",
        "http-0.9-style",
        "version-digits",
        "space-in-target",
    ],
)
def test_request_decoder_rejects_malformed_request_lines(line: bytes) -> None:
    assert status(line + b"\r\nHost: h\r\n\r\n") == 400


@pytest.mark.parametrize("method", [b"G@T", b"GE(T", b'G"T', b"\x00GET"])
def test_request_decoder_rejects_invalid_method_tokens_with_400(method: bytes) -> None:
    assert status(method + b" / HTTP/1.1\r\nHost: h\r\n\r\n") == 400


@pytest.mark.parametrize("method", [b"FOO", b"get", b"BREW"])
def test_request_decoder_rejects_unknown_methods_with_501(method: bytes) -> None:
    assert status(method + b" / HTTP/1.1\r\nHost: h\r\n\r\n") == 501


@pytest.mark.parametrize(
    "target",
    [
        b"a/b",
        b"ftp://h/a",
        b"http://user@h/a",
        b"http://user:pw@h/a",
        b"http:///a",
        b"http://h a/",
        b"/a#frag",
        b"/a?b#frag",
        b"/a\\b",
        b"/a\x7fb",
        b"/a\xffb",
        b"/a?\xff",
        b"*",
        b"h:443",
    ],
    ids=[
        "relative",
        "ftp",
        "userinfo",
        "userinfo-password",
        "empty-authority",
        "space-in-authority",
        "fragment",
        "fragment-after-query",
        "backslash",
        "del",
        "non-ascii-path",
        "non-ascii-query",
        "asterisk-with-get",
        "authority-form",
    ],
)
def test_request_decoder_rejects_bad_request_targets(target: bytes) -> None:
    assert status(b"GET " + target + b" HTTP/1.1\r\nHost: h\r\n\r\n") == 400


def test_request_decoder_rejects_connect_with_405() -> None:
    assert status(b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n") == 405


@pytest.mark.parametrize("value", [b"100-continue-x", b"200-ok", b"", b"100-continue, foo"])
def test_request_decoder_rejects_unknown_expectations_with_417(value: bytes) -> None:
    assert status(with_host(b"Expect: " + value, b"Content-Length: 0")) == 417


# ------------------------------------------------------------------ request: limits


def test_request_decoder_rejects_long_request_line_with_414() -> None:
    limits = Limits(max_request_line=100)
    line = b"GET /" + b"a" * 100 + b" HTTP/1.1"
    assert status(line + b"\r\nHost: h\r\n\r\n", limits=limits) == 414
    # Exactly at the limit is fine.
    ok = b"GET /" + b"a" * (100 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(ok) == 100
    assert head_of(ok + b"\r\nHost: h\r\n\r\n", limits=limits).path.startswith(b"/aaa")


def test_request_decoder_rejects_a_request_line_that_never_ends_with_414() -> None:
    limits = Limits(max_request_line=100)
    decoder = RequestDecoder(limits)
    decoder.feed(b"GET /" + b"a" * 90)
    with pytest.raises(ParseError) as error:
        decoder.feed(b"a" * 20)
    assert error.value.status == 414


def test_request_decoder_rejects_large_head_with_431() -> None:
    limits = Limits(max_header_bytes=200)
    fields = [b"X-%d: %s" % (i, b"v" * 20) for i in range(10)]
    assert status(request(b"Host: h", *fields), limits=limits) == 431
    small = request(b"Host: h", *fields[:3])
    assert len(small) <= 200
    head_of(small, limits=limits)


def test_request_decoder_accepts_a_head_of_exactly_the_limit() -> None:
    data = request(b"Host: h", b"X: " + b"v" * 50)
    head_of(data, limits=Limits(max_header_bytes=len(data)))
    assert status(data, limits=Limits(max_header_bytes=len(data) - 1)) == 431


def test_request_decoder_rejects_too_many_fields_with_431() -> None:
    fields = [b"X-%d: v" % i for i in range(10)]
    assert status(request(b"Host: h", *fields), limits=Limits(max_headers=10)) == 431
    head_of(request(b"Host: h", *fields[:9]), limits=Limits(max_headers=10))


@pytest.mark.parametrize("step", [1, 7, 1024, 65536])
@pytest.mark.parametrize(
    "prefix",
    [b"GET /", b"GET / HTTP/1.1\r\nHost: h\r\nX: ", b"GET / HTTP/1.1\r\nHost: h\r\n"],
    ids=["request-line", "one-value", "many-fields"],
)
def test_request_decoder_fails_fast_on_endless_heads(prefix: bytes, step: int) -> None:
    limits = Limits()
    filler = b"X: y\r\n" if prefix.endswith(b"\r\n") else b"a"
    piece = (filler * (step // len(filler) + 1))[:step]
    decoder = RequestDecoder()
    fed = 0
    started = time.perf_counter()
    with pytest.raises(ParseError) as error:
        decoder.feed(prefix)
        fed = len(prefix)
        while fed < 10_000_000:
            decoder.feed(piece)
            fed += len(piece)
    elapsed = time.perf_counter() - started
    assert error.value.status in (414, 431)
    # It stopped at the limit (within one piece), not at the end of the 10 MB.
    assert fed <= limits.max_header_bytes + step
    assert elapsed < 5


def test_request_decoder_fails_fast_on_one_huge_piece() -> None:
    started = time.perf_counter()
    assert status(b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 10_000_000) == 431
    assert status(b"GET /" + b"a" * 10_000_000) == 414
    assert time.perf_counter() - started < 5


# ------------------------------------------------------------------------- responses


def test_response_decoder_decodes_a_content_length_response() -> None:
    events = respond(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello")
    assert events == [
        ResponseHead(
            200, b"OK", b"1.1", [(b"content-length", b"5"), (b"server", b"x")], True, False, 5
        ),
        Data(b"hello"),
        EndOfMessage([]),
    ]


def test_response_decoder_decodes_chunked_with_trailers() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGrpc-Status: 0\r\n\r\n"
    for step in (0, 1, 4):
        events = merged(respond(data, step=step))
        assert events[1:] == [Data(b"abc"), EndOfMessage([(b"grpc-status", b"0")])]
        assert events[0].chunked  # type: ignore[attr-defined]


def test_response_decoder_reads_a_body_until_close() -> None:
    data = b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nsome body"
    for step in (0, 1, 3):
        events = merged(respond(data, step=step, eof=True))
        head = events[0]
        assert isinstance(head, ResponseHead)
        assert not head.keep_alive and head.content_length is None and not head.chunked
        assert events[1:] == [Data(b"some body"), EndOfMessage([])]


def test_response_decoder_gives_no_body_to_head_responses() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    data += b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"
    for step in (0, 1):
        events = merged(respond(data, b"HEAD", b"HEAD", b"GET", step=step))
        kinds = [type(e) for e in events]
        assert kinds == [ResponseHead, EndOfMessage] * 2 + [ResponseHead, Data, EndOfMessage]
        assert events[0].content_length is None  # type: ignore[attr-defined]
        assert events[-2] == Data(b"hi")


@pytest.mark.parametrize("code", [204, 304])
def test_response_decoder_gives_no_body_to_204_and_304(code: int) -> None:
    data = b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % code
    data += b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    events = respond(data, b"GET", b"GET")
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage] * 2


def test_response_decoder_reports_informational_responses() -> None:
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 150 Odd\r\nContent-Length: 3\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    for step in (0, 1):
        events = merged(respond(data, step=step))
        assert events[:3] == [
            Informational(100, []),
            Informational(103, [(b"link", b"</a.css>; rel=preload")]),
            Informational(150, [(b"content-length", b"3")]),
        ]
        assert [type(e) for e in events[3:]] == [ResponseHead, Data, EndOfMessage]


def test_response_decoder_switches_on_101() -> None:
    data = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    events = respond(data + b"frames")
    assert [type(e) for e in events] == [ResponseHead, Upgraded]
    assert events[0].status == 101 and events[1] == Upgraded(b"frames")  # type: ignore[attr-defined]
    # llhttp reports a bare 101 differently; the decoder does not care.
    assert respond(b"HTTP/1.1 101 Switching Protocols\r\n\r\nx")[-1] == Upgraded(b"x")


def test_response_decoder_decodes_pipelined_responses() -> None:
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"
    events = respond(one * 3, b"GET", b"GET", b"GET")
    assert [e.data for e in events if isinstance(e, Data)] == [b"a"] * 3


def test_response_decoder_keep_alive_follows_version_and_connection() -> None:
    def head(data: bytes) -> ResponseHead:
        first = respond(data)[0]
        assert isinstance(first, ResponseHead)
        return first

    assert head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert not head(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert not head(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive
    assert head(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    ).keep_alive


def test_response_decoder_accepts_status_line_without_reason() -> None:
    for line in (b"HTTP/1.1 200", b"HTTP/1.1 200 "):
        head = respond(line + b"\r\nContent-Length: 0\r\n\r\n")[0]
        assert isinstance(head, ResponseHead) and head.reason == b""


def test_response_decoder_rejects_content_length_with_transfer_encoding() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert response_status(data) == 502


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 099 OK\r\n\r\n",
        b"HTTP/1.1 600 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x01K\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: y\r\n z\r\n\r\n",
        b"ICE/1.0 200 OK\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
    ids=[
        "gzip",
        "chunked-twice",
        "te-in-http10",
        "two-content-length",
        "negative-length",
        "bad-chunk",
        "http2",
        "status-099",
        "status-600",
        "status-4-digits",
        "two-spaces",
        "control-in-reason",
        "bare-lf",
        "space-before-colon",
        "obs-fold",
        "ice",
        "garbage",
    ],
)
def test_response_decoder_rejects_invalid_responses_with_502(data: bytes) -> None:
    assert response_status(data) == 502


def test_response_decoder_rejects_a_response_nobody_asked_for() -> None:
    with pytest.raises(ParseError) as error:
        ResponseDecoder().feed(b"HTTP/1.1 200 OK\r\n\r\n")
    assert (error.value.status, error.value.reason) == (502, "response without request")


def test_response_decoder_limits_the_head() -> None:
    decoder = ResponseDecoder(Limits(max_header_bytes=100))
    decoder.expect(b"GET")
    with pytest.raises(ParseError) as error:
        decoder.feed(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 30)
    assert error.value.status == 502


def test_response_decoder_feed_eof_between_responses_is_quiet() -> None:
    decoder = ResponseDecoder()
    assert decoder.feed_eof() == []
    decoder = ResponseDecoder()
    decoder.expect(b"GET")
    decoder.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert decoder.feed_eof() == []


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: y\r\n",
    ],
    ids=["in-head", "in-length-body", "in-chunk", "in-trailers"],
)
def test_response_decoder_feed_eof_mid_message_raises(data: bytes) -> None:
    decoder = ResponseDecoder()
    decoder.expect(b"GET")
    decoder.feed(data)
    with pytest.raises(ParseError) as error:
        decoder.feed_eof()
    assert (error.value.status, error.value.reason) == (502, "upstream closed mid-message")


def test_response_decoder_ignores_bytes_after_connection_close() -> None:
    decoder = ResponseDecoder()
    decoder.expect(b"GET")
    data = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx"
    assert [type(e) for e in decoder.feed(data + b"junk")] == [ResponseHead, Data, EndOfMessage]
    assert decoder.feed(b"more junk") == []


# -------------------------------------------------------------------------- encoders


def test_encode_request_head_writes_request_line_and_fields() -> None:
    out = encode_request_head(b"GET", b"/a?b", [(b"host", b"h"), (b"x", b"1")])
    assert out == b"GET /a?b HTTP/1.1\r\nhost: h\r\nx: 1\r\n\r\n"
    assert encode_request_head(b"GET", b"/", []) == b"GET / HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        (b"GET", b"/", [(b"x", b"a\r\nInjected: 1")]),
        (b"GET", b"/", [(b"x\r\n", b"a")]),
        (b"GET", b"/\r\nX: y", []),
        (b"GET", b"/ HTTP/1.0", []),
        (b"GET /", b"/", []),
        (b"GET", b"/", [(b"x", b"a\nb")]),
    ],
)
def test_encode_request_head_refuses_injection(
    method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    with pytest.raises(ValueError):
        encode_request_head(method, target, headers)


def test_encode_response_head_fills_in_the_standard_reason() -> None:
    assert encode_response_head(404, b"", []) == b"HTTP/1.1 404 Not Found\r\n\r\n"
    assert (
        encode_response_head(200, b"Fine", [(b"a", b"b")]) == b"HTTP/1.1 200 Fine\r\na: b\r\n\r\n"
    )
    assert encode_response_head(299, b"", []) == b"HTTP/1.1 299 \r\n\r\n"


def test_encode_response_head_refuses_injection() -> None:
    with pytest.raises(ValueError):
        encode_response_head(200, b"OK\r\nX: y", [])
    with pytest.raises(ValueError):
        encode_response_head(200, b"OK", [(b"a", b"b\rc")])
    with pytest.raises(ValueError):
        encode_response_head(20, b"OK", [])


def test_encode_chunk_frames_data() -> None:
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"
    with pytest.raises(ValueError):
        encode_chunk(b"")


def test_encode_last_chunk_writes_trailers() -> None:
    assert encode_last_chunk([]) == b"0\r\n\r\n"
    assert encode_last_chunk([(b"grpc-status", b"0")]) == b"0\r\ngrpc-status: 0\r\n\r\n"
    with pytest.raises(ValueError):
        encode_last_chunk([(b"a", b"b\r\nc: d")])


def test_strip_hop_by_hop_removes_fixed_and_connection_named_fields() -> None:
    headers = [
        (b"host", b"h"),
        (b"Connection", b"keep-alive, X-Private , close"),
        (b"connection", b"x-other"),
        (b"keep-alive", b"timeout=5"),
        (b"x-private", b"secret"),
        (b"X-Other", b"1"),
        (b"TE", b"trailers"),
        (b"transfer-encoding", b"chunked"),
        (b"upgrade", b"websocket"),
        (b"proxy-authorization", b"basic x"),
        (b"accept", b"*/*"),
    ]
    assert strip_hop_by_hop(headers) == [(b"host", b"h"), (b"accept", b"*/*")]
    assert strip_hop_by_hop([]) == []


def test_hop_by_hop_lists_the_rfc_fields() -> None:
    expected = {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
    assert expected == HOP_BY_HOP


def test_parse_error_carries_status_and_reason() -> None:
    error = ParseError("too many header fields", 431)
    assert (error.status, error.reason) == (431, "too many header fields")
    assert ParseError("bad").status == 400
    assert str(error) == "431 too many header fields"


@pytest.mark.parametrize(
    "data",
    [
        # CL.TE and TE.CL desync attempts with the field names or values obfuscated.
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding : chunked\r\n"
        b"\r\n0\r\n\r\nG",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding:\x0bchunked\r\n"
        b"\r\n0\r\n\r\nG",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\x00\r\n"
        b"\r\n0\r\n\r\nG",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nX: x\nTransfer-Encoding: chunked\r\n"
        b"\r\n0\r\n\r\nG",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nContent-Length : 0\r\n\r\nGGGGGG",
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-encoding: x\r\n"
        b"\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\nContent-Length:\r\n 0\r\n\r\nGGGGGG",
        b"GET /a\x00b HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a\rb HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\nGET / HTTP/1.1\r\nHost h\r\n\r\n",
    ],
    ids=[
        "te-space-before-colon",
        "te-vertical-tab",
        "te-nul",
        "bare-lf-hides-te",
        "cl-space-before-colon",
        "te-twice-different",
        "cl-obs-fold",
        "nul-in-target",
        "cr-in-target",
        "bad-pipelined-request",
    ],
)
def test_request_decoder_rejects_desync_attempts(data: bytes) -> None:
    assert status(data) == 400
