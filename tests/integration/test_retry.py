"""Retry end to end: a real proxy process in front of real failing upstreams (sockets in
this process): one that answers 503 before it recovers, one that resets connections,
one that stalls, one that dies mid-test, and one that always fails (the budget)."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from .conftest import free_port, http_snapshot

pytestmark = pytest.mark.integration

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy"
# what a scripted upstream does with request number n (0-based, over all its connections)
RESET, STALL = "reset", "stall"
Action = bytes | str


@dataclass
class ScriptedUpstream:
    """A raw HTTP/1.1 upstream whose answer to each request is chosen by `script(n)`:
    response bytes, RESET (the connection is reset), or STALL (never answered; the
    upstream waits for the proxy to end the connection, and notes when it did)."""

    script: Callable[[int], Action]
    port: int = field(default_factory=free_port)
    requests: list[bytes] = field(default_factory=list)
    # monotonic times at which the proxy ended a stalled connection
    ended: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: socket.socket | None = None
    _conns: list[socket.socket] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> ScriptedUpstream:
        self._server = socket.create_server(("127.0.0.1", self.port), backlog=128)
        self._server.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    @property
    def count(self) -> int:
        with self._lock:
            return len(self.requests)

    def die(self) -> None:
        """Stop at once, as a crashed process would: nothing listens, open
        connections are reset."""
        self._stop.set()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            _reset(conn)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(buffer) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                request, buffer = head + b"\r\n\r\n" + buffer[:length], buffer[length:]
                with self._lock:
                    n = len(self.requests)
                    self.requests.append(request)
                action = self.script(n)
                if action == RESET:
                    _reset(conn)
                    return
                if action == STALL:
                    conn.settimeout(30)
                    try:
                        while conn.recv(65536):
                            pass
                    except OSError:
                        pass
                    self.ended.append(time.monotonic())
                    return
                assert isinstance(action, bytes)
                conn.sendall(action)
        except OSError:
            return
        finally:
            conn.close()

    def close(self) -> None:
        self.die()


def _reset(conn: socket.socket) -> None:
    """Close with a RST instead of a FIN."""
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    except OSError:
        pass


Upstreams = Callable[[Callable[[int], Action]], ScriptedUpstream]


def scripted_upstreams() -> Iterator[Upstreams]:
    """Make scripted upstreams; all of them stop when the generator resumes."""
    started: list[ScriptedUpstream] = []

    def make(script: Callable[[int], Action]) -> ScriptedUpstream:
        upstream = ScriptedUpstream(script).start()
        started.append(upstream)
        return upstream

    yield make
    for upstream in started:
        upstream.close()


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    yield from scripted_upstreams()


def request(
    port: int,
    method: str = "GET",
    body: bytes = b"",
    path: str = "/",
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: (status, headers, body)."""
    head = f"{method} {path} HTTP/1.1\r\nhost: api\r\nconnection: close\r\n"
    if body or method in ("POST", "PUT"):
        head += f"content-length: {len(body)}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return parse_response(data)


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


def retry_snapshot(endpoints: list[int], retry: dict[str, Any], **route: Any) -> dict[str, Any]:
    routes = [{"name": "api", "cluster": "up", "retry": retry, **route}]
    return http_snapshot(free_port(), free_port(), endpoints, routes=routes)


FAST = {"base": "5ms", "max": "20ms"}


def test_retry_hides_503s_until_the_upstream_recovers(start_proxy, upstreams) -> None:
    upstream = upstreams(lambda n: UNAVAILABLE if n < 2 else OK)
    proxy = start_proxy(retry_snapshot([upstream.port], {"max_attempts": 3, "backoff": FAST}))
    status, headers, body = request(proxy.port)
    assert (status, body) == (200, b"ok")
    assert headers["x-meshling-attempts"] == "3"
    assert upstream.count == 3
    # the next request succeeds at once, and says so
    status, headers, _ = request(proxy.port)
    assert (status, headers["x-meshling-attempts"]) == (200, "1")
    metrics = proxy.metrics()
    assert 'meshling_http_retries_total{cluster="up",listener="in",route="api"} 2.0' in metrics


def test_retry_gives_up_after_max_attempts_and_forwards_the_last_answer(
    start_proxy, upstreams
) -> None:
    upstream = upstreams(lambda n: UNAVAILABLE)
    proxy = start_proxy(retry_snapshot([upstream.port], {"max_attempts": 3, "backoff": FAST}))
    status, headers, body = request(proxy.port)
    assert (status, body) == (503, b"busy")
    assert headers["x-meshling-attempts"] == "3"
    assert "x-meshling-error" not in headers  # the upstream's own answer
    assert upstream.count == 3


def test_retry_after_connection_reset(start_proxy, upstreams) -> None:
    upstream = upstreams(lambda n: RESET if n == 0 else OK)
    proxy = start_proxy(retry_snapshot([upstream.port], {"backoff": FAST}))
    status, headers, _ = request(proxy.port)
    assert (status, headers["x-meshling-attempts"]) == (200, "2")
    assert upstream.count == 2


def test_retry_reset_not_retried_without_the_condition(start_proxy, upstreams) -> None:
    upstream = upstreams(lambda n: RESET if n == 0 else OK)
    proxy = start_proxy(retry_snapshot([upstream.port], {"retry_on": ["5xx"]}))
    status, headers, _ = request(proxy.port)
    assert (status, headers["x-meshling-error"], headers["x-meshling-attempts"]) == (
        502,
        "upstream_reset",
        "1",
    )


def test_retry_post_is_not_retried_by_default(start_proxy, upstreams) -> None:
    upstream = upstreams(lambda n: UNAVAILABLE if n == 0 else OK)
    proxy = start_proxy(retry_snapshot([upstream.port], {"backoff": FAST}))
    status, headers, _ = request(proxy.port, "POST", b"order=1")
    assert (status, headers["x-meshling-attempts"]) == (503, "1")
    assert upstream.count == 1


def test_retry_post_is_retried_when_listed(start_proxy, upstreams) -> None:
    upstream = upstreams(lambda n: UNAVAILABLE if n == 0 else OK)
    proxy = start_proxy(retry_snapshot([upstream.port], {"methods": ["POST"], "backoff": FAST}))
    status, headers, _ = request(proxy.port, "POST", b"order=1")
    assert (status, headers["x-meshling-attempts"]) == (200, "2")
    # the body was sent again, byte for byte
    assert upstream.requests[0].endswith(b"\r\n\r\norder=1")
    assert upstream.requests[1].endswith(b"\r\n\r\norder=1")


def test_retry_replays_the_body_and_refuses_bodies_over_the_limit(start_proxy, upstreams) -> None:
    upstream = upstreams(lambda n: UNAVAILABLE if n in (0, 2) else OK)
    proxy = start_proxy(
        retry_snapshot([upstream.port], {"max_body": 4096, "backoff": FAST}, timeout="5s")
    )
    small = bytes(range(256)) * 8  # 2 KiB, kept
    status, headers, _ = request(proxy.port, "PUT", small)
    assert (status, headers["x-meshling-attempts"]) == (200, "2")
    assert upstream.requests[1].endswith(small)
    large = b"x" * 8192  # over max_body: answered by the first attempt
    status, headers, _ = request(proxy.port, "PUT", large)
    assert (status, headers["x-meshling-attempts"]) == (503, "1")
    assert upstream.count == 3
    assert 'reason="body_too_large",route="api"} 1.0' in proxy.metrics()


def test_retry_status_codes_listed(start_proxy, upstreams) -> None:
    conflict = b"HTTP/1.1 409 Conflict\r\ncontent-length: 0\r\n\r\n"
    upstream = upstreams(lambda n: conflict if n == 0 else OK)
    proxy = start_proxy(
        retry_snapshot([upstream.port], {"retry_on": [], "status_codes": [409], "backoff": FAST})
    )
    status, headers, _ = request(proxy.port)
    assert (status, headers["x-meshling-attempts"]) == (200, "2")


def test_retry_moves_to_the_other_endpoint_when_one_dies(start_proxy, upstreams) -> None:
    a = upstreams(lambda n: OK)
    b = upstreams(lambda n: OK)
    proxy = start_proxy(
        retry_snapshot(
            [a.port, b.port],
            # every other request meets the dead endpoint first: a budget for all of them
            {"max_attempts": 2, "backoff": FAST, "budget": {"ratio": 1.0}},
            timeout="5s",
        )
    )
    for _ in range(10):
        assert request(proxy.port)[0] == 200
    assert a.count and b.count
    a.die()  # mid-test: its pooled connections reset, new ones refused
    statuses = []
    attempts = []
    for _ in range(20):
        status, headers, _ = request(proxy.port)
        statuses.append(status)
        attempts.append(headers["x-meshling-attempts"])
    assert statuses == [200] * 20
    assert "2" in attempts  # some went to the dead endpoint first, and were retried
    assert 'meshling_upstream_connect_failures_total{cluster="up",reason="refused"}' in (
        proxy.metrics()
    )


def test_retry_per_try_timeout_then_success_on_another_endpoint(start_proxy, upstreams) -> None:
    stalled = upstreams(lambda n: STALL)
    healthy = upstreams(lambda n: OK)
    proxy = start_proxy(
        retry_snapshot(
            [stalled.port, healthy.port],
            {"per_try_timeout": "200ms", "backoff": FAST},
            timeout="5s",
        )
    )
    started = time.monotonic()
    status, headers, _ = request(proxy.port)  # round robin: the stalled endpoint first
    elapsed = time.monotonic() - started
    assert (status, headers["x-meshling-attempts"]) == (200, "2")
    assert 0.2 <= elapsed < 0.5, elapsed
    # the stalled attempt's connection was ended by the proxy, which the upstream saw
    deadline = time.monotonic() + 2
    while not stalled.ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stalled.ended
    assert 'meshling_http_per_try_timeouts_total{cluster="up",listener="in",route="api"} 1.0' in (
        proxy.metrics()
    )


def test_retry_budget_bounds_what_an_always_failing_upstream_sees(start_proxy, upstreams) -> None:
    upstream = upstreams(lambda n: UNAVAILABLE)
    ratio, floor = 0.2, 2
    proxy = start_proxy(
        retry_snapshot(
            [upstream.port],
            {
                "max_attempts": 5,
                "backoff": {"base": "1ms", "max": "2ms"},
                "budget": {"ratio": ratio, "min_per_second": floor, "ttl": "10s"},
            },
        )
    )
    requests = 0
    attempts_seen = 0
    started = time.monotonic()
    while time.monotonic() - started < 2.0:
        status, headers, _ = request(proxy.port)
        assert status == 503
        requests += 1
        attempts_seen += int(headers["x-meshling-attempts"])
    seconds = time.monotonic() - started
    received = upstream.count
    assert received == attempts_seen
    # (1 + ratio) times the requests, plus the floor: a full bucket, then its refill
    bound = (1 + ratio) * requests + floor * (seconds + 1)
    assert requests < received <= bound, (requests, received, bound)
    metrics = proxy.metrics()
    assert 'reason="budget_exhausted",route="api"} 0.0' not in metrics
    print(
        f"budget: {requests} requests in {seconds:.2f}s -> {received} attempts (bound {bound:.0f})"
    )
