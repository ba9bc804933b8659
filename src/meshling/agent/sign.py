"""The certificate request: `POST {cp}/api/v1/ca/sign` with the dataplane token.

Request `{"csr": PEM, "dataplane": NAME}`; answer `{"certificate", "bundle", "identity",
"expires"}`. One short HTTP/1.1 exchange on its own connection, read with the proxy's own
codec: the proxy does not load an HTTP client library for one request a day.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from meshling.http1 import (
    Data,
    EndOfMessage,
    ParseError,
    ResponseDecoder,
    ResponseHead,
    encode_request_head,
)

SIGN_PATH: Final = "/api/v1/ca/sign"
MAX_RESPONSE: Final = 1024 * 1024
TIMEOUT: Final = 10.0


class SignError(Exception):
    """The certificate request failed: why, and the HTTP status if there was one."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status

    @property
    def refused(self) -> bool:
        """The control plane answered and said no to this token (not a network error)."""
        return self.status in (401, 403)


@dataclass(frozen=True, slots=True)
class SignedCertificate:
    certificate: bytes
    bundle: bytes
    identity: str
    expires: str


async def request_certificate(
    base_url: str,
    token: str,
    dataplane: str,
    csr: bytes,
    *,
    timeout: float = TIMEOUT,
    tls: ssl.SSLContext | None = None,
) -> SignedCertificate:
    """Have the control plane at `base_url` sign `csr`. Raises SignError.

    `tls` verifies an `https://` control plane (default: the system's trusted CAs).
    """
    body = json.dumps({"csr": csr.decode("ascii"), "dataplane": dataplane}).encode()
    try:
        async with asyncio.timeout(timeout):
            status, answer = await _post(base_url, SIGN_PATH, token, body, tls)
    except TimeoutError:
        raise SignError(f"no answer from {base_url} within {timeout:g}s") from None
    except ssl.SSLError as exc:
        raise SignError(f"TLS with {base_url} failed: {exc.reason or exc}") from None
    except OSError as exc:
        raise SignError(f"cannot reach {base_url}: {exc.strerror or exc}") from None
    except ParseError as exc:
        raise SignError(f"{base_url} sent a malformed response: {exc.reason}") from None
    try:
        document = json.loads(answer)
    except ValueError:
        document = None
    if status != 200:
        message = document.get("error") if isinstance(document, dict) else None
        raise SignError(
            f"{base_url}{SIGN_PATH} answered {status}: "
            f"{message or answer[:200].decode('utf-8', 'replace')}",
            status,
        )
    return _signed(base_url, document)


def _signed(base_url: str, document: Any) -> SignedCertificate:
    fields = ("certificate", "bundle", "identity", "expires")
    if not isinstance(document, dict) or not all(
        isinstance(document.get(name), str) and document[name] for name in fields
    ):
        raise SignError(f"{base_url}{SIGN_PATH}: the answer lacks one of {', '.join(fields)}")
    return SignedCertificate(
        document["certificate"].encode(),
        document["bundle"].encode(),
        document["identity"],
        document["expires"],
    )


async def _post(
    base_url: str, path: str, token: str, body: bytes, tls: ssl.SSLContext | None
) -> tuple[int, bytes]:
    parts = urlsplit(base_url)
    secure = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    context = (tls or ssl.create_default_context()) if secure else None
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    try:
        authority = parts.netloc.rpartition("@")[2].encode("idna")
        headers = [
            (b"host", authority),
            (b"authorization", b"Bearer " + token.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        target = (parts.path.rstrip("/") + path).encode()
        writer.write(encode_request_head(b"POST", target, headers) + body)
        await writer.drain()
        decoder = ResponseDecoder()
        decoder.expect(b"POST")
        status = 0
        answer = bytearray()
        while True:
            chunk = await reader.read(65536)
            events = decoder.feed(chunk) if chunk else decoder.feed_eof()
            for event in events:
                if isinstance(event, ResponseHead):
                    status = event.status
                elif isinstance(event, Data):
                    answer += event.data
                    if len(answer) > MAX_RESPONSE:
                        raise ParseError("response body over 1 MiB", 502)
                elif isinstance(event, EndOfMessage):
                    return status, bytes(answer)
            if not chunk:
                raise ConnectionResetError(0, "connection closed before the response ended")
    finally:
        writer.close()
