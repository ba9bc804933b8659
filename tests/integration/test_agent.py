"""`meshling proxy run --cp`: real proxy processes against a fake control plane.

The fake control plane is a Starlette app on uvicorn in a thread: the config stream
(WebSocket) and the sign endpoint on one port, certificates from a real
`CertificateAuthority`. The test decides what it pushes and sees every message the proxy
sends.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import queue
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.configstream import Push, Refusal, decode_client, encode
from meshling.identity import CertificateAuthority, SpiffeId, make_key_and_csr

from .conftest import Nginx, free_port, http_get, wait_for

pytestmark = pytest.mark.integration

TOKEN = "dataplane-token-for-tests"


class FakeControlPlane:
    """A control plane that signs CSRs and pushes whatever `snapshot_for` returns."""

    def __init__(
        self,
        ca: CertificateAuthority,
        snapshot_for: Callable[[dict[str, Any]], tuple[str, dict[str, Any]] | None],
        *,
        ttl: dt.timedelta = dt.timedelta(hours=24),
        port: int | None = None,
    ) -> None:
        self.ca = ca
        self.snapshot_for = snapshot_for
        self.ttl = ttl
        self.port = port or free_port()
        self.messages: queue.Queue[Any] = queue.Queue()
        self.hellos: list[Any] = []
        self.signed: list[str] = []
        self.refusal: Refusal | None = None
        self.sessions: list[Any] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route, WebSocketRoute
        from starlette.websockets import WebSocket, WebSocketDisconnect

        async def sign(request: Request) -> JSONResponse:
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return JSONResponse({"error": "token is not valid"}, status_code=401)
            body = await request.json()
            cert = self.ca.issue(body["csr"].encode(), "api", ttl=self.ttl)
            self.signed.append(cert.decode())
            return JSONResponse(
                {
                    "certificate": cert.decode(),
                    "bundle": self.ca.bundle.to_pem().decode(),
                    "identity": "spiffe://default/api",
                    "expires": "later",
                }
            )

        async def stream(websocket: WebSocket) -> None:
            if websocket.headers.get("authorization") != f"Bearer {TOKEN}":
                await websocket.close(code=1008)
                return
            await websocket.accept()
            hello = decode_client(await websocket.receive_text())
            self.hellos.append(hello)
            self.messages.put(hello)
            if self.refusal is not None:
                await websocket.send_text(encode(self.refusal))
                await websocket.close()
                return
            first = self.snapshot_for(hello.dataplane)
            if first is not None:
                await websocket.send_text(encode(Push(*first)))
            self.sessions.append(websocket)
            try:
                while True:
                    self.messages.put(decode_client(await websocket.receive_text()))
            except WebSocketDisconnect:
                pass
            finally:
                self.sessions.remove(websocket)

        return Starlette(
            routes=[
                Route("/api/v1/ca/sign", sign, methods=["POST"]),
                WebSocketRoute("/api/v1/stream", stream),
            ]
        )

    def start(self) -> None:
        import uvicorn

        config = uvicorn.Config(
            self.app(),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)

        def serve() -> None:
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(self.server.serve())

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "fake control plane")

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
            self.server = None

    def push(self, version: str, snapshot: dict[str, Any]) -> None:
        assert self.loop is not None and self.sessions
        message = encode(Push(version, snapshot))
        for ws in list(self.sessions):
            asyncio.run_coroutine_threadsafe(ws.send_text(message), self.loop).result(5)

    def next_message(self, kind: type, timeout: float = 15.0) -> Any:
        """The next message of that kind the proxy sent (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind.__name__} from the proxy within {timeout}s")
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(message, kind):
                return message


def dataplane_document(inbound: int, service_port: int, admin: int) -> dict[str, Any]:
    return {
        "kind": "Dataplane",
        "metadata": {"name": "api-1", "mesh": "default"},
        "spec": {
            "service": "api",
            "address": "127.0.0.1",
            "inbounds": [{"port": inbound, "service_port": service_port, "protocol": "http"}],
            "admin": {"port": admin},
        },
    }


def inbound_snapshot(dataplane: dict[str, Any], tls: dict[str, str], tag: str) -> dict[str, Any]:
    """What a control plane would build for the dataplane: one mTLS inbound to the app."""
    spec = dataplane["spec"]
    inbound = spec["inbounds"][0]
    return {
        "version": tag,
        "node": dataplane["metadata"]["name"],
        "drain_timeout": "2s",
        "admin": {"address": "127.0.0.1", "port": spec["admin"]["port"]},
        "listeners": [
            {
                "name": "inbound",
                "address": "127.0.0.1",
                "port": inbound["port"],
                "filter_chains": [
                    {
                        "tls": {"mode": "strict", **tls},
                        "http": {
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "all",
                                        "domains": ["*"],
                                        "routes": [{"name": "all", "cluster": "local"}],
                                    }
                                ]
                            }
                        },
                    }
                ],
            }
        ],
        "clusters": [
            {
                "name": "local",
                "connect_timeout": "1s",
                "endpoints": [{"address": "127.0.0.1", "port": inbound["service_port"]}],
            }
        ],
    }


@dataclass
class Client:
    """A mesh peer ("web") with its own certificate from the same CA."""

    context: ssl.SSLContext

    @classmethod
    def of(cls, ca: CertificateAuthority, root: Path) -> Client:
        key, csr = make_key_and_csr(SpiffeId.for_service("default", "web"))
        (root / "web.crt").write_bytes(ca.issue(csr, "web"))
        (root / "web.key").write_bytes(key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=ca.root_pem.decode())
        context.load_cert_chain(root / "web.crt", root / "web.key")
        return cls(context)

    def connect(self, port: int) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5)
        return self.context.wrap_socket(raw)

    def get(self, port: int, path: str = "/hello") -> tuple[int, bytes]:
        with self.connect(port) as tls:
            return request(tls, path, close=True)

    def served_certificate(self, port: int) -> bytes:
        with self.connect(port) as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return ssl.DER_cert_to_PEM_cert(der).encode()


def request(tls: ssl.SSLSocket, path: str, close: bool = False) -> tuple[int, bytes]:
    connection = b"close" if close else b"keep-alive"
    tls.sendall(
        b"GET %b HTTP/1.1\r\nHost: api\r\nConnection: %b\r\n\r\n" % (path.encode(), connection)
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), body


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    admin_port: int
    data_dir: Path

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited {self.proc.returncode}:\n{self.logs()}")
        try:
            return http_get(self.admin + "/ready", timeout=0.5)[0] == 200
        except OSError:
            return False

    def metrics(self) -> str:
        return http_get(self.admin + "/metrics")[1].decode()

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start `meshling proxy run --cp ...`; does not wait for it to be ready."""
    started: list[AgentProcess] = []
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")

    def start(
        cp: str,
        dataplane: dict[str, Any],
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> AgentProcess:
        n = len(started)
        dp = tmp_path / f"dataplane{n}.yaml"
        dp.write_text(yaml.safe_dump(dataplane))
        data = data_dir or tmp_path / "data"
        log = tmp_path / f"agent{n}.log"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshling",
                "proxy",
                "run",
                "--cp",
                cp,
                "--token-file",
                str(token),
                "--dataplane",
                str(dp),
                "--data-dir",
                str(data),
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        agent = AgentProcess(proc, log, dataplane["spec"]["admin"]["port"], data)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("default")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} in\n{text}")


class Setup:
    """One fake control plane, one dataplane, nginx behind it, a client peer."""

    def __init__(self, ca: CertificateAuthority, nginx: Nginx, tmp_path: Path, **cp: Any) -> None:
        self.ca = ca
        self.inbound = free_port()
        self.dataplane = dataplane_document(self.inbound, nginx.port, free_port())
        self.tls = {
            "certificate": str(tmp_path / "data" / "cert.pem"),
            "key": str(tmp_path / "data" / "key.pem"),
            "trust_bundle": str(tmp_path / "data" / "bundle.pem"),
        }
        self.cp = FakeControlPlane(ca, self.snapshot_for, **cp)
        self.client = Client.of(ca, tmp_path)
        self.tag = "v1"

    def snapshot_for(self, dataplane: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return self.tag, self.snapshot(self.tag)

    def snapshot(self, tag: str) -> dict[str, Any]:
        return inbound_snapshot(self.dataplane, self.tls, tag)


@pytest.fixture
def setup(ca: CertificateAuthority, nginx: Nginx, tmp_path: Path) -> Iterator[Setup]:
    s = Setup(ca, nginx, tmp_path)
    s.cp.start()
    yield s
    s.cp.stop()


def test_agent_gets_a_certificate_applies_the_push_and_acks(setup: Setup, start_agent) -> None:
    from meshling.configstream import Ack, Hello

    agent = start_agent(setup.cp.url, setup.dataplane)
    hello = setup.cp.next_message(Hello)
    assert hello.applied is None
    assert hello.dataplane["metadata"]["name"] == "api-1"
    assert hello.tls_paths.certificate == setup.tls["certificate"]
    assert setup.cp.next_message(Ack).version == "v1"
    wait_for(agent.ready, 10, "proxy ready")
    assert setup.client.get(setup.inbound) == (200, b"hello from nginx\n")
    # the certificate the proxy presents is the one the control plane signed
    assert setup.client.served_certificate(setup.inbound) == setup.cp.signed[0].encode()

    data = agent.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in ("snapshot.json", "cert.pem", "key.pem", "bundle.pem"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    cached = json.loads((data / "snapshot.json").read_text())
    assert cached["version"] == "v1"

    text = agent.metrics()
    assert metric(text, "meshling_control_plane_connected") == 1
    assert metric(text, 'meshling_control_plane_snapshots_total{result="applied"}') == 1
    assert metric(text, 'meshling_certificate_renewals_total{result="ok"}') == 1
    expiry = metric(text, "meshling_certificate_expiry_timestamp_seconds")
    assert 23 * 3600 < expiry - time.time() <= 24 * 3600

    # the same version again is acked without a switch; a new one switches
    setup.cp.push("v1", setup.snapshot("v1"))
    assert setup.cp.next_message(Ack).version == "v1"
    setup.cp.push("v2", setup.snapshot("v2"))
    assert setup.cp.next_message(Ack).version == "v2"
    assert json.loads(http_get(agent.admin + "/config")[1])["version"] == "v2"
    assert agent.stop() == 0


def test_agent_nacks_a_bad_snapshot_and_keeps_serving(
    setup: Setup, start_agent, nginx: Nginx
) -> None:
    from meshling.configstream import Ack, Nack

    agent = start_agent(setup.cp.url, setup.dataplane)
    assert setup.cp.next_message(Ack).version == "v1"
    wait_for(agent.ready, 10, "proxy ready")

    # invalid document: a field path in the reason
    bad = setup.snapshot("v2")
    bad["listeners"][0]["port"] = "not a port"
    setup.cp.push("v2", bad)
    nack = setup.cp.next_message(Nack)
    assert nack.version == "v2"
    assert "listeners[0].port" in nack.reason

    # valid document that cannot run: a TLS file that does not exist
    missing = setup.snapshot("v3")
    missing["listeners"][0]["filter_chains"][0]["tls"]["certificate"] = "/nonexistent.pem"
    setup.cp.push("v3", missing)
    nack = setup.cp.next_message(Nack)
    assert nack.version == "v3" and "/nonexistent.pem" in nack.reason

    # another admin listener
    moved = setup.snapshot("v4")
    moved["admin"]["port"] = free_port()
    setup.cp.push("v4", moved)
    assert "admin" in setup.cp.next_message(Nack).reason

    # v1 still runs and serves
    assert json.loads(http_get(agent.admin + "/config")[1])["version"] == "v1"
    for _ in range(20):
        assert setup.client.get(setup.inbound)[0] == 200
    text = agent.metrics()
    assert metric(text, 'meshling_control_plane_snapshots_total{result="rejected"}') == 3
    assert json.loads((agent.data_dir / "snapshot.json").read_text())["version"] == "v1"


def test_agent_keeps_serving_without_the_control_plane_and_restarts_from_cache(
    setup: Setup, start_agent
) -> None:
    from meshling.configstream import Ack, Hello

    agent = start_agent(setup.cp.url, setup.dataplane)
    assert setup.cp.next_message(Ack).version == "v1"
    wait_for(agent.ready, 10, "proxy ready")

    setup.cp.stop()
    wait_for(lambda: metric(agent.metrics(), "meshling_control_plane_connected") == 0, 10, "down")
    for _ in range(20):
        assert setup.client.get(setup.inbound)[0] == 200

    # a restart while no control plane answers: the cache runs, ready at once
    assert agent.stop() == 0
    again = start_agent(setup.cp.url, setup.dataplane)
    wait_for(again.ready, 10, "proxy ready from the cache")
    assert setup.client.get(setup.inbound) == (200, b"hello from nginx\n")
    assert "running the cached snapshot v1" in again.logs()
    wait_for(lambda: "retrying in" in again.logs(), 10, "a retry logged")

    # the control plane comes back: the proxy says what it runs, and takes the new one
    setup.tag = "v2"
    setup.cp.start()
    hello = setup.cp.next_message(Hello, timeout=40)
    assert hello.applied == "v1"
    assert setup.cp.next_message(Ack).version == "v2"
    # the cached certificate was still good: no new one was requested
    assert setup.cp.signed == [setup.cp.signed[0]]
    assert setup.client.get(setup.inbound)[0] == 200


def test_agent_without_control_plane_or_cache_is_not_ready_and_retries(
    start_agent, tmp_path: Path
) -> None:
    dataplane = dataplane_document(free_port(), free_port(), free_port())
    url = f"http://127.0.0.1:{free_port()}"
    agent = start_agent(url, dataplane)
    wait_for(lambda: agent.logs().count("retrying in") >= 2, 15, "retries logged")
    assert agent.proc.poll() is None
    assert not agent.ready()
    assert f"no control plane reachable at {url} and no cached snapshot in" in agent.logs()
    assert agent.stop() == 0


def test_agent_fails_over_to_the_next_control_plane(
    ca: CertificateAuthority, nginx: Nginx, tmp_path: Path, start_agent
) -> None:
    from meshling.configstream import Ack

    s = Setup(ca, nginx, tmp_path)
    dead = f"http://127.0.0.1:{free_port()}"
    s.cp.start()
    try:
        agent = start_agent(f"{dead},{s.cp.url}", s.dataplane)
        assert s.cp.next_message(Ack, timeout=20).version == "v1"
        wait_for(agent.ready, 10, "proxy ready")
        assert s.client.get(s.inbound)[0] == 200
        # the serving one dies, a new one comes up at the first address: the proxy moves
        second = FakeControlPlane(ca, s.snapshot_for, port=int(dead.rsplit(":", 1)[1]))
        second.start()
        try:
            s.cp.stop()
            assert second.next_message(Ack, timeout=40).version == "v1"
            assert s.client.get(s.inbound)[0] == 200
        finally:
            second.stop()
    finally:
        s.cp.stop()


def test_agent_refusal_is_logged_and_not_retried_soon(
    setup: Setup, start_agent, tmp_path: Path
) -> None:
    from meshling.configstream import Hello

    setup.cp.refusal = Refusal("revoked", "token id 0123 was revoked")
    agent = start_agent(setup.cp.url, setup.dataplane)
    setup.cp.next_message(Hello)
    wait_for(lambda: "revoked: token id 0123 was revoked" in agent.logs(), 10, "refusal logged")
    time.sleep(3)
    assert len(setup.cp.hellos) == 1
    assert agent.proc.poll() is None
    # a new token in the token file ends the long wait: the proxy reconnects at once
    setup.cp.refusal = None
    (tmp_path / "token").write_text(TOKEN + "\n")
    wait_for(lambda: len(setup.cp.hellos) == 2, 5, "a reconnect with the new token")
    assert "the token file" in agent.logs() and "reconnecting now" in agent.logs()


def test_agent_start_up_errors_are_clear(start_agent, tmp_path: Path) -> None:
    bad = dataplane_document(free_port(), free_port(), free_port())
    bad["spec"]["inbounds"][0]["port"] = 70000
    agent = start_agent("http://127.0.0.1:1", bad)
    assert agent.proc.wait(10) == 2
    assert "spec.inbounds[0].port" in agent.logs()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "meshling", "proxy", "run", *args],
            capture_output=True,
            text=True,
            timeout=20,
        )

    missing = run(
        "--cp", "http://127.0.0.1:1", "--token-file", str(tmp_path / "none"), "--dataplane", "x"
    )
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr and "meshling token dataplane" in missing.stderr
    both = run("--cp", "http://127.0.0.1:1", "--config", "x.yaml")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    no_token = run("--cp", "http://127.0.0.1:1")
    assert no_token.returncode == 2 and "--token-file" in no_token.stderr


def test_agent_renews_at_half_life_and_new_handshakes_use_the_new_certificate(
    ca: CertificateAuthority, nginx: Nginx, tmp_path: Path, start_agent
) -> None:
    from meshling.configstream import Ack

    s = Setup(ca, nginx, tmp_path, ttl=dt.timedelta(seconds=8))
    s.cp.start()
    try:
        agent = start_agent(s.cp.url, s.dataplane)
        assert s.cp.next_message(Ack).version == "v1"
        wait_for(agent.ready, 10, "proxy ready")
        first = s.client.served_certificate(s.inbound)
        assert first == s.cp.signed[0].encode()
        # a connection opened on the first certificate
        held = s.client.connect(s.inbound)
        assert request(held, "/hello")[0] == 200
        started = time.monotonic()
        wait_for(lambda: len(s.cp.signed) >= 2, 10, "a renewal")
        renewed_after = time.monotonic() - started
        # half of the ~8 s life, counted from when the proxy got it
        assert renewed_after < 6.0
        second = s.cp.signed[1].encode()
        wait_for(lambda: s.client.served_certificate(s.inbound) == second, 5, "new cert served")
        # the open connection goes on (its next response may ask it to reconnect)
        assert request(held, "/hello")[0] == 200
        held.close()
        # keys are not reused across renewals
        from cryptography import x509

        keys = {
            x509.load_pem_x509_certificate(c.encode()).public_key().public_numbers()
            for c in s.cp.signed[:2]
        }
        assert len(keys) == 2
        text = agent.metrics()
        assert metric(text, 'meshling_certificate_renewals_total{result="ok"}') >= 2
        assert (agent.data_dir / "cert.pem").read_bytes() in {c.encode() for c in s.cp.signed[1:]}
    finally:
        s.cp.stop()
