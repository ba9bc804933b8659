"""The control plane's convergence benchmark: N simulated proxies on one control plane.

For each size N it starts a real `meshling control-plane run` (SQLite in a temporary
directory, on 127.0.0.1), creates a mesh with mTLS on through the REST API (10 services,
N/10 dataplanes each, every one with an inbound and outbounds to 2-3 other services, a
TrafficPermission per service and one for every service), and connects N simulated
proxies to the config stream (`bench/cp_client.py`: one process up to 500 proxies, then
one per 500, at most one per CPU left to them). When every proxy has acked its first snapshot it measures rounds: each round
updates the permission that selects every service (`destination: *`), and times, for
every proxy, the moment its ack of the snapshot carrying that change is sent, from the
moment the update request was started. It also reads the control plane's resident memory
(`VmRSS`, and the kernel's peak `VmHWM`) from /proc.

    make bench-cp                              # N = 100 and 1000, 5 rounds each
    .venv/bin/python bench/cp.py --sizes 100   # one size
    .venv/bin/python bench/cp.py --sizes 1000 --rounds 10 --json /tmp/cp.json

Prints a table (p50/p90/p99/max convergence, RSS, peak RSS) against the targets (p99
<= 1 s and RSS <= 300 MB at N = 1000) and writes the same to bench/results/cp.json.
Every process is started here and stopped by PID, also on errors and Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvloop

# bench/ is the script's directory, so first on the path
from cp_client import raise_nofile_limit
from cp_profile import Recorder, py_spy, summary

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "cp.json"
MESHLING = ROOT / ".venv" / "bin" / "meshling"
PYTHON = ROOT / ".venv" / "bin" / "python"
CLIENT = ROOT / "bench" / "cp_client.py"
HOST = "127.0.0.1"
MESH = "default"
STREAM_PATH = "/api/v1/stream"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 30.0  # seconds the control plane gets to answer /healthz
STOP_TIMEOUT = 15.0  # seconds a process gets to exit after SIGTERM before SIGKILL
QUIET_TIMEOUT = 60.0  # seconds to wait for the control plane to go idle before a round
PROXIES_PER_WORKER = 500  # above this, a worker process per spare CPU (up to --workers)
MB = 1024 * 1024

# every process started, for the last-resort cleanup in main()
STARTED_CONTROL_PLANES: list[ControlPlane] = []
STARTED_WORKERS: list[asyncio.subprocess.Process] = []

# The targets, stated for N = 1000 (checked on every row, judged at that size).
TARGET_SIZE = 1000
TARGET_P99_S = 1.0
TARGET_RSS_MB = 300.0

INBOUND_PORT = 15006
SERVICE_PORT = 8080
FIRST_OUTBOUND_PORT = 15001
EVERYWHERE = "bench-everywhere"  # the permission each round updates


# -- the mesh --------------------------------------------------------------------------


def service_name(index: int) -> str:
    return f"svc-{index}"


def outbound_services(index: int, services: int) -> list[int]:
    """2 or 3 other services this service calls (none when there are too few)."""
    steps = [1, 2, 4] if index % 2 == 0 else [1, 2]
    return sorted({(index + s) % services for s in steps if (index + s) % services != index})


def dataplane_document(number: int, services: int) -> dict[str, Any]:
    """Dataplane `number` of the mesh: service number % services, a unique address."""
    index = number % services
    service = service_name(index)
    address = f"10.{(number >> 16) & 255}.{(number >> 8) & 255}.{number & 255}"
    outbounds = [
        {"port": FIRST_OUTBOUND_PORT + i, "service": service_name(target), "protocol": "http"}
        for i, target in enumerate(outbound_services(index, services))
    ]
    return {
        "kind": "Dataplane",
        "metadata": {"name": f"{service}-{number // services}", "mesh": MESH},
        "spec": {
            "service": service,
            "address": address,
            "tags": {"version": f"v{number % 3 + 1}", "zone": "abc"[number % 3]},
            "inbounds": [{"port": INBOUND_PORT, "service_port": SERVICE_PORT, "protocol": "http"}],
            "outbounds": outbounds,
            "admin": {"port": 9901},
        },
    }


def callers_permission(index: int, services: int) -> dict[str, Any]:
    """Service `index` takes calls from the services with an outbound to it."""
    callers = [s for s in range(services) if index in outbound_services(s, services)]
    sources = [{"service": service_name(s)} for s in callers] or [{"service": "*"}]
    return {
        "kind": "TrafficPermission",
        "metadata": {"name": f"{service_name(index)}-callers", "mesh": MESH},
        "spec": {
            "destination": {"service": service_name(index)},
            "rules": [{"action": "allow", "sources": sources}],
        },
    }


def everywhere_permission(marker: str, version: int | None) -> dict[str, Any]:
    """The permission on every service; `marker` (a service name) changes each round, and
    shows up in every proxy's snapshot, which is how a proxy tells the round's push."""
    metadata: dict[str, Any] = {"name": EVERYWHERE, "mesh": MESH}
    if version is not None:
        metadata["version"] = version
    return {
        "kind": "TrafficPermission",
        "metadata": metadata,
        "spec": {
            "destination": {"service": "*"},
            "rules": [
                {"action": "allow", "sources": [{"identity": f"spiffe://{MESH}/ops/*"}]},
                {"action": "allow", "sources": [{"service": marker}]},
            ],
        },
    }


def new_marker(round_number: int) -> str:
    return f"bench-r{round_number}-{secrets.token_hex(4)}"


# -- results ---------------------------------------------------------------------------


@dataclass
class Round:
    number: int
    marker: str
    apply_ms: float  # the update request, start to response
    acked: int  # proxies that acked the round's snapshot in time
    missing: int
    latencies_s: list[float]  # per acked proxy: apply start -> ack sent
    p50_s: float | None
    p99_s: float | None
    max_s: float | None  # the round's convergence: the last ack (None: some missing)
    client_delay_p99_ms: float | None  # a proxy's receive -> ack sent, in the worker
    pushes: int  # pushes the proxies received since the round was armed
    cp_cpu_s: float  # the control plane's CPU time from the apply to the last ack
    worker_cpu_percent: float  # the busiest worker's CPU over the same span
    rss_mb: float  # the control plane's RSS after the round
    missing_names: list[str] = field(default_factory=list)


@dataclass
class SizeResult:
    size: int
    services: int
    workers: int
    rounds: list[Round] = field(default_factory=list)
    setup_s: float | None = None  # REST setup: mesh, permissions, dataplanes, tokens
    connect_s: float | None = None  # first connect -> every proxy acked its first push
    settle_s: float | None = None  # then until the control plane is idle
    connect_pushes: int | None = None  # pushes the proxies had received by then
    snapshot_kb_mean: float | None = None
    snapshot_kb_max: float | None = None
    compression: list[str] = field(default_factory=list)
    rss_idle_mb: float | None = None  # the control plane after the REST setup
    rss_steady_mb: float | None = None  # every proxy connected, before the rounds
    rss_after_mb: float | None = None  # after the rounds
    rss_rounds_peak_mb: float | None = None  # sampled every 50 ms during the rounds
    rss_hwm_mb: float | None = None  # VmHWM at the end: the peak over its life
    p50_s: float | None = None  # over every proxy of every round (a missing ack is +inf)
    p90_s: float | None = None
    p99_s: float | None = None
    max_s: float | None = None
    missing: int = 0
    cp_exit_code: int | None = None
    profiles: dict[str, str] = field(default_factory=dict)  # phase -> py-spy raw file
    profile_summaries: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values. +inf values (missing acks) count."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def finite(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else value


# -- processes -------------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """The process and all its children."""
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


def memory_mb(pids: list[int], field_name: str) -> float:
    """The sum of a /proc/PID/status memory field (VmRSS, VmHWM) in MB."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1]) * 1024
    return total / MB


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_split(pin: bool) -> tuple[list[int] | None, list[int] | None]:
    """(control-plane CPUs, client CPUs): the first CPU alone for the control plane when
    there are two or more, the rest for this script and the simulated proxies."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return cpus[:1], cpus[1:]


class ControlPlane:
    """One `meshling control-plane run` on a fresh data directory, stopped by PID."""

    def __init__(self, workdir: Path, cpus: list[int] | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.token_file = workdir / "admin.token"
        self.log = workdir / "control-plane.out"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        base = [str(MESHLING)]
        help_text = subprocess.run(
            [*base, "control-plane", "run", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        argv = [*base, "control-plane", "run"]
        # the flags of the installed version: --host/--port or --listen HOST:PORT, and
        # --data-dir and --mesh where there are (the mesh is made below, through the API)
        argv += ["--store", f"sqlite:///{self.workdir / 'meshling.db'}"]
        if "--host" in help_text and "--port" in help_text:
            argv += ["--host", HOST, "--port", str(self.port)]
        else:
            argv += ["--listen", f"{HOST}:{self.port}"]
        if "--data-dir" in help_text:
            argv += ["--data-dir", str(self.workdir / "data")]
        if "--mesh " in help_text:
            argv += ["--mesh", ""]
        argv += ["--token-file", str(self.token_file)]
        return argv

    def start(self) -> None:
        argv = self.command()
        if self.cpus is not None:
            argv = ["taskset", "-c", ",".join(map(str, self.cpus)), *argv]
        with self.log.open("wb") as log:
            # a session of its own: Ctrl-C reaches this script, which stops it in order
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        STARTED_CONTROL_PLANES.append(self)

    def output(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc else []

    def rss(self) -> float:
        return memory_mb(self.pids, "VmRSS")

    def hwm(self) -> float:
        return memory_mb(self.pids, "VmHWM")

    def cpu(self) -> float:
        return cpu_seconds(self.pids)

    def exited(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def stop(self) -> int | None:
        """SIGTERM, wait, then SIGKILL its group; the exit code, None if it was killed."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None
        return proc.returncode


class Worker:
    """One `bench/cp_client.py` process and its JSON-lines channel."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process) -> None:
        self.index = index
        self.proc = proc
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.reader = asyncio.create_task(self.read())

    @classmethod
    async def start(cls, index: int, spec: Path, cpus: list[int] | None, log: Path) -> Worker:
        argv = [str(PYTHON), str(CLIENT), str(spec)]
        if cpus is not None:
            argv = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                limit=64 * MB,
            )
        STARTED_WORKERS.append(proc)
        return cls(index, proc)

    async def read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            await self.events.put(json.loads(line))
        await self.events.put({"event": "exited"})

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())

    async def expect(self, event: str, deadline: float, on_other: Any = None) -> dict[str, Any]:
        """The next `event` (earlier events go to `on_other`); TimeoutError at `deadline`
        (monotonic), RuntimeError if the worker exits first."""
        while True:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                raise TimeoutError
            message = await asyncio.wait_for(self.events.get(), timeout)
            if message["event"] == event:
                return message
            if message["event"] in ("exited", "fatal"):
                raise RuntimeError(
                    f"client worker {self.index} {message['event']}: {message.get('error', '')}"
                )
            if on_other is not None:
                on_other(self, message)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                self.send(cmd="stop")
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()
        self.reader.cancel()


# -- one size --------------------------------------------------------------------------


class Api:
    """The REST calls of the setup and the rounds, with the admin token."""

    def __init__(self, base: str, token: str) -> None:
        self.client = httpx.AsyncClient(
            base_url=base,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30.0,
            trust_env=False,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        response = await self.client.request(method, path, json=body)
        if response.status_code >= 300:
            raise RuntimeError(
                f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}"
            )
        return response.json() if response.content else None

    async def close(self) -> None:
        await self.client.aclose()


class SizeRun:
    def __init__(self, args: argparse.Namespace, size: int, workdir: Path) -> None:
        self.args = args
        self.size = size
        self.workdir = workdir
        self.cp_cpus, self.client_cpus = cpu_split(not args.no_pin)
        spare = len(self.client_cpus) if self.client_cpus else max(1, (os.cpu_count() or 2) - 1)
        wanted = args.workers or max(1, min(spare, math.ceil(size / PROXIES_PER_WORKER)))
        self.result = SizeResult(size, args.services, min(wanted, size))
        self.cp = ControlPlane(workdir, self.cp_cpus)
        self.workers: list[Worker] = []
        self.api: Api | None = None
        self.rss_peak = 0.0
        self.sampling = False

    def note(self, text: str) -> None:
        self.result.notes.append(text)
        print(f"    {text}", flush=True)

    async def run(self) -> SizeResult:
        try:
            await self.measure()
        except (RuntimeError, TimeoutError, httpx.HTTPError, OSError) as e:
            self.result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            tail = self.cp.output()
            if tail:
                self.result.notes.append("control plane output (last lines):\n" + tail)
        finally:
            self.sampling = False
            for worker in self.workers:
                await worker.stop()
            if self.api is not None:
                await self.api.close()
            if self.cp.proc is not None and self.cp.exited() is None:
                self.result.rss_hwm_mb = round(self.cp.hwm(), 1)
            self.result.cp_exit_code = self.cp.stop()
            if self.result.cp_exit_code not in (0, None) and self.result.error is None:
                self.result.notes.append(f"the control plane exited {self.result.cp_exit_code}")
        return self.result

    async def measure(self) -> None:
        result = self.result
        self.cp.start()
        await self.wait_healthy()
        token = self.cp.token_file.read_text().strip()
        self.api = Api(self.cp.base, token)

        started = time.monotonic()
        tokens = await self.setup(self.api)
        result.setup_s = round(time.monotonic() - started, 2)
        await asyncio.sleep(0.5)
        result.rss_idle_mb = round(self.cp.rss(), 1)
        print(
            f"    setup {result.setup_s:.1f} s (REST), control plane RSS "
            f"{result.rss_idle_mb:.0f} MB; connecting {self.size} proxies "
            f"from {result.workers} worker process(es)",
            flush=True,
        )

        with self.profiling("connect"):
            await self.connect(tokens)
            result.settle_s = await self.quiesce("the connects")
        replies = [w.expect("status", time.monotonic() + 10) for w in self.workers]
        for worker in self.workers:
            worker.send(cmd="status")
        result.connect_pushes = sum(r["pushes"] for r in await asyncio.gather(*replies))
        print(
            f"    control plane idle {result.settle_s:.1f} s after that; "
            f"{result.connect_pushes} pushes in all to the {self.size} proxies so far",
            flush=True,
        )
        result.rss_steady_mb = round(self.cp.rss(), 1)
        self.sampling = True
        sampler = asyncio.create_task(self.sample_rss())
        try:
            with self.profiling("rounds"):
                for number in range(1, self.args.rounds + 1):
                    result.rounds.append(await self.round(number))
                    await asyncio.sleep(self.args.pause)
                    await self.quiesce(f"round {number}")
        finally:
            self.sampling = False
            await sampler
        result.rss_after_mb = round(self.cp.rss(), 1)
        result.rss_rounds_peak_mb = round(self.rss_peak, 1)
        self.summarize()

    @contextlib.contextmanager
    def profiling(self, phase: str) -> Iterator[None]:
        """py-spy on the control plane for a phase, with --profile DIR."""
        binary = py_spy() if self.args.profile else None
        if binary is None or self.cp.proc is None:
            yield
            return
        self.args.profile.mkdir(parents=True, exist_ok=True)
        output = self.args.profile / f"n{self.size}-{phase}.txt"
        recorder = Recorder(binary, self.cp.proc.pid, output)
        try:
            yield
        finally:
            error = recorder.stop()
            if error:
                self.note(f"profile of {phase}: {error}")
            else:
                self.result.profiles[phase] = str(output)
                self.result.profile_summaries[phase] = summary(output)

    async def quiesce(self, after: str) -> float:
        """Wait until the control plane is idle (under 10% of a CPU over half a second),
        so that a round starts from a steady state; the seconds waited."""
        started = time.monotonic()
        last = self.cp.cpu()
        while time.monotonic() - started < QUIET_TIMEOUT:
            await asyncio.sleep(0.5)
            now = self.cp.cpu()
            if now - last <= 0.05:
                break
            last = now
        else:
            self.note(f"the control plane was still busy {QUIET_TIMEOUT:g} s after {after}")
        return round(time.monotonic() - started, 1)

    async def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        async with httpx.AsyncClient(trust_env=False, timeout=1.0) as client:
            while time.monotonic() < deadline:
                code = self.cp.exited()
                if code is not None:
                    raise RuntimeError(f"the control plane exited {code} at start")
                with contextlib.suppress(httpx.HTTPError):
                    response = await client.get(f"{self.cp.base}/healthz")
                    if response.status_code == 200 and self.cp.token_file.exists():
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the control plane did not answer /healthz in {START_TIMEOUT:g} s")

    async def setup(self, api: Api) -> dict[str, str]:
        """The mesh (mTLS on), the permissions, the dataplanes (unless they register by
        hello alone), and a dataplane token per service."""
        services = self.args.services
        mesh = {
            "kind": "Mesh",
            "metadata": {"name": MESH},
            "spec": {"mtls": {"enabled": True, "mode": "strict"}},
        }
        try:
            await api.call("POST", "/api/v1/resources", mesh)
        except RuntimeError as e:
            if "HTTP 409" not in str(e):
                raise
            # the control plane made a default mesh: turn its mTLS on
            current = await api.call("GET", f"/api/v1/Mesh/{MESH}/{MESH}")
            mesh["metadata"]["version"] = current["metadata"]["version"]
            await api.call("PUT", f"/api/v1/Mesh/{MESH}/{MESH}", mesh)
        # before the dataplanes: the permissions select none of them yet
        unmatched = "/api/v1/resources?allow_unmatched=true"
        for index in range(services):
            await api.call("POST", unmatched, callers_permission(index, services))
        created = await api.call("POST", unmatched, everywhere_permission(new_marker(0), None))
        self.everywhere_version: int = created["metadata"]["version"]

        if self.args.register == "api":
            documents = [dataplane_document(n, services) for n in range(self.size)]
            gate = asyncio.Semaphore(8)

            async def create(document: dict[str, Any]) -> None:
                async with gate:
                    await api.call("POST", "/api/v1/resources", document)

            await asyncio.gather(*(create(d) for d in documents))

        tokens = {}
        for index in range(services):
            issued = await api.call(
                "POST",
                "/api/v1/tokens/dataplane",
                {"mesh": MESH, "service": service_name(index), "ttl": "2h"},
            )
            tokens[service_name(index)] = issued["token"]
        return tokens

    async def connect(self, tokens: dict[str, str]) -> None:
        result = self.result
        url = f"ws://{HOST}:{self.cp.port}{STREAM_PATH}"
        shares: list[list[dict[str, Any]]] = [[] for _ in range(result.workers)]
        for number in range(self.size):
            document = dataplane_document(number, self.args.services)
            name = document["metadata"]["name"]
            shares[number % result.workers].append(
                {
                    "dataplane": document,
                    "token": tokens[document["spec"]["service"]],
                    "tls_paths": {
                        "certificate": f"/var/run/meshling/{name}/cert.pem",
                        "key": f"/var/run/meshling/{name}/key.pem",
                        "trust_bundle": f"/var/run/meshling/{name}/bundle.pem",
                    },
                }
            )
        settings = {
            "compression": not self.args.no_compression,
            "max_message_bytes": MAX_MESSAGE_BYTES,
            "open_timeout": 30,
            "ping_interval": 15,
            "ping_timeout": 15,
            "handshakes": self.args.handshakes,
        }
        started = time.monotonic()
        for index, share in enumerate(shares):
            spec = self.workdir / f"worker-{index}.json"
            spec.write_text(json.dumps({"url": url, "settings": settings, "dataplanes": share}))
            log = self.workdir / f"worker-{index}.err"
            self.workers.append(await Worker.start(index, spec, self.client_cpus, log))

        def progress(worker: Worker, message: dict[str, Any]) -> None:
            if message["event"] == "progress" and worker.index == 0:
                print(
                    f"    worker 0: {message['connected']} connected, "
                    f"{message['acked']} acked, {message['failed']} failed",
                    flush=True,
                )

        deadline = started + self.args.connect_timeout
        try:
            readies = await asyncio.gather(
                *(w.expect("ready", deadline, progress) for w in self.workers)
            )
        except TimeoutError:
            raise TimeoutError(
                f"not every proxy acked its first push within {self.args.connect_timeout:g} s"
            ) from None
        failed = sum(r["failed"] for r in readies)
        if failed:
            errors = [e for r in readies for e in r["errors"]][:5]
            raise RuntimeError(
                f"{failed} of {self.size} proxies failed to connect; first errors:\n      "
                + "\n      ".join(errors)
            )
        last = max(r["last_first_ack"] for r in readies)
        result.connect_s = round(last - started, 2)
        sizes = [b for r in readies for b in r["snapshot_bytes"]]
        result.snapshot_kb_mean = round(sum(sizes) / len(sizes) / 1024, 1)
        result.snapshot_kb_max = round(max(sizes) / 1024, 1)
        result.compression = readies[0]["extensions"]
        print(
            f"    all {self.size} acked their first push {result.connect_s:.2f} s after "
            f"the first connect; snapshot {result.snapshot_kb_mean:.1f} KB mean "
            f"(compression: {', '.join(result.compression) or 'none'})",
            flush=True,
        )

    async def sample_rss(self) -> None:
        while self.sampling:
            self.rss_peak = max(self.rss_peak, self.cp.rss())
            await asyncio.sleep(0.05)

    async def round(self, number: int) -> Round:
        assert self.api is not None
        marker = new_marker(number)
        arm_deadline = time.monotonic() + 10
        for worker in self.workers:
            worker.send(cmd="arm", round=number, marker=marker)
        await asyncio.gather(*(w.expect("armed", arm_deadline) for w in self.workers))

        document = everywhere_permission(marker, self.everywhere_version)
        cpu_before = self.cp.cpu()
        t0 = time.monotonic()
        updated = await self.api.call(
            "PUT", f"/api/v1/TrafficPermission/{MESH}/{EVERYWHERE}", document
        )
        apply_ms = (time.monotonic() - t0) * 1000
        self.everywhere_version = updated["metadata"]["version"]

        deadline = t0 + self.args.round_timeout
        with contextlib.suppress(TimeoutError):
            await asyncio.gather(*(w.expect("done", deadline) for w in self.workers))
        cpu_after = self.cp.cpu()
        reports = []
        for worker in self.workers:
            worker.send(cmd="collect", round=number)
        for worker in self.workers:
            reports.append(await worker.expect("report", time.monotonic() + 30))

        acked_at = [t for r in reports for t in r["acked"]]
        latencies = sorted(t - t0 for t in acked_at)
        delays = [
            (a - b) * 1000 for r in reports for a, b in zip(r["acked"], r["received"], strict=True)
        ]
        missing_names = [n for r in reports for n in r["missing"]]
        span = (max(acked_at) - t0) if acked_at else self.args.round_timeout
        busiest = max(r["cpu_s"] for r in reports) / max(span, 1e-3) * 100
        pooled = latencies + [math.inf] * len(missing_names)
        result = Round(
            number=number,
            marker=marker,
            apply_ms=round(apply_ms, 1),
            acked=len(latencies),
            missing=len(missing_names),
            latencies_s=[round(v, 4) for v in latencies],
            p50_s=finite(percentile(pooled, 0.5)),
            p99_s=finite(percentile(pooled, 0.99)),
            max_s=None if missing_names else (latencies[-1] if latencies else None),
            client_delay_p99_ms=percentile(delays, 0.99),
            pushes=sum(r["pushes"] for r in reports),
            cp_cpu_s=round(cpu_after - cpu_before, 2),
            worker_cpu_percent=round(busiest, 1),
            rss_mb=round(self.cp.rss(), 1),
            missing_names=missing_names[:20],
        )
        last = f"last ack {result.max_s:.3f} s" if result.max_s is not None else "TIMED OUT"
        print(
            f"    round {number}: {result.acked}/{self.size} acked, p50 "
            f"{fmt_s(result.p50_s)}, p99 {fmt_s(result.p99_s)}, {last}; apply "
            f"{result.apply_ms:.0f} ms, control plane {result.cp_cpu_s:.2f} s CPU, "
            f"client worker {result.worker_cpu_percent:.0f}% CPU, {result.pushes} pushes",
            flush=True,
        )
        if result.missing:
            print(
                f"      missing acks after {self.args.round_timeout:g} s: "
                f"{', '.join(missing_names[:8])}{' ...' if len(missing_names) > 8 else ''}",
                flush=True,
            )
        return result

    def summarize(self) -> None:
        result = self.result
        pooled = [v for r in result.rounds for v in r.latencies_s]
        result.missing = sum(r.missing for r in result.rounds)
        pooled += [math.inf] * result.missing
        result.p50_s = finite(percentile(pooled, 0.5))
        result.p90_s = finite(percentile(pooled, 0.9))
        result.p99_s = finite(percentile(pooled, 0.99))
        result.max_s = None if result.missing else finite(percentile(pooled, 1.0))
        if result.p99_s is None and pooled:
            result.notes.append(
                f"over 1% of the acks were missing after {self.args.round_timeout:g} s: "
                "p99 is unknown and the target is missed"
            )
        busiest = max((r.worker_cpu_percent for r in result.rounds), default=0.0)
        if busiest > 80:
            self.note(
                f"a client worker used {busiest:.0f}% of a CPU during a round: the simulated "
                "proxies may have delayed their own acks (see client_delay_p99_ms per round; "
                "--workers N splits them if there are spare CPUs)"
            )
        extra = [r for r in result.rounds if r.pushes > r.acked]
        if extra:
            self.note(
                "some rounds pushed more snapshots than there are proxies: "
                + ", ".join(f"round {r.number}: {r.pushes}" for r in extra)
            )


# -- output ----------------------------------------------------------------------------


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def verdicts(result: SizeResult, round_timeout: float) -> tuple[bool | None, bool | None]:
    """(p99 met, RSS met); None when not measured."""
    if result.error or not result.rounds:
        return None, None
    p99_met = result.p99_s is not None and result.p99_s <= TARGET_P99_S
    rss = max(v for v in (result.rss_steady_mb, result.rss_after_mb, 0.0) if v is not None)
    return p99_met, rss <= TARGET_RSS_MB


def table(results: list[SizeResult], round_timeout: float) -> str:
    header = [
        "N",
        "rounds",
        "p50 s",
        "p90 s",
        "p99 s",
        "max s",
        "missing",
        "RSS MB",
        "peak MB",
        "snap KB",
        "connect s",
        f"p99<={TARGET_P99_S:g}s",
        f"RSS<={TARGET_RSS_MB:g}MB",
    ]
    rows = [header]
    for r in results:
        p99_met, rss_met = verdicts(r, round_timeout)

        def seconds(value: float | None, r: SizeResult = r) -> str:
            # None with acks missing: the value is past the round's timeout
            return f">{round_timeout:g}" if value is None and r.missing else fmt_s(value)

        rows.append(
            [
                str(r.size),
                str(len(r.rounds)),
                seconds(r.p50_s),
                seconds(r.p90_s),
                seconds(r.p99_s),
                seconds(r.max_s),
                str(r.missing),
                fmt_mb(r.rss_after_mb),
                fmt_mb(r.rss_hwm_mb),
                "-" if r.snapshot_kb_mean is None else f"{r.snapshot_kb_mean:.1f}",
                "-" if r.connect_s is None else f"{r.connect_s:.2f}",
                {None: "-", True: "met", False: "MISSED"}[p99_met],
                {None: "-", True: "met", False: "MISSED"}[rss_met],
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def targets(results: list[SizeResult], round_timeout: float) -> list[dict[str, Any]]:
    judged = [r for r in results if r.size == TARGET_SIZE]
    checked = []
    for r in judged:
        p99_met, rss_met = verdicts(r, round_timeout)
        rss = max(v for v in (r.rss_steady_mb, r.rss_after_mb, 0.0) if v is not None)
        checked.append(
            {
                "target": "convergence p99",
                "size": r.size,
                "value": r.p99_s,
                "bound": TARGET_P99_S,
                "unit": "s",
                "met": p99_met,
            }
        )
        checked.append(
            {
                "target": "control plane RSS (steady, after the rounds)",
                "size": r.size,
                "value": rss if r.rounds else None,
                "bound": TARGET_RSS_MB,
                "unit": "MB",
                "met": rss_met,
                "peak_hwm_mb": r.rss_hwm_mb,
            }
        )
    return checked


def targets_text(checked: list[dict[str, Any]], round_timeout: float) -> str:
    if not checked:
        return f"  (the targets are stated for N = {TARGET_SIZE}, which was not run)"
    lines = []
    for t in checked:
        if t["value"] is None:
            value = f">{round_timeout:g} s" if t["unit"] == "s" else "-"
        else:
            value = f"{t['value']:.3f} s" if t["unit"] == "s" else f"{t['value']:.0f} MB"
        verdict = {None: "not measured", True: "met", False: "MISSED"}[t["met"]]
        bound = f"{t['bound']:g} {t['unit']}"
        lines.append(f"  {t['target']:<46} {value:>10}   target <= {bound:<7} {verdict}")
        if t.get("peak_hwm_mb") is not None and t["peak_hwm_mb"] > t["bound"]:
            lines.append(
                f"  {'':<46} (peak VmHWM {t['peak_hwm_mb']:.0f} MB is above it: "
                "a transient, see the JSON)"
            )
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 100,1000, got {text!r}") from None
    if not sizes or any(s < 1 or s > 20000 for s in sizes):
        raise argparse.ArgumentTypeError("each size must be within 1..20000")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=parse_sizes, default=[100, 1000], help="proxies per run (100,1000)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per size (5)")
    parser.add_argument("--services", type=int, default=10, help="services of the mesh (10)")
    parser.add_argument(
        "--round-timeout", type=float, default=30.0, help="seconds a round may take (30)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        default=180.0,
        help="seconds for every proxy to connect and ack its first push (180)",
    )
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between rounds (1)")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="client processes (default: one per 500 proxies, at most one per spare CPU)",
    )
    parser.add_argument(
        "--handshakes", type=int, default=50, help="concurrent connects per worker (50)"
    )
    parser.add_argument(
        "--register",
        choices=["api", "hello"],
        default="api",
        help="create the dataplanes through the REST API before the proxies connect "
        "(api, the default), or let each proxy's hello create its own (hello)",
    )
    parser.add_argument(
        "--no-compression",
        action="store_true",
        help="do not offer permessage-deflate (the clients offer it by default)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin the control plane to its own CPU"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record the control plane with py-spy (pip install py-spy) during the "
        "connects and during the rounds, into DIR/n<N>-<phase>.txt, and print a summary",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"results file ({RESULTS})")
    args = parser.parse_args(argv)
    if args.profile and py_spy() is None:
        parser.error("--profile needs py-spy: .venv/bin/pip install py-spy")
    if args.rounds < 1 or args.services < 2 or args.round_timeout <= 0:
        parser.error("--rounds must be >= 1, --services >= 2, --round-timeout > 0")
    return args


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP become KeyboardInterrupt, so the same cleanup runs for all three."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def versions() -> dict[str, str]:
    out = subprocess.run([str(MESHLING), "--version"], capture_output=True, text=True, check=False)
    return {"meshling": out.stdout.strip(), "python": platform.python_version()}


async def run_all(args: argparse.Namespace, tmp: Path) -> list[SizeResult]:
    results = []
    for size in args.sizes:
        workdir = tmp / f"n{size}"
        workdir.mkdir()
        print(f"N = {size}", flush=True)
        run = SizeRun(args, size, workdir)
        result = await run.run()
        if result.error:
            print(f"    failed: {result.error}", flush=True)
        results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not MESHLING.exists():
        raise SystemExit(f"{MESHLING} is missing: run `make install` first")
    limit = raise_nofile_limit()  # the control plane and the workers inherit it
    needed = max(args.sizes) + 256
    if limit < needed:
        raise SystemExit(f"the open-files limit is {limit}; N = {max(args.sizes)} needs {needed}")
    cp_cpus, client_cpus = cpu_split(not args.no_pin)
    if client_cpus is not None:
        os.sched_setaffinity(0, client_cpus)  # this script runs with the clients
        pinning = f"control plane on CPU {cp_cpus}, this script and the proxies on {client_cpus}"
    else:
        pinning = "not pinned"
    print(
        f"sizes {', '.join(map(str, args.sizes))}; {args.rounds} rounds each, "
        f"{args.round_timeout:g} s timeout; {args.services} services; {pinning}",
        flush=True,
    )
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"warning: load average {load_before:.2f} before starting", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="meshling-bench-cp-"))
    results: list[SizeResult] = []
    try:
        with terminate_as_interrupt(), asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
            results = r.run(run_all(args, tmp))
    except KeyboardInterrupt:
        # the runner cancelled the size in progress, whose cleanup stopped its processes
        print("\ninterrupted: every process started was stopped", file=sys.stderr)
        return 130
    finally:
        # normally each size stops its own processes; this is for an interrupted loop
        for proc in STARTED_WORKERS:
            if proc.returncode is None:  # not reaped, so the PID is still this child's
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        for cp in STARTED_CONTROL_PLANES:
            cp.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)

    checked = targets(results, args.round_timeout)
    print()
    print(table(results, args.round_timeout))
    print()
    print(f"against the targets (stated for N = {TARGET_SIZE}):")
    print(targets_text(checked, args.round_timeout))
    for r in results:
        for note in ([r.error] if r.error else []) + r.notes:
            print(f"\nN = {r.size}: {note}")
    for r in results:
        for phase, text in r.profile_summaries.items():
            print(f"\nprofile, N = {r.size}, {phase}: {text}")

    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": {
            "sizes": args.sizes,
            "rounds": args.rounds,
            "services": args.services,
            "round_timeout_s": args.round_timeout,
            "register": args.register,
            "compression_offered": not args.no_compression,
            "handshakes_per_worker": args.handshakes,
            "control_plane_cpus": cp_cpus,
            "client_cpus": client_cpus,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "machine": {
            "cpus": os.cpu_count(),
            "processor": processor(),
            "kernel": platform.release(),
        },
        "versions": versions(),
        "results": [asdict(r) for r in results],
        "targets": checked,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten to {args.json}")
    return 1 if any(r.error for r in results) else 0


def processor() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
