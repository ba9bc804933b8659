"""The config stream's messages, as frozen dataclasses, and their JSON text encoding.

Every WebSocket text frame holds one JSON object whose `type` names the message:

proxy -> control plane
    hello  {"type": "hello", "protocol": 1, "dataplane": {Dataplane document},
            "applied": "<version>" | null, "tls_paths": {"certificate", "key",
            "trust_bundle"} | null, "proxy": {"version": "...", ...}}
           the first message, exactly once: registers the dataplane (created or
           updated in the store) and says which snapshot the proxy runs already;
    ack    {"type": "ack", "version": "<version>"}
           the snapshot of that version is running;
    nack   {"type": "nack", "version": "<version>", "reason": "..."}
           the snapshot of that version was refused; the proxy keeps the one it had.

control plane -> proxy
    push   {"type": "push", "version": "<version>", "snapshot": {snapshot document}}
           the snapshot the proxy should run; sent after the hello, then whenever it
           changes. Versions are content hashes: equal versions, equal snapshots;
    refuse {"type": "refuse", "reason": "<word>", "message": "..."}
           the stream is refused (bad hello, a token for another service, ...); the
           control plane closes the connection right after it.

Decoding checks shape and types and raises `ProtocolError` with a reason a person can
act on; it does not validate the Dataplane or the snapshot themselves (their own parsers
do, with field paths).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
STREAM_PATH: Final = "/api/v1/stream"
# a snapshot of a large mesh is a few hundred KiB; anything far beyond is an error
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024


class ProtocolError(ValueError):
    """A message that breaks the protocol; the text says how."""


@dataclass(frozen=True, slots=True)
class TlsPaths:
    """Where the proxy keeps its own certificate, key and trust bundle."""

    certificate: str
    key: str
    trust_bundle: str


@dataclass(frozen=True, slots=True)
class Hello:
    dataplane: dict[str, Any]
    applied: str | None = None
    tls_paths: TlsPaths | None = None
    proxy: dict[str, Any] = field(default_factory=dict)
    protocol: int = PROTOCOL_VERSION


@dataclass(frozen=True, slots=True)
class Ack:
    version: str


@dataclass(frozen=True, slots=True)
class Nack:
    version: str
    reason: str


@dataclass(frozen=True, slots=True)
class Push:
    version: str
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    message: str


ClientMessage = Hello | Ack | Nack
ServerMessage = Push | Refusal


def encode(message: ClientMessage | ServerMessage) -> str:
    """The JSON text frame of a message."""
    body: dict[str, Any]
    if isinstance(message, Hello):
        tls = message.tls_paths
        body = {
            "type": "hello",
            "protocol": message.protocol,
            "dataplane": message.dataplane,
            "applied": message.applied,
            "tls_paths": None
            if tls is None
            else {"certificate": tls.certificate, "key": tls.key, "trust_bundle": tls.trust_bundle},
            "proxy": message.proxy,
        }
    elif isinstance(message, Ack):
        body = {"type": "ack", "version": message.version}
    elif isinstance(message, Nack):
        body = {"type": "nack", "version": message.version, "reason": message.reason}
    elif isinstance(message, Push):
        body = {"type": "push", "version": message.version, "snapshot": message.snapshot}
    else:
        body = {"type": "refuse", "reason": message.reason, "message": message.message}
    return json.dumps(body, separators=(",", ":"))


def encode_push(version: str, snapshot_json: str) -> str:
    """The text frame of a `Push` whose snapshot is already JSON text (one JSON object):
    a control plane that serialised the snapshot to hash it sends that text as it is,
    instead of serialising the document again. Decodes like `encode(Push(...))`."""
    return f'{{"type":"push","version":{json.dumps(version)},"snapshot":{snapshot_json}}}'


def decode_client(text: str | bytes) -> ClientMessage:
    """A message from a proxy. Raises ProtocolError."""
    body = _object(text)
    kind = body.get("type")
    if kind == "hello":
        protocol = body.get("protocol")
        if protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                f"hello.protocol: this control plane speaks protocol {PROTOCOL_VERSION}, "
                f"the proxy sent {protocol!r}"
            )
        dataplane = body.get("dataplane")
        if not isinstance(dataplane, dict):
            raise ProtocolError("hello.dataplane: must be a Dataplane document (a mapping)")
        applied = body.get("applied")
        if applied is not None and not isinstance(applied, str):
            raise ProtocolError(f"hello.applied: must be a version string or null, got {applied!r}")
        proxy = body.get("proxy", {})
        if not isinstance(proxy, dict):
            raise ProtocolError("hello.proxy: must be a mapping")
        return Hello(dataplane, applied, _tls_paths(body.get("tls_paths")), proxy, protocol)
    if kind == "ack":
        return Ack(_string(body, "ack", "version"))
    if kind == "nack":
        return Nack(_string(body, "nack", "version"), _string(body, "nack", "reason"))
    raise ProtocolError(f"type: a proxy sends hello, ack or nack, not {kind!r}")


def decode_server(text: str | bytes) -> ServerMessage:
    """A message from the control plane. Raises ProtocolError."""
    body = _object(text)
    kind = body.get("type")
    if kind == "push":
        snapshot = body.get("snapshot")
        if not isinstance(snapshot, dict):
            raise ProtocolError("push.snapshot: must be a snapshot document (a mapping)")
        return Push(_string(body, "push", "version"), snapshot)
    if kind == "refuse":
        return Refusal(_string(body, "refuse", "reason"), _string(body, "refuse", "message"))
    raise ProtocolError(f"type: a control plane sends push or refuse, not {kind!r}")


def _object(text: str | bytes) -> dict[str, Any]:
    if len(text) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(text)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    try:
        body = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ProtocolError("a message must be a JSON object")
    return body


def _string(body: dict[str, Any], message: str, name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"{message}.{name}: must be a non-empty string, got {value!r}")
    return value


def _tls_paths(raw: Any) -> TlsPaths | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProtocolError("hello.tls_paths: must be a mapping or null")
    paths = {}
    for name in ("certificate", "key", "trust_bundle"):
        value = raw.get(name)
        if not isinstance(value, str) or not value:
            raise ProtocolError(f"hello.tls_paths.{name}: must be a non-empty path")
        paths[name] = value
    return TlsPaths(**paths)
