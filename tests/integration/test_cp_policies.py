"""Traffic policies through the control plane, on live traffic: a real `meshling
control-plane run` (mTLS strict), two real proxies in control-plane mode (web-1 -> mTLS
-> api-1) and a real upstream behind api-1 that fails the first try of every request
under /flaky/ with 503.

`meshling apply` of a Retry (web -> api) reaches web's proxy (its `/config` carries it)
and the failures disappear, each answer saying it took two attempts; a RateLimit on api
brings 429s, a FaultInjection abort its status; deleting each brings the behaviour back.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import http_get, wait_for
from .cp_mesh import ControlPlane, Dataplane, allow, start_ready, web_and_service
from .reliability_upstreams import answer, serve

pytestmark = pytest.mark.integration

PERMISSION = allow("web", "api")
RETRY = {
    "kind": "Retry",
    "metadata": {"name": "web-to-api", "mesh": "default"},
    "spec": {
        "sources": [{"service": "web"}],
        "destinations": [{"service": "api"}],
        "conf": {"max_attempts": 3, "retry_on": ["5xx"], "backoff": {"base": "5ms", "max": "20ms"}},
    },
}
RATE_LIMIT = {
    "kind": "RateLimit",
    "metadata": {"name": "api-from-web", "mesh": "default"},
    "spec": {
        "sources": [{"service": "web"}],
        "destinations": [{"service": "api"}],
        "conf": {"local": {"requests": 3, "interval": "1m"}},
    },
}
FAULT = {
    "kind": "FaultInjection",
    "metadata": {"name": "api-teapot", "mesh": "default"},
    "spec": {
        "sources": [{"service": "web"}],
        "destinations": [{"service": "api"}],
        "conf": {"abort": {"percentage": 100, "http_status": 418}},
    },
}


class FlakyUpstream:
    """An HTTP/1.1 server on 127.0.0.1 that answers the first request for each path under
    /flaky/ with 503, and every other request with 200; it counts requests by path."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.lock = threading.Lock()
        self.server = serve(self.handle)
        self.port = int(self.server.server_address[1])

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        with self.lock:
            n = self.seen[request.path] = self.seen.get(request.path, 0) + 1
        status = 503 if request.path.startswith("/flaky/") and n == 1 else 200
        answer(request, status, b"try %d\n" % n)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def flaky() -> Iterator[FlakyUpstream]:
    upstream = FlakyUpstream()
    yield upstream
    upstream.close()


def get(port: int, path: str) -> tuple[int, dict[str, str]]:
    """One request through web's outbound: status and headers (lower-case names)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def running(proxy: Dataplane) -> Any:
    """The snapshot the proxy runs, from its admin `/config`."""
    return json.loads(http_get(proxy.admin + "/config")[1])["snapshot"]


def carries(document: Any, key: str) -> bool:
    """Whether a non-empty `key` appears anywhere in the document."""
    if isinstance(document, dict):
        return any((k == key and v is not None) or carries(v, key) for k, v in document.items())
    if isinstance(document, list):
        return any(carries(v, key) for v in document)
    return False


class Mesh:
    def __init__(self, root: Path, cp: ControlPlane, outbound: int) -> None:
        self.root = root
        self.cp = cp
        self.outbound = outbound
        self.requests = 0

    def meshling(self, *args: str, stdin: str | None = None) -> None:
        """`meshling ARGS` as a user runs it, against this control plane."""
        done = subprocess.run(
            [sys.executable, "-m", "meshling", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=30,
            env={
                "MESHLING_CP": self.cp.url,
                "MESHLING_ADMIN_TOKEN_FILE": str(self.cp.admin_token_file),
            },
            cwd=self.root,
        )
        assert done.returncode == 0, done.stderr

    def apply(self, document: dict[str, Any]) -> None:
        path = self.root / f"{document['metadata']['name']}.{document['kind']}.yaml"
        path.write_text(yaml.safe_dump(document))
        self.meshling("apply", "-f", str(path))

    def delete(self, document: dict[str, Any]) -> None:
        self.meshling("delete", document["kind"].lower(), document["metadata"]["name"])

    def call(self, prefix: str = "/flaky/") -> tuple[int, dict[str, str]]:
        """A request for a path never asked for before."""
        self.requests += 1
        return get(self.outbound, f"{prefix}{self.requests}")


def test_cp_policies_apply_and_delete_change_live_traffic(
    flaky: FlakyUpstream, tmp_path: Path
) -> None:
    started = time.monotonic()
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    cp.apply_unmatched(PERMISSION)
    api, web, outbound = web_and_service(tmp_path, cp, "api", flaky.port)
    mesh = Mesh(tmp_path, cp, outbound)
    try:
        start_ready(api, web)
        wait_for(lambda: mesh.call("/ok/")[0] == 200, 20, "web -> api over mTLS")

        # no Retry: the first try's 503 is the answer
        status, headers = mesh.call()
        assert status == 503 and "x-meshling-attempts" not in headers

        # Retry web -> api: pushed to web's proxy only, and the failures disappear
        api_version = running(api)
        mesh.apply(RETRY)
        wait_for(lambda: carries(running(web), "retry"), 10, "web runs the Retry")
        assert running(api) == api_version
        first = mesh.requests + 1
        answers = [mesh.call() for _ in range(10)]
        assert [s for s, _ in answers] == [200] * 10
        assert {h.get("x-meshling-attempts") for _, h in answers} == {"2"}
        # each path reached the upstream twice: the failed try, and the retry
        assert [flaky.seen[f"/flaky/{n}"] for n in range(first, first + 10)] == [2] * 10

        # RateLimit on api for web: 3 a minute, then 429 (not retried: not a 5xx). The
        # first request may still ride web's pooled connection to api, accepted before
        # the change: it keeps that chain (and is then closed), so up to 4 get through.
        mesh.apply(RATE_LIMIT)
        wait_for(lambda: carries(running(api), "rate_limit"), 10, "api runs the RateLimit")
        statuses = [mesh.call("/ok/")[0] for _ in range(8)]
        admitted = statuses.count(200)
        assert admitted in (3, 4) and statuses == [200] * admitted + [429] * (8 - admitted)
        mesh.delete(RATE_LIMIT)
        wait_for(lambda: not carries(running(api), "rate_limit"), 10, "api drops the RateLimit")
        assert [mesh.call("/ok/")[0] for _ in range(7)][1:] == [200] * 6

        # FaultInjection: every call web makes to api is aborted with 418
        mesh.apply(FAULT)
        wait_for(lambda: carries(running(api), "fault"), 10, "api runs the FaultInjection")
        assert [mesh.call("/ok/")[0] for _ in range(4)][1:] == [418] * 3
        mesh.delete(FAULT)
        wait_for(lambda: not carries(running(api), "fault"), 10, "api drops the FaultInjection")
        assert [mesh.call("/ok/")[0] for _ in range(4)][1:] == [200] * 3

        # the Retry deleted: the failures are back
        mesh.delete(RETRY)
        wait_for(lambda: not carries(running(web), "retry"), 10, "web drops the Retry")
        status, headers = mesh.call()
        assert status == 503 and "x-meshling-attempts" not in headers
        assert time.monotonic() - started < 40
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()
