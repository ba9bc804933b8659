"""The config stream against a real `meshling control-plane run` process (SQLite), with a
`websockets` client standing in for the proxy: hello, push, ACK/NACK, status, refusals,
and the token, inspect and get commands around them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import websockets

from meshling.configstream import (
    STREAM_PATH,
    Ack,
    Hello,
    Nack,
    Push,
    Refusal,
    TlsPaths,
    decode_server,
    encode,
)
from meshling.controlplane.cli import run as cli
from meshling.identity import SpiffeId, make_key_and_csr

from .conftest import free_port, wait_for

pytestmark = pytest.mark.integration

T = TypeVar("T")
TLS = TlsPaths("/etc/meshling/cert.pem", "/etc/meshling/key.pem", "/etc/meshling/bundle.pem")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class ControlPlane:
    """A `meshling control-plane run` process."""

    proc: subprocess.Popen[bytes]
    port: int
    token: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}{STREAM_PATH}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def cli(self) -> list[str]:
        return ["--cp", self.url, "--token", self.token]

    def post(self, path: str, body: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, headers=self.auth, timeout=5)

    def get(self, path: str) -> Any:
        r = httpx.get(self.url + path, headers=self.auth, timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    def apply(self, document: dict[str, Any]) -> None:
        r = self.post("/api/v1/resources", document)
        if r.status_code == 409:
            kind, meta = document["kind"], document["metadata"]
            mesh = meta.get("mesh", meta["name"])
            current = self.get(f"/api/v1/{kind}/{mesh}/{meta['name']}")
            body = {**document, "metadata": {**meta, "version": current["metadata"]["version"]}}
            r = httpx.put(
                f"{self.url}/api/v1/{kind}/{mesh}/{meta['name']}",
                json=body,
                headers=self.auth,
                timeout=5,
            )
        assert r.status_code in (200, 201), r.text

    def dataplane_token(self, service: str, ttl: str = "1h", mesh: str = "default") -> str:
        r = self.post("/api/v1/tokens/dataplane", {"mesh": mesh, "service": service, "ttl": ttl})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])

    def status(self, name: str | None = None, mesh: str = "default") -> Any:
        if name is None:
            return {i["name"]: i for i in self.get("/api/v1/status/dataplanes")["items"]}
        return self.get(f"/api/v1/status/dataplanes/{mesh}/{name}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


def start_control_plane(
    tmp: Path, *args: str, store: str | None = None, name: str = "cp"
) -> ControlPlane:
    port = free_port()
    data = tmp / name
    log = tmp / f"{name}.log"
    argv = [
        sys.executable,
        "-m",
        "meshling",
        "control-plane",
        "run",
        "--data-dir",
        str(data),
        "--port",
        str(port),
        "--replica-id",
        name,
        *args,
    ]
    if store:
        argv += ["--store", store]
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the control plane exited:\n{log.read_text()}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(healthy, timeout=15, what="the control plane")
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    token = (data / "admin.token").read_text().strip()
    return ControlPlane(proc, port, token, log)


@pytest.fixture
def cp(tmp_path: Path) -> Iterator[ControlPlane]:
    control_plane = start_control_plane(tmp_path, "--offline-after", "2")
    try:
        yield control_plane
    finally:
        assert control_plane.stop() == 0, control_plane.log.read_text()


def dataplane(
    name: str,
    service: str,
    *,
    address: str = "10.0.0.1",
    outbound: str | None = None,
    mesh: str = "default",
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "service": service,
        "address": address,
        "inbounds": [{"port": 15006, "service_port": 8080, "protocol": "http"}],
    }
    if outbound:
        spec["outbounds"] = [{"port": 15001, "service": outbound, "protocol": "http"}]
    return {"kind": "Dataplane", "metadata": {"name": name, "mesh": mesh}, "spec": spec}


class ProxyClient:
    """The proxy's side of one stream."""

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, url: str, token: str | None) -> ProxyClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return cls(await websockets.connect(url, additional_headers=headers, open_timeout=5))

    async def hello(
        self, document: dict[str, Any], tls: TlsPaths | None = None, applied: str | None = None
    ) -> Push:
        await self.connection.send(encode(Hello(document, applied=applied, tls_paths=tls)))
        message = await self.receive()
        assert isinstance(message, Push), message
        return message

    async def receive(self, timeout: float = 5.0) -> Push | Refusal:
        return decode_server(await asyncio.wait_for(self.connection.recv(), timeout))

    async def nothing(self, wait: float = 0.5) -> None:
        with pytest.raises(TimeoutError):
            await self.receive(wait)

    async def ack(self, push: Push) -> None:
        await self.connection.send(encode(Ack(push.version)))

    async def nack(self, push: Push, reason: str) -> None:
        await self.connection.send(encode(Nack(push.version, reason)))

    async def refused(self) -> tuple[Refusal, int]:
        """The refusal, and the close code after it."""
        message = await self.receive()
        assert isinstance(message, Refusal), message
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(self.connection.recv(), 5)
        assert closed.value.rcvd is not None
        return message, closed.value.rcvd.code

    async def close(self) -> None:
        await self.connection.close()


async def eventually(check: Any, timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# the stream


def test_cp_stream_hello_push_ack_then_status_shows_applied(
    cp: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        proxy = await ProxyClient.connect(cp.ws, cp.dataplane_token("api"))
        push = await proxy.hello(dataplane("api-1", "api"))
        assert push.snapshot["node"] == "api-1"
        assert push.snapshot["version"] == push.version
        # the hello registered the dataplane
        stored = cp.get("/api/v1/Dataplane/default/api-1")
        assert stored["spec"]["service"] == "api"
        await proxy.ack(push)
        status = await eventually(
            lambda: (s := cp.status()["api-1"])["applied"] == push.version and s,
            what="the ACK in the status",
        )
        assert status["online"] is True and status["pushed"] == push.version
        assert status["replica"] == "cp" and status["last_nack"] is None
        one = cp.status("api-1")
        assert one["snapshot"] == push.snapshot and one["connected_at"]

        # the CLI shows the same
        assert await asyncio.to_thread(cli, ["inspect", "dataplane", "api-1", *cp.cli()]) == 0
        out = capsys.readouterr().out
        assert f"Applied:       {push.version}" in out and "online" in out
        assert "node: api-1" in out
        assert await asyncio.to_thread(cli, ["get", "dataplanes", *cp.cli()]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split()[-2:] == ["ONLINE", "APPLIED"]
        assert table[1].split()[-2:] == ["yes", push.version]

        # a clean disconnect is offline at once
        await proxy.close()
        await eventually(lambda: not cp.status()["api-1"]["online"], what="offline")

    run(body())


def test_cp_stream_a_permission_reaches_the_affected_proxy_only(cp: ControlPlane) -> None:
    async def body() -> None:
        cp.apply(
            {"kind": "Mesh", "metadata": {"name": "default"}, "spec": {"mtls": {"enabled": True}}}
        )
        proxies = {}
        pushes = {}
        for name, service, outbound in (
            ("api-1", "api", None),
            ("web-1", "web", "api"),
            ("db-1", "db", None),
        ):
            proxies[name] = await ProxyClient.connect(cp.ws, cp.dataplane_token(service))
            pushes[name] = await proxies[name].hello(
                dataplane(name, service, outbound=outbound), tls=TLS
            )
            await proxies[name].ack(pushes[name])
        # web-1's outbound got api-1's endpoint when api-1 registered before it; api-1
        # and db-1 may see one rebuild for web-1's registration: drain them
        for name in ("api-1", "db-1"):
            with pytest.raises(TimeoutError):
                await proxies[name].receive(0.3)

        cp.apply(
            {
                "kind": "TrafficPermission",
                "metadata": {"name": "web-to-api", "mesh": "default"},
                "spec": {
                    "destination": {"service": "api"},
                    "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
                },
            }
        )
        push = await proxies["api-1"].receive()
        assert isinstance(push, Push) and push.version != pushes["api-1"].version
        [inbound] = push.snapshot["listeners"][:1]
        authz = inbound["filter_chains"][0]["authz"]
        assert "spiffe://default/web" in json.dumps(authz)
        await proxies["web-1"].nothing()
        await proxies["db-1"].nothing()
        for proxy in proxies.values():
            await proxy.close()

    run(body())


def test_cp_stream_nack_is_in_the_status(cp: ControlPlane) -> None:
    async def body() -> None:
        proxy = await ProxyClient.connect(cp.ws, cp.dataplane_token("api"))
        push = await proxy.hello(dataplane("api-1", "api"))
        await proxy.nack(push, "listener inbound:15006: port 15006 is in use")
        status = await eventually(
            lambda: (s := cp.status()["api-1"])["last_nack"] and s, what="the NACK"
        )
        assert status["last_nack"]["version"] == push.version
        assert status["last_nack"]["reason"] == "listener inbound:15006: port 15006 is in use"
        assert status["applied"] is None
        await proxy.close()

    run(body())


def test_cp_stream_refusals_say_why(cp: ControlPlane) -> None:
    async def refused(
        token: str | None, document: dict[str, Any] | None, tls: TlsPaths | None = None
    ) -> tuple[str, str, int]:
        proxy = await ProxyClient.connect(cp.ws, token)
        if document is not None:
            # a bad token is refused before the hello: the send may find the stream closed
            with contextlib.suppress(websockets.ConnectionClosed):
                await proxy.connection.send(encode(Hello(document, tls_paths=tls)))
        refusal, code = await proxy.refused()
        return refusal.reason, refusal.message, code

    async def body() -> None:
        api = cp.dataplane_token("api")
        reason, message, code = await refused(cp.dataplane_token("web"), dataplane("api-1", "api"))
        assert (reason, code) == ("forbidden", 4403)
        assert "token is for service 'web'" in message
        # no token, the admin token, garbage
        for token in (None, cp.token, "x.y.z"):
            reason, message, code = await refused(token, dataplane("api-1", "api"))
            assert (reason, code) == ("unauthenticated", 4401), message
        # an invalid document names the field
        bad = dataplane("api-1", "api")
        bad["spec"]["inbounds"][0]["port"] = 70000
        reason, message, code = await refused(api, bad)
        assert (reason, code) == ("invalid", 4400)
        assert "hello.dataplane" in message and "spec.inbounds[0].port" in message
        # an unknown mesh
        token = cp.dataplane_token("api", mesh="nowhere")
        reason, message, code = await refused(token, dataplane("api-1", "api", mesh="nowhere"))
        assert (reason, code) == ("invalid", 4400) and "'nowhere' does not exist" in message
        # a name taken by another service
        web = ProxyClient((await ProxyClient.connect(cp.ws, cp.dataplane_token("web"))).connection)
        await web.hello(dataplane("shared-1", "web"))
        await web.close()
        reason, message, code = await refused(api, dataplane("shared-1", "api"))
        assert (reason, code) == ("forbidden", 4403) and "belongs to service 'web'" in message
        # mTLS on, no tls_paths
        cp.apply(
            {"kind": "Mesh", "metadata": {"name": "default"}, "spec": {"mtls": {"enabled": True}}}
        )
        reason, message, code = await refused(api, dataplane("api-1", "api"))
        assert (reason, code) == ("invalid", 4400) and "tls_paths" in message
        # a dataplane token is no admin token
        r = httpx.get(cp.url + "/api/v1/Dataplane", headers={"Authorization": f"Bearer {api}"})
        assert r.status_code == 401

    run(body())


def test_cp_stream_expired_and_revoked_tokens_are_refused(
    cp: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        short = cp.dataplane_token("api", ttl="1s")
        await asyncio.sleep(1.1)
        proxy = await ProxyClient.connect(cp.ws, short)
        refusal, code = await proxy.refused()
        assert (refusal.reason, code) == ("unauthenticated", 4401)
        assert "expired" in refusal.message

        token = cp.dataplane_token("api")
        connected = await ProxyClient.connect(cp.ws, token)
        await connected.hello(dataplane("api-1", "api"))
        jti = json.loads(__import__("base64").urlsafe_b64decode(token.split(".")[1] + "=="))["jti"]
        assert await asyncio.to_thread(cli, ["token", "revoke", jti, *cp.cli()]) == 0
        assert f"token {jti} revoked" in capsys.readouterr().out
        # the open stream is closed, and a new one refused
        refusal, code = await connected.refused()
        assert (refusal.reason, code) == ("unauthenticated", 4401)
        proxy = await ProxyClient.connect(cp.ws, token)
        refusal, code = await proxy.refused()
        assert "revoked" in refusal.message

    run(body())


def test_cp_stream_closes_when_its_token_expires(cp: ControlPlane) -> None:
    async def body() -> None:
        proxy = await ProxyClient.connect(cp.ws, cp.dataplane_token("api", ttl="2s"))
        opened = time.monotonic()
        push = await proxy.hello(dataplane("api-1", "api"))
        await proxy.ack(push)
        # open, and served, until the token runs out; then refused and closed
        refusal, code = await proxy.refused()
        assert (refusal.reason, code) == ("unauthenticated", 4401)
        assert "expired" in refusal.message and "token file" in refusal.message
        assert time.monotonic() - opened < 4
        await eventually(lambda: not cp.status()["api-1"]["connected"], what="disconnected")
        # the proxy comes back with the token it reads then
        again = await ProxyClient.connect(cp.ws, cp.dataplane_token("api"))
        assert (await again.hello(dataplane("api-1", "api"), applied=push.version)) == push
        await again.close()

    run(body())


def test_cp_sign_records_the_certificate_in_the_dataplane_status(cp: ControlPlane) -> None:
    token = cp.dataplane_token("api")
    bearer = {"Authorization": f"Bearer {token}"}
    _, csr = make_key_and_csr(SpiffeId.for_service("default", "api"))
    r = httpx.post(
        cp.url + "/api/v1/ca/sign",
        json={"csr": csr.decode(), "dataplane": "api-1"},
        headers=bearer,
        timeout=5,
    )
    assert r.status_code == 200, r.text
    expires = r.json()["expires"]
    _, wrong = make_key_and_csr(SpiffeId.for_service("default", "web"))
    r = httpx.post(cp.url + "/api/v1/ca/sign", json={"csr": wrong.decode()}, headers=bearer)
    assert r.status_code == 403 and r.json()["reason"] == "identity_mismatch"
    # the same CA serves the bundle, and the status has the expiry once the proxy is known
    bundle = httpx.get(cp.url + "/api/v1/ca/bundle?mesh=default").text
    assert "BEGIN CERTIFICATE" in bundle

    async def body() -> None:
        proxy = await ProxyClient.connect(cp.ws, token)
        await proxy.hello(dataplane("api-1", "api"))
        status = await eventually(lambda: cp.status("api-1")["connected"] and cp.status("api-1"))
        assert status["certificate_expires"] == expires
        await proxy.close()

    run(body())


def test_cp_token_command_writes_a_private_file(
    cp: ControlPlane, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = tmp_path / "api.token"
    argv = ["token", "dataplane", "--service", "api", "--ttl", "2h", "-o", str(file), *cp.cli()]
    assert cli(argv) == 0
    assert "spiffe://default/api" in capsys.readouterr().out
    assert stat.S_IMODE(file.stat().st_mode) == 0o600

    async def body() -> None:
        proxy = await ProxyClient.connect(cp.ws, file.read_text().strip())
        await proxy.hello(dataplane("api-1", "api"))
        await proxy.close()

    run(body())
    # to stdout, just the token; a wrong admin token says which to use
    assert cli(["token", "dataplane", "--service", "api", *cp.cli()]) == 0
    assert capsys.readouterr().out.count(".") == 2
    assert cli(["token", "dataplane", "--service", "api", "--cp", cp.url, "--token", "x"]) == 1
    assert "admin token" in capsys.readouterr().err


def test_cp_run_creates_the_default_mesh_and_says_where_things_are(tmp_path: Path) -> None:
    control_plane = start_control_plane(tmp_path, "--mesh-mtls", "strict")
    try:
        mesh = control_plane.get("/api/v1/Mesh/default/default")
        assert mesh["spec"] == {"mtls": {"enabled": True, "mode": "strict"}}
    finally:
        assert control_plane.stop() == 0
    out = control_plane.log.read_text()
    assert str(tmp_path / "cp" / "admin.token") in out
    assert f"API at http://127.0.0.1:{control_plane.port}" in out
    assert stat.S_IMODE(os.stat(tmp_path / "cp").st_mode) == 0o700
    # a second start keeps the mesh as it is and the same signing key
    again = start_control_plane(tmp_path)
    try:
        assert again.get("/api/v1/Mesh/default/default")["metadata"]["version"] == 1
    finally:
        again.stop()


def test_cp_cli_unreachable_says_to_start_the_control_plane(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli(["inspect", "dataplane", "x", "--cp", url, "--token", "t"]) == 2
    assert f"Is the control plane running at {url}?" in capsys.readouterr().err
