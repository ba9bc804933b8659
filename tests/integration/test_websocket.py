"""WebSocket through two proxies: client -> proxy A (outbound) -> proxy B (inbound) ->
a real `websockets` server, plaintext and with mTLS between the proxies: the upgrade,
messages both ways (one of 1 MiB), a clean close seen by both ends, and no connection
left open in either proxy afterwards."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.sync.client import connect

from .conftest import free_port, http_snapshot, wait_for
from .test_mtls import Pki, inbound, outbound

pytestmark = pytest.mark.integration

MESSAGE_LIMIT = 4 * 1024 * 1024


class EchoWebSocketServer:
    """Greets each client, echoes every message, and records how each connection closed."""

    def __init__(self) -> None:
        self.port = free_port()
        self.close_codes: list[int | None] = []
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.stopping: asyncio.Future[None] | None = None
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self.run(),))
        self.thread.start()
        assert self.started.wait(10), "websocket server did not start"

    async def handle(self, ws: ServerConnection) -> None:
        await ws.send("hello from the server")
        async for message in ws:
            await ws.send(message)
        # the iteration ends once the closing handshake is done
        self.close_codes.append(ws.close_code)

    async def run(self) -> None:
        self.stopping = self.loop.create_future()
        async with serve(self.handle, "127.0.0.1", self.port, max_size=MESSAGE_LIMIT):
            self.started.set()
            await self.stopping

    def close(self) -> None:
        assert self.stopping is not None
        self.loop.call_soon_threadsafe(self.stopping.set_result, None)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def ws_server() -> Iterator[EchoWebSocketServer]:
    server = EchoWebSocketServer()
    yield server
    server.close()


def gauge(text: str, prefix: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def open_connections(proxy: Any) -> float:
    """Downstream and upstream connections the proxy still holds open."""
    metrics = proxy.metrics()
    return gauge(metrics, "meshling_downstream_connections_active") + gauge(
        metrics, "meshling_upstream_connections_active"
    )


@pytest.mark.parametrize("security", ["plaintext", "mtls"])
def test_websocket_through_two_proxies(
    start_proxy, ws_server: EchoWebSocketServer, tmp_path: Path, security: str
) -> None:
    if security == "mtls":
        pki = Pki(tmp_path)
        proxy_b = start_proxy(inbound(ws_server.port, pki.issue("api")))
        proxy_a = start_proxy(outbound(proxy_b.port, pki.issue("web")))
    else:
        proxy_b = start_proxy(http_snapshot(free_port(), free_port(), [ws_server.port]))
        proxy_a = start_proxy(http_snapshot(free_port(), free_port(), [proxy_b.port]))

    large = os.urandom(1024 * 1024)
    with connect(
        f"ws://127.0.0.1:{proxy_a.port}/chat", max_size=MESSAGE_LIMIT, open_timeout=5
    ) as ws:
        assert ws.recv(timeout=5) == "hello from the server"
        for i in range(20):
            ws.send(f"message {i}")
            assert ws.recv(timeout=5) == f"message {i}"
        ws.send(large)
        assert ws.recv(timeout=10) == large
        # the tunnel is open in both proxies (what must return to zero below)
        assert open_connections(proxy_a) >= 2 and open_connections(proxy_b) >= 2
        ws.send(b"\x00binary\xff")
        assert ws.recv(timeout=5) == b"\x00binary\xff"
        ws.close(code=1000, reason="done")
        # the server answered the close frame with its own, code 1000
        received = ws.protocol.close_rcvd
        assert received is not None and received.code == 1000 and ws.close_code == 1000

    wait_for(lambda: ws_server.close_codes == [1000], 5, "the server saw the close")
    # both proxies let go of both sides of the tunnel
    for proxy in (proxy_a, proxy_b):
        wait_for(lambda p=proxy: open_connections(p) == 0, 5, "connections closed")
    if security == "mtls":
        handshakes = gauge(proxy_b.metrics(), "meshling_tls_handshakes_total")
        assert handshakes == 1
