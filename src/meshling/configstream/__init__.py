"""The config stream: how the control plane pushes snapshots to a proxy, and how the
proxy says whether it applied them. Shared by both planes, so it imports nothing but
the standard library.

* `messages` — the messages and their JSON encoding (sans-I/O): `Hello`, `Ack`, `Nack`
  from the proxy; `Push`, `Refusal` from the control plane; and, between peers that both
  announced them, the telemetry ones: `Stats`, `TapEvents` up, `TelemetryOffer`, `Tap`,
  `Untap` down.

The transport is a WebSocket at `/api/v1/stream`; see `docs/config-stream.md`.
"""

from meshling.configstream.messages import (
    PROTOCOL_VERSION,
    STREAM_PATH,
    Ack,
    ClientMessage,
    Hello,
    Nack,
    ProtocolError,
    Push,
    Refusal,
    ServerMessage,
    TlsPaths,
    decode_client,
    decode_server,
    encode,
    encode_push,
)

__all__ = [
    "PROTOCOL_VERSION",
    "STREAM_PATH",
    "Ack",
    "ClientMessage",
    "Hello",
    "Nack",
    "ProtocolError",
    "Push",
    "Refusal",
    "ServerMessage",
    "TlsPaths",
    "decode_client",
    "decode_server",
    "encode",
    "encode_push",
]
