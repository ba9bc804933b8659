"""A gRPC server for the benchmark: unary echo over cleartext HTTP/2, written at the frame level.

The gRPC scenarios measure the proxies between a load generator and a server, so the
server must be cheap enough not to be the bottleneck while sharing the load CPU with
h2load. grpcio's server runs every call through its completion queue and a Python handler
on a thread pool; this one does the least a correct server may do: it reads the frames,
decodes every header block (its HPACK table kept in step with the client's, each string
literal's Huffman decoding remembered, since a load repeats the same few), answers with
fields that never touch the client's table, and writes every frame a batch of input
produced in one write.

    .venv/bin/python bench/grpc_responder.py --port 50051

Served methods (messages are raw bytes, no protobuf):

- `/bench.Echo/Unary`: the request's one message back, status 0;
- `/bench.Echo/Stats`: a JSON object, `{"ok": <calls answered with status 0>,
  "failed": <calls answered otherwise>, "connections": <accepted>}`;
- anything else: status 12 (UNIMPLEMENTED), a trailers-only response.

A call whose message is compressed, missing or more than one gets a non-zero status; one
larger than `MAX_MESSAGE` gets RESOURCE_EXHAUSTED as soon as it is, then RST_STREAM.
Flow control is kept both ways: the connection's receive window is topped up as data is
consumed, and responses wait for the client's windows. A protocol error closes the
connection with GOAWAY.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import cast

from hpack.exceptions import HPACKError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
UNARY = b"/bench.Echo/Unary"
STATS = b"/bench.Echo/Stats"
MAX_MESSAGE = 1 << 19  # below a stream's receive window, so that the excess arrives
# what this server announces: stream windows of 1 MiB (so that no message needs a stream
# WINDOW_UPDATE), a connection window topped up once half of it is used
RECEIVE_WINDOW = 1 << 20
CONNECTION_WINDOW = 16 << 20
MAX_STREAMS = 1000
DEFAULT_WINDOW = 65535

# frame types
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0x5, 0x6, 0x7, 0x8, 0x9
# flags
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# settings
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
# error codes
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR = 0x1, 0x3, 0x6, 0x9
# the HPACK table size this server allows (SETTINGS_HEADER_TABLE_SIZE, left at its default)
TABLE_SIZE = 4096
STATIC_TABLE: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE

_frame_head = struct.Struct(">I B I")  # (length << 8 | type), flags, stream id


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return _frame_head.pack(len(payload) << 8 | kind, flags, sid) + payload


def literal(name: bytes, value: bytes) -> bytes:
    """A header field "without indexing", with a literal name: it leaves both tables as
    they are. Names and values here are all shorter than 127 bytes."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


# `:status: 200` (static index 8), `content-type` (static name 31) without indexing
RESPONSE_HEAD = b"\x88" + b"\x0f\x10" + bytes([len(b"application/grpc")]) + b"application/grpc"
OK_TRAILERS = literal(b"grpc-status", b"0")


def status_fields(code: int, message: bytes) -> bytes:
    return literal(b"grpc-status", str(code).encode()) + literal(b"grpc-message", message)


class ProtocolViolation(Exception):
    """The client broke the protocol: the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def unpadded(flags: int, payload: bytes) -> tuple[int, int]:
    """Where a DATA or HEADERS frame's content starts and ends, without its padding."""
    if not flags & PADDED:
        return 0, len(payload)
    if not payload or payload[0] >= len(payload):
        raise ProtocolViolation(PROTOCOL_ERROR, "padding longer than the frame")
    return 1, len(payload) - payload[0]


class HeaderDecoder:
    """HPACK decoding (RFC 7541) of a client's header blocks, into (name, value) bytes."""

    def __init__(self) -> None:
        self.entries: deque[tuple[bytes, bytes]] = deque()
        self.size = 0
        self.limit = TABLE_SIZE  # the encoder may lower it with a size update
        self.strings: dict[bytes, bytes] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        fields = []
        pos, end = 0, len(block)
        try:
            while pos < end:
                first = block[pos]
                if first & 0x80:  # indexed field
                    index, pos = self.integer(block, pos, 0x7F)
                    fields.append(self.lookup(index))
                elif first & 0x40:  # literal, added to the table
                    name, value, pos = self.literal(block, pos, 0x3F)
                    fields.append((name, value))
                    self.add(name, value)
                elif first & 0x20:  # table size update
                    size, pos = self.integer(block, pos, 0x1F)
                    if size > TABLE_SIZE:
                        raise ProtocolViolation(COMPRESSION_ERROR, "table size above the limit")
                    self.limit = size
                    self.add(b"", b"", evict_only=True)
                else:  # literal without indexing, or never indexed
                    name, value, pos = self.literal(block, pos, 0x0F)
                    fields.append((name, value))
        except (IndexError, HPACKError) as exc:
            raise ProtocolViolation(COMPRESSION_ERROR, f"malformed header block: {exc}") from exc
        return fields

    @staticmethod
    def integer(block: bytes, pos: int, mask: int) -> tuple[int, int]:
        value = block[pos] & mask
        pos += 1
        if value < mask:
            return value, pos
        shift = 0
        while True:
            byte = block[pos]
            pos += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, pos
            if shift > 28:
                raise ProtocolViolation(COMPRESSION_ERROR, "integer too large")

    def string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        huffman = block[pos] & 0x80
        length, pos = self.integer(block, pos, 0x7F)
        raw = block[pos : pos + length]
        if len(raw) < length:
            raise ProtocolViolation(COMPRESSION_ERROR, "string beyond the block")
        pos += length
        if not huffman:
            return raw, pos
        text = self.strings.get(raw)
        if text is None:
            if len(self.strings) >= 1024:
                self.strings.clear()
            text = self.strings[raw] = decode_huffman(raw)
        return text, pos

    def literal(self, block: bytes, pos: int, mask: int) -> tuple[bytes, bytes, int]:
        index, pos = self.integer(block, pos, mask)
        if index:
            name = self.lookup(index)[0]
        else:
            name, pos = self.string(block, pos)
        value, pos = self.string(block, pos)
        return name, value, pos

    def lookup(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        at = index - len(STATIC_TABLE) - 1
        if index == 0 or at >= len(self.entries):
            raise ProtocolViolation(COMPRESSION_ERROR, f"no table entry {index}")
        return self.entries[at]

    def add(self, name: bytes, value: bytes, evict_only: bool = False) -> None:
        """Add an entry at the front, evicting the oldest ones to make room; an entry
        larger than the table empties it (RFC 7541, 4.4)."""
        size = 0 if evict_only else 32 + len(name) + len(value)
        entries = self.entries
        while entries and self.size + size > self.limit:
            old_name, old_value = entries.pop()
            self.size -= 32 + len(old_name) + len(old_value)
        if not evict_only and size <= self.limit:
            entries.appendleft((name, value))
            self.size += size


@dataclass
class Stream:
    path: bytes = b""
    grpc: bool = False
    body: bytearray = field(default_factory=bytearray)


@dataclass
class Pending:
    """A response whose message waits for the client's flow-control windows."""

    data: bytes
    window: int
    trailers: bytes


@dataclass
class Counts:
    ok: int = 0
    failed: int = 0
    connections: int = 0


class Responder(asyncio.Protocol):
    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface_seen = False
        self.decoder = HeaderDecoder()
        self.streams: dict[int, Stream] = {}
        self.last_sid = 0
        # a header block spread over CONTINUATION frames: its stream, flags, bytes so far
        self.continuing: tuple[int, int, bytearray] | None = None
        # what the client lets us send
        self.send_window = DEFAULT_WINDOW
        self.initial_window = DEFAULT_WINDOW
        self.max_frame = 16384
        self.stream_updates: dict[int, int] = {}
        self.pending: dict[int, Pending] = {}
        # bytes received and not yet returned to the client's connection window
        self.consumed = 0
        self.out = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.counts.connections += 1
        settings = struct.pack(
            ">HIHI",
            SETTINGS_MAX_CONCURRENT_STREAMS,
            MAX_STREAMS,
            SETTINGS_INITIAL_WINDOW_SIZE,
            RECEIVE_WINDOW,
        )
        increment = CONNECTION_WINDOW - DEFAULT_WINDOW
        self.transport.write(
            frame(SETTINGS, 0, 0, settings)
            + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", increment))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        pos = 0
        try:
            if not self.preface_seen:
                if len(buf) < len(PREFACE):
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise ProtocolViolation(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                self.preface_seen = True
                pos = len(PREFACE)
            size = len(buf)
            while size - pos >= 9:
                word, flags, sid = _frame_head.unpack_from(buf, pos)
                length, kind = word >> 8, word & 0xFF
                if length > 16384:
                    raise ProtocolViolation(FRAME_SIZE_ERROR, "frame above the maximum size")
                end = pos + 9 + length
                if end > size:
                    break
                self.on_frame(kind, flags, sid & 0x7FFFFFFF, bytes(buf[pos + 9 : end]))
                pos = end
        except ProtocolViolation as exc:
            self.fail(exc.code)
            return
        del buf[:pos]
        if self.consumed >= CONNECTION_WINDOW // 2:
            self.out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", self.consumed))
            self.consumed = 0
        if self.out and self.transport is not None:
            self.transport.write(bytes(self.out))
            self.out.clear()

    def fail(self, code: int) -> None:
        if self.transport is not None:
            self.transport.write(
                bytes(self.out) + frame(GOAWAY, 0, 0, struct.pack(">II", self.last_sid, code))
            )
            self.transport.close()
        self.out.clear()

    # -- frames ------------------------------------------------------------------------

    def on_frame(self, kind: int, flags: int, sid: int, payload: bytes) -> None:
        if self.continuing is not None and kind != CONTINUATION:
            raise ProtocolViolation(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self.on_data(flags, sid, payload)
        elif kind == HEADERS:
            self.on_headers(flags, sid, payload)
        elif kind == CONTINUATION:
            if self.continuing is None or self.continuing[0] != sid:
                raise ProtocolViolation(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            block = self.continuing[2]
            block += payload
            if flags & END_HEADERS:
                _, first_flags, _ = self.continuing
                self.continuing = None
                self.on_header_block(first_flags, sid, bytes(block))
        elif kind == SETTINGS:
            if sid:
                raise ProtocolViolation(PROTOCOL_ERROR, "SETTINGS on a stream")
            if not flags & ACK:
                self.on_settings(payload)
                self.out += frame(SETTINGS, ACK, 0)
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "WINDOW_UPDATE of a wrong size")
            self.on_window_update(sid, struct.unpack(">I", payload)[0] & 0x7FFFFFFF)
        elif kind == PING:
            if len(payload) != 8 or sid:
                raise ProtocolViolation(PROTOCOL_ERROR, "malformed PING")
            if not flags & ACK:
                self.out += frame(PING, ACK, 0, payload)
        elif kind == RST_STREAM:
            self.streams.pop(sid, None)
            self.pending.pop(sid, None)
            self.stream_updates.pop(sid, None)
        elif kind == PUSH_PROMISE:
            raise ProtocolViolation(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # PRIORITY, GOAWAY (the client closes when done) and unknown types: nothing to do

    def on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise ProtocolViolation(FRAME_SIZE_ERROR, "SETTINGS of a wrong size")
        for at in range(0, len(payload), 6):
            ident, value = struct.unpack_from(">HI", payload, at)
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > 0x7FFFFFFF:
                    raise ProtocolViolation(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.initial_window
                self.initial_window = value
                for pending in self.pending.values():
                    pending.window += delta
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value
        if self.pending:
            self.flush_pending()

    def on_window_update(self, sid: int, increment: int) -> None:
        if sid == 0:
            self.send_window += increment
        elif sid in self.pending:
            self.pending[sid].window += increment
        elif sid in self.streams:
            self.stream_updates[sid] = self.stream_updates.get(sid, 0) + increment
        if self.pending:
            self.flush_pending()

    def on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0 or sid % 2 == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "HEADERS on a server's stream id")
        start, end = unpadded(flags, payload)
        if flags & PRIORITY_FLAG:
            start += 5
            if start > end:
                raise ProtocolViolation(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
        block = payload[start:end]
        if flags & END_HEADERS:
            self.on_header_block(flags, sid, block)
        else:
            self.continuing = (sid, flags, bytearray(block))

    def on_header_block(self, flags: int, sid: int, block: bytes) -> None:
        fields = self.decoder.decode(block)
        stream = self.streams.get(sid)
        if stream is None:
            if sid <= self.last_sid:
                return  # trailers or headers of a stream already answered or reset
            self.last_sid = sid
            stream = self.streams[sid] = Stream()
            for name, value in fields:
                if name == b":path":
                    stream.path = value
                elif name == b"content-type":
                    stream.grpc = value.startswith(b"application/grpc")
        if flags & END_STREAM:
            self.answer(sid)

    def on_data(self, flags: int, sid: int, payload: bytes) -> None:
        if sid == 0:
            raise ProtocolViolation(PROTOCOL_ERROR, "DATA on stream 0")
        self.consumed += len(payload)
        stream = self.streams.get(sid)
        if stream is None:
            return
        start, end = unpadded(flags, payload)
        stream.body += payload[start:end]
        if len(stream.body) > MAX_MESSAGE + 5:
            # answered at once, and the rest of the request refused: the client would
            # otherwise wait for window this server will not give for a message it drops
            del self.streams[sid]
            self.stream_updates.pop(sid, None)
            self.counts.failed += 1
            fields = RESPONSE_HEAD + status_fields(8, b"message too large")
            self.out += frame(HEADERS, END_STREAM | END_HEADERS, sid, fields)
            self.out += frame(RST_STREAM, 0, sid, struct.pack(">I", 0))
        elif flags & END_STREAM:
            self.answer(sid)

    # -- answers -----------------------------------------------------------------------

    def answer(self, sid: int) -> None:
        stream = self.streams.pop(sid)
        updates = self.stream_updates.pop(sid, 0)
        if stream.path == STATS:
            text = json.dumps(
                {
                    "ok": self.counts.ok,
                    "failed": self.counts.failed,
                    "connections": self.counts.connections,
                }
            ).encode()
            self.respond(sid, struct.pack(">BI", 0, len(text)) + text, updates)
            return
        failure = self.check(stream)
        if failure is not None:
            self.counts.failed += 1
            code, message = failure
            self.out += frame(
                HEADERS, END_STREAM | END_HEADERS, sid, RESPONSE_HEAD + status_fields(code, message)
            )
            return
        self.counts.ok += 1
        self.respond(sid, bytes(stream.body), updates)

    @staticmethod
    def check(stream: Stream) -> tuple[int, bytes] | None:
        """The status and message of a call that cannot be answered with its echo."""
        if stream.path != UNARY:
            return 12, b"unknown method"
        if not stream.grpc:
            return 3, b"not application/grpc"
        body = stream.body
        if len(body) < 5:
            return 13, b"no request message"
        if body[0] != 0:
            return 12, b"compressed messages are not supported"
        if int.from_bytes(body[1:5], "big") != len(body) - 5:
            return 13, b"exactly one request message expected"
        return None

    def respond(self, sid: int, message: bytes, updates: int) -> None:
        size = len(message)
        window = self.initial_window + updates
        if not self.pending and size <= min(self.send_window, window, self.max_frame):
            self.send_window -= size
            self.out += frame(HEADERS, END_HEADERS, sid, RESPONSE_HEAD)
            self.out += frame(DATA, 0, sid, message)
            self.out += frame(HEADERS, END_STREAM | END_HEADERS, sid, OK_TRAILERS)
            return
        self.out += frame(HEADERS, END_HEADERS, sid, RESPONSE_HEAD)
        self.pending[sid] = Pending(message, window, OK_TRAILERS)
        self.flush_pending()

    def flush_pending(self) -> None:
        """Send what the windows allow of the waiting responses, oldest first."""
        for sid in list(self.pending):
            pending = self.pending[sid]
            while pending.data and self.send_window > 0 and pending.window > 0:
                n = min(len(pending.data), self.send_window, pending.window, self.max_frame)
                self.out += frame(DATA, 0, sid, pending.data[:n])
                pending.data = pending.data[n:]
                self.send_window -= n
                pending.window -= n
            if pending.data:
                if self.send_window <= 0:
                    return
                continue
            del self.pending[sid]
            self.out += frame(HEADERS, END_STREAM | END_HEADERS, sid, pending.trailers)


async def serve(host: str, port: int) -> None:
    counts = Counts()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Responder(counts), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving gRPC on {host}:{port}", flush=True)
    await stop.wait()
    server.close()
    print(json.dumps({"ok": counts.ok, "failed": counts.failed}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
