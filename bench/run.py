"""The proxy benchmark: meshling against HAProxy and nginx, on the same machine, in one run.

Every proxy forwards to the same nginx upstream (a tiny keep-alive `200 ok`) and is loaded
by wrk. The proxy under test runs alone on one CPU; wrk, the upstream and this script share
another, so the proxy's numbers are not mixed with the load generator's. For each scenario
the script records requests/s, p50/p99 latency, the proxy's CPU time per request, its
resident memory idle and under load, and (for meshling) the time from spawn to ready.
It prints one table, the meshling/HAProxy ratios against their targets, and writes
everything to bench/results/latest.json.

`meshling-http+policies` is `meshling-http` with every reliability policy configured and
none firing (route timeout and retry, circuit breaker with outlier detection, an HTTP
health check, a least-request balancer, an inbound rate limit and a header-triggered
fault); its CPU per request is compared with `meshling-http`'s from the same run.

Then the mesh hop: two meshling proxies in a row joined by mutual TLS, against two
HAProxies joined the same way, both pairs on the proxy CPU. Besides wrk's figures it
counts the TLS handshakes between the two proxies, and runs bench/paced.py at a fixed
1000 requests/s through each hop and straight to the upstream, for the p99 latency a hop
adds at a modest load. A second table and its own targets follow the first.

Last, the same hop over HTTP/2 (bench/h2_hop.py): h2load with prior knowledge through two
proxies joined by mTLS HTTP/2 to the upstream, and gRPC unary calls through the same hop
to bench/grpc_responder.py, for meshling and for a HAProxy pair configured for h2. It
reports requests/s, latency, both proxies' CPU per request and the connections between
the two proxies, at two loads for the HTTP/2 hop. A third table and its targets follow.

    .venv/bin/python bench/run.py            # 10 s per scenario, about four minutes in all
    .venv/bin/python bench/run.py --quick    # 3 s per scenario
    .venv/bin/python bench/run.py --only haproxy-http meshling-http
    .venv/bin/python bench/run.py --only meshling-http meshling-http+policies
    .venv/bin/python bench/run.py --only meshling-mtls-hop haproxy-mtls-hop
    .venv/bin/python bench/run.py --only meshling-h2-hop haproxy-h2-hop meshling-grpc-hop haproxy-grpc-hop

Every peer is started here, from a config written to a temporary directory, and stopped
by PID at the end, also on errors and Ctrl-C. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from h2_hop import (
    GRPC_LOADS,
    GRPC_MESSAGE,
    GRPC_METHOD,
    H2_LOADS,
    H2_TARGETS,
    H2HopResult,
    grpc_body,
    grpc_unary,
    h2_measured,
    h2_rows,
    h2load_argv,
    haproxy_h2_hop_conf,
    latencies_us,
    meshling_h2_hop_conf,
    parse_h2load,
    responder_stats,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"
MESHLING = ROOT / ".venv" / "bin" / "meshling"
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 15.0  # seconds a proxy gets to become ready
STOP_TIMEOUT = 15.0  # seconds a process gets to exit after SIGTERM before SIGKILL
MB = 1024 * 1024

# The targets meshling is held to: a ratio to HAProxy in the same run ("x"), or absolute.
# (name, what is measured, bound, unit, the value must be at least (True) or at most the bound)
TARGETS = [
    ("http rps", "meshling-http rps / haproxy-http rps", 0.75, "x", True),
    ("http cpu/req", "meshling-http cpu / haproxy-http cpu", 1.5, "x", False),
    ("http+accesslog rps", "meshling-http+accesslog rps / haproxy-http rps", 0.6, "x", True),
    ("tcp rps", "meshling-tcp rps / haproxy-tcp rps", 0.9, "x", True),
    ("idle rss", "meshling idle RSS, worst of its scenarios", 25.0, " MB", False),
    ("start to ready", "meshling spawn -> /ready 200, worst of its scenarios", 0.5, " s", False),
]
# The reliability policies configured and not firing, against the same proxy without them.
POLICY_TARGETS = [
    (
        "policies cpu/req",
        "meshling-http+policies cpu / meshling-http cpu",
        1.15,
        "x",
        False,
    ),
]
# The policies scenario's settings (see policy_fragments): one health check of the single
# endpoint per HEALTH_CHECK_INTERVAL (plus up to 10% jitter), and a header no benchmark
# request carries, which would make the fault abort a request.
HEALTH_CHECK_INTERVAL = "1s"
HEALTH_CHECK_PATH = "/healthz"
FAULT_HEADER = ("x-bench-fault", "abort")
LB_POLICIES = ("least_request", "ewma", "round_robin", "random")
# Counters of the policies firing: every sample must stay 0 in the policies scenario.
FIRING_METRICS = (
    "meshling_rate_limited_total",
    "meshling_faults_injected_total",
    "meshling_http_retries_total",
    "meshling_http_retries_skipped_total",
    "meshling_http_per_try_timeouts_total",
    "meshling_upstream_request_timeouts_total",
    "meshling_circuit_breaker_overflows_total",
    "meshling_outlier_ejections_total",
    "meshling_outlier_ejections_skipped_total",
    "meshling_lb_panic",
)
# The mesh hop: two meshling proxies over mTLS against two HAProxies over mTLS.
HOP_TARGETS = [
    ("hop rps", "meshling-mtls-hop rps / haproxy-mtls-hop rps", 0.6, "x", True),
    ("hop cpu/req", "meshling-mtls-hop cpu / haproxy-mtls-hop cpu, both proxies", 2.0, "x", False),
    ("hop added p99", "meshling-mtls-hop paced p99 - direct paced p99", 0.3, " ms", False),
]
PACED = ROOT / "bench" / "paced.py"
RESPONDER = ROOT / "bench" / "grpc_responder.py"
PACED_RATE = 1000.0  # requests/s of the latency run
PACED_CONNECTIONS = 4
MESH = "bench"  # the trust domain of the hop's certificates


# -- results ---------------------------------------------------------------------------


@dataclass
class Load:
    """What wrk reported for one measured run."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: int
    non_2xx: int


@dataclass
class Result:
    scenario: str
    description: str
    load: Load | None = None
    # the proxy's own cost; None for the direct baseline, which has no proxy
    cpu_us_per_request: float | None = None
    # below ~95% with a proxy on its own CPU, something else held it back (or other work ran)
    cpu_percent: float | None = None
    rss_idle_mb: float | None = None
    rss_loaded_mb: float | None = None
    start_to_ready_s: float | None = None
    # the policies scenario: the health checks the proxy made during the measured run
    health_checks: int | None = None
    health_checks_per_s: float | None = None
    exit_code: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class HopResult:
    """One mesh hop: two proxies in a row, the second behind mutual TLS."""

    scenario: str
    description: str
    load: Load | None = None
    # the two proxies' CPU together (they share one CPU), per request and as % of that CPU
    cpu_us_per_request: float | None = None
    cpu_percent: float | None = None
    # TLS handshakes the second proxy completed during the measured wrk run
    handshakes: int | None = None
    handshakes_per_s: float | None = None
    # ... and from its start to the end of the paced run (warm-up and all)
    handshakes_total: int | None = None
    # the latency run at a fixed rate (bench/paced.py), and its p99 less the direct one's
    paced: dict[str, Any] | None = None
    added_p99_ms: float | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# -- processes -------------------------------------------------------------------------


class Processes:
    """Every process this script starts, so that each is stopped by PID, whatever happens."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], cpu: int | None) -> subprocess.Popen[bytes]:
        if cpu is not None:
            # taskset execs the command, so the PID we hold is the program's own
            argv = ["taskset", "-c", str(cpu), *argv]
        with (self.workdir / f"{name}.out").open("wb") as log:
            # A session of its own: a Ctrl-C reaches only this script, which then stops the
            # peers in order instead of every process dying at once.
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.running.append(proc)
        return proc

    def output(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.out"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[bytes]) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code (negative: killed by a signal),
        or None if it had to be killed."""
        self.running = [p for p in self.running if p is not proc]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # its process group (its PID, see start) also holds any workers it forked
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None
        return proc.returncode

    def stop_all(self) -> None:
        for proc in reversed(self.running):
            self.stop(proc)


def descendants(pid: int) -> list[int]:
    """The process and all its children (nginx master + workers, proxy --workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(parents.get(p, []))
    return found


def cpu_ticks(pids: list[int]) -> int:
    """User + system clock ticks used so far by these processes (all their threads)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total


def cpu_busy(cpu: int | None) -> tuple[int, int]:
    """(busy, all) clock ticks of one CPU so far, from /proc/stat; (0, 0) without one."""
    if cpu is None:
        return 0, 0
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{cpu} "):
            # user nice system idle iowait irq softirq steal (guest time is in user's)
            ticks = [int(n) for n in line.split()[1:9]]
            busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
            return busy, sum(ticks)
    return 0, 0


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def access_log_lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str = "/", timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# -- wrk -------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(output: str) -> Load:
    """Read the numbers out of `wrk --latency` text output."""

    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, output, re.MULTILINE)
        if not m:
            raise ValueError(f"wrk output has no {pattern!r}:\n{output}")
        return m

    total = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Load(
        requests=int(total.group(1)),
        seconds=_ms(total.group(2) + total.group(3)) / 1e3,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_ms=_ms(find(r"^\s+99%\s+(\S+)").group(1)),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


# -- peer configs ----------------------------------------------------------------------


def nginx_conf(workdir: Path, name: str, http_block: str) -> Path:
    """An nginx config whose every path (pid, logs, temp files) lives in workdir/name."""
    prefix = workdir / name
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(f"""\
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
{temp}
{http_block}
}}
""")
    return conf


def nginx_argv(nginx: str, conf: Path) -> list[str]:
    prefix = str(conf.parent)
    return [nginx, "-p", prefix, "-e", f"{prefix}/error.log", "-c", str(conf), "-g", "daemon off;"]


def upstream_block(port: int) -> str:
    return f"""\
    server {{
        listen {HOST}:{port};
        location / {{ default_type text/plain; return 200 "ok\\n"; }}
    }}"""


def nginx_proxy_block(port: int, upstream: int) -> str:
    return f"""\
    upstream backend {{
        server {HOST}:{upstream};
        keepalive 64;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def haproxy_conf(workdir: Path, mode: str, port: int, upstream: int) -> Path:
    conf = workdir / f"haproxy-{mode}.cfg"
    keepalive = "    option http-keep-alive\n" if mode == "http" else ""
    conf.write_text(f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode {mode}
{keepalive}    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend bench
    bind {HOST}:{port}
    default_backend upstream

backend upstream
    server nginx {HOST}:{upstream}
""")
    return conf


def policy_fragments(lb_policy: str) -> dict[str, dict[str, Any]]:
    """Every reliability policy, configured so that none fires under the benchmark's load,
    as the snapshot fragments of the route, the cluster and the inbound filter chain."""
    route = {
        "timeout": {"connect": "1s", "request": "15s", "per_try": "5s", "idle": "60s"},
        "retry": {
            "max_attempts": 3,
            "retry_on": ["5xx", "connect-failure", "reset"],
            "backoff": {"base": "25ms", "max": "250ms"},
            "budget": {"ratio": 0.2, "min_per_second": 10, "ttl": "10s"},
        },
    }
    load_balancing: dict[str, Any] = {"policy": lb_policy}
    if lb_policy == "ewma":
        load_balancing["decay"] = "10s"
    cluster = {
        "circuit_breaker": {
            "max_connections": 1024,
            "max_pending_requests": 1024,
            "max_requests": 1024,
            "outlier_detection": {
                "consecutive_5xx": 5,
                "consecutive_gateway_failures": 0,
                "interval": "10s",
                "base_ejection_time": "30s",
                "max_ejection_time": "300s",
                "max_ejection_percent": 50,
            },
        },
        "health_check": {
            "interval": HEALTH_CHECK_INTERVAL,
            "timeout": "500ms",
            "healthy_threshold": 2,
            "unhealthy_threshold": 3,
            "panic_threshold": 50,
            "http": {"path": HEALTH_CHECK_PATH, "expected_statuses": [200]},
        },
        "load_balancing": load_balancing,
    }
    header, value = FAULT_HEADER
    chain = {
        # a million requests a second: some fifty times what one proxy serves here
        "rate_limit": {
            "rules": [
                {
                    "name": "bench-limit",
                    "identities": ["*"],
                    "local": {"requests": 1_000_000, "interval": "1s", "burst": 1_000_000},
                }
            ]
        },
        # aborts every request that carries the header, and wrk's requests do not
        "fault": {
            "rules": [
                {
                    "name": "bench-fault",
                    "identities": ["*"],
                    "abort": {"percentage": 100, "http_status": 503},
                    "header": {"name": header, "value": value},
                }
            ]
        },
    }
    return {"route": route, "cluster": cluster, "chain": chain}


def meshling_conf(
    workdir: Path,
    name: str,
    mode: str,
    port: int,
    admin: int,
    upstream: int,
    access_log: bool,
    lb_policy: str | None = None,
) -> Path:
    """A one-listener, one-cluster snapshot; with `lb_policy`, an HTTP one with every
    reliability policy configured (`policy_fragments`) and that balancer."""
    route: dict[str, Any] = {"name": "all", "cluster": "upstream"}
    cluster: dict[str, Any] = {
        "name": "upstream",
        "endpoints": [{"address": HOST, "port": upstream}],
    }
    if mode == "http":
        chain: dict[str, Any] = {
            "name": "http",
            "http": {
                "route_config": {
                    "virtual_hosts": [{"name": "bench", "domains": ["*"], "routes": [route]}]
                }
            },
        }
    else:
        chain = {"name": "tcp", "tcp": {"cluster": "upstream"}}
    if lb_policy is not None:
        if mode != "http":
            raise ValueError("the policies scenario is an HTTP one")
        fragments = policy_fragments(lb_policy)
        route.update(fragments["route"])
        cluster.update(fragments["cluster"])
        chain.update(fragments["chain"])
    snapshot: dict[str, Any] = {
        "version": "1",
        "node": "bench",
        "drain_timeout": "2s",
        "admin": {"address": HOST, "port": admin, "token": "bench"},
        "listeners": [{"name": "bench", "address": HOST, "port": port, "filter_chains": [chain]}],
        "clusters": [cluster],
    }
    if access_log:
        snapshot["access_log"] = {"path": str(workdir / f"{name}.access.log")}
    conf = workdir / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(snapshot, sort_keys=False))
    return conf


@dataclass
class Certificates:
    """A fresh mesh CA and two leaves, `web` (the caller) and `api` (the callee), as PEM files.

    Each leaf is also written as one PEM with its key, for HAProxy's `crt`."""

    ca: Path
    web_cert: Path
    web_key: Path
    web_pem: Path
    api_cert: Path
    api_key: Path
    api_pem: Path

    def meshling_files(self, service: str) -> dict[str, str]:
        cert, key = (
            (self.web_cert, self.web_key) if service == "web" else (self.api_cert, self.api_key)
        )
        return {"certificate": str(cert), "key": str(key), "trust_bundle": str(self.ca)}


def issue_certificates(directory: Path) -> Certificates:
    from meshling.identity import CertificateAuthority, SpiffeId, make_key_and_csr

    directory.mkdir(mode=0o700)
    ca = CertificateAuthority.create(MESH)
    (directory / "ca.crt").write_bytes(ca.root_pem)
    paths: dict[str, Path] = {}
    for service in ("web", "api"):
        key, csr = make_key_and_csr(SpiffeId.for_service(MESH, service))
        cert = ca.issue(csr, service)
        for suffix, data in (("crt", cert), ("key", key), ("pem", cert + key)):
            path = directory / f"{service}.{suffix}"
            path.touch(mode=0o600)
            path.write_bytes(data)
            paths[f"{service}_{'cert' if suffix == 'crt' else suffix}"] = path
    return Certificates(ca=directory / "ca.crt", **paths)


def haproxy_hop_conf(workdir: Path, name: str, stats: Path, frontend: str, backend: str) -> Path:
    """A one-thread HAProxy in mode http with a stats socket; the hop's halves differ only
    in their `bind` and `server` lines."""
    conf = workdir / f"{name}.cfg"
    conf.write_text(f"""\
global
    nbthread 1
    maxconn 4096
    stats socket {stats} mode 600 level user

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend hop
    {frontend}
    default_backend next

backend next
    http-reuse always
    {backend}
""")
    return conf


def haproxy_info(stats: Path) -> dict[str, str]:
    """`show info` from a HAProxy stats socket, as a dict."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2.0)
        s.connect(str(stats))
        s.sendall(b"show info\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    info = {}
    for line in data.decode(errors="replace").splitlines():
        key, colon, value = line.partition(":")
        if colon:
            info[key.strip()] = value.strip()
    return info


def meshling_hop_conf(
    workdir: Path,
    name: str,
    port: int,
    admin: int,
    target: int,
    listener_tls: dict[str, Any] | None,
    cluster_tls: dict[str, Any] | None,
    protocol: str = "http1",
) -> Path:
    """One half of the meshling hop: an HTTP listener routing everything to one endpoint
    (over HTTP/1.1, or `protocol: http2`: multiplexed streams)."""
    chain: dict[str, Any] = {
        "name": "http",
        "http": {
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "bench",
                        "domains": ["*"],
                        "routes": [{"name": "all", "cluster": "next"}],
                    }
                ]
            }
        },
    }
    if listener_tls:
        chain["tls"] = listener_tls
    cluster: dict[str, Any] = {
        "name": "next",
        "endpoints": [{"address": HOST, "port": target}],
        "protocol": protocol,
    }
    if cluster_tls:
        cluster["tls"] = cluster_tls
    snapshot: dict[str, Any] = {
        "version": "1",
        "node": name,
        "drain_timeout": "2s",
        "admin": {"address": HOST, "port": admin, "token": "bench"},
        "listeners": [{"name": "hop", "address": HOST, "port": port, "filter_chains": [chain]}],
        "clusters": [cluster],
    }
    conf = workdir / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(snapshot, sort_keys=False))
    return conf


def admin_ready(admin: int) -> bool:
    return http_get(admin, "/ready")[0] == 200


def admin_text(admin: int, path: str) -> str:
    status, body = http_get(admin, path, timeout=5.0)
    if status != 200:
        raise RuntimeError(f"GET {path} on the admin port gave {status}")
    return body.decode()


def haproxy_up(stats: Path) -> bool:
    """Whether a HAProxy answers on its stats socket (its listeners are bound by then)."""
    return "Uptime_sec" in haproxy_info(stats)


def responder_up(port: int) -> bool:
    import grpc

    try:
        responder_stats(port)
    except grpc.RpcError:
        return False
    return True


def metric_sum(text: str, name: str, *labels: str) -> float:
    """The sum of a metric's samples whose labels include all of `labels` (k="v")."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def nonzero_samples(text: str, *names: str) -> list[str]:
    """The samples of these metrics that are not 0, as exposition lines."""
    return [
        line
        for line in text.splitlines()
        if line.startswith(tuple(n + "{" for n in names)) and float(line.rsplit(" ", 1)[1]) != 0
    ]


# -- the run ---------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    description: str
    # starts the proxy; returns its process (None: no proxy) and the port to load
    start: Callable[[Bench], tuple[subprocess.Popen[bytes] | None, int]]
    # meshling promises exit code 0 after a SIGTERM drain; the peers make no such promise
    clean_exit: bool = False
    # meshling with the reliability policies: count its health checks, check none fired
    policies: bool = False


@dataclass
class Hop:
    """A started hop: the port to load, and what to read from its proxies."""

    port: int
    # TLS handshakes completed by the second proxy so far
    handshakes: Callable[[], int]
    # after the runs: anything the proxies counted that should not have happened
    problems: Callable[[], list[str]] = lambda: []
    # the second proxy's /metrics text (meshling hops only)
    inbound_metrics: Callable[[], str] | None = None


@dataclass
class HopScenario:
    name: str
    description: str
    start: Callable[[Bench], Hop]
    clean_exit: bool = False


@dataclass
class H2Hop:
    """A started HTTP/2 hop: the port to load, and what to read from its proxies."""

    port: int
    # connections from the first proxy to the second: (open now, opened since the start)
    connections: Callable[[], tuple[int, int]]
    # after the runs: anything the proxies counted that should not have happened
    problems: Callable[[], list[str]] = lambda: []
    # the second proxy's /metrics text (meshling hops only)
    inbound_metrics: Callable[[], str] | None = None


@dataclass
class H2HopScenario:
    name: str
    description: str
    # starts the pair, given whether it is the gRPC hop
    start: Callable[[Bench, bool], H2Hop]
    grpc: bool
    # (h2load clients, streams per client), measured one after the other on the same pair
    loads: tuple[tuple[int, int], ...]
    clean_exit: bool = False


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.processes = Processes(workdir)
        self.nginx = find_binary("nginx")
        self.haproxy = find_binary("haproxy")
        self.wrk_path = find_binary("wrk")
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2 and shutil.which("taskset"):
            self.proxy_cpu: int | None = cpus[0]
            self.load_cpu: int | None = cpus[1]
            # this script samples /proc during the runs: keep it off the proxy's CPU
            os.sched_setaffinity(0, {cpus[1]})
        else:
            self.proxy_cpu = self.load_cpu = None
        self.upstream_port = 0
        # set by the scenario that starts a proxy, for measure() to report
        self.ready_time: float | None = None
        self.access_log: Path | None = None
        self.admin_port: int | None = None
        # the hop scenarios: their certificates, the proxies of the one running, and the
        # paced run straight to the upstream that their paced runs are compared with
        self.certs: Certificates | None = None
        self.hop_procs: dict[str, subprocess.Popen[bytes]] = {}
        self.paced_direct: dict[str, Any] | None = None
        # the HTTP/2 hops: the gRPC server (started by the first gRPC hop) and h2load's body
        self.responder_port = self.responder_pid = 0
        self.grpc_body: Path | None = None
        self.upstream_pid = 0

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        conf = nginx_conf(self.workdir, "upstream", upstream_block(self.upstream_port))
        proc = self.processes.start("upstream", nginx_argv(self.nginx, conf), self.load_cpu)
        self.wait_serving("upstream", proc, self.upstream_port)
        self.upstream_pid = proc.pid

    def wait_ready(
        self, name: str, proc: subprocess.Popen[bytes], ready: Callable[[], bool]
    ) -> None:
        """Poll until ready() holds; if the process dies or never gets there, say why."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                problem = f"{name} exited with code {proc.returncode} before it was ready"
                break
            with contextlib.suppress(OSError, http.client.HTTPException):
                if ready():
                    return
            time.sleep(0.005)
        else:
            problem = f"{name} was not ready after {START_TIMEOUT:.0f} s"
        self.processes.stop(proc)
        output = self.processes.output(name)
        raise RuntimeError(problem + (f"; its output:\n{output}" if output else ""))

    def wait_serving(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        self.wait_ready(name, proc, lambda: http_get(port)[0] == 200)

    def measure(self, scenario: Scenario) -> Result:
        result = Result(scenario.name, scenario.description)
        self.ready_time = self.access_log = self.admin_port = None
        proc: subprocess.Popen[bytes] | None = None
        try:
            proc, port = scenario.start(self)
            result.start_to_ready_s = self.ready_time
            pids = descendants(proc.pid) if proc else []
            if proc:
                result.rss_idle_mb = rss_bytes(pids) / MB
            status, body = http_get(port, timeout=5.0)
            if status != 200 or body != b"ok\n":
                raise RuntimeError(f"GET / through the proxy gave {status} {body[:80]!r}")
            if self.args.warmup:
                self.wrk(port, self.args.warmup, pids)
            if proc:
                pids = descendants(proc.pid)  # workers may have been started lazily
            checks_before = self.health_checks() if scenario.policies else 0
            result.load, peak, ticks = self.wrk(port, self.args.duration, pids)
            if scenario.policies:
                result.health_checks = self.health_checks() - checks_before
                result.health_checks_per_s = result.health_checks / result.load.seconds
                result.notes.extend(self.policy_problems())
            if proc:
                result.rss_loaded_mb = peak / MB
                seconds = ticks / CLK_TCK
                result.cpu_percent = 100 * seconds / result.load.seconds
                if result.load.requests:
                    result.cpu_us_per_request = seconds * 1e6 / result.load.requests
            if result.load.socket_errors or result.load.non_2xx:
                result.notes.append(
                    f"{result.load.socket_errors} socket errors, "
                    f"{result.load.non_2xx} non-2xx responses"
                )
            if proc and proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode} during the run")
        except Exception as exc:
            result.error = str(exc)
        finally:
            if proc:
                crashed = proc.poll() is not None
                result.exit_code = self.processes.stop(proc)
                if result.error or crashed:
                    tail = self.processes.output(scenario.name)
                    if tail:
                        result.notes.append(f"output:\n{tail}")
                elif scenario.clean_exit and result.exit_code is None:
                    result.notes.append(f"still running {STOP_TIMEOUT:g} s after SIGTERM: killed")
                elif scenario.clean_exit and result.exit_code != 0:
                    result.notes.append(f"exit code {result.exit_code} after SIGTERM, wanted 0")
            if self.access_log and result.load:
                # a cheap access log is only a result if the log was written
                lines = access_log_lines(self.access_log)
                if lines < result.load.requests:
                    result.notes.append(
                        f"access log has {lines} lines for {result.load.requests} measured requests"
                    )
        return result

    def admin_metrics(self) -> str:
        if self.admin_port is None:
            raise RuntimeError("no meshling admin port to read metrics from")
        status, body = http_get(self.admin_port, "/metrics", timeout=5.0)
        if status != 200:
            raise RuntimeError(f"GET /metrics on the admin port gave {status}")
        return body.decode()

    def health_checks(self) -> int:
        """The health checks the running meshling proxy has made, passed or failed."""
        return int(metric_sum(self.admin_metrics(), "meshling_health_checks_total"))

    def policy_problems(self) -> list[str]:
        """What says the policies scenario was not the policies configured and idle: a
        policy that fired (warm-up included), or a health check that failed."""
        text = self.admin_metrics()
        problems = [f"a policy fired: {line}" for line in nonzero_samples(text, *FIRING_METRICS)]
        failed = metric_sum(text, "meshling_health_checks_total", 'result="failed"')
        if failed:
            problems.append(f"{failed:g} health checks failed")
        if not metric_sum(text, "meshling_health_checks_total", 'result="passed"'):
            problems.append("no health check passed: was the health check configured?")
        return problems

    def wrk(self, port: int, seconds: float, pids: list[int]) -> tuple[Load, int, int]:
        """One wrk run while sampling the proxy's RSS; returns (load, peak RSS, CPU ticks)."""
        argv = [self.wrk_path, "-t", str(self.args.threads), "-c", str(self.args.connections)]
        argv += ["-d", f"{seconds:g}s", "--latency", f"http://{HOST}:{port}/"]
        before, peak = cpu_ticks(pids), rss_bytes(pids)
        wrk = self.processes.start("wrk", argv, self.load_cpu)
        deadline = time.monotonic() + seconds + 30  # wrk stops itself; this is a backstop
        try:
            while wrk.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
                peak = max(peak, rss_bytes(pids))
        finally:
            code = self.processes.stop(wrk)
        ticks = cpu_ticks(pids) - before
        text = self.processes.output("wrk", lines=100)
        if code != 0:
            raise RuntimeError(f"wrk exited with code {code}: {text}")
        return parse_wrk(text), peak, ticks

    def paced(self, port: int) -> dict[str, Any]:
        """bench/paced.py at PACED_RATE for the run's duration; its JSON result."""
        seconds = self.args.duration
        argv = [sys.executable, str(PACED), "--port", str(port), "--rate", f"{PACED_RATE:g}"]
        argv += ["--seconds", f"{seconds:g}", "--connections", str(PACED_CONNECTIONS)]
        proc = self.processes.start("paced", argv, self.load_cpu)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(seconds + 30)  # it stops itself within seconds + 10; this is a backstop
        code = self.processes.stop(proc)
        text = self.processes.output("paced", lines=50)
        lines = [line for line in text.splitlines() if line.startswith("{")]
        if code != 0 or not lines:
            raise RuntimeError(f"the paced client exited with code {code}: {text}")
        result: dict[str, Any] = json.loads(lines[-1])
        if not result["requests"]:
            raise RuntimeError(f"the paced client completed no request: {result}")
        return result

    def measure_paced_direct(self) -> str | None:
        """The paced run straight to the upstream; an error message if it failed."""
        try:
            self.paced_direct = self.paced(self.upstream_port)
        except Exception as exc:
            return str(exc)
        return None

    def measure_hop(self, scenario: HopScenario) -> HopResult:
        result = HopResult(scenario.name, scenario.description)
        self.hop_procs = {}
        try:
            hop = scenario.start(self)
            status, body = http_get(hop.port, timeout=5.0)
            if status != 200 or body != b"ok\n":
                raise RuntimeError(f"GET / through the hop gave {status} {body[:80]!r}")
            pids = [pid for proc in self.hop_procs.values() for pid in descendants(proc.pid)]
            if self.args.warmup:
                self.wrk(hop.port, self.args.warmup, pids)
            before = hop.handshakes()
            result.load, _, ticks = self.wrk(hop.port, self.args.duration, pids)
            result.handshakes = hop.handshakes() - before
            result.handshakes_per_s = result.handshakes / result.load.seconds
            seconds = ticks / CLK_TCK
            result.cpu_percent = 100 * seconds / result.load.seconds
            if result.load.requests:
                result.cpu_us_per_request = seconds * 1e6 / result.load.requests
            if result.load.socket_errors or result.load.non_2xx:
                result.notes.append(
                    f"{result.load.socket_errors} socket errors, "
                    f"{result.load.non_2xx} non-2xx responses"
                )
            result.paced = paced = self.paced(hop.port)
            if paced["errors"]:
                result.notes.append(
                    f"paced run: {paced['errors']} errors, e.g. {paced['error_examples']}"
                )
            if paced["late"]:
                result.notes.append(
                    f"paced run: {paced['late']} of {paced['requests']} sends were more than one "
                    f"interval ({1e3 * PACED_CONNECTIONS / PACED_RATE:g} ms) behind their timetable"
                )
            direct = self.paced_direct
            if direct and direct["p99_ms"] is not None and paced["p99_ms"] is not None:
                result.added_p99_ms = paced["p99_ms"] - direct["p99_ms"]
            result.handshakes_total = hop.handshakes()
            result.notes.extend(hop.problems())
            for name, proc in self.hop_procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} during the run")
        except Exception as exc:
            result.error = str(exc)
        finally:
            result.exit_codes, notes = self.stop_hop(scenario.clean_exit, result.error is not None)
            result.notes.extend(notes)
        return result

    def stop_hop(self, clean_exit: bool, failed: bool) -> tuple[dict[str, int | None], list[str]]:
        """Stop the hop's proxies; their exit codes, and what to note about how they ended
        (with `failed`, or if one crashed, the last lines of its output)."""
        codes: dict[str, int | None] = {}
        notes = []
        # the caller's proxy first, so that the other one sees its clients leave
        for name, proc in reversed(self.hop_procs.items()):
            crashed = proc.poll() is not None
            code = codes[name] = self.processes.stop(proc)
            if failed or crashed:
                tail = self.processes.output(name)
                if tail:
                    notes.append(f"{name} output:\n{tail}")
            elif clean_exit and code is None:
                notes.append(f"{name} still running {STOP_TIMEOUT:g} s after SIGTERM: killed")
            elif clean_exit and code != 0:
                notes.append(f"{name} exit code {code} after SIGTERM, wanted 0")
        self.hop_procs = {}
        return codes, notes

    # the proxies ---------------------------------------------------------------------

    def direct(self) -> tuple[subprocess.Popen[bytes] | None, int]:
        return None, self.upstream_port

    def haproxy_mode(self, mode: str) -> tuple[subprocess.Popen[bytes] | None, int]:
        port = free_port()
        conf = haproxy_conf(self.workdir, mode, port, self.upstream_port)
        proc = self.processes.start(
            f"haproxy-{mode}", [self.haproxy, "-db", "-f", str(conf)], self.proxy_cpu
        )
        self.wait_serving(f"haproxy-{mode}", proc, port)
        return proc, port

    def nginx_proxy(self) -> tuple[subprocess.Popen[bytes] | None, int]:
        port = free_port()
        conf = nginx_conf(self.workdir, "nginx-proxy", nginx_proxy_block(port, self.upstream_port))
        proc = self.processes.start("nginx-proxy", nginx_argv(self.nginx, conf), self.proxy_cpu)
        self.wait_serving("nginx-proxy", proc, port)
        return proc, port

    def meshling(
        self, name: str, mode: str, access_log: bool, lb_policy: str | None = None
    ) -> tuple[subprocess.Popen[bytes] | None, int]:
        port, admin = free_port(), free_port()
        conf = meshling_conf(
            self.workdir, name, mode, port, admin, self.upstream_port, access_log, lb_policy
        )
        self.admin_port = admin
        if access_log:
            self.access_log = self.workdir / f"{name}.access.log"
        argv = [str(MESHLING), "proxy", "run", "--config", str(conf)]
        started = time.monotonic()
        proc = self.processes.start(name, argv, self.proxy_cpu)
        self.wait_ready(name, proc, lambda: http_get(admin, "/ready")[0] == 200)
        self.ready_time = time.monotonic() - started
        return proc, port

    # the hops: both proxies on the proxy CPU, started callee first ----------------------

    def certificates(self) -> Certificates:
        if self.certs is None:
            self.certs = issue_certificates(self.workdir / "pki")
        return self.certs

    def start_hop_proxy(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        proc = self.processes.start(name, argv, self.proxy_cpu)
        self.hop_procs[name] = proc
        return proc

    def meshling_hop(
        self, multiplex: bool = False, edit: Callable[[Path], None] | None = None
    ) -> Hop:
        """The mesh hop; `multiplex`: the app's HTTP/1.1 requests travel between the two
        proxies as streams of one HTTP/2 connection, as the control plane sets it up;
        `edit` changes each proxy's snapshot file (`...-in` or `...-out`) before it starts."""
        certs = self.certificates()
        in_port, in_admin, out_port, out_admin = (free_port() for _ in range(4))
        inbound = meshling_hop_conf(
            self.workdir,
            "meshling-hop-in",
            in_port,
            in_admin,
            self.upstream_port,
            listener_tls={"mode": "strict", **certs.meshling_files("api")},
            cluster_tls=None,
        )
        outbound = meshling_hop_conf(
            self.workdir,
            "meshling-hop-out",
            out_port,
            out_admin,
            in_port,
            listener_tls=None,
            cluster_tls={**certs.meshling_files("web"), "identity": f"spiffe://{MESH}/api"},
            protocol="http2" if multiplex else "http1",
        )
        admins = {"meshling-hop-in": in_admin, "meshling-hop-out": out_admin}
        for name, conf in (("meshling-hop-in", inbound), ("meshling-hop-out", outbound)):
            if edit is not None:
                edit(conf)
            proc = self.start_hop_proxy(
                name, [str(MESHLING), "proxy", "run", "--config", str(conf)]
            )
            self.wait_ready(name, proc, functools.partial(admin_ready, admins[name]))

        def metrics(admin: int) -> str:
            status, body = http_get(admin, "/metrics", timeout=5.0)
            if status != 200:
                raise RuntimeError(f"GET /metrics on the admin port gave {status}")
            return body.decode()

        def handshakes() -> int:
            text = metrics(in_admin)
            return int(metric_sum(text, "meshling_tls_handshakes_total", 'direction="downstream"'))

        def problems() -> list[str]:
            return [
                f"{name}: {line}"
                for name, admin in admins.items()
                for line in nonzero_samples(
                    metrics(admin),
                    "meshling_tls_handshake_failures_total",
                    "meshling_upstream_connect_failures_total",
                )
            ]

        return Hop(out_port, handshakes, problems, functools.partial(metrics, in_admin))

    def haproxy_hop(self) -> Hop:
        certs = self.certificates()
        in_port, out_port = free_port(), free_port()
        in_stats = self.workdir / "haproxy-hop-in.sock"
        inbound = haproxy_hop_conf(
            self.workdir,
            "haproxy-hop-in",
            in_stats,
            f"bind {HOST}:{in_port} ssl crt {certs.api_pem} ca-file {certs.ca} verify required",
            f"server upstream {HOST}:{self.upstream_port}",
        )
        outbound = haproxy_hop_conf(
            self.workdir,
            "haproxy-hop-out",
            self.workdir / "haproxy-hop-out.sock",
            f"bind {HOST}:{out_port}",
            f"server hop-in {HOST}:{in_port} ssl verify required ca-file {certs.ca} "
            f"crt {certs.web_pem}",
        )
        proc = self.start_hop_proxy("haproxy-hop-in", [self.haproxy, "-db", "-f", str(inbound)])
        self.wait_ready("haproxy-hop-in", proc, lambda: "CumSslConns" in haproxy_info(in_stats))
        proc = self.start_hop_proxy("haproxy-hop-out", [self.haproxy, "-db", "-f", str(outbound)])
        self.wait_serving("haproxy-hop-out", proc, out_port)
        return Hop(out_port, lambda: int(haproxy_info(in_stats)["CumSslConns"]))

    # the HTTP/2 hops (bench/h2_hop.py): both proxies on the proxy CPU, h2load and the
    # server on the load CPU -----------------------------------------------------------

    def responder(self) -> int:
        """The port of bench/grpc_responder.py, started on the load CPU on first use and
        kept for the rest of the run, like the upstream."""
        if not self.responder_port:
            port = free_port()
            argv = [sys.executable, str(RESPONDER), "--port", str(port)]
            proc = self.processes.start("grpc-responder", argv, self.load_cpu)
            self.wait_ready("grpc-responder", proc, functools.partial(responder_up, port))
            self.responder_port, self.responder_pid = port, proc.pid
        return self.responder_port

    def measure_h2_hop(self, scenario: H2HopScenario) -> list[H2HopResult]:
        """Start the pair, check one request through it, then measure each load in turn
        on the same pair (so that the connections opened accumulate over the loads)."""
        results = [
            H2HopResult(scenario.name, scenario.description, c, m) for c, m in scenario.loads
        ]
        self.hop_procs = {}
        failed = False
        try:
            hop = scenario.start(self, scenario.grpc)
            self.check_h2_hop(hop, scenario.grpc)
            pids = [pid for proc in self.hop_procs.values() for pid in descendants(proc.pid)]
            for result in results:
                try:
                    self.measure_h2_load(hop, scenario.grpc, result, pids)
                except Exception as exc:
                    result.error = str(exc)
                    failed = True
                for name, proc in self.hop_procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited with code {proc.returncode}")
            problems = hop.problems()
            results[-1].notes.extend(problems)
            # anything that went wrong under load: the proxies' last words go with it
            failed = failed or bool(problems) or any(r.notes for r in results)
        except Exception as exc:
            failed = True
            unmeasured = [r for r in results if r.load is None and r.error is None]
            for result in unmeasured:
                result.error = str(exc)
            if not unmeasured:
                results[-1].notes.append(f"after the runs: {exc}")
        finally:
            codes, notes = self.stop_hop(scenario.clean_exit, failed)
            for result in results:
                result.exit_codes = codes
            results[-1].notes.extend(notes)
        return results

    def check_h2_hop(self, hop: H2Hop, grpc: bool) -> None:
        """One request through the hop with a client other than h2load, its answer checked."""
        if grpc:
            reply = grpc_unary(hop.port, GRPC_METHOD, b"check " + GRPC_MESSAGE)
            if reply != b"check " + GRPC_MESSAGE:
                raise RuntimeError(f"a gRPC call through the hop was answered {reply[:80]!r}")
            return
        done = subprocess.run(
            [find_binary("nghttp"), f"http://{HOST}:{hop.port}/"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if done.returncode != 0 or done.stdout != b"ok\n":
            raise RuntimeError(
                f"nghttp through the hop: exit code {done.returncode}, body {done.stdout[:80]!r}, "
                f"{done.stderr.decode(errors='replace')[-300:]}"
            )

    def h2load(
        self, port: int, grpc: bool, seconds: float, clients: int, streams: int, log: Path | None
    ) -> str:
        """One h2load run on the load CPU; its text output."""
        if grpc and self.grpc_body is None:
            self.grpc_body = grpc_body(self.workdir / "grpc-body.bin")
        url = f"http://{HOST}:{port}{GRPC_METHOD if grpc else '/'}"
        argv = h2load_argv(
            find_binary("h2load"),
            url,
            seconds,
            clients,
            streams,
            log=log,
            body=self.grpc_body if grpc else None,
        )
        proc = self.processes.start("h2load", argv, self.load_cpu)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(seconds + 30)  # it stops itself; this is a backstop
        code = self.processes.stop(proc)
        text = self.processes.output("h2load", lines=40)
        if code != 0:
            raise RuntimeError(f"h2load exited with code {code}: {text}")
        return text

    def measure_h2_load(self, hop: H2Hop, grpc: bool, result: H2HopResult, pids: list[int]) -> None:
        clients, streams = result.clients, result.streams
        if self.args.warmup:
            self.h2load(hop.port, grpc, self.args.warmup, clients, streams, None)
        log = self.workdir / "h2load.log"
        log.unlink(missing_ok=True)
        served_before = responder_stats(self.responder_port)["ok"] if grpc else 0
        server = descendants(self.responder_pid if grpc else self.upstream_pid)
        busy_before, all_before = cpu_busy(self.load_cpu)
        ticks_before, server_before = cpu_ticks(pids), cpu_ticks(server)
        text = self.h2load(hop.port, grpc, self.args.duration, clients, streams, log)
        ticks = cpu_ticks(pids) - ticks_before
        server_ticks = cpu_ticks(server) - server_before
        busy_after, all_after = cpu_busy(self.load_cpu)
        result.connections, result.connections_opened = hop.connections()
        if grpc:
            result.server_ok = responder_stats(self.responder_port)["ok"] - served_before
        result.load = load = parse_h2load(text, clients, streams, latencies_us(log))
        log.unlink(missing_ok=True)
        seconds = ticks / CLK_TCK
        result.cpu_percent = 100 * seconds / load.seconds
        result.server_cpu_percent = 100 * server_ticks / CLK_TCK / load.seconds
        if load.requests:
            result.cpu_us_per_request = seconds * 1e6 / load.requests
        if all_after > all_before:
            result.load_cpu_percent = 100 * (busy_after - busy_before) / (all_after - all_before)
        if load.failed or load.errored or load.timeouts or load.non_2xx:
            codes = re.search(r"^status codes: .*$", text, re.MULTILINE)
            result.notes.append(
                f"h2load: {load.failed} failed ({load.errored} errored, {load.timeouts} timed "
                f"out), {load.non_2xx} non-2xx responses"
                + (f" ({codes.group(0)})" if codes else "")
            )
        if result.server_ok is not None and result.server_ok < load.requests:
            # h2load counts a 200 as success whatever its grpc-status: a proxy's own gRPC
            # error (UNAVAILABLE and the like) shows up here only
            result.notes.append(
                f"the server answered {result.server_ok} calls with status 0 while h2load "
                f"counted {load.requests} successes: the rest were answered by a proxy"
            )

    def meshling_h2_hop(self, grpc: bool) -> H2Hop:
        certs = self.certificates()
        scenario = "meshling-grpc-hop" if grpc else "meshling-h2-hop"
        in_port, in_admin, out_port, out_admin = (free_port() for _ in range(4))
        inbound = meshling_h2_hop_conf(
            self.workdir,
            f"{scenario}-in",
            in_port,
            in_admin,
            self.responder() if grpc else self.upstream_port,
            protocol="http2" if grpc else "http1",
            listener_tls={"mode": "strict", **certs.meshling_files("api")},
            cluster_tls=None,
            max_streams=self.args.h2_peer_streams,
        )
        outbound = meshling_h2_hop_conf(
            self.workdir,
            f"{scenario}-out",
            out_port,
            out_admin,
            in_port,
            protocol="http2",
            listener_tls=None,
            cluster_tls={**certs.meshling_files("web"), "identity": f"spiffe://{MESH}/api"},
        )
        admins = {f"{scenario}-in": in_admin, f"{scenario}-out": out_admin}
        for name, conf in ((f"{scenario}-in", inbound), (f"{scenario}-out", outbound)):
            proc = self.start_hop_proxy(
                name, [str(MESHLING), "proxy", "run", "--config", str(conf)]
            )
            self.wait_ready(name, proc, functools.partial(admin_ready, admins[name]))

        def connections() -> tuple[int, int]:
            text = admin_text(out_admin, "/metrics")
            return (
                int(metric_sum(text, "meshling_upstream_connections_active", 'cluster="next"')),
                int(metric_sum(text, "meshling_upstream_connections_total", 'cluster="next"')),
            )

        def problems() -> list[str]:
            found = []
            for name, admin in admins.items():
                text = admin_text(admin, "/metrics")
                lines = nonzero_samples(
                    text,
                    "meshling_tls_handshake_failures_total",
                    "meshling_upstream_connect_failures_total",
                    "meshling_upstream_request_timeouts_total",
                    "meshling_http2_abuse_goaways_total",
                    "meshling_http_protocol_errors_total",
                )
                # "": a call h2load left unfinished when its time was up
                lines += [
                    line
                    for line in nonzero_samples(text, "meshling_grpc_responses_total")
                    if 'grpc_status="0"' not in line and 'grpc_status=""' not in line
                ]
                found += [f"{name}: {line}" for line in lines]
            return found

        return H2Hop(out_port, connections, problems)

    def haproxy_h2_hop(self, grpc: bool) -> H2Hop:
        certs = self.certificates()
        scenario = "haproxy-grpc-hop" if grpc else "haproxy-h2-hop"
        in_port, out_port = free_port(), free_port()
        in_stats = self.workdir / f"{scenario}-in.sock"
        out_stats = self.workdir / f"{scenario}-out.sock"
        target = (
            f"server grpc {HOST}:{self.responder()} proto h2"
            if grpc
            else f"server upstream {HOST}:{self.upstream_port}"
        )
        inbound = haproxy_h2_hop_conf(
            self.workdir,
            f"{scenario}-in",
            in_stats,
            f"bind {HOST}:{in_port} ssl crt {certs.api_pem} ca-file {certs.ca} verify required "
            "alpn h2",
            target,
            max_streams=self.args.h2_peer_streams,
        )
        outbound = haproxy_h2_hop_conf(
            self.workdir,
            f"{scenario}-out",
            out_stats,
            f"bind {HOST}:{out_port} proto h2",
            f"server hop-in {HOST}:{in_port} ssl verify required ca-file {certs.ca} "
            f"crt {certs.web_pem} alpn h2",
        )
        for name, conf, stats in (
            (f"{scenario}-in", inbound, in_stats),
            (f"{scenario}-out", outbound, out_stats),
        ):
            proc = self.start_hop_proxy(name, [self.haproxy, "-db", "-f", str(conf)])
            self.wait_ready(name, proc, functools.partial(haproxy_up, stats))

        def connections() -> tuple[int, int]:
            # the second proxy's TLS connections are all from the first (its server is
            # in cleartext)
            info = haproxy_info(in_stats)
            return int(info["CurrSslConns"]), int(info["CumSslConns"])

        return H2Hop(out_port, connections)


# In the order they run; the names are the keys of the table and of the JSON results.
SCENARIOS = [
    Scenario("direct", "wrk -> nginx upstream, no proxy (baseline)", Bench.direct),
    Scenario(
        "haproxy-http",
        "HAProxy mode http, 1 thread, keep-alive upstream",
        lambda b: b.haproxy_mode("http"),
    ),
    Scenario("haproxy-tcp", "HAProxy mode tcp, 1 thread", lambda b: b.haproxy_mode("tcp")),
    Scenario("nginx-proxy", "nginx reverse proxy, 1 worker, upstream keepalive", Bench.nginx_proxy),
    Scenario(
        "meshling-http",
        "meshling http filter, metrics on, no access log",
        lambda b: b.meshling("meshling-http", "http", access_log=False),
        clean_exit=True,
    ),
    Scenario(
        "meshling-http+policies",
        "meshling-http with every reliability policy configured, none firing",
        lambda b: b.meshling(
            "meshling-http+policies", "http", access_log=False, lb_policy=b.args.policies_lb
        ),
        clean_exit=True,
        policies=True,
    ),
    Scenario(
        "meshling-http+accesslog",
        "meshling http filter, JSON access log to a file",
        lambda b: b.meshling("meshling-http+accesslog", "http", access_log=True),
        clean_exit=True,
    ),
    Scenario(
        "meshling-tcp",
        "meshling tcp filter",
        lambda b: b.meshling("meshling-tcp", "tcp", access_log=False),
        clean_exit=True,
    ),
]


HOP_SCENARIOS = [
    HopScenario(
        "meshling-mtls-hop",
        "meshling (plain HTTP in) -> mTLS -> meshling (strict) -> upstream",
        Bench.meshling_hop,
        clean_exit=True,
    ),
    HopScenario(
        "meshling-mux-hop",
        "as meshling-mtls-hop, HTTP/1.1 carried as HTTP/2 streams between the proxies",
        lambda b: b.meshling_hop(multiplex=True),
        clean_exit=True,
    ),
    HopScenario(
        "haproxy-mtls-hop",
        "HAProxy http -> TLS, verify required both ways, http-reuse always -> HAProxy -> upstream",
        Bench.haproxy_hop,
    ),
]


H2_HOP_SCENARIOS = [
    H2HopScenario(
        "meshling-h2-hop",
        "h2load -> meshling (h2c in) -> mTLS HTTP/2 -> meshling (strict, ALPN h2) "
        "-> HTTP/1.1 upstream",
        Bench.meshling_h2_hop,
        grpc=False,
        loads=H2_LOADS,
        clean_exit=True,
    ),
    H2HopScenario(
        "haproxy-h2-hop",
        "h2load -> HAProxy (proto h2) -> TLS, verify required both ways, alpn h2 -> HAProxy "
        "-> HTTP/1.1 upstream",
        Bench.haproxy_h2_hop,
        grpc=False,
        loads=H2_LOADS,
    ),
    H2HopScenario(
        "meshling-grpc-hop",
        "h2load gRPC unary -> meshling -> mTLS HTTP/2 -> meshling -> h2c gRPC responder",
        Bench.meshling_h2_hop,
        grpc=True,
        loads=GRPC_LOADS,
        clean_exit=True,
    ),
    H2HopScenario(
        "haproxy-grpc-hop",
        "h2load gRPC unary -> HAProxy -> TLS alpn h2 -> HAProxy (proto h2 server) "
        "-> gRPC responder",
        Bench.haproxy_h2_hop,
        grpc=True,
        loads=GRPC_LOADS,
    ),
]


def find_binary(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if not path:
        raise SystemExit(f"{name} is not installed: run scripts/install-peers (as root)")
    return path


# -- report ----------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[Result]) -> str:
    header = [
        "scenario",
        "req/s",
        "p50 ms",
        "p99 ms",
        "cpu us/req",
        "cpu %",
        "rss idle MB",
        "rss load MB",
        "ready s",
    ]
    rows = [header]
    for r in results:
        if r.error or r.load is None:
            rows.append([r.scenario, "failed"] + [""] * (len(header) - 2))
            continue
        rows.append(
            [
                r.scenario,
                _fmt(r.load.rps, ",.0f"),
                _fmt(r.load.p50_ms, ".2f"),
                _fmt(r.load.p99_ms, ".2f"),
                _fmt(r.cpu_us_per_request, ".1f"),
                _fmt(r.cpu_percent, ".0f"),
                _fmt(r.rss_idle_mb, ".1f"),
                _fmt(r.rss_loaded_mb, ".1f"),
                _fmt(r.start_to_ready_s, ".3f"),
            ]
        )
    return format_rows(rows)


def format_rows(rows: list[list[str]]) -> str:
    """Left-aligned first column, the others right-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets(results: list[Result]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met (None: not measured)."""
    by_name = {r.scenario: r for r in results if r.load and not r.error}

    def ratio(a: str, b: str, metric: Callable[[Result], float | None]) -> float | None:
        if a not in by_name or b not in by_name:
            return None
        x, y = metric(by_name[a]), metric(by_name[b])
        return None if x is None or not y else x / y

    def rps(r: Result) -> float | None:
        return r.load.rps if r.load else None

    def worst(metric: Callable[[Result], float | None]) -> float | None:
        values = [metric(r) for n, r in by_name.items() if n.startswith("meshling")]
        present = [v for v in values if v is not None]
        return max(present) if present else None

    measured = [
        ratio("meshling-http", "haproxy-http", rps),
        ratio("meshling-http", "haproxy-http", lambda r: r.cpu_us_per_request),
        ratio("meshling-http+accesslog", "haproxy-http", rps),
        ratio("meshling-tcp", "haproxy-tcp", rps),
        worst(lambda r: r.rss_idle_mb),
        worst(lambda r: r.start_to_ready_s),
    ]
    return target_rows(TARGETS, measured)


def policy_targets(results: list[Result]) -> list[dict[str, Any]]:
    """The policies target with its measured value (None: not measured)."""
    by_name = {r.scenario: r for r in results if r.load and not r.error}
    bare, policies = by_name.get("meshling-http"), by_name.get("meshling-http+policies")
    value = None
    if bare and policies and bare.cpu_us_per_request and policies.cpu_us_per_request:
        value = policies.cpu_us_per_request / bare.cpu_us_per_request
    return target_rows(POLICY_TARGETS, [value])


def policy_summary(results: list[Result]) -> str:
    """The CPU per request of meshling-http with and without the policies, and the health
    checks made while the policies scenario was measured."""
    by_name = {r.scenario: r for r in results if r.load and not r.error}
    bare, policies = by_name.get("meshling-http"), by_name.get("meshling-http+policies")
    if not (bare and policies and bare.cpu_us_per_request and policies.cpu_us_per_request):
        return "  cpu us/req: not measured (both meshling-http and meshling-http+policies needed)"
    a, b = bare.cpu_us_per_request, policies.cpu_us_per_request
    line = (
        f"  cpu us/req: bare {a:.1f}, policies {b:.1f} ({b - a:+.1f} us, {100 * (b - a) / a:+.1f}%)"
    )
    if policies.health_checks is not None and policies.load:
        per = policies.load.requests / policies.health_checks if policies.health_checks else 0
        line += (
            f"\n  health checks while measured: {policies.health_checks} "
            f"({_fmt(policies.health_checks_per_s, '.2f')}/s"
            + (f", one per {per:,.0f} requests)" if per else ")")
        )
    return line


def hop_targets(hops: list[HopResult]) -> list[dict[str, Any]]:
    """The hop targets with their measured values (None: not measured)."""
    by_name = {h.scenario: h for h in hops if h.load and not h.error}
    mesh, peer = by_name.get("meshling-mtls-hop"), by_name.get("haproxy-mtls-hop")

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x is None or not y else x / y

    measured = [
        ratio(mesh.load.rps, peer.load.rps) if mesh and peer and mesh.load and peer.load else None,
        ratio(mesh.cpu_us_per_request, peer.cpu_us_per_request) if mesh and peer else None,
        mesh.added_p99_ms if mesh else None,
    ]
    return target_rows(HOP_TARGETS, measured)


def target_rows(
    specs: list[tuple[str, str, float, str, bool]], measured: list[float | None]
) -> list[dict[str, Any]]:
    out = []
    for (name, what, bound, unit, at_least), value in zip(specs, measured, strict=True):
        out.append(
            {
                "target": name,
                "what": what,
                "value": value,
                "bound": f"{'>=' if at_least else '<='} {bound:g}{unit}",
                "limit": bound,
                "unit": unit.strip(),
                "met": None if value is None else value >= bound if at_least else value <= bound,
            }
        )
    return out


def hop_table(hops: list[HopResult], direct: dict[str, Any] | None) -> str:
    header = [
        "hop",
        "req/s",
        "p50 ms",
        "p99 ms",
        "cpu us/req",
        "cpu %",
        "handshakes/s",
        f"@{PACED_RATE:g}/s p50",
        "p99 ms",
        "added p99",
    ]
    rows = [header]
    if direct:
        rows.append(
            ["direct (no proxy)"]
            + [""] * 6
            + [_fmt(direct["p50_ms"], ".3f"), _fmt(direct["p99_ms"], ".3f"), ""]
        )
    for h in hops:
        if h.error or h.load is None:
            rows.append([h.scenario, "failed"] + [""] * (len(header) - 2))
            continue
        paced = h.paced or {}
        rows.append(
            [
                h.scenario,
                _fmt(h.load.rps, ",.0f"),
                _fmt(h.load.p50_ms, ".2f"),
                _fmt(h.load.p99_ms, ".2f"),
                _fmt(h.cpu_us_per_request, ".1f"),
                _fmt(h.cpu_percent, ".0f"),
                _fmt(h.handshakes_per_s, ".2f"),
                _fmt(paced.get("p50_ms"), ".3f"),
                _fmt(paced.get("p99_ms"), ".3f"),
                _fmt(h.added_p99_ms, "+.3f"),
            ]
        )
    return format_rows(rows)


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for t in rows:
        if t["value"] is None:
            value, verdict = "n/a", "not measured"
        else:
            # a value that rounds onto its bound gets the digit that decides it
            digits = 2
            if round(t["value"], 2) == t["limit"] and t["value"] != t["limit"]:
                digits = 3
            value = f"{t['value']:.{digits}f}{'x' if t['unit'] == 'x' else ' ' + t['unit']}"
            verdict = "met" if t["met"] else "MISSED"
        lines.append(f"  {t['target']:<20} {value:>9}   target {t['bound']:<9} {verdict}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release()}


def versions(bench: Bench) -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else "unknown"

    from importlib.metadata import PackageNotFoundError, version

    try:
        meshling = version("meshling")
    except PackageNotFoundError:
        meshling = "not installed"
    return {
        "meshling": meshling,
        "python": platform.python_version(),
        "nginx": first_line([bench.nginx, "-v"]),
        "haproxy": first_line([bench.haproxy, "-v"]),
        "wrk": first_line([bench.wrk_path, "-v"]),
        "h2load": first_line(["h2load", "--version"]),
    }


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up")
    names = [s.name for s in SCENARIOS] + [h.name for h in HOP_SCENARIOS + H2_HOP_SCENARIOS]
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        choices=names,
        help="run only these scenarios: " + ", ".join(names),
    )
    parser.add_argument(
        "--policies-lb",
        choices=LB_POLICIES,
        default="least_request",
        help="the balancer of meshling-http+policies (least_request)",
    )
    parser.add_argument(
        "--h2-peer-streams",
        type=int,
        metavar="N",
        help="the streams the second proxy of an HTTP/2 hop allows per connection "
        "(SETTINGS_MAX_CONCURRENT_STREAMS; default: each proxy's own, 100 for both)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if args.duration <= 0 or args.duration > 120 or args.warmup < 0 or args.warmup > 60:
        parser.error("keep --duration within (0, 120] and --warmup within [0, 60] seconds")
    if args.h2_peer_streams is not None and not 1 <= args.h2_peer_streams <= 10000:
        parser.error("keep --h2-peer-streams within [1, 10000]")
    return args


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt, so the same cleanup runs for all three."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.only or s.name in args.only]
    chosen_hops = [h for h in HOP_SCENARIOS if not args.only or h.name in args.only]
    chosen_h2 = [h for h in H2_HOP_SCENARIOS if not args.only or h.name in args.only]
    names = [s.name for s in chosen] + [h.name for h in chosen_hops + chosen_h2]
    if any(n.startswith("meshling") for n in names) and not MESHLING.exists():
        raise SystemExit(f"{MESHLING} is missing: run `make install` first")
    for tool in ("h2load", "nghttp") if chosen_h2 else ():
        find_binary(tool)
    if any(h.grpc for h in chosen_h2):
        try:
            import grpc  # noqa: F401
        except ImportError:
            raise SystemExit("the gRPC hops need grpcio: run `make install` first") from None
    results: list[Result] = []
    hops: list[HopResult] = []
    h2_hops: list[H2HopResult] = []
    paced_error: str | None = None
    with tempfile.TemporaryDirectory(prefix="meshling-bench-") as tmp, terminate_as_interrupt():
        bench = Bench(args, Path(tmp))
        pinning = (
            f"proxy on CPU {bench.proxy_cpu}, wrk and upstream on CPU {bench.load_cpu}"
            if bench.proxy_cpu is not None
            else "not pinned (fewer than 2 CPUs)"
        )
        print(
            f"wrk -t{args.threads} -c{args.connections}, {args.warmup:g} s warm-up, "
            f"{args.duration:g} s measured; {pinning}",
            flush=True,
        )
        load_before = os.getloadavg()[0]
        if load_before > 0.5:
            # the proxy's CPU is only its own if nothing else runs: say when that was not so
            print(f"warning: load average {load_before:.2f} before starting", flush=True)
        try:
            bench.start_upstream()
            for scenario in chosen:
                print(f"  {scenario.name} ...", end=" ", flush=True)
                result = bench.measure(scenario)
                results.append(result)
                if result.error or not result.load:
                    print("failed (see below)", flush=True)
                else:
                    print(f"{result.load.rps:,.0f} req/s", flush=True)
            if chosen_hops:
                print(f"  direct, paced at {PACED_RATE:g} req/s ...", end=" ", flush=True)
                paced_error = bench.measure_paced_direct()
                direct = bench.paced_direct
                print(
                    "failed (see below)"
                    if paced_error or not direct
                    else f"p99 {direct['p99_ms']:.3f} ms",
                    flush=True,
                )
            for hop in chosen_hops:
                print(f"  {hop.name} ...", end=" ", flush=True)
                hop_result = bench.measure_hop(hop)
                hops.append(hop_result)
                if hop_result.error or not hop_result.load:
                    print("failed (see below)", flush=True)
                else:
                    print(f"{hop_result.load.rps:,.0f} req/s", flush=True)
            for h2 in chosen_h2:
                loads = ", ".join(f"c{c}x{m}" for c, m in h2.loads)
                print(f"  {h2.name} ({loads}) ...", end=" ", flush=True)
                measured = bench.measure_h2_hop(h2)
                h2_hops.extend(measured)
                print(
                    ", ".join(
                        "failed (see below)"
                        if r.error or not r.load
                        else f"{r.load.rps:,.0f} req/s"
                        for r in measured
                    ),
                    flush=True,
                )
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every process started", file=sys.stderr)
            return 130
        finally:
            bench.processes.stop_all()
        info = versions(bench)

    load_after = os.getloadavg()[0]
    checked = targets(results) if results else []
    policies_chosen = any(s.name == "meshling-http+policies" for s in chosen)
    policy_checked = policy_targets(results) if policies_chosen else []
    if results:
        print()
        print(table(results))
        print()
        print("meshling against HAProxy (same run):")
        print(targets_table(checked))
    if policies_chosen:
        print()
        print(
            f"meshling-http+policies ({args.policies_lb}) against meshling-http, "
            "policies configured, none firing (same run):"
        )
        print(policy_summary(results))
        print(targets_table(policy_checked))
    hop_checked = hop_targets(hops) if chosen_hops else []
    if chosen_hops:
        print()
        print(hop_table(hops, bench.paced_direct))
        print()
        print("meshling mesh hop against the HAProxy pair (same run):")
        print(targets_table(hop_checked))
    h2_checked = target_rows(H2_TARGETS, h2_measured(h2_hops)) if chosen_h2 else []
    if chosen_h2:
        print()
        print(format_rows(h2_rows(h2_hops)))
        print()
        print("meshling HTTP/2 and gRPC hops against the HAProxy pairs (same run):")
        print(targets_table(h2_checked))
    everything: list[Result | HopResult] = [*results, *hops]
    for r in everything:
        for note in ([r.error] if r.error else []) + r.notes:
            print(f"\n{r.scenario}: {note}")
    for h in h2_hops:
        for note in ([h.error] if h.error else []) + h.notes:
            print(f"\n{h.label}: {note}")
    if paced_error:
        print(f"\ndirect, paced: {paced_error}")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "proxy_cpu": bench.proxy_cpu,
            "load_cpu": bench.load_cpu,
            "load_average_before": load_before,
            "load_average_after": load_after,
            "paced_rate": PACED_RATE,
            "paced_connections": PACED_CONNECTIONS,
            "h2_loads": H2_LOADS,
            "grpc_loads": GRPC_LOADS,
            "h2_peer_streams": args.h2_peer_streams,
            "policies_lb": args.policies_lb,
            "policies": policy_fragments(args.policies_lb),
        },
        "machine": machine(),
        "versions": info,
        "results": [asdict(r) for r in results],
        "hops": [asdict(h) for h in hops],
        "paced_direct": bench.paced_direct,
        "h2_hops": [asdict(h) for h in h2_hops],
        "targets": checked + policy_checked + hop_checked + h2_checked,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    failed = (
        any(r.error for r in everything) or any(h.error for h in h2_hops) or paced_error is not None
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
