"""Access logs on live traffic: real proxy processes, a real nginx upstream, a real TCP
collector in the test, and (last) a real control plane placing an AccessLog policy.

* JSON and text to two files at once, both rotated away mid-run with `os.rename`: every
  request is in one file or the other, none lost, none twice;
* text to the proxy's stdout;
* a TCP collector: records arrive newline-delimited; stopped, the proxy queues up to the
  bound, drops and counts the rest (`meshling_access_log_dropped_total{backend}`) and
  requests are not slowed; restarted, the proxy reconnects and sends what it queued;
* TCP connections logged (bytes both ways, upstream, protocol);
* a reload that keeps the backend keeps the file open and loses nothing;
* through the control plane, an AccessLog selecting web's traffic to api logs those
  requests and not those to db, and api's inbound log names its caller's SPIFFE ID.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Nginx, free_port, http_snapshot, wait_for

pytestmark = pytest.mark.integration

TEXT = '%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% "%REQ(USER-AGENT)%" %REQ(X-REQUEST-ID)%'


class Collector:
    """A TCP log collector on 127.0.0.1: accepts connections and keeps every line."""

    def __init__(self, port: int = 0) -> None:
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.port = port
        self.server: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.accepted = 0

    def start(self) -> Collector:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(8)
        self.port = server.getsockname()[1]
        self.server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(conn)
                self.accepted += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buffered = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffered += data
            *complete, buffered = buffered.split(b"\n")
            with self.lock:
                self.lines.extend(line.decode() for line in complete)

    def stop(self) -> None:
        """Close the listener and every connection (the proxy sees its connection end)."""
        if self.server is not None:
            # shutdown wakes the accepting thread; close alone would leave it listening
            with contextlib.suppress(OSError):
                self.server.shutdown(socket.SHUT_RDWR)
            self.server.close()
            self.server = None
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self.connections.clear()

    def count(self) -> int:
        with self.lock:
            return len(self.lines)

    def records(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(line) for line in self.lines]


@pytest.fixture
def collector() -> Iterator[Collector]:
    found = Collector().start()
    yield found
    found.stop()


def get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, float]:
    """One request on a new connection: its status and how long it took (seconds)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        conn.close()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def dropped(metrics: str, backend: str) -> float:
    prefix = f'meshling_access_log_dropped_total{{backend="{backend}"}} '
    for line in metrics.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return -1.0


def test_access_log_json_and_text_files_survive_rotation_without_loss(
    start_proxy: Any, nginx: Nginx, tmp_path: Path
) -> None:
    json_log, text_log = tmp_path / "access.json", tmp_path / "access.txt"
    sinks = [
        {"file": str(json_log), "fields": ["method", "path", "status", "request_id"]},
        {"file": str(text_log), "format": "text", "template": TEXT},
    ]
    doc = http_snapshot(free_port(), free_port(), [nginx.port])
    doc["listeners"][0]["filter_chains"][0]["access_log"] = sinks
    proxy = start_proxy(doc)
    sent = 0

    def send(count: int) -> None:
        nonlocal sent
        for _ in range(count):
            assert get(proxy.port, f"/hello?n={sent}", {"x-request-id": f"req-{sent}"})[0] == 200
            sent += 1

    send(100)
    wait_for(lambda: len(lines(json_log)) >= 50 and len(lines(text_log)) >= 50, 10, "records")
    # rotate both files while requests flow: records keep going to the renamed files until
    # the proxy sees the rotation (within a second) and reopens both paths
    os.rename(json_log, tmp_path / "access.json.1")
    os.rename(text_log, tmp_path / "access.txt.1")
    deadline = time.monotonic() + 10
    while not (json_log.exists() and text_log.exists()) and time.monotonic() < deadline:
        send(10)
    send(50)
    total = sent

    def every(current: Path, rotated: Path) -> list[str]:
        return lines(rotated) + lines(current)

    wait_for(
        lambda: (
            len(every(json_log, tmp_path / "access.json.1")) == total
            and len(every(text_log, tmp_path / "access.txt.1")) == total
        ),
        10,
        f"{total} records in each log, across the rotation",
    )
    assert json_log.exists() and text_log.exists(), "the proxy reopened both paths"
    assert lines(json_log) and lines(text_log), "records after the rotation went to the new files"
    records = [json.loads(line) for line in every(json_log, tmp_path / "access.json.1")]
    assert sorted(r["request_id"] for r in records) == sorted(f"req-{i}" for i in range(total))
    assert {(r["method"], r["status"]) for r in records} == {("GET", 200)}
    texts = every(text_log, tmp_path / "access.txt.1")
    assert sorted(t.rsplit(" ", 1)[1] for t in texts) == sorted(f"req-{i}" for i in range(total))
    assert texts[0].startswith("GET /hello?n=0 200 ")
    assert '"Python-urllib' in texts[0] or '"-"' in texts[0]
    # the drops metric names both backends, with nothing dropped
    metrics = proxy.metrics()
    assert dropped(metrics, f"file:{json_log}") == 0
    assert dropped(metrics, f"file:{text_log}") == 0


def test_access_log_text_to_stdout_with_the_default_format(start_proxy: Any, nginx: Nginx) -> None:
    doc = http_snapshot(free_port(), free_port(), [nginx.port])
    doc["access_log"] = {"stdout": True, "format": "text"}
    proxy = start_proxy(doc)
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert (
        get(proxy.port, "/hello", {"traceparent": traceparent, "user-agent": "probe/1"})[0] == 200
    )
    assert get(proxy.port, "/missing-file")[0] == 404

    def printed() -> list[str]:
        return [line for line in proxy.logs().splitlines() if line.startswith("[")]

    wait_for(lambda: len(printed()) >= 2, 10, "two access log lines on stdout")
    first, second = printed()[:2]
    assert '"GET /hello HTTP/1.1" 200 - 0 17 ' in first
    assert '"probe/1"' in first and first.endswith(" 0af7651916cd43dd8448eb211c80319c")
    assert f'"127.0.0.1:{nginx.port}"' in first
    assert '"GET /missing-file HTTP/1.1" 404 ' in second and second.endswith(" -")


def test_access_log_http2_streams_are_logged(
    start_proxy: Any, nginx: Nginx, tmp_path: Path
) -> None:
    import shutil
    import subprocess

    log = tmp_path / "h2.log"
    doc = http_snapshot(free_port(), free_port(), [nginx.port])
    doc["access_log"] = {
        "file": str(log),
        "format": "text",
        "template": "%PROTOCOL% %REQ(:METHOD)% %REQ(:PATH)% %REQ(:SCHEME)% %RESPONSE_CODE% "
        "%BYTES_SENT% %REQ(X-TEST)%",
    }
    proxy = start_proxy(doc)
    done = subprocess.run(
        [
            *(shutil.which("curl") or "curl", "-sS", "--max-time", "10"),
            *("--http2-prior-knowledge", "-H", "x-test: h2-stream"),
            *("-o", "/dev/null", "-w", "%{http_version}", proxy.url + "/hello?h2"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout == "2", done.stderr
    wait_for(lambda: len(lines(log)) == 1, 10, "the stream's record")
    assert lines(log) == ["HTTP/2 GET /hello?h2 http 200 17 h2-stream"]


def test_access_log_tcp_collector_reconnects_and_counts_drops_while_down(
    start_proxy: Any, nginx: Nginx, collector: Collector
) -> None:
    bound = 20
    backend = f"tcp:127.0.0.1:{collector.port}"
    doc = http_snapshot(free_port(), free_port(), [nginx.port])
    doc["access_log"] = {
        "tcp": f"127.0.0.1:{collector.port}",
        "fields": ["path", "status", "request_id"],
        "max_pending": bound,
    }
    proxy = start_proxy(doc)

    def send(first: int, count: int) -> list[float]:
        took = []
        for i in range(first, first + count):
            status, seconds = get(proxy.port, f"/hello?n={i}", {"x-request-id": f"r{i}"})
            assert status == 200
            took.append(seconds)
        return took

    # up: every record arrives, newline-delimited JSON
    send(0, 5)  # warm-up, not measured
    up = send(5, 60)
    wait_for(lambda: collector.count() == 65, 10, "65 records at the collector")
    assert [r["request_id"] for r in collector.records()] == [f"r{i}" for i in range(65)]
    assert dropped(proxy.metrics(), backend) == 0

    # down: the proxy notices, queues `bound` records, drops and counts the rest
    collector.stop()
    wait_for(lambda: "access log collector " + backend + " lost" in proxy.logs(), 10, "lost")
    down = send(65, 60)
    wait_for(lambda: dropped(proxy.metrics(), backend) == 60 - bound, 10, "drops counted")
    p50_up, p50_down = statistics.median(up), statistics.median(down)
    print(f"median latency: collector up {p50_up * 1000:.2f} ms, down {p50_down * 1000:.2f} ms")
    assert p50_down < p50_up * 2 + 0.005, (p50_up, p50_down)
    assert max(down) < 1.0

    # back: the proxy reconnects (with backoff) and sends what it queued, then new ones
    collector.start()
    wait_for(lambda: collector.count() == 65 + bound, 15, "the queued records after reconnecting")
    send(125, 3)
    wait_for(lambda: collector.count() == 65 + bound + 3, 10, "new records")
    ids = [r["request_id"] for r in collector.records()]
    assert ids[65:] == [f"r{i}" for i in range(65, 65 + bound)] + ["r125", "r126", "r127"]
    assert collector.accepted == 2
    assert dropped(proxy.metrics(), backend) == 60 - bound


def echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data[: len(data) // 2])

    threading.Thread(target=serve, daemon=True).start()
    return server, server.getsockname()[1]


def test_access_log_tcp_connections_are_logged(start_proxy: Any, tmp_path: Path) -> None:
    server, port = echo_server()
    log = tmp_path / "tcp.log"
    listen = free_port()
    doc = {
        "version": "1",
        "service": "web",
        "admin": {"address": "127.0.0.1", "port": free_port()},
        "listeners": [
            {
                "name": "outbound:db",
                "address": "127.0.0.1",
                "port": listen,
                "direction": "outbound",
                "filter_chains": [
                    {
                        "tcp": {"cluster": "db"},
                        "access_log": [
                            {
                                "file": str(log),
                                "fields": [
                                    "protocol",
                                    "cluster",
                                    "upstream",
                                    "bytes_received",
                                    "bytes_sent",
                                    "duration_ms",
                                    "source_service",
                                    "destination_service",
                                    "direction",
                                ],
                            },
                            {
                                "file": str(log) + ".txt",
                                "format": "text",
                                "template": "%PROTOCOL% %BYTES_RECEIVED% %BYTES_SENT% "
                                "%UPSTREAM_HOST% %RESPONSE_CODE% %REQ(:METHOD)%",
                            },
                        ],
                    }
                ],
            }
        ],
        "clusters": [{"name": "db", "endpoints": [{"address": "127.0.0.1", "port": port}]}],
    }
    try:
        start_proxy(doc)
        with socket.create_connection(("127.0.0.1", listen), timeout=5) as conn:
            conn.sendall(b"x" * 1000)
            got = b""
            while len(got) < 500:
                got += conn.recv(65536)
            time.sleep(0.05)  # a connection that lasts a little
        wait_for(lambda: len(lines(log)) == 1, 10, "the connection's record")
        (record,) = [json.loads(line) for line in lines(log)]
        assert record["protocol"] is None and record["cluster"] == "db"
        assert record["upstream"] == f"127.0.0.1:{port}"
        assert record["bytes_received"] == 1000 and record["bytes_sent"] == 500
        assert record["duration_ms"] >= 50
        assert record["source_service"] == "web" and record["destination_service"] == "db"
        assert record["direction"] == "outbound"
        wait_for(lambda: len(lines(Path(str(log) + ".txt"))) == 1, 10, "the text record")
        assert lines(Path(str(log) + ".txt")) == [f"TCP 1000 500 127.0.0.1:{port} 0 -"]
    finally:
        server.close()


def test_access_log_reload_keeps_the_writer_and_its_records(
    start_proxy: Any, nginx: Nginx, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    doc = http_snapshot(free_port(), free_port(), [nginx.port])
    doc["access_log"] = {"path": str(log), "fields": ["path", "route"]}
    proxy = start_proxy(doc)
    assert get(proxy.port, "/hello?before")[0] == 200
    wait_for(lambda: len(lines(log)) == 1, 10, "first record")
    inode = log.stat().st_ino
    # a new snapshot with another route name and the same backend
    doc["version"] = "2"
    routes = doc["listeners"][0]["filter_chains"][0]["http"]["route_config"]["virtual_hosts"]
    routes[0]["routes"] = [{"name": "renamed", "cluster": "up"}]
    proxy.write_config(doc)
    wait_for(lambda: 'meshling_snapshot_info{version="2"}' in proxy.metrics(), 10, "reloaded")
    for i in range(20):
        assert get(proxy.port, f"/hello?after={i}")[0] == 200
    wait_for(lambda: len(lines(log)) == 21, 10, "every record in the same file")
    assert log.stat().st_ino == inode
    routes_seen = [json.loads(line)["route"] for line in lines(log)]
    assert routes_seen == ["all"] + ["renamed"] * 20
    assert "meshling_config_reloads_total" in proxy.metrics()


def test_access_log_snapshot_with_a_bad_template_is_refused_naming_the_placeholder(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    import yaml

    doc = http_snapshot(free_port(), free_port(), [1])
    doc["access_log"] = {"stdout": True, "format": "text", "template": "%STATUS%"}
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [sys.executable, "-m", "meshling", "proxy", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert done.returncode != 0
    assert f"{config}: access_log.template: %STATUS%: unknown placeholder" in done.stderr


def test_access_log_policy_through_the_control_plane_logs_only_the_selected_traffic(
    tmp_path: Path,
) -> None:
    from .cp_mesh import ControlPlane, Dataplane, allow, start_ready
    from .test_cp_policies import FlakyUpstream, Mesh, running

    def logged(snapshot: Any) -> list[str]:
        """The names of the sinks on the chains of a running snapshot."""
        return sorted(
            sink["name"]
            for listener in snapshot["listeners"]
            for chain in listener["filter_chains"]
            for sink in chain.get("access_log") or ()
        )

    upstream = FlakyUpstream()
    cp = ControlPlane(tmp_path, mtls="strict")
    cp.start()
    cp.apply_unmatched(allow("*", "*", name="everyone"))
    to_api, to_db = free_port(), free_port()

    def service(name: str, service: str, spec: dict[str, Any]) -> Dataplane:
        return Dataplane(
            tmp_path,
            cp,
            name,
            {"service": service, "address": "127.0.0.1", "admin": {"port": free_port()}, **spec},
        )

    inbound = [{"port": 0, "service_port": upstream.port, "protocol": "http"}]
    api = service("api-1", "api", {"inbounds": [{**inbound[0], "port": free_port()}]})
    db = service("db-1", "db", {"inbounds": [{**inbound[0], "port": free_port()}]})
    web = service(
        "web-1",
        "web",
        {
            "outbounds": [
                {"port": to_api, "service": "api", "protocol": "http"},
                {"port": to_db, "service": "db", "protocol": "http"},
            ]
        },
    )
    web_log, api_log = tmp_path / "web-to-api.log", tmp_path / "api-from-web.log"
    mesh = Mesh(tmp_path, cp, to_api)
    try:
        start_ready(api, db, web)
        wait_for(lambda: get(to_api, "/ok/warm")[0] == 200, 20, "web -> api over mTLS")
        wait_for(lambda: get(to_db, "/ok/warm")[0] == 200, 20, "web -> db over mTLS")

        mesh.apply(
            {
                "kind": "AccessLog",
                "metadata": {"name": "web-to-api", "mesh": "default"},
                "spec": {
                    "dataplanes": [{"service": "web"}],
                    "to": [{"service": "api"}],
                    "backends": [
                        {
                            "file": str(web_log),
                            "fields": ["path", "status", "source_service", "destination_service"],
                        }
                    ],
                },
            }
        )
        mesh.apply(
            {
                "kind": "AccessLog",
                "metadata": {"name": "api-from-web", "mesh": "default"},
                "spec": {
                    "dataplanes": [{"service": "api"}],
                    "from": [{"service": "web"}],
                    "backends": [
                        {
                            "file": str(api_log),
                            "format": "text",
                            "template": "%SOURCE_IDENTITY% %SOURCE_SERVICE% %REQ(:PATH)% "
                            "%RESPONSE_CODE%",
                        }
                    ],
                },
            }
        )
        wait_for(lambda: logged(running(web)) == ["web-to-api"], 10, "web runs the AccessLog")
        wait_for(lambda: logged(running(api)) == ["api-from-web"], 10, "api runs the other")
        assert logged(running(db)) == []
        # the pooled connection between the proxies, accepted by api before the change,
        # keeps the chain it started with for one more request, and is then replaced
        assert get(to_api, "/ok/settle")[0] == 200
        for n in range(5):
            assert get(to_api, f"/ok/api-{n}")[0] == 200
            assert get(to_db, f"/ok/db-{n}")[0] == 200
        wait_for(lambda: len(lines(web_log)) == 6, 10, "web's records of its calls to api")
        wait_for(lambda: "/ok/api-4 " in api_log.read_text(), 10, "api's records of web's calls")
        records = [json.loads(line) for line in lines(web_log)]
        paths = ["/ok/settle"] + [f"/ok/api-{n}" for n in range(5)]
        assert [r["path"] for r in records] == paths
        assert {(r["source_service"], r["destination_service"], r["status"]) for r in records} == {
            ("web", "api", 200)
        }
        assert lines(api_log)[-5:] == [
            f"spiffe://default/web web /ok/api-{n} 200" for n in range(5)
        ]
        assert len(lines(api_log)) in (5, 6)
    finally:
        for proxy in (web, db, api):
            proxy.stop_all()
        cp.stop()
        upstream.close()
