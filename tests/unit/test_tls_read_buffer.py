"""The inbound TLS protocol's read buffer: what one accepted TLS connection costs."""

from __future__ import annotations

import asyncio
import ssl

from meshling.proxy.acceptor import AlertingTlsProtocol


def test_alerting_tls_protocol_reads_into_a_64_kib_buffer() -> None:
    async def buffer_size() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        protocol = AlertingTlsProtocol(
            loop, asyncio.Protocol(), context, loop.create_future(), server_side=True
        )
        # the transport asks for a buffer with no size hint, and with a hint over the cap
        return len(protocol.get_buffer(-1)), len(protocol.get_buffer(1 << 20))

    assert asyncio.run(buffer_size()) == (64 * 1024, 64 * 1024)
