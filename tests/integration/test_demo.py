"""Tests of `meshling demo`: its sample services, its summary, and whole runs of it.

The whole-run tests start the real thing (`python -m meshling demo`) as a process: a
control plane on SQLite, nginx and three Python apps, four proxies in control-plane mode
with mTLS, traffic through all of them; then they check that every process the demo
recorded in `<workdir>/pids` is gone.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from meshling.demo.summary import (
    LatencyHistogram,
    TrafficCounts,
    calls_by_service,
    parse_metrics,
    quantile,
    render,
)

PROXIES = ("store", "api-1", "api-2", "web")
# a row of the summary table: proxy, listener, "-> cluster", requests, rps, success, 4xx, 5xx
ROW = re.compile(
    r"^\s+(\S+)\s+(\S+)\s+-> (\S+)\s+(\d+)\s+(\S+)\s+(\S+)\s+(\d+)\s+(\d+)\s", re.MULTILINE
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _recorded_pids(workdir: Path) -> dict[str, int]:
    lines = (workdir / "pids").read_text(encoding="utf-8").splitlines()
    return {name: int(pid) for name, pid in (line.split() for line in lines if line.strip())}


def _alive(pid: int, workdir: Path) -> bool:
    """Whether pid is still one of the demo's processes (not merely a reused number):
    meshling's own, or nginx, whose command line names the work directory."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    return b"meshling" in cmdline or str(workdir).encode() in cmdline


def _assert_all_stopped(workdir: Path) -> None:
    pids = _recorded_pids(workdir)
    assert pids, "the demo recorded no processes"
    left = {name: pid for name, pid in pids.items() if _alive(pid, workdir)}
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


def _rows(section: str) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(proxy, listener) -> (requests, 4xx, 5xx) from a summary table."""
    return {
        (proxy, listener): (int(requests), int(refused), int(errors))
        for proxy, listener, _cluster, requests, _rps, _ok, refused, errors in ROW.findall(section)
    }


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


WEB_METRICS = """\
# TYPE meshling_http_requests_total counter
meshling_http_requests_total{listener="outbound:api",route="api",cluster="api",status_class="2xx"} 90.0
meshling_http_requests_total{listener="outbound:api",route="api",cluster="api",status_class="4xx"} 10.0
# TYPE meshling_tls_handshakes_total counter
meshling_tls_handshakes_total{direction="upstream",name="api"} 3.0
meshling_tls_handshakes_total{direction="downstream",name="inbound:15006"} 0.0
# TYPE meshling_tls_handshake_failures_total counter
meshling_tls_handshake_failures_total{direction="upstream",name="api",reason="peer_identity"} 1.0
"""

API_METRICS = """\
# TYPE meshling_http_requests_total counter
meshling_http_requests_total{listener="inbound:15007",route="local",cluster="local:8081",status_class="2xx"} 90.0
meshling_http_requests_total{listener="outbound:store",route="store",cluster="store",status_class="2xx"} 88.0
meshling_http_requests_total{listener="outbound:store",route="store",cluster="store",status_class="5xx"} 2.0
# TYPE meshling_tls_handshakes_total counter
meshling_tls_handshakes_total{direction="downstream",name="inbound:15007"} 4.0
# TYPE meshling_authz_decisions_total counter
meshling_authz_decisions_total{listener="inbound:15007",result="allowed",rule="api-from-web/0"} 4.0
meshling_authz_decisions_total{listener="inbound:15007",result="denied",rule="api-from-web/0"} 6.0
"""


def test_parse_metrics_reads_mtls_per_side_and_denied_connections() -> None:
    web, api = parse_metrics(WEB_METRICS), parse_metrics(API_METRICS)
    [outbound] = web.rows
    tls = web.mtls(outbound)
    assert tls is not None and (tls.handshakes, tls.failures) == (3.0, 1.0)
    assert outbound.refused == 10 and outbound.success_rate == pytest.approx(0.9)
    inbound = next(r for r in api.rows if r.listener.startswith("inbound:"))
    assert api.mtls(inbound) is not None and api.mtls(inbound).handshakes == 4.0  # type: ignore[union-attr]
    assert api.denied == {"api-from-web/0": 6.0}


def test_calls_by_service_counts_each_destination_from_its_callers_outbounds() -> None:
    proxies = {"web": parse_metrics(WEB_METRICS), "api-1": parse_metrics(API_METRICS)}
    calls = calls_by_service(proxies)
    assert (calls["api"].ok, calls["api"].total, calls["api"].callers) == (90, 100, ["web"])
    assert (calls["store"].ok, calls["store"].total, calls["store"].callers) == (88, 90, ["api-1"])
    # since an earlier scrape: only what happened in between
    assert calls_by_service(proxies, proxies)["api"].total == 0


def test_render_shows_refusals_mtls_and_success_by_service() -> None:
    proxies = {"web": parse_metrics(WEB_METRICS), "api-1": parse_metrics(API_METRICS)}
    traffic = TrafficCounts(sent=100, statuses={200: 90, 403: 10})
    text = render("[title]", proxies, traffic)
    rows = _rows(text)
    assert rows[("web", "outbound:api")] == (100, 10, 0)
    assert "3 (1 refused)" in text  # web's upstream handshakes to api
    assert "web 90.0% of 100 (from client); api 90.0% of 100 (from web)" in text
    assert "store 97.8% of 90 (from api-1)" in text
    assert "connections denied by TrafficPermission: api-1 6 (rule api-from-web/0)" in text
    assert "403: 10" in text


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
def _service(name: str, *args: str) -> Iterator[int]:
    """One demo service as a process; yields its port."""
    port = _free_port()
    argv = [sys.executable, "-m", "meshling.demo.services", name, "--port", str(port), *args]
    process = subprocess.Popen(argv)
    try:
        _wait_for_port(port, process)
        yield port
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


@contextlib.contextmanager
def _fixed_answer(status: int, document: dict[str, object]) -> Iterator[int]:
    """A plain HTTP server answering every GET with `status` and `document`."""
    body = json.dumps(document).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.integration
def test_services_web_and_api_combine_the_answers_down_to_the_store() -> None:
    store = {"service": "store", "caller": "spiffe://default/api"}
    with (
        _fixed_answer(200, store) as store_port,
        _service(
            "api", "--instance", "api-1", "--error-rate", "0", "--upstream-port", str(store_port)
        ) as api_port,
        _service("web", "--instance", "web", "--upstream-port", str(api_port)) as web_port,
    ):
        status, document = _get(f"http://127.0.0.1:{web_port}/users/42")
    assert status == 200
    assert document == {
        "service": "web",
        "instance": "web",
        "path": "/users/42",
        "api": {"service": "api", "instance": "api-1", "path": "/users/42", "store": store},
    }


@pytest.mark.integration
def test_services_web_answers_502_when_api_fails() -> None:
    with (
        _service("api", "--instance", "api-1", "--error-rate", "1") as api_port,
        _service("web", "--instance", "web", "--upstream-port", str(api_port)) as web_port,
    ):
        assert _get(f"http://127.0.0.1:{api_port}/x")[0] == 500
        status, document = _get(f"http://127.0.0.1:{web_port}/x")
    assert status == 502
    assert document["error"] == "api answered 500"


@pytest.mark.integration
def test_services_web_passes_a_refusal_of_its_call_on() -> None:
    # what api's proxy answers when no TrafficPermission lets web in
    with (
        _fixed_answer(403, {"error": "forbidden"}) as api_port,
        _service("web", "--instance", "web", "--upstream-port", str(api_port)) as web_port,
    ):
        status, document = _get(f"http://127.0.0.1:{web_port}/x")
    assert status == 403
    assert document["error"] == "api answered 403"


# -- whole runs of the demo -------------------------------------------------------------


def _demo(workdir: Path, *args: str) -> list[str]:
    # any free port for the control plane, so that a developer's own one is left alone
    argv = [sys.executable, "-m", "meshling", "demo", "--workdir", str(workdir)]
    return [*argv, "--cp-port", "0", *args]


@contextlib.contextmanager
def _running_demo(tmp_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The demo as a process, past its start; yields it and the file of its output."""
    workdir = tmp_path / "demo"
    out = tmp_path / "stdout.txt"
    with out.open("w", encoding="utf-8") as stdout:
        demo = subprocess.Popen(
            _demo(workdir, *args), stdout=stdout, stderr=subprocess.STDOUT, text=True
        )
        try:
            _wait_for_text(out, "sending traffic", demo, timeout=60)
            yield demo, out
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
            if (workdir / "pids").exists():
                _assert_all_stopped(workdir)


def _admin_port(workdir: Path, name: str) -> int:
    document = yaml.safe_load((workdir / name / "dataplane.yaml").read_text(encoding="utf-8"))
    port: int = document["spec"]["admin"]["port"]
    return port


def _app_port(workdir: Path, name: str) -> int:
    document = yaml.safe_load((workdir / name / "dataplane.yaml").read_text(encoding="utf-8"))
    port: int = document["spec"]["inbounds"][0]["service_port"]
    return port


def _web_refusals(workdir: Path) -> float:
    """4xx answers web's proxy got from api so far."""
    url = f"http://127.0.0.1:{_admin_port(workdir, 'web')}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        metrics = parse_metrics(response.read().decode())
    return sum(r.refused for r in metrics.rows if r.listener == "outbound:api")


@pytest.mark.integration
def test_demo_runs_the_mesh_over_mtls_and_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    try:
        result = subprocess.run(
            _demo(workdir, "--duration", "8", "--report-every", "3"),
            capture_output=True,
            text=True,
            timeout=90,
            cwd=tmp_path,
        )
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        final = _final_section(result.stdout)
        requests: dict[str, int] = {}
        for (proxy, _listener), (count, _refused, _errors) in _rows(final).items():
            requests[proxy] = requests.get(proxy, 0) + count
        for proxy in PROXIES:
            assert requests.get(proxy, 0) > 0, f"no requests through {proxy}:\n{final}"
        # both api versions answered: web's proxy balanced over them
        assert re.search(r"api answers by instance: api-1 \d+%, api-2 \d+%", final), final
        assert re.search(r"success by service \(since the start\): web \d", final), final
        # the banner says where to look
        assert "inspect dataplane api-1" in result.stdout
        assert "apply -f demo/deny-web.yaml" in result.stdout  # relative to where it ran

        summary = json.loads((workdir / "summary.json").read_text(encoding="utf-8"))
        for proxy in PROXIES:
            rows = summary["proxies"][proxy]["rows"]
            assert sum(r["by_status_class"].get("2xx", 0) for r in rows) > 0, rows
            # every hop between proxies is mutual TLS: each proxy's inbound completed
            # handshakes with its callers (web's has no caller), each outbound with its
            # destination
            for row in rows:
                if row["listener"].startswith(("outbound:", "inbound:")) and proxy != "web":
                    assert row["mtls_handshakes"], (proxy, row)
        tls = summary["proxies"]["web"]["tls"]
        assert tls["upstream/api"]["handshakes"] > 0 and tls["upstream/api"]["failures"] == 0
        services = summary["services"]
        assert services["api"]["callers"] == ["web"]
        assert sorted(services["store"]["callers"]) == ["api-1", "api-2"]
        # api fails ~2% on purpose; the store never does
        assert services["api"]["success_rate"] > 0.8, services
        assert services["store"]["success_rate"] == 1.0, services
        assert summary["client"]["statuses"].get("200", 0) > 0
        assert summary["failed"] is False
    finally:
        if (workdir / "pids").exists():
            _assert_all_stopped(workdir)
    # the control plane, four apps and four proxies
    assert len(_recorded_pids(workdir)) == 9
    assert (workdir / "cp" / "meshling.db").exists()


@pytest.mark.integration
def test_demo_policy_example_turns_web_calls_into_403s_then_ctrl_c_stops_all(
    tmp_path: Path,
) -> None:
    workdir = tmp_path / "demo"
    with _running_demo(tmp_path, "--rps", "40", "--report-every", "1", "--duration", "50") as (
        demo,
        out,
    ):
        # through the mesh: the store (nginx) sees api's verified identity (api answers
        # 2% of its calls with a simulated 500, and no Retry is applied yet: a few tries)
        for _ in range(5):
            status, document = _get(f"http://127.0.0.1:{_app_port(workdir, 'web')}/")
            if status == 200:
                break
        assert status == 200, document
        assert document["api"]["store"]["caller"] == "spiffe://default/api"  # type: ignore[index]
        refused_before = _web_refusals(workdir)

        # what the banner suggests, run as the banner says
        env = dict(os.environ)
        for line in (workdir / "cp.env").read_text(encoding="utf-8").splitlines():
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").partition("=")
                env[name] = value
        # the reliability example: web's proxy gets the Retry in its route to api
        retry = subprocess.run(
            [sys.executable, "-m", "meshling", "apply", "-f", str(workdir / "retry-api.yaml")],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert retry.returncode == 0, retry.stderr
        config_url = f"http://127.0.0.1:{_admin_port(workdir, 'web')}/config"

        def web_has_retry() -> bool:
            with urllib.request.urlopen(config_url, timeout=5) as response:
                return b'"max_attempts"' in response.read()

        began = time.monotonic()
        while not web_has_retry():
            assert time.monotonic() - began < 10, "the Retry did not reach web's proxy"
            time.sleep(0.2)

        deny = str(workdir / "deny-web.yaml")
        applied = subprocess.run(
            [sys.executable, "-m", "meshling", "apply", "-f", deny],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert applied.returncode == 0, applied.stderr
        began = time.monotonic()
        while _web_refusals(workdir) == refused_before:
            assert time.monotonic() - began < 10, "no 403 within 10s of applying deny-web.yaml"
            time.sleep(0.2)
        status, document = _get(f"http://127.0.0.1:{_app_port(workdir, 'web')}/")
        assert status == 403, document
        # the report after the change shows the refusals, and the demo keeps running
        time.sleep(2.5)
        assert demo.poll() is None, out.read_text(encoding="utf-8")

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=40) == 0, out.read_text(encoding="utf-8")
    output = out.read_text(encoding="utf-8")
    final = _final_section(output)
    assert "stopped by SIGINT" in final
    assert _rows(final)[("web", "outbound:api")][1] > 0, final
    assert re.search(r"403: \d+", final), final
    assert "connections denied by TrafficPermission" in output


@pytest.mark.integration
def test_demo_fails_naming_a_child_that_died(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    with _running_demo(tmp_path, "--duration", "50") as (demo, out):
        os.kill(_recorded_pids(workdir)["api-2-app"], signal.SIGKILL)
        assert demo.wait(timeout=40) != 0
    output = out.read_text(encoding="utf-8")
    assert "api-2-app" in output and "killed by SIGKILL" in output, output


@pytest.mark.integration
def test_demo_stops_cleanly_on_sigterm_while_starting(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    out = tmp_path / "stdout.txt"
    with out.open("w", encoding="utf-8") as stdout:
        demo = subprocess.Popen(
            _demo(workdir, "--duration", "50"), stdout=stdout, stderr=subprocess.STDOUT, text=True
        )
        try:
            # once the control plane and the first apps are up
            deadline = time.monotonic() + 60
            while (
                not ((workdir / "pids").exists() and len(_recorded_pids(workdir)) >= 3)
                and demo.poll() is None
            ):
                assert time.monotonic() < deadline, out.read_text(encoding="utf-8")
                time.sleep(0.05)
            demo.send_signal(signal.SIGTERM)
            assert demo.wait(timeout=40) == 0, out.read_text(encoding="utf-8")
        finally:
            if demo.poll() is None:
                demo.kill()
                demo.wait()
            if (workdir / "pids").exists():
                _assert_all_stopped(workdir)
    assert "interrupted while starting" in out.read_text(encoding="utf-8")


@pytest.mark.integration
def test_demo_without_nginx_says_how_to_install_it(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    result = subprocess.run(
        _demo(workdir, "--nginx", str(tmp_path / "no-nginx-here")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "apt-get install nginx" in result.stderr, result.stderr
    assert not (workdir / "pids").exists()
