"""`meshling proxy run --cp` against a real `meshling control-plane run` process.

web proxy (outbound, plaintext from the app) -> mTLS -> api proxy (inbound) -> nginx, both
proxies configured by the control plane. Steady traffic goes through the web proxy while
the control plane stops, the proxies are restarted in place (the new process binds the
same ports, TLS listeners included, while the old one drains) and the control plane comes
back: not one request may fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml

from .conftest import Nginx, free_port, http_get, wait_for
from .test_agent import metric
from .test_lifecycle import Load

pytestmark = pytest.mark.integration


class ControlPlane:
    def __init__(self, root: Path, mtls: str = "strict") -> None:
        self.root = root
        self.mtls = mtls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.root / f"cp{self.runs}.log"
        self.runs += 1
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshling",
                "control-plane",
                "run",
                "--data-dir",
                str(self.root / "cp"),
                "--port",
                str(self.port),
                "--mesh-mtls",
                self.mtls,
            ],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
        )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"control plane exited:\n{log.read_text()}")
            try:
                return http_get(self.url + "/healthz", timeout=0.5)[0] == 200
            except OSError:
                return False

        wait_for(healthy, 20, "control plane")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def call(self, method: str, path: str, body: Any) -> Any:
        token = (self.root / "cp" / "admin.token").read_text().strip()
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
        return json.loads(raw) if raw else None


class ControlPlanes(Protocol):
    """What a proxy is given of its control plane: the `--cp` address(es), and the API
    its token is issued through."""

    @property
    def url(self) -> str: ...

    def call(self, method: str, path: str, body: Any) -> Any: ...


class Dataplane:
    def __init__(self, root: Path, cp: ControlPlanes, name: str, spec: dict[str, Any]) -> None:
        self.root = root
        self.cp = cp
        self.name = name
        self.admin_port = spec["admin"]["port"]
        self.document = {
            "kind": "Dataplane",
            "metadata": {"name": name, "mesh": "default"},
            "spec": spec,
        }
        self.file = root / f"{name}.yaml"
        self.file.write_text(yaml.safe_dump(self.document))
        self.token = root / f"{name}.token"
        issued = cp.call("POST", "/api/v1/tokens/dataplane", {"service": spec["service"]})
        self.token.write_text(issued["token"])
        self.data = root / f"{name}-data"
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def log(self, n: int) -> Path:
        return self.root / f"{self.name}-{n}.log"

    def start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshling",
                "proxy",
                "run",
                "--cp",
                self.cp.url,
                "--token-file",
                str(self.token),
                "--dataplane",
                str(self.file),
                "--data-dir",
                str(self.data),
            ],
            stdout=self.log(len(self.procs)).open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def logs(self, n: int = -1) -> str:
        return self.log(n % len(self.procs)).read_text(errors="replace")

    def ready(self) -> bool:
        try:
            return http_get(self.admin + "/ready", timeout=0.5)[0] == 200
        except OSError:
            return False

    def metrics(self) -> str:
        return http_get(self.admin + "/metrics")[1].decode()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def restart(proxy: Dataplane) -> None:
    """A new process on the same ports (SO_REUSEPORT), ready from the cache; then the
    old one drains."""
    old = proxy.procs[-1]
    proxy.start()
    wait_for(lambda: "ready: snapshot" in proxy.logs(), 20, f"the new {proxy.name} ready")
    assert "running the cached snapshot" in proxy.logs()
    old.terminate()
    assert old.wait(15) == 0


def mesh(cp: ControlPlane, nginx: Nginx, tmp_path: Path) -> tuple[Dataplane, Dataplane, int]:
    """api-1 (inbound to nginx) and web-1 (outbound to api), started and serving."""
    # applied before api-1 registers, as a GitOps set-up would: it selects nothing yet
    cp.call(
        "POST",
        "/api/v1/resources?allow_unmatched=true",
        {
            "kind": "TrafficPermission",
            "metadata": {"name": "web-to-api", "mesh": "default"},
            "spec": {
                "destination": {"service": "api"},
                "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
            },
        },
    )
    inbound, outbound = free_port(), free_port()
    api = Dataplane(
        tmp_path,
        cp,
        "api-1",
        {
            "service": "api",
            "address": "127.0.0.1",
            "inbounds": [{"port": inbound, "service_port": nginx.port, "protocol": "http"}],
            "admin": {"port": free_port()},
        },
    )
    web = Dataplane(
        tmp_path,
        cp,
        "web-1",
        {
            "service": "web",
            "address": "127.0.0.1",
            "outbounds": [{"port": outbound, "service": "api", "protocol": "http"}],
            "admin": {"port": free_port()},
        },
    )
    api.start()
    web.start()
    wait_for(api.ready, 20, "api proxy ready")
    wait_for(web.ready, 20, "web proxy ready")
    for proxy in (api, web):
        text = proxy.metrics()
        assert metric(text, "meshling_control_plane_connected") == 1
        assert metric(text, 'meshling_certificate_renewals_total{result="ok"}') == 1
    return api, web, outbound


def test_agent_cp_zero_failures_while_the_control_plane_is_away_and_proxies_restart(
    nginx: Nginx, tmp_path: Path
) -> None:
    # mTLS off: plaintext listeners handed over (the strict-mTLS test below does TLS)
    cp = ControlPlane(tmp_path, mtls="off")
    cp.start()
    api, web, outbound = mesh(cp, nginx, tmp_path)
    try:
        # the web proxy learns the api endpoint once api-1 registered
        wait_for(lambda: http_get(f"http://127.0.0.1:{outbound}/hello")[0] == 200, 20, "web -> api")
        load = Load(outbound, clients=4, seconds=120, path="/hello")
        try:
            time.sleep(1)
            cp.stop()
            for proxy in (api, web):
                wait_for(
                    lambda p=proxy: metric(p.metrics(), "meshling_control_plane_connected") == 0,
                    15,
                    f"{proxy.name} sees the control plane gone",
                )
            time.sleep(1)
            restart(web)
            time.sleep(1)
            restart(api)
            time.sleep(2)
            cp.start()
            for proxy in (api, web):
                wait_for(
                    lambda p=proxy: metric(p.metrics(), "meshling_control_plane_connected") == 1,
                    45,
                    f"{proxy.name} reconnected",
                )
            time.sleep(1)
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()


def test_agent_cp_mtls_between_two_proxies_and_a_control_plane_outage(
    nginx: Nginx, tmp_path: Path
) -> None:
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    api, web, outbound = mesh(cp, nginx, tmp_path)
    try:
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{outbound}/echo-headers")[0] == 200,
            20,
            "web -> api over mTLS",
        )
        load = Load(outbound, clients=4, seconds=60, path="/echo-headers")
        try:
            time.sleep(1)
            cp.stop()
            time.sleep(2)
            restart(web)
            time.sleep(1)
            # the mTLS inbound: the new process shares the TLS listener's port, then the
            # old one drains; web's pooled connections to it close after their response
            restart(api)
            time.sleep(1)
            cp.start()
            for proxy in (api, web):
                wait_for(
                    lambda p=proxy: metric(p.metrics(), "meshling_control_plane_connected") == 1,
                    45,
                    f"{proxy.name} reconnected",
                )
            time.sleep(1)
        finally:
            load.finish()
        assert load.failures == [], load.failures[:5]
        assert load.ok > 100
        assert any(b"id=spiffe://default/web " in body for body in load.bodies)
        # the new api process took web's connections over mTLS, under the permission
        assert len(api.procs) == 2 and api.procs[0].poll() == 0
        allowed = [
            line
            for line in api.metrics().splitlines()
            if line.startswith("meshling_authz_decisions_total{") and 'result="allowed"' in line
        ]
        assert allowed and float(allowed[0].rsplit(" ", 1)[1]) > 0, allowed
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()
