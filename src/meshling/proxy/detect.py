"""Protocol detection: which protocol a client speaks, told from its first bytes.

A pure function of the bytes received so far, without I/O. A port declared `auto`
peeks at what the client sends and asks `classify`, which answers with a protocol or
with None ("need more bytes"); the acceptor decides what a timeout means.

- http1: a known request method followed by a space (RFC 9110 methods, PATCH, WebDAV);
- h2: the HTTP/2 connection preface of a client with prior knowledge;
- tls: a TLS record header (handshake record type 0x16, major version 3);
- opaque: anything else, as soon as the bytes rule out every protocol above.

A server-speaks-first protocol (SMTP, MySQL, ...) sends nothing from the client's
side, so it is never classified: the detection timeout sends it down the TCP path.
"""

from __future__ import annotations

from typing import Literal

Detected = Literal["http1", "h2", "tls", "opaque"]
DETECTED: tuple[Detected, ...] = ("http1", "h2", "tls", "opaque")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
METHODS = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"PROPFIND",
    b"PROPPATCH",
    b"MKCOL",
    b"COPY",
    b"MOVE",
    b"LOCK",
    b"UNLOCK",
)
TLS_HANDSHAKE = 0x16
TLS_MAJOR_VERSION = 0x03

# Every prefix that decides, with its answer; the longest is the most to peek at.
_SIGNATURES: tuple[tuple[bytes, Detected], ...] = (
    (H2_PREFACE, "h2"),
    *((method + b" ", "http1") for method in METHODS),
    (bytes((TLS_HANDSHAKE, TLS_MAJOR_VERSION)), "tls"),
)
PEEK_BYTES = max(len(signature) for signature, _ in _SIGNATURES)


def classify(data: bytes) -> Detected | None:
    """The protocol the first bytes of a connection belong to; None: need more bytes."""
    if not data:
        return None
    undecided = False
    for signature, protocol in _SIGNATURES:
        if data.startswith(signature):
            return protocol
        if signature.startswith(data[: len(signature)]):
            # the bytes so far are a prefix of this signature: more may complete it
            undecided = True
    return None if undecided else "opaque"
