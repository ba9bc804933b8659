"""The chaos suite: a mesh across test hosts, steady traffic, and one fault at a time.

Topology (`ChaosMesh`), each its own network namespace (`hosts.Network`):

    cp      meshling control-plane (SQLite)
    client  chaos_load.py (the app) -> its proxy's outbound :15001 -> service "api"
    api1..3 an nginx instance of "api" behind its proxy's inbound :15006

with mTLS strict and, for client -> api: a Retry (3 attempts, a budget), a Timeout, a
CircuitBreaker with outlier detection and an HTTP HealthCheck (`POLICIES`).

A scenario runs the traffic, puts its fault on one instance (or the control plane, or
every proxy) a little after the traffic starts, takes it away again, and stops the traffic
a little later. The result counts the requests and failures, takes the p99 latency, and
compares every proxy's FDs and RSS before the traffic with after it (once the traffic has
stopped and a settle time passed, and, while a proxy holds more FDs than before, until
its pooled upstream connections reached their idle timeout): `Result.problems` lists
what missed the targets.

Used by tests/integration/test_chaos.py (short form, asserts the targets) and
bench/chaos.py (`make chaos`, long form, prints the table).
"""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hosts import (
    MESH,
    OUTBOUND_PORT,
    Instance,
    MeshHosts,
    Network,
    Process,
    wait_until,
)

LOAD_SCRIPT = Path(__file__).with_name("chaos_load.py")
SERVICE = "api"

# the settings the targets depend on (see POLICIES)
PER_TRY_TIMEOUT = 0.5
HEALTH_INTERVAL = 1.0
HEALTH_TIMEOUT = 0.5
UNHEALTHY_THRESHOLD = 2
# how long, at most, a dead endpoint takes to leave the balancer: the health checks that
# find it (a check may have just passed, so one interval more), or the per-try timeouts
# in a row that eject it, whichever comes first
OUTLIER_WINDOW = HEALTH_INTERVAL * (UNHEALTHY_THRESHOLD + 1) + HEALTH_TIMEOUT + PER_TRY_TIMEOUT

# every answer of the api instances weighs about 2 KiB, so that the traffic fills a
# noticeable part of a limited link: 150 requests a second are about 2.5 Mbit/s in all
BODY_PADDING = 2000
LIMIT = "256kbit"

# how long a proxy keeps an idle upstream connection pooled (the cluster's default
# idle_timeout, which the control plane leaves as it is)
POOL_IDLE_TIMEOUT = 60.0

# a proxy may hold a few more descriptors after a scenario than before it (a pooled
# connection to an endpoint that came back) without leaking; a leak grows with traffic
FD_SLACK = 8
# RSS after a scenario may exceed RSS before by this much (allocator arenas, caches
# filled once): a leak at 150 requests a second grows well past it within a minute
RSS_SLACK = 8 * 1024 * 1024


def _policies() -> list[dict[str, Any]]:
    selectors = {"sources": [{"service": "client"}], "destinations": [{"service": SERVICE}]}

    def policy(kind: str, conf: dict[str, Any]) -> dict[str, Any]:
        name = f"client-to-api-{kind.lower()}"
        return {
            "kind": kind,
            "metadata": {"name": name, "mesh": MESH},
            "spec": {**selectors, "conf": conf},
        }

    return [
        {
            "kind": "Mesh",
            "metadata": {"name": MESH},
            "spec": {"mtls": {"enabled": True, "mode": "strict"}},
        },
        {
            "kind": "TrafficPermission",
            "metadata": {"name": "api-from-client", "mesh": MESH},
            "spec": {
                "destination": {"service": SERVICE},
                "rules": [{"action": "allow", "sources": [{"service": "client"}]}],
            },
        },
        policy("Timeout", {"connect": "500ms", "request": "5s"}),
        policy(
            "Retry",
            {
                "max_attempts": 3,
                "retry_on": ["5xx", "connect-failure", "reset"],
                "per_try_timeout": f"{int(PER_TRY_TIMEOUT * 1000)}ms",
                "backoff": {"base": "10ms", "max": "100ms"},
                "budget": {"ratio": 0.5, "min_per_second": 20, "ttl": "10s"},
            },
        ),
        policy(
            "CircuitBreaker",
            {
                "outlier_detection": {
                    "consecutive_5xx": 3,
                    "base_ejection_time": "5s",
                    "max_ejection_time": "30s",
                    "interval": "5s",
                    "max_ejection_percent": 50,
                }
            },
        ),
        policy(
            "HealthCheck",
            {
                "interval": f"{int(HEALTH_INTERVAL * 1000)}ms",
                "timeout": f"{int(HEALTH_TIMEOUT * 1000)}ms",
                "healthy_threshold": 1,
                "unhealthy_threshold": UNHEALTHY_THRESHOLD,
                "http": {"path": "/healthz"},
            },
        ),
    ]


POLICIES = _policies()


@dataclass(frozen=True, slots=True)
class Timing:
    """How long each part of a scenario lasts: short in `make test`, longer in `make chaos`."""

    rps: float
    # traffic before the fault and after it is taken away
    lead: float
    tail: float
    # how long a fault lasts (a kill, a freeze, loss, a cut, a limit)
    fault: float
    # how long the control plane stays down
    cp_outage: float
    # after the traffic stops, before FDs and RSS are read again
    settle: float


SHORT = Timing(rps=100, lead=2.0, tail=3.0, fault=5.0, cp_outage=10.0, settle=2.0)
LONG = Timing(rps=150, lead=5.0, tail=10.0, fault=20.0, cp_outage=60.0, settle=5.0)

Usage = dict[str, tuple[int, int]]


@dataclass(slots=True)
class Result:
    scenario: str
    target: str
    sent: int
    failed: int
    p99: float
    before: Usage
    after: Usage
    # when the fault started and ended (wall clock), for the cut-off host's window
    fault_start: float = 0.0
    fault_end: float = 0.0
    # seconds from the fault's start to the last failure, when any failed
    failures_for: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # seconds from the traffic's end to the reading of `after`
    settled_after: float = 0.0

    @property
    def success_rate(self) -> float:
        return 1.0 - self.failed / self.sent if self.sent else 0.0

    @property
    def passed(self) -> bool:
        return not self.problems


class ChaosMesh:
    """The chaos topology on a `Network` of hosts cp, client, api1..apiN."""

    def __init__(self, network: Network, instances: int = 3) -> None:
        self.network = network
        self.mesh = MeshHosts(network, "cp")
        self.apis: list[Instance] = []
        self.client: Instance | None = None
        self.count = instances
        self.runs = 0

    @staticmethod
    def host_names(instances: int = 3) -> list[str]:
        return ["cp", "client", *(f"api{n}" for n in range(1, instances + 1))]

    def start(self) -> None:
        self.mesh.body_padding = BODY_PADDING
        self.mesh.start_control_plane()
        self.mesh.apply(POLICIES)
        for n in range(1, self.count + 1):
            api = self.mesh.add_instance(f"api{n}", f"api-{n}", SERVICE)
            self.mesh.start_instance(api)
            self.apis.append(api)
        self.client = self.mesh.add_instance(
            "client", "client", "client", app=False, outbounds=[SERVICE]
        )
        self.mesh.start_instance(self.client)
        host = self.client.host
        url = f"http://127.0.0.1:{OUTBOUND_PORT}/"

        def every_instance_answers() -> bool:
            seen = set()
            for _ in range(3 * self.count):
                try:
                    status, body = host.http_get(url, timeout=2.0)
                except OSError:
                    return False
                if status == 200:
                    seen.add(body.decode().split("\n", 1)[0])
            return len(seen) == self.count

        wait_until(every_instance_answers, 30.0, "every api instance to answer through the mesh")

    # -- what to measure ----------------------------------------------------------------

    @property
    def instances(self) -> list[Instance]:
        assert self.client is not None
        return [self.client, *self.apis]

    def usage(self) -> Usage:
        """FDs and RSS of every proxy now."""
        found: Usage = {}
        for instance in self.instances:
            proxy = instance.proxy
            if proxy is not None and proxy.alive:
                found[instance.name] = (proxy.fds(), proxy.rss())
        return found

    # -- a scenario ---------------------------------------------------------------------

    def run(
        self, scenario: str, timing: Timing, fault: Callable[[ChaosMesh, Timing], None]
    ) -> Result:
        """Traffic, `fault(self, timing)` after the lead time, the tail, then the numbers."""
        assert self.client is not None
        self.runs += 1
        out = self.network.workdir / f"load-{self.runs}-{scenario}.json"
        before = self.usage()
        load = self.client.host.start(
            f"load-{self.runs}",
            [sys.executable, str(LOAD_SCRIPT), "--port", str(OUTBOUND_PORT), "--rps",
             str(timing.rps), "--duration", "600", "--timeout", "5", "--out", str(out)],
        )  # fmt: skip
        time.sleep(timing.lead)
        fault_start = time.time()
        fault(self, timing)
        fault_end = time.time()
        time.sleep(timing.tail)
        load.signal(signal.SIGTERM)
        try:
            load.popen.wait(15)
        except Exception:
            load.kill()
            raise AssertionError(f"the load generator did not stop:\n{load.tail()}") from None
        if load.popen.returncode != 0 or not out.exists():
            raise AssertionError(f"the load generator failed:\n{load.tail()}")
        records: list[list[Any]] = json.loads(out.read_text())
        time.sleep(timing.settle)
        after, waited = self.settled_usage(before)
        result = evaluate(scenario, records, before, after, fault_start, fault_end)
        result.settled_after = timing.settle + waited
        return result

    def settled_usage(self, before: Usage) -> tuple[Usage, float]:
        """FDs and RSS once the proxies have let go of the connections a scenario made them
        open: a burst (retries, a slow instance) leaves more upstream connections pooled,
        closed once idle for the pool's idle timeout. A leak never comes back; so wait, at
        most that timeout and a sweep, while some proxy holds more FDs than before."""
        began = time.monotonic()
        while True:
            after = self.usage()
            grown = [
                name
                for name, (fds, _) in after.items()
                if name in before and fds > before[name][0] + FD_SLACK
            ]
            if not grown or time.monotonic() - began > POOL_IDLE_TIMEOUT + 10:
                return after, time.monotonic() - began
            time.sleep(1.0)

    # -- the pieces of faults -------------------------------------------------------------

    def restart_app(self, instance: Instance) -> None:
        self.mesh.start_app(instance)

    def replace_proxy(self, instance: Instance, timeout: float = 30.0) -> None:
        """Start a second proxy for the instance, wait until it holds every listener of its
        own (SO_REUSEPORT: the old one holds them too), then drain the old one (SIGTERM),
        as an orchestrator replaces a process without dropping traffic."""
        old = instance.proxy
        assert old is not None
        new = self.mesh.start_proxy(instance, wait=False)
        ports = _ports(instance)
        wait_until(
            lambda: _listening(new) >= ports,
            timeout,
            f"the new proxy of {instance.name} to listen on {sorted(ports)}",
            0.1,
        )
        old.stop(timeout=20.0)
        instance.host.processes.remove(old)

    def restart_proxy(self, instance: Instance, timeout: float = 30.0) -> None:
        """Drain the proxy (SIGTERM), then start it again and wait for /ready."""
        old = instance.proxy
        assert old is not None
        old.stop(timeout=20.0)
        instance.host.processes.remove(old)
        self.mesh.start_proxy(instance, timeout=timeout)


def _ports(instance: Instance) -> set[int]:
    spec = instance.dataplane["spec"]
    ports = {spec["admin"]["port"]}
    ports |= {inbound["port"] for inbound in spec.get("inbounds", [])}
    ports |= {outbound["port"] for outbound in spec.get("outbounds", [])}
    return ports


_SS_PID = re.compile(r"pid=(\d+),")


def _listening(process: Process) -> set[int]:
    """The TCP ports `process` listens on in its host."""
    lines = process.host.run(["ss", "-Hltnp"], check=False).stdout.splitlines()
    ports = set()
    for line in lines:
        if str(process.pid) not in _SS_PID.findall(line):
            continue
        local = line.split()[3]
        ports.add(int(local.rsplit(":", 1)[1]))
    return ports


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- the targets ---------------------------------------------------------------------------

# the targets, by scenario: a success rate, none failed, or failures that stop
# within the outlier-detection window after the host is cut off
TARGETS = {
    "instance killed": ">=99.9%",
    "instance frozen": ">=99.9%",
    "5% packet loss": ">=99.9%",
    "host cut off": "window",
    "bandwidth limited": ">=99.9%",
    "control plane down": "zero",
    "rolling restart": "zero",
}


def evaluate(
    scenario: str,
    records: list[list[Any]],
    before: Usage,
    after: Usage,
    fault_start: float,
    fault_end: float,
) -> Result:
    failures = [r for r in records if r[2] != 200]
    errors: dict[str, int] = {}
    for r in failures:
        key = f"{r[2]} {r[3][:60]}".strip()
        errors[key] = errors.get(key, 0) + 1
    result = Result(
        scenario=scenario,
        target=TARGETS[scenario],
        sent=len(records),
        failed=len(failures),
        p99=quantile([r[1] for r in records], 0.99),
        before=before,
        after=after,
        fault_start=fault_start,
        fault_end=fault_end,
        errors=errors,
    )
    if failures:
        result.failures_for = max(r[0] for r in failures) - fault_start
    if result.target == ">=99.9%" and result.success_rate < 0.999:
        result.problems.append(f"success {result.success_rate:.3%} < 99.9%")
    elif result.target == "zero" and result.failed:
        result.problems.append(f"{result.failed} failed, none may")
    elif (
        result.target == "window"
        and result.failures_for is not None
        and result.failures_for > OUTLIER_WINDOW
    ):
        result.problems.append(
            f"failures went on {result.failures_for:.1f}s after the cut, longer than the "
            f"outlier-detection window ({OUTLIER_WINDOW:g}s)"
        )
    for name, (fds, rss) in after.items():
        if name not in before:
            result.problems.append(f"{name}: no proxy to measure before the scenario")
            continue
        fds0, rss0 = before[name]
        if fds > fds0 + FD_SLACK:
            result.problems.append(f"{name}: FDs {fds0} -> {fds}")
        if rss > rss0 + RSS_SLACK:
            result.problems.append(f"{name}: RSS {rss0 >> 20} -> {rss >> 20} MiB")
    for name in before:
        if name not in after:
            result.problems.append(f"{name}: its proxy is not running after the scenario")
    if not records:
        result.problems.append("no requests were sent")
    return result


# -- the scenarios -----------------------------------------------------------------------------


def instance_killed(chaos: ChaosMesh, timing: Timing) -> None:
    """SIGKILL an instance's app and proxy; start both again after the fault time."""
    victim = chaos.apis[0]
    assert victim.app is not None and victim.proxy is not None
    victim.proxy.kill()
    victim.app.kill()
    victim.host.processes.remove(victim.proxy)
    victim.host.processes.remove(victim.app)
    time.sleep(timing.fault)
    chaos.restart_app(victim)
    chaos.mesh.start_proxy(victim)


def instance_frozen(chaos: ChaosMesh, timing: Timing) -> None:
    """SIGSTOP an instance's app and proxy for the fault time, then SIGCONT."""
    victim = chaos.apis[1]
    assert victim.app is not None and victim.proxy is not None
    victim.proxy.freeze()
    victim.app.freeze()
    try:
        time.sleep(timing.fault)
    finally:
        victim.app.thaw()
        victim.proxy.thaw()


def packet_loss(chaos: ChaosMesh, timing: Timing) -> None:
    """5 % of the packets in and out of one instance's host dropped at random."""
    victim = chaos.apis[2]
    chaos.network.loss(victim.host, 5)
    try:
        time.sleep(timing.fault)
    finally:
        chaos.network.heal(victim.host)


def host_cut_off(chaos: ChaosMesh, timing: Timing) -> None:
    """One instance's host loses its link for the fault time, then gets it back."""
    victim = chaos.apis[0]
    chaos.network.cut(victim.host)
    try:
        time.sleep(timing.fault)
    finally:
        chaos.network.heal(victim.host)


def bandwidth_limited(chaos: ChaosMesh, timing: Timing) -> None:
    """What one instance's host sends is shaped to 256 kbit/s (tc tbf), less than its
    share of the traffic (about 800 kbit/s): its answers queue, then its packets drop."""
    victim = chaos.apis[1]
    chaos.network.limit(victim.host, LIMIT)
    try:
        time.sleep(timing.fault)
    finally:
        chaos.network.heal(victim.host)


def control_plane_down(chaos: ChaosMesh, timing: Timing) -> None:
    """The control plane stops; meanwhile an instance's proxy restarts (from its cached
    snapshot and certificate) and the client's proxy is replaced; then it comes back."""
    began = time.monotonic()
    chaos.mesh.stop_control_plane()
    assert chaos.mesh.control_plane is not None
    chaos.network["cp"].processes.remove(chaos.mesh.control_plane)
    chaos.restart_proxy(chaos.apis[2])
    assert chaos.client is not None
    chaos.replace_proxy(chaos.client)
    time.sleep(max(0.0, began + timing.cp_outage - time.monotonic()))
    chaos.mesh.start_control_plane()


def rolling_restart(chaos: ChaosMesh, timing: Timing) -> None:
    """Every proxy replaced in turn: the new one started, then the old one drained."""
    for instance in [*chaos.apis, chaos.instances[0]]:
        chaos.replace_proxy(instance)


SCENARIOS: list[tuple[str, Callable[[ChaosMesh, Timing], None]]] = [
    ("instance killed", instance_killed),
    ("instance frozen", instance_frozen),
    ("5% packet loss", packet_loss),
    ("host cut off", host_cut_off),
    ("bandwidth limited", bandwidth_limited),
    ("control plane down", control_plane_down),
    ("rolling restart", rolling_restart),
]


# -- the table ---------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def render(results: list[Result], timing: Timing) -> str:
    lines = [
        f"chaos: {timing.rps:g} req/s of idempotent GETs, client -> api (3 instances), "
        f"faults of {timing.fault:g}s, control plane down {timing.cp_outage:g}s",
        f"{'scenario':<19} {'sent':>6} {'failed':>6} {'success':>8} {'p99 ms':>7} "
        f"{'last fail':>9}  {'target':<8} result",
    ]
    for r in results:
        last = f"{r.failures_for:.1f}s" if r.failures_for is not None else "-"
        lines.append(
            f"{r.scenario:<19} {r.sent:>6} {r.failed:>6} {r.success_rate:>8.3%} "
            f"{r.p99 * 1000:>7.1f} {last:>9}  {r.target:<8} {'PASS' if r.passed else 'FAIL'}"
        )
    names = sorted({name for r in results for name in (*r.before, *r.after)})
    lines.append("")
    lines.append(
        "proxies' FDs and RSS (MiB) before the traffic -> after it, read `settled` seconds "
        "after it stopped"
    )
    lines.append(f"{'scenario':<19} {'settled':>7} " + " ".join(f"{name:>20}" for name in names))
    for r in results:
        cells = []
        for name in names:
            b, a = r.before.get(name), r.after.get(name)
            text = (
                f"{b[0] if b else '-'}->{a[0] if a else '-'} "
                f"{_mib(b[1]) if b else '-'}->{_mib(a[1]) if a else '-'}"
            )
            cells.append(f"{text:>20}")
        lines.append(f"{r.scenario:<19} {r.settled_after:>6.0f}s " + " ".join(cells))
    problems = [(r.scenario, p) for r in results for p in r.problems]
    if problems:
        lines.append("")
        lines += [f"FAIL {scenario}: {problem}" for scenario, problem in problems]
    errors = [(r.scenario, e, n) for r in results for e, n in r.errors.items()]
    if errors:
        lines.append("")
        lines.append("failed requests by answer:")
        lines += [f"  {scenario}: {n} x {e}" for scenario, e, n in errors]
    return "\n".join(lines)
