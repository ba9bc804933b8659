"""gRPC over HTTP/2, as a proxy sees it: deadlines, statuses, and local replies.

A gRPC call is an HTTP/2 request with `content-type: application/grpc…`; its outcome is
the `grpc-status` of the trailers (or of a headers-only response), while `:status` is
200 whenever a server produced the reply. A proxy that answers a call itself (no route,
no endpoint, a timeout) answers the gRPC way too: `:status` 200 with `grpc-status` and
`grpc-message` in one header block, so that clients report the real reason instead of
a protocol error (the mapping follows gRPC's "HTTP to gRPC status code mapping").
"""

from __future__ import annotations

from urllib.parse import quote

OK = 0
CANCELLED = 1
UNKNOWN = 2
DEADLINE_EXCEEDED = 4
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
UNAUTHENTICATED = 16

# Retry conditions (a Retry policy's `retry_on`) that name gRPC statuses.
RETRY_CONDITIONS = {
    "cancelled": CANCELLED,
    "deadline-exceeded": DEADLINE_EXCEEDED,
    "internal": INTERNAL,
    "resource-exhausted": RESOURCE_EXHAUSTED,
    "unavailable": UNAVAILABLE,
}

_UNITS = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}


def parse_timeout(value: bytes) -> float | None:
    """Seconds of a `grpc-timeout` value (at most 8 digits and a unit); None if malformed."""
    digits, unit = value[:-1], value[-1:]
    if not digits or len(digits) > 8 or not digits.isdigit() or unit not in _UNITS:
        return None
    return int(digits) * _UNITS[unit]


def status_of(fields: list[tuple[bytes, bytes]]) -> int | None:
    """The `grpc-status` among header or trailer fields; None when absent or malformed."""
    for name, value in fields:
        if name == b"grpc-status":
            return int(value) if value.isdigit() else None
    return None


def from_http(status: int, reason: str) -> int:
    """The gRPC status of a proxy's own reply with HTTP `status` and error `reason`."""
    if "timeout" in reason:
        return DEADLINE_EXCEEDED
    if status == 400:
        return INTERNAL
    if status == 401:
        return UNAUTHENTICATED
    if status == 403:
        return PERMISSION_DENIED
    if status == 404:
        return UNIMPLEMENTED
    if status in (429, 502, 503, 504):
        return UNAVAILABLE
    return UNKNOWN


def local_reply(status: int, reason: str) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC response for a proxy's own reply: one header block."""
    code = from_http(status, reason)
    return [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", quote(reason.replace("_", " "), safe=" ").encode()),
        (b"x-meshling-error", reason.encode()),
    ]
