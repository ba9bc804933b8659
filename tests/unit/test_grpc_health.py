"""The gRPC health check client without sockets: the two protobuf messages (checked
against the real generated classes), the verdict on a response, and one call driven
against an `h2` server connection through a fake link."""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from grpc_health.v1 import health_pb2

from meshling.proxy.grpc_health import (
    PASSED,
    HealthCall,
    decode_response,
    encode_request,
    grpc_timeout,
    judge,
    unframe,
)

ServingStatus = health_pb2.HealthCheckResponse.ServingStatus


def framed(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def response_message(status: int) -> bytes:
    message: bytes = health_pb2.HealthCheckResponse(status=status).SerializeToString()
    return message


# -- the messages


@pytest.mark.parametrize("service", ["", "x", "shop.v1.Orders", "s" * 200, "dienst.ü"])
def test_encode_request_is_what_protobuf_writes(service: str) -> None:
    encoded = encode_request(service)
    assert encoded == framed(health_pb2.HealthCheckRequest(service=service).SerializeToString())
    parsed = health_pb2.HealthCheckRequest()
    parsed.ParseFromString(unframe(encoded))
    assert parsed.service == service


def test_encode_request_bytes() -> None:
    assert encode_request("") == b"\x00\x00\x00\x00\x00"
    assert encode_request("ab") == b"\x00\x00\x00\x00\x04\x0a\x02ab"
    # a length of 200 takes a two-byte varint
    assert encode_request("s" * 200)[5:8] == b"\x0a\xc8\x01"


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_decode_response_reads_every_serving_status(status: int) -> None:
    assert decode_response(response_message(status)) == status


def test_decode_response_defaults_skips_and_keeps_the_last() -> None:
    # proto3 writes nothing for UNKNOWN
    assert decode_response(b"") == 0
    # unknown fields of every wire type around the status are skipped
    unknown = b"\x10\x96\x01" + b"\x1a\x03abc" + b"\x21" + bytes(8) + b"\x2d" + bytes(4)
    assert decode_response(unknown + b"\x08\x01" + unknown) == 1
    # a repeated scalar: the last one wins
    assert decode_response(b"\x08\x02\x08\x01") == 1


@pytest.mark.parametrize(
    "message",
    [
        b"\x08",  # a key with no value
        b"\x08\x81",  # a truncated varint
        b"\x1a\x05ab",  # a length beyond the end
        b"\x21\x00",  # a fixed64 cut short
        b"\x0b",  # group start: not in proto3
        b"\x00\x01",  # field number 0
        b"\x08" + b"\xff" * 11,  # a varint that never ends
    ],
)
def test_decode_response_refuses_malformed_bytes(message: bytes) -> None:
    with pytest.raises(ValueError):
        decode_response(message)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "no message"),
        (b"\x00\x00\x00", "truncated"),
        (b"\x01\x00\x00\x00\x02\x08\x01", "compressed"),
        (b"\x00\x00\x00\x00\x02\x08", "exactly one"),
        (framed(b"\x08\x01") + framed(b"\x08\x01"), "exactly one"),
    ],
)
def test_unframe_wants_one_plain_message(body: bytes, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        unframe(body)


def test_grpc_timeout_fits_eight_digits() -> None:
    assert grpc_timeout(0.25) == b"250m"
    assert grpc_timeout(0.0001) == b"1m"
    assert grpc_timeout(30 * 86400) == b"2592000S"


# -- the verdict

OK_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]


def test_judge_serving_passes() -> None:
    trailers = [(b"grpc-status", b"0")]
    assert judge(OK_HEADERS, trailers, framed(response_message(1))) == PASSED
    # a gRPC content type with a suffix is still gRPC
    headers = [(b":status", b"200"), (b"content-type", b"application/grpc+proto")]
    assert judge(headers, trailers, framed(response_message(1))) == PASSED


@pytest.mark.parametrize(
    ("headers", "trailers", "body", "verdict"),
    [
        (OK_HEADERS, [(b"grpc-status", b"0")], framed(response_message(2)), "NOT_SERVING"),
        (OK_HEADERS, [(b"grpc-status", b"0")], framed(b""), "UNKNOWN"),
        (OK_HEADERS, [(b"grpc-status", b"0")], framed(b"\x08\x07"), "status 7"),
        # trailers-only: the status is in the one header block
        (
            [*OK_HEADERS, (b"grpc-status", b"5")],
            None,
            b"",
            "grpc-status 5 NOT_FOUND (service unknown)",
        ),
        (
            [*OK_HEADERS, (b"grpc-status", b"12")],
            None,
            b"",
            "grpc-status 12 UNIMPLEMENTED (no health service)",
        ),
        (OK_HEADERS, [(b"grpc-status", b"14"), (b"grpc-message", b"x")], b"", "grpc-status 14"),
        (OK_HEADERS, [(b"grpc-status", b"99")], b"", "grpc-status 99"),
        (OK_HEADERS, [(b"grpc-status", b"zero")], b"", "invalid grpc-status"),
        (OK_HEADERS, [], framed(response_message(1)), "no grpc-status"),
        (OK_HEADERS, None, framed(response_message(1)), "no grpc-status"),
        (OK_HEADERS, [(b"grpc-status", b"0")], b"", "invalid response: no message"),
        ([(b":status", b"404")], None, b"", "HTTP status 404"),
        ([(b":status", b"200"), (b"content-type", b"text/html")], None, b"", "is not gRPC"),
    ],
)
def test_judge_failures_say_why(
    headers: list[tuple[bytes, bytes]],
    trailers: list[tuple[bytes, bytes]] | None,
    body: bytes,
    verdict: str,
) -> None:
    got = judge(headers, trailers, body)
    assert got != PASSED
    assert verdict in got


# -- one call against an h2 server through a fake link


class Server:
    """The server's side of the link: an `h2` connection and the request it saw."""

    def __init__(self) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.conn.initiate_connection()
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.stream_id = 0
        self.ended = False

    def receive(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.stream_id = event.stream_id
                self.headers = {bytes(k): bytes(v) for k, v in event.headers or ()}
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data or b""
            elif isinstance(event, h2.events.StreamEnded):
                self.ended = True

    def answer(
        self, status: int, *, grpc_status: bytes = b"0", trailers_only: bool = False
    ) -> None:
        head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        if trailers_only:
            self.conn.send_headers(self.stream_id, [*head, (b"grpc-status", grpc_status)], True)
            return
        self.conn.send_headers(self.stream_id, head)
        self.conn.send_data(self.stream_id, framed(response_message(status)))
        self.conn.send_headers(self.stream_id, [(b"grpc-status", grpc_status)], end_stream=True)


def exchange(answer: Callable[[Server], None], *, chunk: int = 65536) -> tuple[HealthCall, Server]:
    """Run a call: the client's bytes to the server, the server's `answer`, its bytes back
    in pieces of `chunk` bytes."""
    call = HealthCall("shop.v1.Orders", "orders.internal", tls=False, timeout=0.5)
    server = Server()
    server.receive(call.start())
    answer(server)
    data = server.conn.data_to_send()
    for i in range(0, len(data), chunk):
        back = call.receive(data[i : i + chunk])
        if back:
            server.receive(back)
    return call, server


def test_call_sends_a_grpc_request() -> None:
    call, server = exchange(lambda s: s.answer(1))
    assert server.ended
    assert server.headers[b":method"] == b"POST"
    assert server.headers[b":scheme"] == b"http"
    assert server.headers[b":path"] == b"/grpc.health.v1.Health/Check"
    assert server.headers[b":authority"] == b"orders.internal"
    assert server.headers[b"content-type"] == b"application/grpc"
    assert server.headers[b"te"] == b"trailers"
    assert server.headers[b"grpc-timeout"] == b"500m"
    request = health_pb2.HealthCheckRequest()
    request.ParseFromString(unframe(server.body))
    assert request.service == "shop.v1.Orders"
    assert call.verdict == PASSED


def test_call_passes_with_the_answer_in_single_bytes() -> None:
    call, _ = exchange(lambda s: s.answer(1), chunk=1)
    assert call.verdict == PASSED


def test_call_scheme_is_https_over_tls() -> None:
    call = HealthCall("", "a", tls=True, timeout=1)
    server = Server()
    server.receive(call.start())
    assert server.headers[b":scheme"] == b"https"
    assert unframe(server.body) == b""


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (lambda s: s.answer(2), "NOT_SERVING"),
        (lambda s: s.answer(1, grpc_status=b"5", trailers_only=True), "grpc-status 5"),
        (lambda s: s.conn.reset_stream(s.stream_id, h2.errors.ErrorCodes.CANCEL), "stream reset"),
        (lambda s: s.conn.close_connection(), "GOAWAY"),
    ],
)
def test_call_fails(answer: Callable[[Server], None], verdict: str) -> None:
    call, _ = exchange(answer)
    assert call.verdict is not None
    assert call.verdict.startswith(verdict)


def test_call_fails_when_the_connection_closes_first() -> None:
    call = HealthCall("", "a", tls=False, timeout=1)
    call.start()
    assert call.receive(b"") == b""
    assert call.verdict == "connection closed before the answer"


def test_call_fails_on_an_http1_answer() -> None:
    call = HealthCall("", "a", tls=False, timeout=1)
    call.start()
    call.receive(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert call.verdict == "the endpoint answered in HTTP/1, not HTTP/2"


def test_call_fails_on_bytes_that_are_not_http2() -> None:
    call = HealthCall("", "a", tls=False, timeout=1)
    call.start()
    # a DATA frame on stream 0, which no stream can take
    call.receive(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    assert call.verdict is not None
    assert call.verdict.startswith("HTTP/2 protocol error")


def test_call_fails_on_an_oversized_answer() -> None:
    def answer(s: Server) -> None:
        s.conn.send_headers(s.stream_id, [(b":status", b"200")])
        s.conn.send_data(s.stream_id, bytes(16000))
        s.conn.send_data(s.stream_id, bytes(16000))

    call, _ = exchange(answer)
    assert call.verdict is not None
    assert "longer than" in call.verdict


def test_call_close_sends_goaway() -> None:
    call, server = exchange(lambda s: s.answer(1))
    events = server.conn.receive_data(call.close())
    assert any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
