"""Tests of `meshling demo`: its sample services, its summary, and whole runs of it.

The whole-run tests start the real thing (`python -m meshling demo`) as a process:
three apps and three proxies on 127.0.0.1, traffic through all of them, and then they
check that every process the demo recorded in `<workdir>/pids` is gone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshling.demo.summary import LatencyHistogram, parse_metrics, quantile

PROXIES = ("web", "api-v1", "api-v2")
# a row of the summary table: proxy, listener, "route -> cluster", requests, ...
ROW = re.compile(r"^\s+(\S+)\s+(\S+)\s+(\S+) -> (\S+)\s+(\d+)\s", re.MULTILINE)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _recorded_pids(workdir: Path) -> dict[str, int]:
    lines = (workdir / "pids").read_text(encoding="utf-8").splitlines()
    return {name: int(pid) for name, pid in (line.split() for line in lines if line.strip())}


def _alive(pid: int) -> bool:
    """Whether pid is still one of the demo's processes (not merely a reused number)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"meshling" in cmdline


def _assert_all_stopped(workdir: Path) -> None:
    pids = _recorded_pids(workdir)
    assert pids, "the demo recorded no processes"
    left = {name: pid for name, pid in pids.items() if _alive(pid)}
    for pid in left.values():
        os.kill(pid, signal.SIGKILL)  # do not leak them into the next test
    assert not left, f"still running after the demo exited: {left}"


def _wait_for_text(path: Path, text: str, process: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(encoding="utf-8"):
            return
        if process.poll() is not None:
            break
        time.sleep(0.1)
    output = path.read_text(encoding="utf-8") if path.exists() else ""
    raise AssertionError(f"{text!r} not printed within {timeout}s; output so far:\n{output}")


def _final_section(stdout: str) -> str:
    assert "final summary" in stdout, stdout
    return stdout[stdout.index("final summary") :]


# -- the summary's arithmetic ---------------------------------------------------------


def test_quantile_interpolates_within_the_bucket() -> None:
    # 10 observations <= 1, 10 more in (1, 2]: the median is the top of the first bucket,
    # the 75th percentile halfway through the second
    assert quantile(0.5, [1.0, 2.0, math.inf], [10, 20, 20]) == 1.0
    assert quantile(0.75, [1.0, 2.0, math.inf], [10, 20, 20]) == 1.5


def test_quantile_beyond_the_last_finite_bucket_is_that_bound() -> None:
    assert quantile(0.99, [1.0, 2.0, math.inf], [0, 0, 5]) == 2.0


def test_quantile_of_an_empty_histogram_is_unknown() -> None:
    assert quantile(0.5, [1.0, math.inf], [0, 0]) is None
    assert LatencyHistogram().quantile(0.5) is None


def test_latency_histogram_quantile_is_close_to_the_observations() -> None:
    histogram = LatencyHistogram()
    for ms in range(1, 101):
        histogram.observe(ms / 1000)
    p50 = histogram.quantile(0.5)
    assert p50 is not None and 0.045 < p50 < 0.056


def test_parse_metrics_groups_requests_and_buckets_by_route() -> None:
    text = """\
# TYPE meshling_http_requests_total counter
meshling_http_requests_total{listener="inbound",route="default",cluster="local-app",status_class="2xx"} 98.0
meshling_http_requests_total{listener="inbound",route="default",cluster="local-app",status_class="5xx"} 2.0
# TYPE meshling_http_request_duration_seconds histogram
meshling_http_request_duration_seconds_bucket{listener="inbound",route="default",cluster="local-app",le="0.005"} 50.0
meshling_http_request_duration_seconds_bucket{listener="inbound",route="default",cluster="local-app",le="0.01"} 100.0
meshling_http_request_duration_seconds_bucket{listener="inbound",route="default",cluster="local-app",le="+Inf"} 100.0
meshling_http_request_duration_seconds_count{listener="inbound",route="default",cluster="local-app"} 100.0
meshling_http_request_duration_seconds_sum{listener="inbound",route="default",cluster="local-app"} 0.5
# TYPE meshling_downstream_connections_active gauge
meshling_downstream_connections_active{listener="inbound"} 4.0
"""
    metrics = parse_metrics(text)
    [row] = metrics.rows
    assert (row.listener, row.route, row.cluster) == ("inbound", "default", "local-app")
    assert row.requests == 100
    assert row.success_rate == pytest.approx(0.98)
    assert row.quantile(0.5) == pytest.approx(0.005)
    assert metrics.connections == {"inbound": 4.0}


# -- the sample services --------------------------------------------------------------


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, "the service exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on {port}")


@contextlib.contextmanager
def _services(error_rate: str) -> Iterator[tuple[int, int]]:
    """An api instance and a web instance calling it directly; yields their ports."""
    api_port, web_port = _free_port(), _free_port()
    service = [sys.executable, "-m", "meshling.demo.services"]
    api = subprocess.Popen(
        [*service, "api", "--port", str(api_port), "--instance", "v1", "--error-rate", error_rate]
    )
    web = subprocess.Popen(
        [
            *service,
            "web",
            "--port",
            str(web_port),
            "--instance",
            "w1",
            "--upstream-port",
            str(api_port),
        ]
    )
    try:
        _wait_for_port(api_port, api)
        _wait_for_port(web_port, web)
        yield api_port, web_port
    finally:
        for process in (web, api):
            process.send_signal(signal.SIGTERM)
        assert web.wait(timeout=10) == 0
        assert api.wait(timeout=10) == 0


@pytest.mark.integration
def test_services_web_combines_its_answer_with_api() -> None:
    with _services(error_rate="0") as (_, web_port):
        status, document = _get(f"http://127.0.0.1:{web_port}/users/42")
    assert status == 200
    assert document == {
        "service": "web",
        "instance": "w1",
        "path": "/users/42",
        "api": {"service": "api", "instance": "v1", "path": "/users/42"},
    }


@pytest.mark.integration
def test_services_web_answers_502_when_api_fails() -> None:
    with _services(error_rate="1") as (api_port, web_port):
        assert _get(f"http://127.0.0.1:{api_port}/x")[0] == 500
        status, document = _get(f"http://127.0.0.1:{web_port}/x")
    assert status == 502
    assert document["error"] == "api answered 500"


# -- whole runs of the demo -------------------------------------------------------------


def _demo(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "meshling", "demo", "--workdir", str(workdir), *args]


@pytest.mark.integration
def test_demo_sends_traffic_through_every_proxy_and_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    try:
        result = subprocess.run(
            _demo(workdir, "--duration", "8"),
            capture_output=True,
            text=True,
            timeout=90,
            cwd=tmp_path,
        )
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        final = _final_section(result.stdout)
        requests: dict[str, int] = {}
        for proxy, _listener, _route, _cluster, count in ROW.findall(final):
            requests[proxy] = requests.get(proxy, 0) + int(count)
        for proxy in PROXIES:
            assert requests.get(proxy, 0) > 0, f"no requests through {proxy}:\n{final}"
        # both api versions answered: web's proxy balanced over them
        assert re.search(r"api answers by instance: v1 \d+%, v2 \d+%", final), final

        summary = json.loads((workdir / "summary.json").read_text(encoding="utf-8"))
        for proxy in PROXIES:
            rows = summary["proxies"][proxy]["rows"]
            assert sum(r["by_status_class"].get("2xx", 0) for r in rows) > 0, rows
        web_outbound = [r for r in summary["proxies"]["web"]["rows"] if r["cluster"] == "api"]
        assert web_outbound and web_outbound[0]["requests"] > 0
        assert summary["client"]["statuses"].get("200", 0) > 0
        assert summary["failed"] is False
    finally:
        if (workdir / "pids").exists():
            _assert_all_stopped(workdir)
    assert len(_recorded_pids(workdir)) == 6


@pytest.mark.integration
def test_demo_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    out = tmp_path / "stdout.txt"
    with out.open("w", encoding="utf-8") as stdout:
        demo = subprocess.Popen(
            _demo(workdir, "--rps", "50"), stdout=stdout, stderr=subprocess.STDOUT, text=True
        )
        try:
            _wait_for_text(out, "sending traffic", demo, timeout=60)
            time.sleep(1.5)
            demo.send_signal(signal.SIGINT)
            assert demo.wait(timeout=30) == 0, out.read_text(encoding="utf-8")
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
            if (workdir / "pids").exists():
                _assert_all_stopped(workdir)
    final = _final_section(out.read_text(encoding="utf-8"))
    assert "stopped by SIGINT" in final


@pytest.mark.integration
def test_demo_fails_naming_a_child_that_died(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    out = tmp_path / "stdout.txt"
    with out.open("w", encoding="utf-8") as stdout:
        demo = subprocess.Popen(_demo(workdir), stdout=stdout, stderr=subprocess.STDOUT, text=True)
        try:
            _wait_for_text(out, "sending traffic", demo, timeout=60)
            os.kill(_recorded_pids(workdir)["api-v2-app"], signal.SIGKILL)
            assert demo.wait(timeout=30) != 0
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
            if (workdir / "pids").exists():
                _assert_all_stopped(workdir)
    output = out.read_text(encoding="utf-8")
    assert "api-v2-app" in output and "killed by SIGKILL" in output, output
