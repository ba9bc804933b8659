"""`meshling stat` and `meshling tap` against a real control plane (mTLS strict) and two
real proxies: web-1 (outbound to api) and api-1 (inbound to a small HTTP app that answers
503 under /fail and 200 elsewhere).

stat: a known mix of requests (90 ok, 10 x 503) shows up in the api row, its route and the
web -> api edge (the caller's identity verified by mTLS). tap: the lines printed match the
filter, arrive while the traffic runs, and the tap ends by itself (after --max requests,
or after --duration), and when its client goes away. And, with `websockets` clients for
proxies, that only proxies that announce the telemetry messages get them.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshling.configstream import Hello, decode_server, encode
from meshling.configstream.messages import Stats, StatsRow, Tap, TapEvents, TelemetryOffer, Untap
from meshling.telemetry.metrics import BUCKETS

from .conftest import http_get, wait_for
from .cp_mesh import ControlPlane, Dataplane, allow, start_ready, web_and_service
from .test_cp_stream import ProxyClient, dataplane, start_control_plane

pytestmark = pytest.mark.integration


class _App(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # the head and the body go in two writes: without this, Nagle's algorithm holds
        # the body until the proxy's delayed ACK (40 ms a request)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        status = 503 if self.path.startswith("/fail") else 200
        body = b"unavailable\n" if status == 503 else b"ok\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def app() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _App)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def cli(cp: ControlPlane, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshling", *args, "--cp", cp.url],
        capture_output=True,
        text=True,
        env=env(cp),
        timeout=timeout,
        check=False,
    )


def env(cp: ControlPlane) -> dict[str, str]:
    return {**os.environ, "MESHLING_ADMIN_TOKEN_FILE": str(cp.admin_token_file)}


def stats(cp: ControlPlane, *args: str) -> dict[str, Any]:
    out = cli(cp, "stat", "-o", "json", *args)
    assert out.returncode == 0, out.stdout + out.stderr
    body: dict[str, Any] = json.loads(out.stdout)
    return body


def api_get(cp: ControlPlane, path: str) -> tuple[int, bytes]:
    token = cp.admin_token_file.read_text().strip()
    request = urllib.request.Request(cp.url + path, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def poll(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """wait_for at a pace fit for running a CLI process each time."""
    wait_for(predicate, timeout, what, interval=0.5)


def row(body: dict[str, Any], section: str, **match: str) -> dict[str, Any]:
    for r in body[section]:
        if all(r.get(k) == v for k, v in match.items()):
            return dict(r)
    raise AssertionError(f"no {section} row {match} in {body}")


class Traffic:
    """Requests through the web proxy in a thread until stopped (bounded in time and count):
    a /fail request every other one."""

    def __init__(self, port: int, seconds: float = 30.0, interval: float = 0.05) -> None:
        self.port, self.seconds, self.interval = port, seconds, interval
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.started = self.ended = 0.0

    def __enter__(self) -> Traffic:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self.stop.is_set() and time.monotonic() < deadline and self.sent < 2000:
            path = "/fail/x" if self.sent % 2 else "/ok"
            with contextlib.suppress(OSError):
                http_get(f"http://127.0.0.1:{self.port}{path}")
            self.sent += 1
            self.stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)
        self.ended = time.monotonic()


def test_stat_and_tap_through_the_control_plane(app: int, tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    cp.apply_unmatched(allow("web", "api"))
    api, web, outbound = web_and_service(tmp_path, cp, "api", app)
    try:
        start_ready(api, web)
        # both proxies' first stats arrived: they are listed, online
        poll(
            lambda: (
                row(stats(cp), "services", service="api")["online"] == 1
                and row(stats(cp), "services", service="web")["online"] == 1
            ),
            20,
            "both services online",
        )
        poll(lambda: http_get(f"http://127.0.0.1:{outbound}/ok")[0] == 200, 20, "web -> api")

        # -- stat: 90 ok and 10 failed on top of what was counted so far -------------------
        def api_requests() -> int:
            return int(row(stats(cp, "--window", "15m"), "services", service="api")["requests"])

        # the warm-up request is in a sample before counting (api-1 sent its first one
        # when its stream opened, before it served anything)
        poll(lambda: api_requests() >= 1, 20, "the warm-up request counted")
        before = api_requests()
        for i in range(100):
            path = "/fail" if i % 10 == 9 else f"/ok/{i}"
            status, _ = http_get(f"http://127.0.0.1:{outbound}{path}")
            assert status == (503 if path == "/fail" else 200)
        poll(lambda: api_requests() >= before + 100, 20, "100 more requests counted")
        body = stats(cp, "--window", "15m")
        api_row = row(body, "services", service="api")
        assert api_row["requests"] == before + 100
        assert api_row["dataplanes"] == 1 and api_row["online"] == 1
        assert api_row["success_rate"] == pytest.approx((before + 90) / (before + 100), abs=2e-4)
        # over the time the proxy has reported (well under the 15 minutes asked)
        assert (before + 100) / 900 < api_row["rps"] <= (before + 100) / 5
        assert 0 < api_row["p50_ms"] <= api_row["p95_ms"] <= api_row["p99_ms"] < 1000
        # web's own inbound has no traffic: listed all the same, without rates
        web_row = row(body, "services", service="web")
        assert web_row["requests"] == 0 and web_row["success_rate"] is None
        assert row(body, "routes", service="api")["requests"] == before + 100
        edge = row(body, "edges", source="web", destination="api")
        assert edge["requests"] == before + 100
        assert body["mesh"] == "default" and body["window"] == 900
        assert body["generated"].endswith("Z")

        table = cli(cp, "stat", "api", "--window", "15m")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == [
            "NAME",
            "MESHED",
            "SUCCESS",
            "RPS",
            "LATENCY_P50",
            "LATENCY_P95",
            "LATENCY_P99",
        ]
        assert lines[1].split()[:2] == ["api", "1/1"] and len(lines) == 2
        by_route = cli(cp, "stat", "api", "--by", "route", "--window", "2m")
        assert by_route.stdout.splitlines()[1].split()[1] == "api", by_route.stdout
        bad = cli(cp, "stat", "--window", "1d")
        assert bad.returncode == 2 and "--window" in bad.stderr

        # -- tap: filtered lines while the traffic runs; it ends after --max ---------------
        tap = subprocess.Popen(
            [
                *(sys.executable, "-m", "meshling", "tap", "api", "--cp", cp.url),
                *("--direction", "inbound", "--path", "/fail", "--max", "5"),
                *("--duration", "25s", "-o", "json"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env(cp),
        )
        arrivals: list[tuple[float, dict[str, Any]]] = []
        try:
            time.sleep(1.0)  # the tap request reaches the control plane and the proxies
            with Traffic(outbound) as traffic:
                assert tap.stdout is not None
                for line in tap.stdout:
                    arrivals.append((time.monotonic(), json.loads(line)))
                    if "end" in arrivals[-1][1] or len(arrivals) > 10:
                        break
            assert tap.wait(10) == 0, tap.stderr.read() if tap.stderr else ""
        finally:
            if tap.poll() is None:
                tap.kill()
                tap.wait()
        events = [event for _, event in arrivals if "end" not in event]
        trailer = arrivals[-1][1]
        assert trailer == {"end": "max", "events": 5, "dropped": 0}, arrivals
        assert len(events) == 5
        for at, event in arrivals[:-1]:
            assert traffic.started < at < traffic.ended  # live, not after the fact
            assert event["path"].startswith("/fail")
            assert event["direction"] == "inbound" and event["dataplane"] == "api-1"
            assert (event["source"], event["destination"]) == ("web", "api")
            assert event["status"] == 503 and event["method"] == "GET"
            assert event["request_id"] and event["duration_ms"] > 0
            assert event["upstream"] == f"127.0.0.1:{app}"
            assert event["time"].endswith("Z") and event["time"][:2] == "20"
        # it ended by itself, with the traffic still running
        assert traffic.sent < 2000 and arrivals[-1][0] < traffic.ended

        # -- tap in text, both directions, by status; it ends after --duration -------------
        started = time.monotonic()
        with Traffic(outbound, seconds=20):
            out = cli(cp, "tap", "api", "--status", "5xx", "--duration", "4s", timeout=30)
        took = time.monotonic() - started
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines and all(" status=503 " in line for line in lines), out.stdout
        assert all(line.startswith("req id=") and " dst=api " in line for line in lines)
        assert any(" dir=inbound " in line for line in lines)
        assert any(" dir=outbound " in line and " dp=web-1 " in line for line in lines)
        assert "tap ended: its duration passed;" in out.stderr
        assert 4 <= took < 15

        # the control plane untapped the proxy once the tap had its 5 events
        wait_for(lambda: "ended by the control plane" in api.logs(), 10, "api-1 untapped")

        # -- a client that goes away ends its tap on the proxies ----------------------------
        def count(proxy: Dataplane, text: str) -> int:
            return proxy.logs().count(text)

        tapped, untapped = count(web, "sending requests"), count(web, "ended by the control")
        gone = subprocess.Popen(
            [sys.executable, "-m", "meshling", "tap", "web", "--cp", cp.url, "-o", "json"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env(cp),
        )
        try:
            wait_for(lambda: count(web, "sending requests") > tapped, 15, "web-1 tapped")
            assert count(web, "ended by the control") == untapped
            gone.terminate()
            gone.wait(10)
        finally:
            if gone.poll() is None:
                gone.kill()
                gone.wait()
        wait_for(
            lambda: count(web, "ended by the control") > untapped, 10, "web-1 untapped on leaving"
        )

        # -- refusals the API and the CLI report --------------------------------------------
        for query, field in (
            ("stats?window=0", "window"),
            ("stats?window=soon", "window"),
            ("stats?by=pod", "by"),
            ("tap?mesh=default", "service"),
            ("tap?service=api&direction=up", "direction"),
            ("tap?service=api&sample=0", "sample"),
            ("tap?service=api&max=0", "max"),
        ):
            status, raw = api_get(cp, "/api/v1/" + query)
            assert status == 400 and json.loads(raw)["field"] == field, (query, raw)
        status, raw = api_get(cp, "/openapi.json")
        assert {"/api/v1/stats", "/api/v1/tap"} <= set(json.loads(raw)["paths"])
        missing = cli(cp, "tap", "nope", "--duration", "2s")
        assert missing.returncode == 1 and "no dataplane of service 'nope'" in missing.stderr
        bad_status = cli(cp, "tap", "api", "--status", "50x")
        assert bad_status.returncode == 1 and "status" in bad_status.stderr
    finally:
        web.stop_all()
        api.stop_all()
        cp.stop()


def test_stat_tap_messages_go_only_to_proxies_that_announce_them(tmp_path: Path) -> None:
    """With `websockets` clients standing in for proxies: an older proxy (no `features`)
    gets no telemetry message, tap or not; a newer one gets `telemetry`, then the tap, and
    its `stats` and `tap_events` reach the API."""
    cp = start_control_plane(tmp_path, "--stats-interval", "2")

    def counts(ok: int) -> Stats:
        buckets = (0, 0, 0, ok, *[0] * (len(BUCKETS) - 3))
        row = StatsRow("inbound", "api", "web", "default", (0, ok, 0, 0, 0), buckets, ok * 0.004)
        return Stats(1000.0, BUCKETS, (row,))

    async def body() -> None:
        old = await ProxyClient.connect(cp.ws, cp.dataplane_token("api"))
        await old.ack(await old.hello(dataplane("api-1", "api")))
        new = await ProxyClient.connect(cp.ws, cp.dataplane_token("web"))
        hello = Hello(dataplane("web-1", "web"), proxy={"features": ["telemetry"]})
        await new.connection.send(encode(hello))
        first = [decode_server(await new.connection.recv()) for _ in range(2)]
        assert TelemetryOffer(2.0) in first, first
        await new.connection.send(encode(counts(0)))
        await asyncio.sleep(1.1)  # the next sample, at least MIN_SPACING later
        await new.connection.send(encode(counts(30)))

        async with httpx.AsyncClient(base_url=cp.url, headers=cp.auth, timeout=10) as client:
            stats = (await client.get("/api/v1/stats?window=60")).json()
            web = next(s for s in stats["services"] if s["service"] == "web")
            assert (web["requests"], web["success_rate"], web["online"]) == (30, 1.0, 1)
            assert 2.5 <= web["p50_ms"] <= 5.0
            assert stats["edges"] == [
                {
                    "source": "api",
                    "destination": "web",
                    "requests": 30,
                    "rps": web["rps"],
                    "success_rate": 1.0,
                    "p99_ms": web["p99_ms"],
                }
            ]
            query = "/api/v1/tap?service=api&duration=3&path=/x"
            async with client.stream("GET", query) as response:
                assert response.status_code == 200
                assert response.headers["x-meshling-tap-proxies"] == "1"
                tap = decode_server(await asyncio.wait_for(new.connection.recv(), 5))
                assert isinstance(tap, Tap) and tap.filter.path == "/x"
                assert tap.filter.destination == "api" and tap.duration == 3.0
                event = {"time": 1764265200.5, "status": 200, "path": "/x/1", "bogus": 1}
                await new.connection.send(encode(TapEvents(tap.id, (event,), dropped=2)))
                lines = [json.loads(line) async for line in response.aiter_lines() if line]
            untap = decode_server(await asyncio.wait_for(new.connection.recv(), 5))
            assert untap == Untap(tap.id)
        assert lines[0]["dataplane"] == "web-1" and lines[0]["path"] == "/x/1"
        assert lines[0]["time"] == "2025-11-27T17:40:00.500Z" and "bogus" not in lines[0]
        assert lines[1] == {"end": "duration", "events": 1, "dropped": 2}
        # the older proxy heard nothing of it all
        await old.nothing(0.5)
        await old.close()
        await new.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 30))
    finally:
        assert cp.stop() == 0, cp.log.read_text()
