"""A small HTTP/1.1 keep-alive client for the demo's services and its traffic loop.

It talks to one address, keeps a few idle connections for reuse, and parses responses
with httptools. It is not on the proxy's hot path: the demo uses it to call `api` from
`web`, to generate traffic, and to read each proxy's admin endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import httptools

_READ_SIZE = 65536
_MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class ClientError(Exception):
    """A request that got no complete response: refused, reset, timed out or malformed."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    # whether the connection may carry another request after this one
    keep_alive: bool = True


@dataclass(slots=True)
class _ResponseReader:
    """httptools callbacks that collect one response."""

    headers: dict[str, str] = field(default_factory=dict)
    body: list[bytes] = field(default_factory=list)
    size: int = 0
    complete: bool = False
    # llhttp forgets this once the message is over, so it is read in the callback
    keep_alive: bool = False
    parser: Any = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > _MAX_RESPONSE_BYTES:
            raise ClientError(f"response body larger than {_MAX_RESPONSE_BYTES} bytes")
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = bool(self.parser.should_keep_alive())


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        self.writer.close()


class HttpClient:
    """GET requests to one host:port over pooled keep-alive connections."""

    def __init__(self, host: str, port: int, *, timeout: float = 5.0, max_idle: int = 32) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._closed = False

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        """Send one GET and return the whole response, or raise ClientError."""
        head = self._request_head(path, headers or {})
        try:
            async with asyncio.timeout(self.timeout):
                while self._idle:
                    # an idle connection may have been closed by the peer meanwhile;
                    # a GET that got no byte back is safe to send again on a new one
                    conn = self._idle.pop()
                    response = await self._exchange(conn, head, reused=True)
                    if response is not None:
                        return response
                conn = await self._open()
                response = await self._exchange(conn, head, reused=False)
                assert response is not None
                return response
        except TimeoutError:
            raise ClientError(f"no response within {self.timeout:g}s") from None

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in idle:
            with contextlib.suppress(OSError):
                await conn.writer.wait_closed()

    def _request_head(self, path: str, headers: dict[str, str]) -> bytes:
        host = headers.get("host", f"{self.host}:{self.port}")
        lines = [f"GET {path} HTTP/1.1", f"host: {host}"]
        lines += [f"{name}: {value}" for name, value in headers.items() if name != "host"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _open(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.host}:{self.port}: {exc}") from None
        return _Connection(reader, writer)

    async def _exchange(self, conn: _Connection, head: bytes, *, reused: bool) -> Response | None:
        """One request on one connection; None if a reused connection was already dead."""
        collected = _ResponseReader()
        parser = collected.parser = httptools.HttpResponseParser(collected)
        received = 0
        try:
            conn.writer.write(head)
            await conn.writer.drain()
            while not collected.complete:
                data = await conn.reader.read(_READ_SIZE)
                if not data:
                    if received == 0 and reused:
                        conn.close()
                        return None
                    # every server here sends Content-Length or chunked, so an end of
                    # stream before the end of the message is a broken response
                    raise ClientError("connection closed before the response was complete")
                received += len(data)
                parser.feed_data(data)
        except (ConnectionError, OSError) as exc:
            conn.close()
            if received == 0 and reused:
                return None
            raise ClientError(f"connection to {self.host}:{self.port} failed: {exc}") from None
        except httptools.HttpParserError as exc:
            conn.close()
            cause = exc.__context__ if isinstance(exc.__context__, ClientError) else exc
            raise ClientError(f"malformed response: {cause}") from None
        except BaseException:
            conn.close()
            raise
        keep_alive = collected.keep_alive
        if keep_alive and not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return Response(
            status=int(parser.get_status_code()),
            headers=collected.headers,
            body=b"".join(collected.body),
            keep_alive=keep_alive,
        )
