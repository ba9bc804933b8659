"""The `meshling demo` command: start the sample topology, drive traffic, show metrics.

The sequence, each step finished before the next:

1. write each proxy's snapshot into the work directory;
2. start the apps and wait until each accepts connections;
3. start one `meshling proxy run` per app and wait until each answers `GET /ready`;
4. send traffic to web's proxy, printing a summary from every proxy's `/metrics`
   every few seconds, until Ctrl-C, SIGTERM, the end of `--duration`, or a child
   stopping on its own (which fails the demo, naming the child);
5. stop the traffic, read the metrics one last time, SIGTERM the proxies and then
   the apps by PID, wait for them, print the final summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop
import yaml

from meshling.demo import topology
from meshling.demo.client import ClientError, HttpClient
from meshling.demo.summary import ProxyMetrics, TrafficCounts, parse_metrics, render
from meshling.demo.supervisor import StartError, Supervisor
from meshling.demo.topology import Instance, Topology
from meshling.demo.traffic import TrafficLoop

REPORT_EVERY = 5.0
START_TIMEOUT = 20.0
# the proxies drain for up to 2 s (their snapshots say so); then some slack
STOP_DEADLINE = 5.0
_WATCH_EVERY = 0.2


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="meshling demo",
        description=(
            "Run a sample mesh on 127.0.0.1: a web service calling an api service in two "
            "versions, each behind its own proxy, with traffic and a live metrics summary."
        ),
    )
    parser.add_argument(
        "--duration",
        type=_positive,
        metavar="SECONDS",
        help="send traffic for this long, then stop (default: until Ctrl-C)",
    )
    parser.add_argument(
        "--rps",
        type=_positive,
        default=20.0,
        metavar="N",
        help="requests per second sent to web (default: 20)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        metavar="DIR",
        help="where snapshots, logs and the pids file go (default: .demo)",
    )
    args = parser.parse_args(argv)
    if args.rps > 10000:
        parser.error(f"--rps {args.rps:g} is more than this demo's traffic loop can send")
    return args


def _app_name(instance: Instance) -> str:
    return f"{instance.name}-app"


def _proxy_name(instance: Instance) -> str:
    return f"{instance.name}-proxy"


@dataclass(slots=True)
class Outcome:
    """How the traffic phase ended and what the proxies said at the end."""

    reason: str = ""
    failed: bool = False
    # for a failure: what the failed child said last
    detail: str = ""
    final: dict[str, ProxyMetrics | str] = field(default_factory=dict)
    # how long the traffic ran
    seconds: float = 0.0


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.duration: float | None = args.duration
        self.rps: float = args.rps
        self.workdir: Path = args.workdir
        self.topology: Topology = topology.build()
        self.counts = TrafficCounts()
        self.outcome = Outcome()
        # Ctrl-C presses so far: the first stops the demo, a second skips the waiting
        self.interrupts = 0

    # -- the whole sequence ------------------------------------------------------

    def run(self) -> int:
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
            supervisor = Supervisor(self.workdir)
        except OSError as exc:
            print(
                f"meshling demo: cannot use work directory {self.workdir}: {exc}", file=sys.stderr
            )
            return 1
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                self._write_snapshots()
                self._print_intro()
                self._start(supervisor)
                uvloop.run(self._drive(supervisor))
            except StartError as exc:
                self.outcome.failed = True
                self.outcome.reason = f"could not start: {exc.args[0]}"
                self.outcome.detail = exc.detail
            except KeyboardInterrupt:
                self.outcome.reason = "interrupted while starting"
            except OSError as exc:
                self.outcome.failed = True
                self.outcome.reason = f"stopped by an error: {exc}"
            finally:
                # the event loop put its own signal handlers back to the defaults
                for signum in previous:
                    signal.signal(signum, self._on_signal)
                self._stop(supervisor)
            return self._finish(supervisor)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.interrupts += 1

    def _write_snapshots(self) -> None:
        for instance in self.topology.instances:
            document = topology.snapshot(self.topology, instance)
            path = self.workdir / f"{instance.name}.yaml"
            path.write_text(
                f"# The snapshot of {instance.name}'s proxy, written by `meshling demo`.\n"
                + yaml.safe_dump(document, sort_keys=False),
                encoding="utf-8",
            )

    def _print_intro(self) -> None:
        top = self.topology
        print(
            f"meshling demo: web -> api (v1, v2), each behind its own proxy; files in {self.workdir}/"
        )
        for instance in top.instances:
            line = (
                f"  {instance.name:<7} app :{instance.app_port:<5}  "
                f"proxy inbound :{instance.inbound_port:<5}"
            )
            if instance.outbound_port is not None:
                line += f"  outbound :{instance.outbound_port} -> api"
            line += f"  admin :{instance.admin_port}"
            print(line)
        until = f"for {self.duration:g}s" if self.duration else "until Ctrl-C"
        print(
            f"  traffic: {self.rps:g} requests/s to web's proxy "
            f"(127.0.0.1:{top.web.inbound_port}) {until}",
            flush=True,
        )

    def _start(self, supervisor: Supervisor) -> None:
        def cancelled() -> bool:
            return self.interrupts > 0

        for instance in self.topology.instances:
            argv = [
                sys.executable,
                "-m",
                "meshling.demo.services",
                instance.service,
                "--port",
                str(instance.app_port),
                "--instance",
                instance.tag,
            ]
            if instance.outbound_port is not None:
                argv += ["--upstream-port", str(instance.outbound_port)]
            if instance.service == "api" and instance.tag != "v1":
                # a slightly slower second version, so the latency columns differ
                argv += ["--latency-ms", "7"]
            child = supervisor.start(_app_name(instance), argv)
            supervisor.wait_for_port(child, instance.app_port, START_TIMEOUT, cancelled)
        for instance in self.topology.instances:
            config = self.workdir / f"{instance.name}.yaml"
            argv = [sys.executable, "-m", "meshling", "proxy", "run", "--config", str(config)]
            child = supervisor.start(_proxy_name(instance), argv)
            supervisor.wait_for_ready(child, instance.admin_port, START_TIMEOUT, cancelled)
        print("  all proxies ready; sending traffic", flush=True)

    # -- the traffic phase, on the event loop -----------------------------------

    async def _drive(self, supervisor: Supervisor) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def request_stop(reason: str, *, failed: bool = False, detail: str = "") -> None:
            if not stop.is_set():
                self.outcome.reason = reason
                self.outcome.failed = failed
                self.outcome.detail = detail
                stop.set()

        def on_signal(name: str) -> None:
            self.interrupts += 1
            request_stop(f"stopped by {name}")

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signal.Signals(signum).name)
        if self.interrupts:
            request_stop("interrupted while starting")
        if self.duration is not None:
            duration = self.duration
            loop.call_later(duration, lambda: request_stop(f"ran for {duration:g}s"))

        admins = {
            i.name: HttpClient("127.0.0.1", i.admin_port, timeout=2.0, max_idle=1)
            for i in self.topology.instances
        }
        web = HttpClient("127.0.0.1", self.topology.web.inbound_port, timeout=5.0, max_idle=64)
        began = loop.time()
        traffic = asyncio.create_task(TrafficLoop(web, self.rps, self.counts).run(stop))
        watcher = asyncio.create_task(self._watch(supervisor, request_stop))
        reporter = asyncio.create_task(self._report(admins, stop))
        try:
            await stop.wait()
            await traffic
            self.outcome.final = await self._scrape(admins)
            self.outcome.seconds = loop.time() - began
        finally:
            for task in (traffic, watcher, reporter):
                task.cancel()
            await asyncio.gather(traffic, watcher, reporter, return_exceptions=True)
            for client in (web, *admins.values()):
                await client.close()

    async def _watch(self, supervisor: Supervisor, request_stop: Callable[..., None]) -> None:
        while True:
            await asyncio.sleep(_WATCH_EVERY)
            for child in supervisor.exited():
                request_stop(
                    f"{child.name} (pid {child.pid}) {child.describe_exit()} while the demo "
                    "was running",
                    failed=True,
                    detail=f"the end of {child.log_path}:\n{child.log_tail()}",
                )
                return

    async def _report(self, admins: dict[str, HttpClient], stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        previous: dict[str, ProxyMetrics | str] = {}
        for n in range(1, sys.maxsize):
            await asyncio.sleep(max(0.0, began + n * REPORT_EVERY - loop.time()))
            if stop.is_set():
                return
            metrics = await self._scrape(admins)
            title = f"\n[{n * REPORT_EVERY:.0f}s]"
            print(render(title, metrics, self.counts, previous, REPORT_EVERY), flush=True)
            previous = metrics

    async def _scrape(self, admins: dict[str, HttpClient]) -> dict[str, ProxyMetrics | str]:
        async def one(client: HttpClient) -> ProxyMetrics | str:
            try:
                response = await client.get("/metrics")
            except ClientError as exc:
                return str(exc)
            if response.status != 200:
                return f"GET /metrics answered {response.status}"
            try:
                return parse_metrics(response.body.decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                return f"unreadable metrics: {exc}"

        results = await asyncio.gather(*(one(c) for c in admins.values()))
        return dict(zip(admins, results, strict=True))

    # -- stopping and the final word --------------------------------------------

    def _stop(self, supervisor: Supervisor) -> None:
        def hurry() -> bool:
            return self.interrupts > 1

        # proxies first, so that no request is sent to an app that is going away
        proxies = [_proxy_name(i) for i in self.topology.instances]
        apps = [_app_name(i) for i in self.topology.instances]
        supervisor.stop(proxies, STOP_DEADLINE, hurry)
        supervisor.stop(apps, STOP_DEADLINE, hurry)

    def _finish(self, supervisor: Supervisor) -> int:
        outcome = self.outcome
        if outcome.final:
            title = (
                f"\nfinal summary ({outcome.reason}); rps is the average over "
                f"{outcome.seconds:.1f}s of traffic"
            )
            print(render(title, outcome.final, self.counts, {}, outcome.seconds))
        elif outcome.reason and not outcome.failed:
            print(f"\n{outcome.reason}")
        problems = [c for c in supervisor.children if c.killed]
        for child in problems:
            print(
                f"  {child.name} (pid {child.pid}) did not stop within {STOP_DEADLINE:g}s of SIGTERM; killed"
            )
        for child in supervisor.children:
            # every child here exits 0 on SIGTERM; anything else is worth a note
            if child.signalled and not child.killed and child.returncode != 0:
                print(f"  note: {child.name} (pid {child.pid}) {child.describe_exit()}")
        stopped = "all stopped" if not problems else "some had to be killed"
        print(
            f"  {len(supervisor.children)} processes started, {stopped} (pids in {supervisor.pids_path})"
        )
        self._write_summary(supervisor)
        sys.stdout.flush()
        if outcome.failed:
            print(f"meshling demo: {outcome.reason}", file=sys.stderr)
            if outcome.detail:
                print(outcome.detail, file=sys.stderr)
            return 1
        return 1 if problems else 0

    def _write_summary(self, supervisor: Supervisor) -> None:
        proxies: dict[str, Any] = {}
        for name, metrics in self.outcome.final.items():
            if isinstance(metrics, str):
                proxies[name] = {"error": metrics}
                continue
            proxies[name] = {
                "requests": metrics.requests,
                "rows": [
                    {
                        "listener": row.listener,
                        "route": row.route,
                        "cluster": row.cluster,
                        "requests": row.requests,
                        "by_status_class": row.by_class,
                        "success_rate": row.success_rate,
                        "p50_seconds": row.quantile(0.5),
                        "p99_seconds": row.quantile(0.99),
                    }
                    for row in metrics.rows
                ],
                "connections": metrics.connections,
            }
        counts = asdict(self.counts)
        counts.pop("latency")
        counts["p50_seconds"] = self.counts.latency.quantile(0.5)
        counts["p99_seconds"] = self.counts.latency.quantile(0.99)
        document = {
            "reason": self.outcome.reason,
            "failed": self.outcome.failed,
            "proxies": proxies,
            "client": counts,
            "processes": [
                {"name": c.name, "pid": c.pid, "returncode": c.returncode, "killed": c.killed}
                for c in supervisor.children
            ],
        }
        path = self.workdir / "summary.json"
        try:
            path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"  could not write {path}: {exc}", file=sys.stderr)


def run(args: list[str]) -> int:
    """Entry point of `meshling demo [--duration SECONDS] [--rps N] [--workdir DIR]`."""
    if args[:1] == ["--"]:
        # `meshling demo -- --rps 5`: the separator is for the outer parser
        args = args[1:]
    return Demo(_parse_args(args)).run()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
