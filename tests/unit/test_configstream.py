"""The config stream's messages: round trips, and the errors a broken peer gets."""

from __future__ import annotations

import json

import pytest

from meshling.configstream import (
    Ack,
    Hello,
    Nack,
    ProtocolError,
    Push,
    Refusal,
    TlsPaths,
    decode_client,
    decode_server,
    encode,
)

DATAPLANE = {"kind": "Dataplane", "metadata": {"name": "api-1"}, "spec": {"service": "api"}}


@pytest.mark.parametrize(
    "message",
    [
        Hello(DATAPLANE),
        Hello(DATAPLANE, "abc", TlsPaths("c.pem", "k.pem", "b.pem"), {"version": "0.1.0"}),
        Ack("v1"),
        Nack("v2", "listeners[0].port: cannot listen on 127.0.0.1:80: Permission denied"),
    ],
)
def test_client_messages_round_trip(message: Hello | Ack | Nack) -> None:
    assert decode_client(encode(message)) == message


@pytest.mark.parametrize(
    "message", [Push("v1", {"version": "v1", "listeners": []}), Refusal("forbidden", "no")]
)
def test_server_messages_round_trip(message: Push | Refusal) -> None:
    assert decode_server(encode(message)) == message


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("{", "not JSON"),
        ("[]", "JSON object"),
        ('{"type": "push", "version": "v", "snapshot": {}}', "hello, ack or nack"),
        ('{"type": "hello", "protocol": 2, "dataplane": {}}', "protocol 1"),
        ('{"type": "hello", "protocol": 1, "dataplane": []}', "hello.dataplane"),
        ('{"type": "hello", "protocol": 1, "dataplane": {}, "applied": 3}', "hello.applied"),
        (
            '{"type": "hello", "protocol": 1, "dataplane": {}, "tls_paths": {"key": "k"}}',
            "hello.tls_paths.certificate",
        ),
        ('{"type": "ack"}', "ack.version"),
        ('{"type": "nack", "version": "v"}', "nack.reason"),
    ],
)
def test_bad_client_messages_say_what_is_wrong(text: str, error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        decode_client(text)


def test_bad_server_messages_say_what_is_wrong() -> None:
    with pytest.raises(ProtocolError, match="push or refuse"):
        decode_server(json.dumps({"type": "ack", "version": "v"}))
    with pytest.raises(ProtocolError, match=r"push\.snapshot"):
        decode_server(json.dumps({"type": "push", "version": "v", "snapshot": None}))
    with pytest.raises(ProtocolError, match=r"refuse\.message"):
        decode_server(json.dumps({"type": "refuse", "reason": "x"}))


def test_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="limit"):
        decode_client(" " * (16 * 1024 * 1024 + 1))
