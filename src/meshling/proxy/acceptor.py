"""Accepting connections ourselves: TLS and protocol sniffing, handshakes, their failures.

`loop.create_server(ssl=...)` hides failed handshakes and cannot serve TLS and
plaintext on one port, so TLS listeners accept sockets themselves. In
permissive mode the first byte decides (a TLS record starts with 0x16, a
handshake); it is read with MSG_PEEK, so the bytes stay in the socket for the
protocol that takes it over. Every refused handshake is counted by reason.

A TLS connection that arrives after the proxy's own certificate expired is closed
before any handshake (`own_certificate_expired`): a listener that cannot prove who it is
serves no new TLS client. Plaintext on a permissive port needs no certificate and is
served as before.

A `protocol: auto` listener is accepted the same way, so that the first bytes can choose
between the HTTP and the TCP path before either sees the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from asyncio.sslproto import SSLProtocol
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshling.proxy.detect import PEEK_BYTES, classify
from meshling.proxy.tls import handshake_failure_reason

if TYPE_CHECKING:
    from meshling.proxy.listener import ChainRuntime, ListenerRuntime

log = logging.getLogger("meshling.proxy")

TLS_HANDSHAKE = 0x16
# Sockets taken from the kernel per wake-up, so one busy listener cannot starve the loop.
ACCEPT_BATCH = 64
# How often a protocol: auto listener looks again at a first segment too short to decide.
DETECT_POLL = 0.005


class AlertingTlsProtocol(SSLProtocol):
    """asyncio's TLS protocol, but a refused handshake sends its alert before closing.

    The stock protocol (asyncio's and uvloop's alike) closes the socket as soon as the
    handshake fails, dropping the alert OpenSSL wrote: the client then sees a bare EOF
    instead of, say, certificate_required, and cannot tell why it was refused.

    Its read buffer is 64 KiB instead of asyncio's 256 KiB: every accepted TLS connection
    allocates one, so a burst of connections (a proxy that was stopped for a while finds
    its accept queue full) otherwise costs 256 KiB each, and the heap keeps that much
    (measured: about 12 MiB more RSS after each 20 s SIGSTOP under load, 3-4 MiB with
    64 KiB). Four TLS records still fit in one read.
    """

    max_size = 64 * 1024

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            with contextlib.suppress(Exception):
                self._process_outgoing()  # type: ignore[attr-defined]
        super()._on_handshake_complete(handshake_exc)


class TlsAcceptor:
    def __init__(
        self, runtime: ListenerRuntime, make: Callable[[ChainRuntime], asyncio.Protocol]
    ) -> None:
        self.runtime = runtime
        self.make = make
        self.loop = asyncio.get_running_loop()
        self.sock: socket.socket | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        config = self.runtime.config
        family = socket.AF_INET6 if ":" in config.address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # as the plaintext listeners: a new proxy process binds the same port while
            # the old one drains, so a restart in place refuses no connection
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((config.address, config.port))
            sock.listen(1024)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, for one
                log.warning("accept on %s failed: %s", self.runtime.config.name, exc)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._serve(conn))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    async def _serve(self, conn: socket.socket, chain: ChainRuntime | None = None) -> None:
        # The chain current when the connection arrived serves it to the end (a
        # transparent listener's acceptor passes the one it picked).
        chain = chain or self.runtime.chain
        tls = chain.tls
        assert tls is not None
        use_tls = True

        def factory() -> asyncio.Protocol:
            return self.make(chain)

        try:
            if tls.config.mode == "permissive":
                first = await self._peek(conn, tls.config.detect_timeout)
                if not first:
                    conn.close()
                    return
                use_tls = first[0] == TLS_HANDSHAKE
            if use_tls and tls.own.expired(time.time()):
                tls.own.refuse()
                conn.close()
                return
            if use_tls:
                handshake = self.loop.create_future()
                tls_protocol = AlertingTlsProtocol(
                    self.loop,
                    factory(),
                    tls.context,
                    handshake,
                    server_side=True,
                    ssl_handshake_timeout=tls.config.handshake_timeout,  # type: ignore[arg-type]
                )
                await self.loop.connect_accepted_socket(lambda: tls_protocol, conn)
                await handshake
            else:
                await self.loop.connect_accepted_socket(factory, conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except (OSError, TimeoutError) as exc:
            tls.stats.fail(handshake_failure_reason(exc))
            log.debug("handshake on %s refused: %s", self.runtime.config.name, exc)
            conn.close()

    async def _peek(self, conn: socket.socket, timeout: float) -> bytes:
        """The first byte the client sent, left in the socket; b"" if none in time."""
        ready = self.loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = conn.fileno()
        self.loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return b""
        finally:
            self.loop.remove_reader(fd)
        try:
            return conn.recv(1, socket.MSG_PEEK)
        except OSError:
            return b""

    def close(self) -> None:
        """Stop accepting; connections not yet handed over are dropped."""
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for task in list(self.pending):
            task.cancel()


class DetectingAcceptor(TlsAcceptor):
    """Accepting on a `protocol: auto` listener: HTTP/1 to the http filter, the rest to tcp.

    The client's first bytes are peeked at (MSG_PEEK, so they stay in the socket for the
    protocol that takes it over) until `detect.classify` decides. HTTP/2 with prior
    knowledge is served by the http filter too; TLS is passed through as TCP. A client that sends nothing decisive
    within the chain's detection timeout is served as TCP: that is how a
    server-speaks-first protocol, whose client waits for the server's greeting, works.
    """

    def __init__(
        self,
        runtime: ListenerRuntime,
        make_http: Callable[[ChainRuntime], asyncio.Protocol],
        make_tcp: Callable[[ChainRuntime], asyncio.Protocol],
    ) -> None:
        super().__init__(runtime, make_tcp)
        self.make_http = make_http

    async def _serve(self, conn: socket.socket, chain: ChainRuntime | None = None) -> None:
        chain = chain or self.runtime.chain
        detection = chain.detection
        stats = chain.detection_stats
        assert detection is not None and stats is not None
        started = time.monotonic()
        try:
            data = await self._peek_bytes(conn, detection.timeout)
            if data == b"":
                conn.close()  # closed (or failed) before saying anything
                return
            protocol = classify(data) if data is not None else None
            while data is not None and protocol is None:
                # A first segment too short to decide: the bytes stay readable, so wait
                # for more by polling instead of by readiness, until the deadline.
                remaining = started + detection.timeout - time.monotonic()
                if remaining <= 0:
                    break
                await asyncio.sleep(min(DETECT_POLL, remaining))
                data = self._peek_now(conn)
                protocol = classify(data) if data else None
            stats.record(protocol or "opaque", time.monotonic() - started, protocol is None)
            # HTTP/2 with prior knowledge takes the HTTP path too, which hands it over
            make = self.make_http if protocol in ("http1", "h2") else self.make
            await self.loop.connect_accepted_socket(lambda: make(chain), conn)
        except asyncio.CancelledError:
            conn.close()
            raise
        except OSError as exc:
            log.debug("connection on %s lost while detecting: %s", self.runtime.config.name, exc)
            conn.close()

    async def _peek_bytes(self, conn: socket.socket, timeout: float) -> bytes | None:
        """What the client sent first, left in the socket; None if nothing came in time."""
        ready = self.loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        fd = conn.fileno()
        self.loop.add_reader(fd, readable)
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            return None
        finally:
            self.loop.remove_reader(fd)
        return self._peek_now(conn)

    def _peek_now(self, conn: socket.socket) -> bytes:
        """The bytes waiting in the socket, left there; b"" at the end or on an error."""
        try:
            return conn.recv(PEEK_BYTES, socket.MSG_PEEK)
        except OSError:
            return b""
