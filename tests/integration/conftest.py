"""Fixtures for integration tests: real proxy processes, real upstreams, real peers.

Everything listens on 127.0.0.1 only, and every process started here is
stopped by PID when its test ends, pass or fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
    *,
    interval: float = 0.02,
) -> None:
    """Poll `predicate` every `interval` seconds until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listener whose accept queue is full: further SYNs are dropped, connects hang.

    Returns the listener and the connections that fill its queue; close them all.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(server.getsockname())
        fillers.append(s)
    time.sleep(0.1)
    return server, fillers


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_snapshot(
    port: int,
    admin_port: int,
    endpoints: list[int],
    *,
    version: str = "1",
    routes: list[dict[str, Any]] | None = None,
    clusters: list[dict[str, Any]] | None = None,
    http: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A snapshot with one HTTP listener routing everything to cluster `up`."""
    chain: dict[str, Any] = {
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": routes or [{"name": "all", "cluster": "up"}],
                }
            ]
        }
    }
    chain.update(http or {})
    document: dict[str, Any] = {
        "version": version,
        "drain_timeout": "5s",
        "admin": {"address": "127.0.0.1", "port": admin_port, "token": "secret"},
        "listeners": [
            {"name": "in", "address": "127.0.0.1", "port": port, "filter_chains": [{"http": chain}]}
        ],
        "clusters": clusters
        if clusters is not None
        else [
            {
                "name": "up",
                "connect_timeout": "1s",
                "endpoints": [{"address": "127.0.0.1", "port": p} for p in endpoints],
            }
        ],
    }
    document.update(extra or {})
    return document


@dataclass
class ProxyProcess:
    config: Path
    port: int
    admin_port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def write_config(self, document: dict[str, Any]) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(document))
        tmp.replace(self.config)

    def metrics(self) -> str:
        return http_get(self.admin + "/metrics")[1].decode()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], ProxyProcess]]:
    """Start `meshling proxy run` on a snapshot document; waits until /ready answers 200."""
    started: list[ProxyProcess] = []

    def start(document: dict[str, Any]) -> ProxyProcess:
        n = len(started)
        config = tmp_path / f"proxy{n}.yaml"
        config.write_text(yaml.safe_dump(document))
        log = tmp_path / f"proxy{n}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshling", "proxy", "run", "--config", str(config)],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        proxy = ProxyProcess(
            config, document["listeners"][0]["port"], document["admin"]["port"], proc, log
        )
        started.append(proxy)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"proxy exited {proc.returncode}:\n{proxy.logs()}")
            try:
                return http_get(proxy.admin + "/ready", timeout=0.5)[0] == 200
            except OSError:
                return False

        wait_for(ready, 10, "proxy ready")
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@dataclass
class RecordingUpstream:
    """A raw TCP upstream that records every byte it receives and answers canned responses."""

    port: int
    received: bytearray = field(default_factory=bytearray)
    connections: int = 0
    response: bytes = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
    _server: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        server.settimeout(0.1)
        self._server = server
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            try:
                while not self._stop.is_set():
                    data = conn.recv(65536)
                    if not data:
                        return
                    self.received.extend(data)
                    if b"\r\n\r\n" in data:
                        conn.sendall(self.response)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.close()


@pytest.fixture
def recording_upstream() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream(free_port())
    upstream.serve()
    yield upstream
    upstream.close()


@dataclass
class Nginx:
    port: int
    proc: subprocess.Popen[bytes]
    root: Path


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 100000;
    client_max_body_size 64m;
    client_body_buffer_size 64m;
    server {{
        listen 127.0.0.1:{port};
        root {root}/www;
        location = /hello {{ default_type text/plain; return 200 "hello from nginx\\n"; }}
        location = /echo-headers {{
            default_type text/plain;
            return 200 "xff=$http_x_forwarded_for xfp=$http_x_forwarded_proto rid=$http_x_request_id host=$host uri=$request_uri te=$http_transfer_encoding id=$http_x_meshling_peer_identity conn=$http_connection\\n";
        }}
        location /upload {{
            proxy_pass http://127.0.0.1:{port}/swallow;
        }}
        location = /swallow {{ default_type text/plain; return 200 "got it\\n"; }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(found):
        pytest.fail("nginx is not installed: run scripts/install-peers")
    return found


@pytest.fixture
def nginx() -> Iterator[Nginx]:
    """A real nginx upstream on a free port with a few fixed locations and static files."""
    root = Path(tempfile.mkdtemp(prefix="meshling-nginx-"))
    root.chmod(0o755)  # nginx workers run as an unprivileged user and must read www/
    (root / "www").mkdir()
    (root / "www" / "big.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    (root / "www" / "index.html").write_text("<h1>nginx</h1>\n")
    port = free_port()
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=root, port=port))
    proc = subprocess.Popen(
        [nginx_binary(), "-p", str(root), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def up() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    wait_for(up, 10, "nginx")
    yield Nginx(port, proc, root)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pki(tmp_path: Path) -> Any:
    """A mesh CA (and a second, foreign one) issuing certificate files under tmp_path
    (`test_mtls.Pki`)."""
    from .test_mtls import Pki

    return Pki(tmp_path)


@pytest.fixture
def checkout_traversable() -> Iterator[None]:
    """Let a proxy that a test runs as a uid of its own reach this checkout's code and
    virtualenv: a checkout inside a 0700 directory (e.g. one from mktemp -d) is out of
    that uid's reach. Every ancestor directory lacking it gets search permission for
    others (not read), and its mode back afterwards."""
    changed: list[tuple[Path, int]] = []
    for parent in Path(__file__).resolve().parents[2].parents:
        mode = stat.S_IMODE(parent.stat().st_mode)
        if not mode & stat.S_IXOTH:
            os.chmod(parent, mode | stat.S_IXOTH)
            changed.append((parent, mode))
    try:
        yield
    finally:
        for parent, mode in reversed(changed):
            os.chmod(parent, mode)
