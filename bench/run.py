"""The proxy benchmark: meshling against HAProxy and nginx, on the same machine, in one run.

Every proxy forwards to the same nginx upstream (a tiny keep-alive `200 ok`) and is loaded
by wrk. The proxy under test runs alone on one CPU; wrk, the upstream and this script share
another, so the proxy's numbers are not mixed with the load generator's. For each scenario
the script records requests/s, p50/p99 latency, the proxy's CPU time per request, its
resident memory idle and under load, and (for meshling) the time from spawn to ready.
It prints one table, the meshling/HAProxy ratios against their targets, and writes
everything to bench/results/latest.json.

    .venv/bin/python bench/run.py            # 10 s per scenario, about two minutes in all
    .venv/bin/python bench/run.py --quick    # 3 s per scenario
    .venv/bin/python bench/run.py --only haproxy-http meshling-http

Every peer is started here, from a config written to a temporary directory, and stopped
by PID at the end, also on errors and Ctrl-C. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
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
    exit_code: int | None = None
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


def meshling_conf(
    workdir: Path, name: str, mode: str, port: int, admin: int, upstream: int, access_log: bool
) -> Path:
    if mode == "http":
        chain: dict[str, Any] = {
            "name": "http",
            "http": {
                "route_config": {
                    "virtual_hosts": [
                        {
                            "name": "bench",
                            "domains": ["*"],
                            "routes": [{"name": "all", "cluster": "upstream"}],
                        }
                    ]
                }
            },
        }
    else:
        chain = {"name": "tcp", "tcp": {"cluster": "upstream"}}
    snapshot: dict[str, Any] = {
        "version": "1",
        "node": "bench",
        "drain_timeout": "2s",
        "admin": {"address": HOST, "port": admin, "token": "bench"},
        "listeners": [{"name": "bench", "address": HOST, "port": port, "filter_chains": [chain]}],
        "clusters": [{"name": "upstream", "endpoints": [{"address": HOST, "port": upstream}]}],
    }
    if access_log:
        snapshot["access_log"] = {"path": str(workdir / f"{name}.access.log")}
    conf = workdir / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(snapshot, sort_keys=False))
    return conf


# -- the run ---------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    description: str
    # starts the proxy; returns its process (None: no proxy) and the port to load
    start: Callable[[Bench], tuple[subprocess.Popen[bytes] | None, int]]
    # meshling promises exit code 0 after a SIGTERM drain; the peers make no such promise
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

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        conf = nginx_conf(self.workdir, "upstream", upstream_block(self.upstream_port))
        proc = self.processes.start("upstream", nginx_argv(self.nginx, conf), self.load_cpu)
        self.wait_serving("upstream", proc, self.upstream_port)

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
        self.ready_time = self.access_log = None
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
            result.load, peak, ticks = self.wrk(port, self.args.duration, pids)
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
        self, name: str, mode: str, access_log: bool
    ) -> tuple[subprocess.Popen[bytes] | None, int]:
        port, admin = free_port(), free_port()
        conf = meshling_conf(self.workdir, name, mode, port, admin, self.upstream_port, access_log)
        if access_log:
            self.access_log = self.workdir / f"{name}.access.log"
        argv = [str(MESHLING), "proxy", "run", "--config", str(conf)]
        started = time.monotonic()
        proc = self.processes.start(name, argv, self.proxy_cpu)
        self.wait_ready(name, proc, lambda: http_get(admin, "/ready")[0] == 200)
        self.ready_time = time.monotonic() - started
        return proc, port


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
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
    out = []
    for (name, what, bound, unit, at_least), value in zip(TARGETS, measured, strict=True):
        out.append(
            {
                "target": name,
                "what": what,
                "value": value,
                "bound": f"{'>=' if at_least else '<='} {bound:g}{unit}",
                "unit": unit.strip(),
                "met": None if value is None else value >= bound if at_least else value <= bound,
            }
        )
    return out


def targets_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for t in rows:
        if t["value"] is None:
            value, verdict = "n/a", "not measured"
        else:
            value = f"{t['value']:.2f}{'x' if t['unit'] == 'x' else ' ' + t['unit']}"
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
    }


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds (2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (1)")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SCENARIO",
        choices=[s.name for s in SCENARIOS],
        help="run only these scenarios: " + ", ".join(s.name for s in SCENARIOS),
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 3.0, 1.0
    if args.duration <= 0 or args.duration > 120 or args.warmup < 0 or args.warmup > 60:
        parser.error("keep --duration within (0, 120] and --warmup within [0, 60] seconds")
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
    if any(s.name.startswith("meshling") for s in chosen) and not MESHLING.exists():
        raise SystemExit(f"{MESHLING} is missing: run `make install` first")
    results: list[Result] = []
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
        except KeyboardInterrupt:
            print("\ninterrupted: stopping every process started", file=sys.stderr)
            return 130
        finally:
            bench.processes.stop_all()
        info = versions(bench)

    checked = targets(results)
    print()
    print(table(results))
    print()
    print("meshling against HAProxy (same run):")
    print(targets_table(checked))
    for r in results:
        for note in ([r.error] if r.error else []) + r.notes:
            print(f"\n{r.scenario}: {note}")

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
        },
        "machine": machine(),
        "versions": info,
        "results": [asdict(r) for r in results],
        "targets": checked,
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
