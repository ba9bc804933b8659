"""The admin listener: readiness, liveness, the running config, metrics, and drain.

It binds to loopback unless the snapshot says otherwise, and anything that
changes state (``POST /drain``) needs the admin token as a bearer token.

    GET  /ready    200 while serving, 503 before start and while draining
    GET  /live     200 while the process runs its event loop
    GET  /config   the running snapshot and its version, as JSON
    GET  /metrics  Prometheus text exposition
    POST /drain    graceful shutdown: stop accepting, finish requests, exit 0
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from typing import TYPE_CHECKING, Any, cast

from meshling.http1 import (
    Data,
    EndOfMessage,
    ParseError,
    RequestDecoder,
    RequestHead,
    Upgraded,
    encode_response_head,
)

if TYPE_CHECKING:
    from meshling.proxy.server import Proxy

JSON = b"application/json"
TEXT = b"text/plain; charset=utf-8"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
# Admin requests have no business carrying large bodies.
MAX_BODY = 64 * 1024


def snapshot_json(value: Any) -> Any:
    """The snapshot as plain JSON values (compiled patterns shown as their source)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: snapshot_json(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.compare
        }
    if isinstance(value, dict):
        return {str(k): snapshot_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [snapshot_json(v) for v in value]
    if isinstance(value, frozenset):
        return sorted(snapshot_json(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, re.Pattern):
        return value.pattern
    return value


class AdminProtocol(asyncio.Protocol):
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.decoder = RequestDecoder()
        self.head: RequestHead | None = None
        self.body_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.decoder.feed(data)
        except ParseError as exc:
            self.respond(exc.status, TEXT, exc.reason.encode() + b"\n", close=True)
            return
        for event in events:
            if isinstance(event, RequestHead):
                self.head = event
                self.body_size = 0
            elif isinstance(event, Data):
                self.body_size += len(event.data)
                if self.body_size > MAX_BODY:
                    self.respond(413, TEXT, b"request body too large\n", close=True)
                    return
            elif isinstance(event, EndOfMessage) and self.head is not None:
                head, self.head = self.head, None
                self.handle(head)
            elif isinstance(event, Upgraded):
                self.respond(400, TEXT, b"upgrade not supported\n", close=True)
                return

    def handle(self, head: RequestHead) -> None:
        proxy = self.proxy
        path = head.path
        method = head.method
        close = not head.keep_alive
        if path == b"/drain":
            if method != b"POST":
                self.respond(405, TEXT, b"use POST\n", close, [(b"allow", b"POST")])
            elif not self.authorized(head):
                self.respond(401, TEXT, b"a valid admin token is required\n", close)
            else:
                self.respond(202, TEXT, b"draining\n", close=True)
                proxy.begin_drain()
            return
        if method not in (b"GET", b"HEAD"):
            self.respond(405, TEXT, b"method not allowed\n", close, [(b"allow", b"GET, HEAD")])
        elif path == b"/ready":
            if proxy.ready and not proxy.draining:
                self.respond(200, TEXT, b"ready\n", close)
            else:
                self.respond(503, TEXT, b"draining\n" if proxy.draining else b"starting\n", close)
        elif path == b"/live":
            self.respond(200, TEXT, b"live\n", close)
        elif path == b"/config":
            body = {"version": proxy.snapshot.version, "snapshot": snapshot_json(proxy.snapshot)}
            self.respond(200, JSON, json.dumps(body, indent=2).encode() + b"\n", close)
        elif path == b"/metrics":
            self.respond(200, PROMETHEUS, proxy.metrics.render(), close)
        else:
            self.respond(404, TEXT, b"not found: try /ready /live /config /metrics /drain\n", close)

    def authorized(self, head: RequestHead) -> bool:
        import hmac  # only here: it loads OpenSSL's digests, which nothing else needs

        token = self.proxy.snapshot.admin.token
        if not token:
            return False
        for name, value in head.headers:
            if name == b"authorization" and value.startswith(b"Bearer "):
                return hmac.compare_digest(value[7:].strip(), token.encode())
        return False

    def respond(
        self,
        status: int,
        content_type: bytes,
        body: bytes,
        close: bool = False,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        headers.extend(extra or ())
        if close:
            headers.append((b"connection", b"close"))
        self.transport.write(encode_response_head(status, b"", headers) + body)
        if close:
            self.transport.close()


async def start_admin(proxy: Proxy) -> asyncio.Server:
    admin = proxy.snapshot.admin
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: AdminProtocol(proxy),
        admin.address,
        admin.port,
        reuse_address=True,
        # shared with a successor process during a restart, like the listeners
        reuse_port=True,
    )
