"""The gRPC health check client: one `grpc.health.v1.Health/Check` call per check.

A check opens a connection to the endpoint, speaks HTTP/2 on it (cleartext with prior
knowledge, or TLS offering ALPN `h2` with the cluster's certificate), sends one unary
call and closes the connection. It passes only on a complete answer that says SERVING:
`:status` 200, a gRPC content type, `grpc-status` 0 (in the trailers, or in the headers
of a trailers-only answer) and one `HealthCheckResponse` whose `status` is 1. Anything
else fails it: another status (NOT_SERVING, UNKNOWN), `grpc-status` 5 for a service the
server does not know or 12 for a server without the health service, a reset stream, a
GOAWAY, a closed connection, or the policy's timeout, which bounds the whole check.

The protocol is sans-I/O, like the HTTP/1 codec: `encode_request` and
`decode_response` are the two protobuf messages (written by hand: each has one field),
`judge` reads a finished response, and `HealthCall` drives an `h2` connection from
bytes in to bytes out. `probe` is the thin asyncio glue around them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from collections.abc import Iterable
from typing import TYPE_CHECKING

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

if TYPE_CHECKING:
    from meshling.policies.health_check.snapshot import GrpcCheck
    from meshling.proxy.tls import ClientTls
    from meshling.snapshot.model import Endpoint, UpstreamTls

log = logging.getLogger("meshling.proxy")

PATH = b"/grpc.health.v1.Health/Check"
# HealthCheckResponse.ServingStatus
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1
# the verdict of a check that passed; every other verdict says why one failed
PASSED = "SERVING"
# grpc-status values worth a name in a verdict
GRPC_STATUS_NAMES = {
    1: "CANCELLED",
    2: "UNKNOWN",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND (service unknown)",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    12: "UNIMPLEMENTED (no health service)",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}
# a HealthCheckResponse is two bytes; anything much larger is not one
MAX_RESPONSE_BYTES = 16 * 1024
_READ_SIZE = 65536
_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


# -- protobuf and gRPC framing -------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        if shift >= 64:
            raise ValueError("varint longer than 10 bytes")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def encode_request(service: str) -> bytes:
    """A length-prefixed `HealthCheckRequest{service}` as a gRPC request body."""
    name = service.encode()
    # proto3 leaves a field at its default ("") out
    message = b"\x0a" + _varint(len(name)) + name if name else b""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def decode_response(message: bytes) -> int:
    """`HealthCheckResponse.status` from the message's bytes (without the gRPC prefix).

    Fields other than `status` are skipped; the last `status` wins and an absent one is
    0 (UNKNOWN), as protobuf has it. Raises ValueError on bytes that are not a message.
    """
    status = 0
    pos = 0
    while pos < len(message):
        key, pos = _read_varint(message, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire == _WIRE_VARINT:
            value, pos = _read_varint(message, pos)
            if field == 1:
                status = value
        elif wire == _WIRE_LEN:
            size, pos = _read_varint(message, pos)
            pos += size
        elif wire == _WIRE_I64:
            pos += 8
        elif wire == _WIRE_I32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(message):
            raise ValueError("truncated field")
    return status


def unframe(body: bytes) -> bytes:
    """The one message of a unary response body: its gRPC length prefix checked and
    removed. Raises ValueError unless the body is exactly one uncompressed message."""
    if len(body) < 5:
        raise ValueError("no message" if not body else "truncated message prefix")
    if body[0] != 0:
        raise ValueError("compressed message (none was asked for)")
    size = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + size:
        raise ValueError("not exactly one message")
    return body[5:]


def _field(fields: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in fields:
        if key == name:
            return value
    return None


def judge(
    headers: list[tuple[bytes, bytes]], trailers: list[tuple[bytes, bytes]] | None, body: bytes
) -> str:
    """The verdict on a complete response: `PASSED`, or why the check failed."""
    status = _field(headers, b":status")
    if status != b"200":
        return f"HTTP status {(status or b'none').decode(errors='replace')}"
    content_type = _field(headers, b"content-type") or b""
    if not content_type.startswith(b"application/grpc"):
        return f"content-type {content_type.decode(errors='replace')!r} is not gRPC"
    # a trailers-only answer carries grpc-status in its one header block
    grpc_status = _field(trailers if trailers is not None else headers, b"grpc-status")
    if grpc_status is None:
        return "no grpc-status"
    if not grpc_status.isdigit():
        return f"invalid grpc-status {grpc_status.decode(errors='replace')!r}"
    code = int(grpc_status)
    if code != 0:
        return f"grpc-status {code} {GRPC_STATUS_NAMES.get(code, '')}".rstrip()
    try:
        serving = decode_response(unframe(body))
    except ValueError as exc:
        return f"invalid response: {exc}"
    if serving != SERVING:
        return STATUS_NAMES.get(serving, f"status {serving}")
    return PASSED


def grpc_timeout(seconds: float) -> bytes:
    """The `grpc-timeout` header's value for a deadline `seconds` away."""
    millis = max(1, round(seconds * 1000))
    # at most eight digits
    return b"%dm" % millis if millis < 10**8 else b"%dS" % max(1, round(seconds))


# -- the call ------------------------------------------------------------------------


class HealthCall:
    """One Health/Check call on its own HTTP/2 connection, without I/O.

    `start()` returns the first bytes to send (preface, SETTINGS, the request);
    `receive(data)` takes what the server sent (b"" when it closed) and returns what to
    send back (acknowledgements, window updates). `verdict` is None until the call is
    over, then `PASSED` or the reason it failed.
    """

    def __init__(self, service: str, authority: str, *, tls: bool, timeout: float) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,
            },
        )
        self.request = [
            (b":method", b"POST"),
            (b":scheme", b"https" if tls else b"http"),
            (b":path", PATH),
            (b":authority", authority.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"grpc-timeout", grpc_timeout(timeout)),
            (b"user-agent", b"meshling-health-check"),
        ]
        self.body = encode_request(service)
        self.stream_id = 0
        self.verdict: str | None = None
        # the server has sent something
        self.answered = False
        # the response as it arrives
        self.headers: list[tuple[bytes, bytes]] | None = None
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.data = bytearray()

    def start(self) -> bytes:
        conn = self.conn
        conn.initiate_connection()
        self.stream_id = conn.get_next_available_stream_id()
        conn.send_headers(self.stream_id, self.request)
        conn.send_data(self.stream_id, self.body, end_stream=True)
        return conn.data_to_send()

    def receive(self, data: bytes) -> bytes:
        if self.verdict is not None:
            return b""
        if not data:
            self.verdict = "connection closed before the answer"
            return b""
        if not self.answered:
            self.answered = True
            # h2 would wait for the rest of the "frame" this header announces
            if data.startswith(b"HTTP/"):
                self.verdict = "the endpoint answered in HTTP/1, not HTTP/2"
                return b""
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.H2Error as exc:
            self.verdict = f"HTTP/2 protocol error: {exc}"
            return b""
        for event in events:
            self._event(event)
            if self.verdict is not None:
                break
        return self.conn.data_to_send()

    def close(self) -> bytes:
        """GOAWAY, so that the server sees an orderly end of the connection."""
        try:
            self.conn.close_connection()
        except h2.exceptions.H2Error:
            return b""
        return self.conn.data_to_send()

    def _event(self, event: h2.events.Event) -> None:
        mine = getattr(event, "stream_id", None) == self.stream_id
        if isinstance(event, h2.events.ResponseReceived) and mine:
            self.headers = _fields(event.headers)
        elif isinstance(event, h2.events.DataReceived) and mine:
            self.data += event.data or b""
            if len(self.data) > MAX_RESPONSE_BYTES:
                self.verdict = f"response longer than {MAX_RESPONSE_BYTES} bytes"
                return
            if event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, self.stream_id)
        elif isinstance(event, h2.events.TrailersReceived) and mine:
            self.trailers = _fields(event.headers)
        elif isinstance(event, h2.events.StreamEnded) and mine:
            if self.headers is None:
                self.verdict = "stream ended without a response"
            else:
                self.verdict = judge(self.headers, self.trailers, bytes(self.data))
        elif isinstance(event, h2.events.StreamReset) and mine:
            self.verdict = f"stream reset ({_code(event.error_code)})"
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.verdict = f"GOAWAY ({_code(event.error_code)})"


def _code(code: object) -> str:
    return str(getattr(code, "name", code))


def _fields(
    headers: Iterable[tuple[bytes | str, bytes | str]] | None,
) -> list[tuple[bytes, bytes]]:
    # header_encoding=None: h2 hands names and values over as bytes already
    return [
        (k if isinstance(k, bytes) else k.encode(), v if isinstance(v, bytes) else v.encode())
        for k, v in headers or ()
    ]


# -- I/O -------------------------------------------------------------------------------


def h2_tls(config: UpstreamTls, cluster: str) -> ClientTls:
    """A cluster's client TLS as a gRPC check needs it: the same certificate, trust and
    expected identity, offering ALPN h2 only. Raises TlsConfigError like the cluster's."""
    from meshling.proxy.tls import ClientTls
    from meshling.telemetry.metrics import TlsStats

    # Its own counters: the checks' handshakes are not the cluster's traffic.
    return ClientTls(
        dataclasses.replace(config, alpn=("h2",)), f"clusters.{cluster}.tls", TlsStats()
    )


async def probe(
    endpoint: Endpoint,
    check: GrpcCheck,
    authority: str,
    timeout: float,
    tls: ClientTls | None,
) -> str:
    """One gRPC check of one endpoint within `timeout`: `PASSED`, or why it failed."""
    call = HealthCall(check.service, authority, tls=tls is not None, timeout=timeout)
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                endpoint.address, endpoint.port, ssl=tls.context if tls is not None else None
            )
            if tls is not None:
                refused = _refuse_peer(tls, writer.get_extra_info("ssl_object"))
                if refused:
                    return refused
            writer.write(call.start())
            while call.verdict is None:
                out = call.receive(await reader.read(_READ_SIZE))
                if out:
                    writer.write(out)
            return call.verdict
    except TimeoutError:
        return f"no answer within {timeout:g}s"
    except ssl.SSLError as exc:
        return f"TLS: {exc.reason or exc}"
    except OSError as exc:
        return f"connection: {exc.strerror or exc}"
    except (ValueError, h2.exceptions.H2Error) as exc:
        return f"error: {exc}"
    finally:
        if writer is not None:
            if call.stream_id and not writer.transport.is_closing():
                writer.write(call.close())
            writer.transport.abort()


def _refuse_peer(tls: ClientTls, ssl_object: ssl.SSLObject | None) -> str | None:
    """Why the TLS peer may not answer the check (None: it may)."""
    from meshling.identity import SvidError

    if ssl_object is None:
        return "TLS: no session"
    alpn = ssl_object.selected_alpn_protocol()
    # None: the peer does not do ALPN, and gets the HTTP/2 preface all the same
    if alpn is not None and alpn != "h2":
        return f"TLS: the endpoint chose ALPN {alpn!r}, not h2"
    try:
        tls.authenticate(ssl_object)
    except SvidError as exc:
        return f"TLS: {exc}"
    return None
