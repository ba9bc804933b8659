"""The demo's sample services in Python: small HTTP/1.1 servers that the mesh sits next to.

`api` answers JSON about itself after a little random latency, fails ~2% of the time (so
that the proxies' metrics have something to show) and, given `--upstream-port`, asks the
store through its local proxy's outbound listener and includes the answer. `web` answers
each request by calling `api` through its local proxy's outbound listener and combining
the answers. Neither knows anything of TLS or identities: their proxies do that.

Run one as a process::

    python -m meshling.demo.services api --port 8081 --instance api-1 --upstream-port 15002
    python -m meshling.demo.services web --port 8080 --instance web --upstream-port 15001

Each is an asyncio server (uvloop) with httptools parsing, keep-alive and pipelining;
it stops on SIGTERM or SIGINT after finishing the requests it is serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import httptools
import uvloop

from meshling.demo.client import ClientError, HttpClient

_READ_SIZE = 65536
_MAX_HEAD_BYTES = 65536
_MAX_BODY_BYTES = 1024 * 1024
_IDLE_TIMEOUT = 60.0


@dataclass(slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass(slots=True)
class Reply:
    status: int
    document: dict[str, Any]


Service = Callable[[Request], Awaitable[Reply]]


class _RequestCollector:
    """httptools callbacks that turn the bytes of a connection into whole requests."""

    def __init__(self) -> None:
        # per-connection
        self.parser = httptools.HttpRequestParser(self)
        self.ready: list[Request] = []
        # bytes received since the current request head began, to bound it
        self.in_head = True
        self.head_bytes = 0
        # per-request
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0

    def on_message_begin(self) -> None:
        self.in_head = True
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0

    def on_body(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > _MAX_BODY_BYTES:
            raise ValueError("request body too large")
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        self.in_head = True
        self.head_bytes = 0
        self.ready.append(
            Request(
                method=self.parser.get_method().decode("ascii"),
                path=self._url.decode("latin-1"),
                headers=self._headers,
                body=b"".join(self._body),
                keep_alive=bool(self.parser.should_keep_alive()),
            )
        )


def _encode(reply: Reply, *, keep_alive: bool) -> bytes:
    body = json.dumps(reply.document, separators=(",", ":")).encode()
    try:
        reason = HTTPStatus(reply.status).phrase
    except ValueError:
        reason = "Unknown"
    head = (
        f"HTTP/1.1 {reply.status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"{'' if keep_alive else 'connection: close' + chr(13) + chr(10)}"
        "\r\n"
    )
    return head.encode("latin-1") + body


class HttpServer:
    """Serves one `Service` on 127.0.0.1:port; `stop()` lets in-flight requests finish."""

    def __init__(self, service: Service, port: int, address: str = "127.0.0.1") -> None:
        self.service = service
        self.address = address
        self.port = port
        # server state
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._waiting: set[asyncio.Task[None]] = set()  # between requests
        self._stopping = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.address, self.port)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self, deadline: float = 5.0) -> None:
        # 1. stop accepting
        self._stopping = True
        if self._server is not None:
            self._server.close()
        # 2. connections waiting for a request close now; busy ones answer their
        #    current request with `connection: close` and then close
        for task in self._connections & self._waiting:
            task.cancel()
        # 3. wait for those with a deadline, then cancel what is left
        if self._connections:
            _, pending = await asyncio.wait(self._connections, timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            if not self._stopping:
                await self._serve(task, reader, writer)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            self._waiting.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _serve(
        self,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        collector = _RequestCollector()
        while not self._stopping:
            self._waiting.add(task)
            try:
                data = await asyncio.wait_for(reader.read(_READ_SIZE), _IDLE_TIMEOUT)
            except TimeoutError:
                return
            finally:
                self._waiting.discard(task)
            if not data:
                return
            if collector.in_head:
                collector.head_bytes += len(data)
            try:
                collector.parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                writer.write(_encode(Reply(400, {"error": "malformed request"}), keep_alive=False))
                return
            if collector.in_head and collector.head_bytes > _MAX_HEAD_BYTES:
                reply = Reply(431, {"error": "request head too large"})
                writer.write(_encode(reply, keep_alive=False))
                return
            while collector.ready:
                request = collector.ready.pop(0)
                reply = await self._call(request)
                keep_alive = request.keep_alive and not self._stopping
                writer.write(_encode(reply, keep_alive=keep_alive))
                await writer.drain()
                if not keep_alive:
                    return

    async def _call(self, request: Request) -> Reply:
        try:
            return await self.service(request)
        except Exception as exc:
            return Reply(500, {"error": f"{type(exc).__name__}: {exc}"})


async def call_upstream(
    upstream: HttpClient, service: str, request: Request, document: dict[str, Any]
) -> Reply | None:
    """Ask `service` through the local proxy's outbound and put its answer in `document`
    under the service's name. None if it answered 2xx or 3xx; otherwise the reply to give
    instead: its own status for a 4xx (a 403 from the mesh says the call was not
    permitted, and the caller should see that), 502 for a 5xx or no answer at all."""
    headers = {"host": service}
    # pass the request id on so that the hops of one request can be matched up
    if "x-request-id" in request.headers:
        headers["x-request-id"] = request.headers["x-request-id"]
    try:
        answer = await upstream.get(request.path, headers)
    except ClientError as exc:
        document["error"] = f"{service} unreachable: {exc}"
        return Reply(502, document)
    try:
        document[service] = json.loads(answer.body)
    except ValueError:
        document[service] = {"status": answer.status, "body": answer.body[:200].decode("latin-1")}
    if answer.status < 400:
        return None
    document["error"] = f"{service} answered {answer.status}"
    return Reply(answer.status if answer.status < 500 else 502, document)


@dataclass
class ApiService:
    """One instance of `api`: JSON about itself (and the store's answer), a little
    latency, a few failures."""

    instance: str
    error_rate: float = 0.02
    # median latency; the tail is longer, as real services' are
    latency: float = 0.004
    rng: random.Random = field(default_factory=random.Random)
    # the local proxy's outbound to the store; None: api answers on its own
    store: HttpClient | None = None

    async def __call__(self, request: Request) -> Reply:
        delay = self.rng.lognormvariate(0.0, 0.5) * self.latency
        if self.rng.random() < 0.01:
            delay += self.rng.uniform(0.02, 0.08)
        await asyncio.sleep(delay)
        document: dict[str, Any] = {
            "service": "api",
            "instance": self.instance,
            "path": request.path,
        }
        if self.rng.random() < self.error_rate:
            document["error"] = "simulated failure"
            return Reply(500, document)
        if self.store is not None:
            refused = await call_upstream(self.store, "store", request, document)
            if refused is not None:
                return refused
        return Reply(200, document)


@dataclass
class WebService:
    """The one instance of `web`: asks `api` (through the local proxy) and combines."""

    instance: str
    upstream: HttpClient

    async def __call__(self, request: Request) -> Reply:
        document: dict[str, Any] = {
            "service": "web",
            "instance": self.instance,
            "path": request.path,
        }
        refused = await call_upstream(self.upstream, "api", request, document)
        return refused if refused is not None else Reply(200, document)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m meshling.demo.services", description="Run one demo service."
    )
    parser.add_argument("service", choices=["api", "web"])
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--instance", required=True, help="instance name, e.g. v1")
    parser.add_argument(
        "--upstream-port",
        type=int,
        help="the local proxy's outbound listener port for the service this one calls "
        "(web: api, required; api: store, optional)",
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.02, help="api only: share of 500 answers"
    )
    parser.add_argument(
        "--latency-ms", type=float, default=4.0, help="api only: median answer time"
    )
    parser.add_argument("--seed", type=int, help="random seed, for repeatable runs")
    args = parser.parse_args(argv)
    if args.service == "web" and args.upstream_port is None:
        parser.error("web needs --upstream-port")
    if not 0.0 <= args.error_rate <= 1.0:
        parser.error("--error-rate must be between 0 and 1")
    if not 0.0 <= args.latency_ms <= 10000:
        parser.error("--latency-ms must be between 0 and 10000")
    return args


async def serve(args: argparse.Namespace) -> None:
    """Run the chosen service until SIGTERM or SIGINT."""
    upstream: HttpClient | None = None
    if args.upstream_port is not None:
        upstream = HttpClient("127.0.0.1", args.upstream_port, timeout=10.0)
    service: Service
    if args.service == "api":
        service = ApiService(
            args.instance,
            error_rate=args.error_rate,
            latency=args.latency_ms / 1000,
            rng=random.Random(args.seed),
            store=upstream,
        )
    else:
        assert upstream is not None
        service = WebService(args.instance, upstream)
    server = HttpServer(service, args.port)
    await server.start()
    print(f"{args.service} {args.instance} listening on 127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop()
    if upstream is not None:
        await upstream.close()
    print(f"{args.service} {args.instance} stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(sys.argv[1:] if argv is None else argv)
    try:
        uvloop.run(serve(args))
    except OSError as exc:
        print(f"{args.service} {args.instance}: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
