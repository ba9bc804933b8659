"""Header fields between HTTP/2 and HTTP/1.1 (RFC 9113 8.2-8.3).

HTTP/2 carries the request line in pseudo-header fields (`:method`, `:scheme`,
`:authority`, `:path`) and forbids connection-specific fields; HTTP/1.1 carries them in
the request line and `Host`. The `h2` library has already refused malformed blocks
(upper-case names, pseudo-fields after regular ones, connection-specific fields on
input) by the time a block reaches these functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshling.http1.codec import HOP_BY_HOP

Fields = list[tuple[bytes, bytes]]

# never forwarded to an HTTP/2 peer (RFC 9113 8.2.2); `te` is, but only as "trailers"
CONNECTION_SPECIFIC = HOP_BY_HOP | {b"host", b"http2-settings"}


class HeaderError(Exception):
    """A request head that cannot be served; `reason` names what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RequestHead2:
    """An HTTP/2 request's head: the pseudo-header fields and the regular ones."""

    method: bytes
    scheme: bytes
    authority: bytes
    path: bytes
    query: bytes
    # regular fields, lower-case, in order; `cookie` crumbs joined back into one field
    headers: Fields
    content_length: int | None
    # the client's HTTP version: "2", or an HTTP/1.1 request's carried over HTTP/2
    version: bytes = b"2"

    @property
    def host(self) -> bytes:
        return self.authority

    @property
    def target(self) -> bytes:
        return self.path + b"?" + self.query if self.query else self.path

    @property
    def grpc(self) -> bool:
        for name, value in self.headers:
            if name == b"content-type":
                return value.startswith(b"application/grpc")
        return False


def request_head(block: list[tuple[bytes, bytes]]) -> RequestHead2:
    """The head of a request from its decoded header block; HeaderError if unusable."""
    method = scheme = authority = target = None
    headers: Fields = []
    cookies: list[bytes] = []
    content_length: int | None = None
    host = None
    for name, value in block:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":scheme":
                scheme = value
            elif name == b":authority":
                authority = value
            elif name == b":path":
                target = value
            else:
                raise HeaderError(f"pseudo-header {name.decode('latin-1')} not allowed")
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            host = value
            continue
        if name == b"content-length":
            if content_length is not None or not value.isdigit():
                raise HeaderError("invalid content-length")
            content_length = int(value)
        headers.append((name, value))
    if method is None:
        raise HeaderError("missing :method")
    if method == b"CONNECT":
        raise HeaderError("CONNECT not supported")
    if target is None or scheme is None:
        raise HeaderError("missing :path or :scheme")
    if not target or (target[:1] != b"/" and not (target == b"*" and method == b"OPTIONS")):
        raise HeaderError("invalid :path")
    if cookies:
        # RFC 9113 8.2.3: crumbs are joined with "; " before going to HTTP/1.1 or an app
        headers.append((b"cookie", b"; ".join(cookies)))
    path, _, query = target.partition(b"?")
    return RequestHead2(
        method=method,
        scheme=scheme,
        authority=authority if authority is not None else host or b"",
        path=path,
        query=query,
        headers=headers,
        content_length=content_length,
    )


def to_http2(fields: Fields) -> Fields:
    """Regular fields for an HTTP/2 peer: connection-specific ones left out, `te` kept
    only as "trailers"."""
    out: Fields = []
    for name, value in fields:
        if name in CONNECTION_SPECIFIC:
            if name == b"te" and value.strip().lower() == b"trailers":
                out.append((b"te", b"trailers"))
            continue
        out.append((name, value))
    return out


def response_fields(block: list[tuple[bytes, bytes]]) -> tuple[int, Fields]:
    """The status and regular fields of a response header block."""
    status = 0
    fields: Fields = []
    for name, value in block:
        if name == b":status":
            status = int(value) if value.isdigit() else 0
        elif name[:1] != b":":
            fields.append((name, value))
    return status, fields
