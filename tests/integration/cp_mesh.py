"""A control plane and the proxies it configures, as the control-plane integration tests
set them up: `meshling control-plane run`, dataplanes registered with tokens issued
through its API, and `meshling proxy run --cp` processes for them.

The usual mesh is two proxies (`web_and_service`): web-1 calling a service through its
outbound, and that service's proxy in front of the app, under a TrafficPermission
(`allow`) applied before either registers, as a GitOps set-up would.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import yaml

from .conftest import free_port, http_get, wait_for


class ControlPlane:
    """`meshling control-plane run` on a free port, its data (and admin token) under
    `root/cp`; it can be stopped and started again on the same port and data."""

    def __init__(self, root: Path, mtls: str = "strict") -> None:
        self.root = root
        self.mtls = mtls
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_token_file(self) -> Path:
        return self.root / "cp" / "admin.token"

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
        token = self.admin_token_file.read_text().strip()
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def apply_unmatched(self, *documents: dict[str, Any]) -> None:
        """Create resources that may select no dataplane yet (none has registered)."""
        for document in documents:
            self.call("POST", "/api/v1/resources?allow_unmatched=true", document)


class ControlPlanes(Protocol):
    """What a proxy is given of its control plane: the `--cp` address(es), and the API
    its token is issued through."""

    @property
    def url(self) -> str: ...

    def call(self, method: str, path: str, body: Any) -> Any: ...


class Dataplane:
    """One proxy in control-plane mode: its Dataplane file and token, written when it is
    made, and every process started for it (a restart is a second process)."""

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


def allow(source: str, destination: str, name: str | None = None) -> dict[str, Any]:
    """A TrafficPermission letting `source` call `destination` (named `source-to-dest`)."""
    return {
        "kind": "TrafficPermission",
        "metadata": {"name": name or f"{source}-to-{destination}", "mesh": "default"},
        "spec": {
            "destination": {"service": destination},
            "rules": [{"action": "allow", "sources": [{"service": source}]}],
        },
    }


def web_and_service(
    root: Path,
    cp: ControlPlanes,
    service: str,
    service_port: int,
    *,
    protocol: str = "http",
    web_cp: ControlPlanes | None = None,
) -> tuple[Dataplane, Dataplane, int]:
    """`<service>-1` in front of the app on `service_port`, and web-1 calling `service`
    through its outbound (registered with `web_cp`, else `cp`): both registered, neither
    started. Returns them and web's outbound port."""
    outbound = free_port()
    server = Dataplane(
        root,
        cp,
        f"{service}-1",
        {
            "service": service,
            "address": "127.0.0.1",
            "inbounds": [{"port": free_port(), "service_port": service_port, "protocol": protocol}],
            "admin": {"port": free_port()},
        },
    )
    web = Dataplane(
        root,
        web_cp or cp,
        "web-1",
        {
            "service": "web",
            "address": "127.0.0.1",
            "outbounds": [{"port": outbound, "service": service, "protocol": protocol}],
            "admin": {"port": free_port()},
        },
    )
    return server, web, outbound


def start_ready(*proxies: Dataplane, timeout: float = 20) -> None:
    """Start the proxies together, then wait until each one is ready."""
    for proxy in proxies:
        proxy.start()
    for proxy in proxies:
        wait_for(proxy.ready, timeout, f"{proxy.name} ready")
