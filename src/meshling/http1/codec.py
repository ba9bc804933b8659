"""Sans-I/O HTTP/1.1 codec: strict request and response decoders built on llhttp, and encoders.

A decoder takes bytes (``feed``) and returns events; an encoder returns bytes. Nothing
here touches a socket, a clock or a loop, so the asyncio protocols stay thin and every
rule below is tested without I/O.

Division of labour. llhttp (through httptools) parses header fields, chunked framing and
trailers in C, with its strict defaults: CRLF only, no obs-fold, token field names,
no CTLs in values, Content-Length digits only and at most once, no Content-Length with
Transfer-Encoding, chunk sizes hex with overflow checks. The decoder adds what llhttp
leaves open or reports too vaguely:

* It finds message boundaries itself (the end of the head by ``\\r\\n\\r\\n``, body length
  from Content-Length, chunk sizes by reading the chunk lines) and feeds llhttp exactly
  one message at a time. llhttp must report "message complete" at the same byte; if it
  does not, the message is rejected, so the two parsers can never disagree about where
  a message ends (the request-smuggling failure).
* It parses the start line (method token, one SP each side of the target, version
  ``HTTP/1.0`` or ``HTTP/1.1`` only, request-target form) and decides framing, Host,
  Expect, Connection and Upgrade rules.
* It enforces size limits before bytes reach llhttp, so a head that never ends costs
  bounded memory and linear time however it is split.

Where the two views differ on purpose (an upgrade request that carries a body, a
response to HEAD, a 1xx with a Content-Length) the decoder restarts llhttp in the state
it decided on rather than following llhttp.

Events, per message: a head, Data for each piece of body, then EndOfMessage (with the
trailers of a chunked body). A response may be preceded by Informational events (1xx).
A switch of protocol is a head then Upgraded (no EndOfMessage: what follows is not
HTTP/1.1), carrying the bytes that came after the head; the decoder is then done, and
feeding it more is a programming error.
After a message that closes the connection (``keep_alive`` false), further bytes are
ignored, as RFC 9112 9.6 asks.

Errors raise ParseError with the status to answer (requests) or 502 (responses); a
decoder that raised is dead and raises the same error again.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from typing import Any, Final, TypeAlias

import httptools

__all__ = [
    "HOP_BY_HOP",
    "Data",
    "EndOfMessage",
    "Headers",
    "Informational",
    "Limits",
    "ParseError",
    "RequestDecoder",
    "RequestEvent",
    "RequestHead",
    "ResponseDecoder",
    "ResponseEvent",
    "ResponseHead",
    "Upgraded",
    "encode_chunk",
    "encode_last_chunk",
    "encode_request_head",
    "encode_response_head",
    "strip_hop_by_hop",
]

Headers: TypeAlias = list[tuple[bytes, bytes]]


# ---------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A request line and its header fields.

    ``path``/``query`` split ``target``; ``path`` is not normalised (see http1.path).
    ``content_length`` is the Content-Length that frames the body, None when the body is
    chunked or there is none. ``upgrade`` is set only when the decoder switched to
    passthrough (an Upgraded event follows).
    """

    method: bytes
    target: bytes
    path: bytes
    query: bytes
    version: bytes
    headers: Headers
    host: bytes
    keep_alive: bool
    chunked: bool
    content_length: int | None
    expect_continue: bool
    upgrade: bytes | None


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A final (non-1xx, or 101) status line and its header fields."""

    status: int
    reason: bytes
    version: bytes
    headers: Headers
    keep_alive: bool
    chunked: bool
    content_length: int | None


@dataclass(frozen=True, slots=True)
class Informational:
    """A 1xx response other than 101 (100 Continue, 103 Early Hints...)."""

    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class Data:
    """A piece of a message body, with any chunked framing removed."""

    data: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """The end of a message; ``trailers`` holds chunked trailer fields, if any."""

    trailers: Headers = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Upgraded:
    """The connection left HTTP/1.1; ``tail`` is what arrived after the head."""

    tail: bytes


RequestEvent: TypeAlias = RequestHead | Data | EndOfMessage | Upgraded
ResponseEvent: TypeAlias = ResponseHead | Informational | Data | EndOfMessage | Upgraded

# A frozen dataclass's __init__ sets each field through object.__setattr__; for the 12
# fields of a RequestHead that costs more than llhttp takes to parse the whole head. The
# decoder builds the events it emits per message through the slot descriptors instead:
# the same objects (equal, hashable alike, still frozen to everyone else) at under half
# the cost.
_new = object.__new__


def _slot_setters(cls: type) -> list[Callable[[object, Any], None]]:
    return [getattr(cls, f.name).__set__ for f in fields(cls)]


(
    _rh_method,
    _rh_target,
    _rh_path,
    _rh_query,
    _rh_version,
    _rh_headers,
    _rh_host,
    _rh_keep_alive,
    _rh_chunked,
    _rh_content_length,
    _rh_expect_continue,
    _rh_upgrade,
) = _slot_setters(RequestHead)
(
    _rs_status,
    _rs_reason,
    _rs_version,
    _rs_headers,
    _rs_keep_alive,
    _rs_chunked,
    _rs_content_length,
) = _slot_setters(ResponseHead)
(_data_data,) = _slot_setters(Data)
(_eom_trailers,) = _slot_setters(EndOfMessage)


def _data(data: bytes) -> Data:
    event = _new(Data)
    _data_data(event, data)
    return event


def _end_of_message(trailers: Headers) -> EndOfMessage:
    event = _new(EndOfMessage)
    _eom_trailers(event, trailers)
    return event


class ParseError(Exception):
    """A message that must be refused.

    ``status`` is the response to send for a request (400; 405 for CONNECT; 414, 431 for
    limits; 417 for Expect; 501 for unknown methods and codings; 505 for versions), and
    502 for anything wrong in an upstream response. ``reason`` is short, lower-case
    ASCII, and safe to put in a header.
    """

    status: int
    reason: str

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(f"{status} {reason}")
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits, checked as bytes arrive."""

    # method SP target SP version, without CRLF; longer -> 414
    max_request_line: int = 8192
    # start line, fields and the empty line; also bounds a trailer section -> 431
    max_header_bytes: int = 65536
    # field lines in a head, or in a trailer section -> 431
    max_headers: int = 100


_DEFAULT_LIMITS: Final = Limits()

# --------------------------------------------------------------------------- grammar

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Request-target characters: printable ASCII (llhttp refuses CTLs, SP and non-ASCII), no
# '#', and no '\\' in the path (servers disagree on whether it separates segments).
# Characters RFC 3986 excludes but browsers send raw, such as '|' and '{', are let
# through: they are not separators.
_ABSOLUTE: Final = re.compile(
    rb"([Hh][Tt][Tt][Pp][Ss]?)://([^/?#@\\\x00-\x20\x7f-\xff]*)"
    rb"(/[!\"$->@-\[\]-~]*)?(?:\?([!-\"$-~]*))?"
)
# uri-host [":" port]: IP-literal or reg-name (unreserved, pct-encoded, sub-delims).
_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
_REG_NAME_HOST: Final = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=%]*(?::[0-9]*)?")  # the usual case
_REASON: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_EMPTY_LINES: Final = re.compile(rb"[\r\n]*")
_HEXDIGITS: Final = re.compile(rb"[0-9A-Fa-f]+")
_HTTP_VERSION: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")

_VERSIONS: Final = {b"HTTP/1.1": b"1.1", b"HTTP/1.0": b"1.0"}
# Methods seen all the time, so that their token check is a set lookup.
_COMMON_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE"}
)
_MAX_LENGTH: Final = 2**63 - 1
# A chunk-size line with extensions; llhttp validates the extensions, this only bounds them.
_MAX_CHUNK_LINE: Final = 4096
# Header fields that the decoder reads; everything else is passed through untouched.
_FRAMING_FIELDS: Final = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"expect", b"upgrade"}
)

# llhttp's error texts, reworded into reasons; unknown ones are sanitised generically.
_LLHTTP_REASONS: Final = {
    "Transfer-Encoding can't be present with Content-Length": "content-length with transfer-encoding",
    "Content-Length can't be present with Transfer-Encoding": "content-length with transfer-encoding",
    "Duplicate Content-Length": "multiple content-length",
    "Invalid character in Content-Length": "invalid content-length",
    "Empty Content-Length": "invalid content-length",
    "Content-Length overflow": "invalid content-length",
    "Invalid `Transfer-Encoding` header value": "invalid transfer-encoding",
    "Request has invalid `Transfer-Encoding`": "invalid transfer-encoding",
    "Missing expected CR after header value": "bare lf",
    "Missing expected LF after header value": "bare cr",
    "Expected LF after headers": "bare cr",
    "Unexpected whitespace after header value": "obs-fold",
    "Unexpected space after start line": "obs-fold",
    "Invalid header token": "invalid field name",
    "Invalid header field char": "invalid field name",
    "Invalid header value char": "invalid field value",
    "Invalid method encountered": "method not implemented",
    "Invalid HTTP version": "http version not supported",
    "Missing expected CR after chunk size": "bare lf",
    "Missing expected CR after chunk data": "bare lf",
    "Expected LF after chunk size": "bare cr",
    "Expected LF after chunk data": "invalid chunk",
    "Invalid character in chunk size": "invalid chunk size",
    "Chunk size overflow": "invalid chunk size",
}
_UNSAFE_REASON: Final = re.compile(r"[^a-z0-9 -]+")

# Body framing decided for a message.
_NONE: Final = 0
_LENGTH: Final = 1
_CHUNKED: Final = 2
_CLOSE: Final = 3  # responses only: the body runs until the connection closes
_UPGRADE: Final = 4
_INFORMATIONAL: Final = 5  # a 1xx: no body, and the final response is still to come

# Decoder states.
_HEAD: Final = 0
_BODY_LENGTH: Final = 1
_BODY_CHUNKED: Final = 2
_BODY_CLOSE: Final = 3
_CLOSED: Final = 4  # the last message said close: later bytes are ignored
_UPGRADED: Final = 5

# Where a chunked body is.
_CK_SIZE: Final = 0
_CK_DATA: Final = 1
_CK_DATA_CRLF: Final = 2
_CK_TRAILERS: Final = 3

_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
_COMMON_CONNECTION: Final = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}

# host, content-length, transfer-encoding, connection, upgrade, expect, Host count
_Fields: TypeAlias = tuple[
    bytes | None, bytes | None, bytes | None, bytes | None, bytes | None, bytes | None, int
]

# llhttp raises this (not HttpParserUpgrade) for a 101 that lacks Upgrade fields.
_PAUSED_TEXT: Final = "Pause on CONNECT/Upgrade"


# ---------------------------------------------------------------------------- shared


def _connection_tokens(connection: bytes) -> frozenset[bytes]:
    tokens = _COMMON_CONNECTION.get(connection)
    if tokens is None:
        tokens = frozenset(t.strip(b" \t").lower() for t in connection.split(b","))
    return tokens


def _persistent(version: bytes, tokens: frozenset[bytes]) -> bool:
    """RFC 9112 9.3: 1.1 persists unless closed; 1.0 only when asked for keep-alive."""
    if b"close" in tokens:
        return False
    return version == b"1.1" or b"keep-alive" in tokens


# Senders repeat the same few chunk-size lines ("4000\r\n"...): remember the sizes of
# lines already validated. Bounded, so varied lines cost a recompute, not memory.
_CHUNK_SIZES: Final[dict[bytes, int]] = {}


def _chunk_size(line: bytes) -> int:
    """The size on a chunk-size line (with its CRLF); llhttp checks the extensions."""
    if len(line) > _MAX_CHUNK_LINE:
        raise ParseError("chunk line too long")
    if line[-2:-1] != b"\r":
        raise ParseError("bare lf")
    digits = _HEXDIGITS.match(line)
    if digits is None:
        raise ParseError("invalid chunk size")
    size = int(digits.group(), 16)
    if size > _MAX_LENGTH:
        raise ParseError("invalid chunk size")
    if len(_CHUNK_SIZES) >= 256:
        _CHUNK_SIZES.clear()
    _CHUNK_SIZES[line] = size
    return size


class _Decoder:
    """What request and response decoding share: limits, framing, llhttp bookkeeping.

    Subclasses supply ``_new_parser``, ``_start_line``, ``_finish_head``,
    ``_after_pause`` and ``_disagree``.
    """

    __slots__ = (
        "_buf",
        "_chunk_line",
        "_chunk_state",
        "_error",
        "_fed",
        "_framing",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_limits",
        "_line_done",
        "_ll_complete",
        "_parser",
        "_remaining",
        "_state",
        "_tail",
        "_trailer_bytes",
        "_version",
    )

    def __init__(self, limits: Limits) -> None:
        # per connection
        self._limits = limits
        self._parser = self._new_parser()
        self._state = _HEAD
        self._error: ParseError | None = None
        # per message: the head
        self._buf = bytearray()  # a head that arrived in pieces, capped at the limit
        self._fed = 0  # how much of _buf llhttp has already seen
        self._line_done = False
        self._headers: Headers = []
        self._headers_done = False
        self._ll_complete = False
        self._version = b""
        self._framing = _NONE
        self._keep_alive = True
        # per message: the body
        self._remaining = 0
        self._chunk_state = _CK_SIZE
        self._chunk_line = b""
        self._tail = b""
        self._trailer_bytes = 0

    # -- subclass hooks ------------------------------------------------------------------

    def _new_parser(self) -> Any:
        raise NotImplementedError

    def _start_line(self, line: bytes) -> None:
        raise NotImplementedError

    def _finish_head(self) -> RequestHead | ResponseHead | Informational:
        """Check the head, decide framing and keep-alive, and return its event."""
        raise NotImplementedError

    def _after_pause(self) -> None:
        """llhttp paused for an upgrade at the end of a head that does not switch."""
        raise NotImplementedError

    def _disagree(self) -> None:
        """llhttp's idea of whether a body follows differs from the decision made."""
        raise NotImplementedError

    # -- llhttp callbacks (bound once, when the parser is built) ------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        # llhttp drops leading OWS but keeps trailing OWS.
        self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        self._headers_done = True

    def on_message_complete(self) -> None:
        self._ll_complete = True

    # -- feeding -------------------------------------------------------------------------

    def _feed(self, data: bytes | bytearray | memoryview) -> list[RequestEvent | ResponseEvent]:
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)
        events: list[RequestEvent | ResponseEvent] = []
        try:
            self._run(data, events)
        except ParseError as exc:
            # A decoder that refused a message stays dead: the same error, every time.
            self._error = refusal = self._refusal(exc)
            if refusal is exc:
                raise
            raise refusal from None
        return events

    def _refusal(self, exc: ParseError) -> ParseError:
        """The error to raise for a refused message (the status to answer with)."""
        raise NotImplementedError

    def _run(self, data: bytes, events: list[RequestEvent | ResponseEvent]) -> None:
        pos = 0
        end = len(data)
        while pos < end:
            state = self._state
            if state == _HEAD:
                pos = self._read_head(data, pos, end, events)
            elif state == _BODY_LENGTH:
                pos = self._read_length(data, pos, end, events)
            elif state == _BODY_CHUNKED:
                pos = self._read_chunked(data, pos, end, events)
            elif state == _BODY_CLOSE:
                events.append(_data(data if pos == 0 else data[pos:]))
                return
            elif state == _UPGRADED:
                raise RuntimeError("the connection was upgraded: pass its bytes through")
            else:  # _CLOSED: the peer said this was the last message
                return

    def _read_head(
        self, data: bytes, pos: int, end: int, events: list[RequestEvent | ResponseEvent]
    ) -> int:
        buf = self._buf
        max_head = self._limits.max_header_bytes
        if not buf:
            first = data[pos]
            if first == 13 or first == 10:
                # RFC 9112 2.2: ignore empty lines before a start line (clients send a
                # stray CRLF after a body). They are not part of the head.
                skipped = _EMPTY_LINES.match(data, pos)
                pos = skipped.end() if skipped else pos
                if pos == end:
                    return end
            stop = data.find(b"\r\n\r\n", pos, pos + max_head)
            if stop != -1:
                stop += 4
                self._head(data, pos, stop, events)
                if self._state == _UPGRADED:
                    events.append(Upgraded(data[stop:]))
                    return end
                return stop
            # The head continues in a later piece: keep it, at most up to the limit.
            buf += data[pos : pos + max_head]
            self._check_partial(0, end - pos > max_head)
            return end

        old = len(buf)
        room = max_head - old
        buf += data[pos : pos + room]
        stop = buf.find(b"\r\n\r\n", max(0, old - 3))
        if stop != -1:
            stop += 4
            head = bytes(buf[:stop])
            pos += stop - old
            self._head(head, 0, stop, events)
            buf.clear()
            if self._state == _UPGRADED:
                events.append(Upgraded(data[pos:]))
                return end
            return pos
        self._check_partial(old, end - pos > room)
        return end

    def _check_partial(self, old: int, overflow: bool) -> None:
        """Check a head that has not ended yet; ``old`` bytes of it were checked before."""
        buf = self._buf
        limits = self._limits
        if not self._line_done:
            nl = buf.find(b"\n", old)
            if nl == -1:
                if len(buf) > limits.max_request_line + 1:
                    raise ParseError("start line too long", 414)
                if overflow or len(buf) >= limits.max_header_bytes:
                    raise ParseError("head too large", 431)
                return
            self._parse_start_line(buf, 0, nl)
        lines_end = buf.rfind(b"\n", old) + 1
        if lines_end:
            # Field lines ended: let llhttp judge the complete lines so far, so that a
            # malformed head fails now instead of at the limit. Whole lines only: llhttp
            # then sees each value in one piece, and sees the same bytes however the
            # head was split, so the verdict does not depend on the split.
            try:
                self._parser.feed_data(bytes(buf[self._fed : lines_end]))
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._head_error(exc)
            self._fed = lines_end
            if self._headers_done:
                raise ParseError("malformed head")
        if overflow or len(buf) >= limits.max_header_bytes:
            raise ParseError("head too large", 431)

    def _parse_start_line(self, src: bytes | bytearray, start: int, nl: int) -> None:
        if nl - start > self._limits.max_request_line + 1:
            raise ParseError("start line too long", 414)
        if src[nl - 1] != 13:
            raise ParseError("bare lf")
        self._start_line(bytes(src[start : nl - 1]))
        self._line_done = True

    def _head_error(self, exc: Exception) -> bool:
        """llhttp raised on head bytes: True if it only paused for an upgrade, else raise."""
        if isinstance(exc, httptools.HttpParserUpgrade):
            return True
        if self._headers_done:
            if str(exc) == _PAUSED_TEXT:
                return True
            # llhttp's verdict came after the fields were read: our own, more specific
            # reason (and status, e.g. 501 for gzip) goes first.
            self._finish_head()
        raise self._llhttp_error(exc) from None

    def _head(
        self, src: bytes, start: int, stop: int, events: list[RequestEvent | ResponseEvent]
    ) -> None:
        """Decode the complete head ``src[start:stop]`` (the end includes CRLF CRLF)."""
        if not self._line_done:
            self._parse_start_line(src, start, src.find(b"\n", start, stop))
        if start == 0 and stop == len(src) and not self._fed:
            segment = src
        else:
            segment = src[start + self._fed : stop]
        try:
            self._parser.feed_data(segment)
            paused = False
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            paused = self._head_error(exc)
        if not self._headers_done:
            # llhttp did not see the head end where we did.
            raise ParseError("malformed head")
        events.append(self._finish_head())
        framing = self._framing
        # After an upgrade llhttp is not used any more, so its view does not matter.
        if framing != _UPGRADE:
            if paused:
                self._after_pause()
            elif self._ll_complete != (framing in (_NONE, _INFORMATIONAL)):
                self._disagree()

        if framing == _NONE:
            self._end_message(events, [])
        elif framing == _UPGRADE:
            self._state = _UPGRADED  # the caller appends Upgraded with the tail
        elif framing == _INFORMATIONAL:
            self._next_message()
        elif framing == _LENGTH:
            self._state = _BODY_LENGTH
        elif framing == _CHUNKED:
            self._state = _BODY_CHUNKED
            self._chunk_state = _CK_SIZE
            self._headers = []  # llhttp reports trailers through on_header
        else:
            self._state = _BODY_CLOSE

    def _restart_parser(self, synthetic_head: bytes = b"") -> None:
        """Replace llhttp's parser; a synthetic head puts it into a body we decided on."""
        self._parser = self._new_parser()
        if synthetic_head:
            headers = self._headers
            self._headers = []
            self._parser.feed_data(synthetic_head)
            self._headers = headers
        self._headers_done = False
        self._ll_complete = False

    def _end_message(self, events: list[RequestEvent | ResponseEvent], trailers: Headers) -> None:
        events.append(_end_of_message(trailers))
        self._next_message()
        if not self._keep_alive:
            self._state = _CLOSED

    def _next_message(self) -> None:
        self._headers = []
        self._headers_done = False
        self._ll_complete = False
        self._line_done = False
        self._fed = 0
        self._state = _HEAD

    # -- bodies --------------------------------------------------------------------------

    def _feed_body(self, segment: bytes, last: bool) -> None:
        try:
            self._parser.feed_data(segment)
        except httptools.HttpParserError as exc:
            raise self._llhttp_error(exc) from None
        if self._ll_complete != last:
            raise ParseError("ambiguous message framing")

    def _read_length(
        self, data: bytes, pos: int, end: int, events: list[RequestEvent | ResponseEvent]
    ) -> int:
        remaining = self._remaining
        take = end - pos
        if take > remaining:
            take = remaining
        chunk = data if pos == 0 and take == end else data[pos : pos + take]
        events.append(_data(chunk))
        remaining -= take
        self._remaining = remaining
        self._feed_body(chunk, remaining == 0)
        if remaining == 0:
            self._end_message(events, [])
        return pos + take

    def _read_chunked(
        self, data: bytes, pos: int, end: int, events: list[RequestEvent | ResponseEvent]
    ) -> int:
        # Chunk boundaries are found here so that the message end is known to the byte;
        # llhttp then validates the same bytes (sizes, extensions, CRLFs, trailers).
        start = pos
        done = False
        try:
            pos, done = self._chunks(data, pos, end, events)
        except ParseError:
            # llhttp names most framing errors more precisely: let it judge the same
            # bytes first, so the reason does not depend on how the input was split.
            try:
                self._parser.feed_data(data[start:end])
            except httptools.HttpParserError as exc:
                raise self._llhttp_error(exc) from None
            raise
        self._feed_body(data if start == 0 and pos == end else data[start:pos], done)
        if done:
            trailers = self._headers
            if len(trailers) > self._limits.max_headers:
                raise ParseError("too many trailer fields", 431)
            self._end_message(events, trailers)
        return pos

    def _chunks(
        self, data: bytes, pos: int, end: int, events: list[RequestEvent | ResponseEvent]
    ) -> tuple[int, bool]:
        """Walk chunk framing from ``pos``; return where it stopped and if the body ended."""
        state = self._chunk_state
        remaining = self._remaining
        try:
            while pos < end:
                if state == _CK_SIZE:
                    nl = data.find(b"\n", pos, end)
                    if nl == -1:
                        self._chunk_line += data[pos:end]
                        if len(self._chunk_line) > _MAX_CHUNK_LINE:
                            raise ParseError("chunk line too long")
                        return end, False
                    line = data[pos : nl + 1]
                    if self._chunk_line:
                        line = self._chunk_line + line
                        self._chunk_line = b""
                    pos = nl + 1
                    size = _CHUNK_SIZES.get(line)
                    if size is None:
                        size = _chunk_size(line)
                    if not size:
                        state = _CK_TRAILERS
                        self._tail = b"\r\n"  # the last-chunk line's CRLF
                        self._trailer_bytes = 0
                        continue
                    stop = pos + size
                    if stop + 2 <= end:
                        # The whole chunk is here: take it in one step.
                        events.append(_data(data[pos:stop]))
                        pos = stop + 2
                        continue
                    state = _CK_DATA
                    remaining = size
                elif state == _CK_DATA:
                    if end - pos < remaining:
                        events.append(_data(data[pos:end]))
                        remaining -= end - pos
                        return end, False
                    events.append(_data(data[pos : pos + remaining]))
                    pos += remaining
                    state = _CK_DATA_CRLF
                    remaining = 2
                elif state == _CK_DATA_CRLF:
                    take = min(remaining, end - pos)
                    pos += take
                    remaining -= take
                    if not remaining:
                        state = _CK_SIZE
                else:
                    return self._read_trailers(data, pos, end)
            return pos, False
        finally:
            self._chunk_state = state
            self._remaining = remaining

    def _read_trailers(self, data: bytes, pos: int, end: int) -> tuple[int, bool]:
        """Find the empty line that ends the trailer section (maybe right away)."""
        tail = self._tail
        probe = tail + data[pos : pos + 3]
        found = probe.find(b"\r\n\r\n")
        if found != -1:
            stop = pos + found + 4 - len(tail)
        else:
            found = data.find(b"\r\n\r\n", pos, end)
            stop = found + 4 if found != -1 else -1
        limit = self._limits.max_header_bytes
        if stop == -1:
            self._trailer_bytes += end - pos
            if self._trailer_bytes > limit:
                raise ParseError("trailer section too large", 431)
            self._tail = data[end - 3 : end] if end - pos >= 3 else probe[-3:]
            return end, False
        if self._trailer_bytes + stop - pos > limit:
            raise ParseError("trailer section too large", 431)
        return stop, True

    # -- shared head rules ---------------------------------------------------------------

    def _framing_fields(self) -> _Fields:
        """Collect the fields the decoder reads, joining repeated ones with commas."""
        host = length = coding = connection = upgrade = expect = None
        hosts = 0
        for name, value in self._headers:
            if name not in _FRAMING_FIELDS:
                continue
            if name == b"host":
                host = value
                hosts += 1
            elif name == b"connection":
                connection = value if connection is None else connection + b"," + value
            elif name == b"content-length":
                if length is not None:
                    raise ParseError("multiple content-length")
                length = value
            elif name == b"transfer-encoding":
                coding = value if coding is None else coding + b"," + value
            elif name == b"upgrade":
                upgrade = value if upgrade is None else upgrade + b"," + value
            else:
                expect = value if expect is None else expect + b"," + value
        return host, length, coding, connection, upgrade, expect, hosts

    def _body_framing(
        self, length: bytes | None, coding: bytes | None, version: bytes, otherwise: int
    ) -> tuple[int, bool, int | None]:
        """How the body is delimited, from Content-Length and Transfer-Encoding.

        Returns (framing, chunked, content length); `otherwise` when neither is present.
        The statuses are a request's: a response decoder answers every refusal with 502.
        """
        if coding is not None:
            if length is not None:
                raise ParseError("content-length with transfer-encoding")
            if version == b"1.0":
                raise ParseError("transfer-encoding in http/1.0")
            self._check_coding(coding)
            return _CHUNKED, True, None
        if length is not None:
            content_length = self._content_length(length)
            self._remaining = content_length
            return (_LENGTH if content_length else _NONE), False, content_length
        return otherwise, False, None

    def _check_coding(self, coding: bytes) -> None:
        """Accept exactly ``chunked``; say why anything else is refused."""
        if coding.lower() == b"chunked":
            return
        codings = [c.strip(b" \t").lower() for c in coding.split(b",")]
        if not all(codings) or codings.count(b"chunked") > 1:
            raise ParseError("invalid transfer-encoding")
        for c in codings:
            # "xchunked", "chunked;x=y": a coding dressed up to look like chunked.
            if (b"chunked" in c and c != b"chunked") or _TOKEN.fullmatch(c) is None:
                raise ParseError("invalid transfer-encoding")
        raise ParseError("unsupported transfer-encoding", 501)

    @staticmethod
    def _content_length(value: bytes) -> int:
        if not value.isdigit() or len(value) > 19 or int(value) > _MAX_LENGTH:
            raise ParseError("invalid content-length")
        return int(value)

    def _llhttp_error(self, exc: Exception) -> ParseError:
        text = str(exc)
        reason = _LLHTTP_REASONS.get(text)
        if reason is None:
            reason = _UNSAFE_REASON.sub("", text.lower()).strip() or "malformed message"
        if reason == "method not implemented":
            return ParseError(reason, 501)
        if reason == "http version not supported":
            return ParseError(reason, 505)
        return ParseError(reason)


# --------------------------------------------------------------------------- requests


class RequestDecoder(_Decoder):
    """Decodes the requests a client sends on one connection, pipelined or not.

    ``upgrades``, when given, lists the protocols (lower-case) the caller can switch to;
    an Upgrade request for anything else is decoded as a plain request. By default every
    upgrade request without a body switches.
    """

    __slots__ = ("_authority", "_method", "_path", "_query", "_target", "_upgrades")

    def __init__(
        self, limits: Limits = _DEFAULT_LIMITS, *, upgrades: Iterable[bytes] | None = None
    ) -> None:
        self._upgrades = None if upgrades is None else frozenset(upgrades)
        # per message: the request line
        self._method = b""
        self._target = b""
        self._path = b""
        self._query = b""
        self._authority: bytes | None = None
        super().__init__(limits)

    def feed(self, data: bytes | bytearray | memoryview) -> list[RequestEvent]:
        """Decode ``data``; return the events it completes, in order."""
        return self._feed(data)  # type: ignore[return-value]

    def _refusal(self, exc: ParseError) -> ParseError:
        return exc

    def _new_parser(self) -> Any:
        return httptools.HttpRequestParser(self)

    def _start_line(self, line: bytes) -> None:
        parts = line.split(b" ")
        if len(parts) != 3:
            raise ParseError("invalid request line")
        method, target, version = parts
        if method not in _COMMON_METHODS and _TOKEN.fullmatch(method) is None:
            raise ParseError("invalid method")
        version_number = _VERSIONS.get(version)
        if version_number is None:
            if _HTTP_VERSION.fullmatch(version) is not None:
                raise ParseError("http version not supported", 505)
            raise ParseError("invalid request line")
        if method == b"CONNECT":
            raise ParseError("connect not supported", 405)
        self._method = method
        self._target = target
        self._version = version_number
        self._authority = None
        if target[:1] == b"/":
            path, _, query = target.partition(b"?")
            # (int membership: a memchr, several times cheaper than a bytes needle)
            if 35 in query or 35 in path or 92 in path:  # '#', '#', '\\'
                raise ParseError("invalid request target")
            self._path = path
            self._query = query
        elif target == b"*":
            if method != b"OPTIONS":
                raise ParseError("invalid request target")
            self._path = b"*"
            self._query = b""
        else:
            absolute = _ABSOLUTE.fullmatch(target)
            if absolute is None:
                raise ParseError("invalid request target")
            authority = absolute.group(2)
            if not authority or _HOST.fullmatch(authority) is None:
                raise ParseError("invalid request target")
            self._authority = authority
            # RFC 9112 3.2.2: an empty path is forwarded as "/".
            self._path = absolute.group(3) or b"/"
            self._query = absolute.group(4) or b""

    def _finish_head(self) -> RequestHead:
        headers = self._headers
        if len(headers) > self._limits.max_headers:
            raise ParseError("too many header fields", 431)
        version = self._version
        host, length, coding, connection, upgrade, expect, hosts = self._framing_fields()

        if hosts > 1:
            raise ParseError("multiple host")
        if host is None:
            if version == b"1.1":
                raise ParseError("missing host")
            host = b""
        elif _REG_NAME_HOST.fullmatch(host) is None and _HOST.fullmatch(host) is None:
            raise ParseError("invalid host")
        if self._authority is not None:
            host = self._authority  # RFC 9112 3.2.2: the target's authority wins

        # A request with neither field has no body (RFC 9112 6.3).
        framing, chunked, content_length = self._body_framing(length, coding, version, _NONE)

        expect_continue = False
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise ParseError("unsupported expectation", 417)
            # RFC 9110 10.1.1: ignored in HTTP/1.0.
            expect_continue = version == b"1.1"

        if connection is None:
            tokens = _NO_TOKENS
            keep_alive = version == b"1.1"
        else:
            tokens = _connection_tokens(connection)
            keep_alive = _persistent(version, tokens)
        self._keep_alive = keep_alive

        protocol = None
        if upgrade is not None and b"upgrade" in tokens and framing == _NONE:
            protocol = upgrade.strip(b" \t").lower()
            if self._upgrades is not None and protocol not in self._upgrades:
                protocol = None
            else:
                framing = _UPGRADE
        self._framing = framing

        head = _new(RequestHead)
        _rh_method(head, self._method)
        _rh_target(head, self._target)
        _rh_path(head, self._path)
        _rh_query(head, self._query)
        _rh_version(head, version)
        _rh_headers(head, headers)
        _rh_host(head, host)
        _rh_keep_alive(head, keep_alive)
        _rh_chunked(head, chunked)
        _rh_content_length(head, content_length)
        _rh_expect_continue(head, expect_continue)
        _rh_upgrade(head, protocol)
        return head

    def _after_pause(self) -> None:
        # An upgrade request that carries a body, or asks for a protocol the caller did
        # not list, is decoded as a plain request: llhttp stopped at its head, so
        # restart it inside the body we decided on.
        framing = self._framing
        if framing == _CHUNKED:
            self._restart_parser(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif framing == _LENGTH:
            self._restart_parser(b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % self._remaining)
        else:
            self._restart_parser()

    def _disagree(self) -> None:
        # For requests both parsers read the same fields the same way; a difference
        # means the head can be read two ways, which is exactly what must not pass.
        raise ParseError("ambiguous message framing")


# -------------------------------------------------------------------------- responses


class ResponseDecoder(_Decoder):
    """Decodes the responses an upstream sends on one connection.

    Call ``expect(method)`` once per request sent, before its response arrives; the
    method decides whether a body follows (none after HEAD).
    """

    __slots__ = ("_methods", "_reason", "_status")

    def __init__(self, limits: Limits = _DEFAULT_LIMITS) -> None:
        self._methods: deque[bytes] = deque()
        self._status = 0
        self._reason = b""
        super().__init__(limits)

    def expect(self, method: bytes) -> None:
        """Announce the method of the next request whose response will be decoded."""
        self._methods.append(method)

    def feed(self, data: bytes | bytearray | memoryview) -> list[ResponseEvent]:
        """Decode ``data``; return the events it completes, in order."""
        return self._feed(data)  # type: ignore[return-value]

    def _refusal(self, exc: ParseError) -> ParseError:
        # Whatever is wrong with an upstream's response, the client is owed a 502.
        return exc if exc.status == 502 else ParseError(exc.reason, 502)

    def feed_eof(self) -> list[ResponseEvent]:
        """The upstream closed its side.

        Ends a body delimited by the close. Returns nothing when no response was under
        way (the caller knows whether one was expected); raises when one was cut short.
        """
        if self._error is not None:
            raise self._error
        state = self._state
        if state == _BODY_CLOSE:
            self._state = _CLOSED
            return [EndOfMessage([])]
        if (state == _HEAD and not self._buf) or state in (_CLOSED, _UPGRADED):
            self._state = _CLOSED if state != _UPGRADED else state
            return []
        self._error = ParseError("upstream closed mid-message", 502)
        raise self._error

    def _new_parser(self) -> Any:
        return httptools.HttpResponseParser(self)

    def _start_line(self, line: bytes) -> None:
        if not self._methods:
            raise ParseError("response without request", 502)
        version = _VERSIONS.get(line[:8])
        if version is None:
            if _HTTP_VERSION.fullmatch(line[:8]) is not None:
                raise ParseError("http version not supported", 502)
            raise ParseError("invalid status line", 502)
        code = line[9:12]
        rest = line[12:]
        if line[8:9] != b" " or len(code) != 3 or not code.isdigit() or (rest and rest[:1] != b" "):
            raise ParseError("invalid status line", 502)
        status = int(code)
        if not 100 <= status <= 599:
            raise ParseError("invalid status code", 502)
        reason = rest[1:]
        if _REASON.fullmatch(reason) is None:
            raise ParseError("invalid reason phrase", 502)
        self._version = version
        self._status = status
        self._reason = reason

    def _finish_head(self) -> ResponseHead | Informational:
        headers = self._headers
        if len(headers) > self._limits.max_headers:
            raise ParseError("too many header fields", 502)
        version = self._version
        status = self._status
        _, length, coding, connection, _, _, _ = self._framing_fields()

        # A response with neither field runs until the connection closes (RFC 9112 6.3).
        framing, chunked, content_length = self._body_framing(length, coding, version, _CLOSE)

        if connection is None:
            keep_alive = version == b"1.1"
        else:
            keep_alive = _persistent(version, _connection_tokens(connection))

        if status < 200:
            if status == 101:
                self._methods.popleft()
                self._framing = _UPGRADE
                self._keep_alive = False
                return ResponseHead(status, self._reason, version, headers, False, False, None)
            # RFC 9110 15.2: a 1xx has no content; the final response is still to come.
            self._framing = _INFORMATIONAL
            return Informational(status, headers)

        method = self._methods.popleft()
        if method == b"HEAD" or status == 204 or status == 304:
            framing = _NONE
            chunked = False
            content_length = None
        elif framing == _CLOSE:
            keep_alive = False
        self._framing = framing
        self._keep_alive = keep_alive
        head = _new(ResponseHead)
        _rs_status(head, status)
        _rs_reason(head, self._reason)
        _rs_version(head, version)
        _rs_headers(head, headers)
        _rs_keep_alive(head, keep_alive)
        _rs_chunked(head, chunked)
        _rs_content_length(head, content_length)
        return head

    def _after_pause(self) -> None:
        # llhttp pauses only for a 101, which always switches.
        raise ParseError("unexpected upgrade", 502)

    def _disagree(self) -> None:
        # A response to HEAD, or a 1xx with a Content-Length, has no body although
        # llhttp expects one: start it afresh at the next response.
        if self._framing not in (_NONE, _INFORMATIONAL):
            raise ParseError("ambiguous message framing", 502)
        self._restart_parser()


# --------------------------------------------------------------------------- encoders

HOP_BY_HOP: Final[frozenset[bytes]] = frozenset(
    {
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
)

_PHRASES: Final = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}


def _fields(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"".join([b"%b: %b\r\n" % field_line for field_line in headers])


def _checked(out: bytes, lines: int) -> bytes:
    # One count per encoded head instead of a check per field: any CR or LF smuggled
    # into a method, target, name or value shows up as an extra line break.
    if out.count(b"\n") != lines or out.count(b"\r") != lines:
        raise ValueError("CR or LF inside an HTTP/1.1 field or start line")
    return out


def encode_request_head(method: bytes, target: bytes, headers: Headers) -> bytes:
    """Encode an HTTP/1.1 request line and header fields, ending with the empty line."""
    if 32 in target or 32 in method:  # SP
        raise ValueError("space inside a method or request-target")
    out = b"%b %b HTTP/1.1\r\n%b\r\n" % (method, target, _fields(headers))
    return _checked(out, len(headers) + 2)


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of a status code (b"" for an unknown one)."""
    return _PHRASES.get(status, b"")


def encode_response_head(status: int, reason: bytes, headers: Headers) -> bytes:
    """Encode an HTTP/1.1 status line and header fields; an empty reason gets the standard one."""
    if not 100 <= status <= 999:
        raise ValueError(f"status {status} is not three digits")
    if not reason:
        reason = _PHRASES.get(status, b"")
    out = b"HTTP/1.1 %d %b\r\n%b\r\n" % (status, reason, _fields(headers))
    return _checked(out, len(headers) + 2)


def encode_chunk(data: bytes) -> bytes:
    """Frame ``data`` as one chunk; an empty chunk would end the body, so it is refused."""
    if not data:
        raise ValueError("an empty chunk is the last chunk: use encode_last_chunk")
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_last_chunk(trailers: Headers) -> bytes:
    """The last chunk, trailer fields and the final empty line."""
    out = b"0\r\n%b\r\n" % _fields(trailers)
    return _checked(out, len(trailers) + 2)


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop fields meant for one connection only (RFC 9110 7.6.1) before forwarding.

    That is HOP_BY_HOP and every field the Connection fields name. Names are compared
    case-insensitively and kept as they were.
    """
    kept: Headers = []
    connection: list[bytes] = []
    for name, value in headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                connection.append(value)
        else:
            kept.append((name, value))
    if not connection:
        return kept
    named = {t.strip(b" \t").lower() for v in connection for t in v.split(b",")}
    return [(n, v) for n, v in kept if n.lower() not in named]
