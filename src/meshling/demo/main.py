"""The `meshling demo` command: a control plane, three services with their proxies, traffic.

The sequence, each step finished before the next:

1. check that nginx (the store service) is installed, and prepare the work directory:
   the Dataplane documents, nginx's configuration, the policy example, and no state
   left from an earlier run (the store's database, the proxies' caches);
2. start `meshling control-plane run` on a SQLite file in the work directory and wait
   for `GET /healthz`;
3. through its REST API, with the admin token it wrote: the Mesh (mTLS strict), the
   TrafficPermissions web -> api and api -> store, and one dataplane token per proxy;
4. start the apps (nginx, api-1, api-2, web) and wait until each accepts connections;
5. start one `meshling proxy run --cp` per app, callees first, and wait until each
   answers `GET /ready`; then until a request to web comes back through the whole mesh;
6. send traffic to web, printing a summary from every proxy's `/metrics` every few
   seconds, until Ctrl-C, SIGTERM, the end of `--duration`, or a child stopping on its
   own (which fails the demo, naming the child);
7. stop the traffic, read the metrics one last time, SIGTERM the proxies (they drain),
   then the apps, then the control plane, by PID; wait for them; print the final summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import uvloop
import yaml

from meshling.demo import topology
from meshling.demo.client import ClientError, HttpClient
from meshling.demo.summary import (
    ProxyMetrics,
    TrafficCounts,
    calls_by_service,
    parse_metrics,
    render,
)
from meshling.demo.supervisor import Child, StartError, Supervisor
from meshling.demo.topology import Instance, Topology
from meshling.demo.traffic import TrafficLoop

DEFAULT_CP_PORT = 5681
START_TIMEOUT = 20.0
# how long the first request may take to make it through the whole mesh: each proxy
# needs its certificate and a snapshot naming the instances it calls
MESH_TIMEOUT = 20.0
# the proxies drain for up to 10 s (the snapshot's default); then a little slack
PROXY_STOP_DEADLINE = 12.0
STOP_DEADLINE = 5.0
_WATCH_EVERY = 0.2
_DATAPLANE_TOKEN_TTL = "24h"
_NGINX_HINT = (
    "the demo's store service is a stock nginx; install it with "
    "`sudo apt-get install nginx` (or `bash scripts/install-peers`), "
    "or name its binary with --nginx PATH"
)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number (0 for any), got {text!r}")
    return int(text)


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="meshling demo",
        description=(
            "Run a sample mesh on 127.0.0.1: a control plane, and web -> api (two versions) "
            "-> store (nginx), each instance behind its own proxy, with mTLS, traffic and a "
            "live metrics summary."
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
        "--report-every",
        type=_positive,
        default=5.0,
        metavar="SECONDS",
        help="print the summary this often (default: 5)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".demo"),
        metavar="DIR",
        help="where the control plane's database, the proxies' files, logs and the pids "
        "file go (default: .demo)",
    )
    parser.add_argument(
        "--cp-port",
        type=_port,
        default=DEFAULT_CP_PORT,
        metavar="PORT",
        help=f"the control plane's API port on 127.0.0.1 (default: {DEFAULT_CP_PORT}, or "
        "any free port if that one is taken; 0: any free port)",
    )
    parser.add_argument(
        "--nginx",
        metavar="PATH",
        help="the nginx binary for the store service (default: nginx on PATH, or /usr/sbin/nginx)",
    )
    args = parser.parse_args(argv)
    if args.rps > 10000:
        parser.error(f"--rps {args.rps:g} is more than this demo's traffic loop can send")
    return args


def find_nginx(given: str | None) -> str | None:
    """The nginx binary to run, or None if there is none."""
    candidates = [shutil.which(given)] if given else [shutil.which("nginx"), "/usr/sbin/nginx"]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def _app_name(instance: Instance) -> str:
    return f"{instance.name}-app"


def _proxy_name(instance: Instance) -> str:
    return f"{instance.name}-proxy"


CONTROL_PLANE = "control-plane"


def _shown(path: Path) -> str:
    """A path as the user would type it from here."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _meshling_command() -> str:
    """How the user runs the `meshling` that runs this demo."""
    script = Path(sys.executable).parent / "meshling"
    on_path = shutil.which("meshling")
    if on_path and script.exists() and os.path.samefile(on_path, script):
        return "meshling"
    if script.exists():
        return _shown(script)
    return f"{sys.executable} -m meshling"


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
    def __init__(self, args: argparse.Namespace, nginx: str) -> None:
        self.duration: float | None = args.duration
        self.rps: float = args.rps
        self.report_every: float = args.report_every
        self.workdir: Path = args.workdir.absolute()
        self.nginx = nginx
        cp_port: int = args.cp_port
        # the default port is a convenience, not a requirement
        if cp_port == 0 or (cp_port == DEFAULT_CP_PORT and not topology.port_is_free(cp_port)):
            cp_port = topology.free_ports(1)[0]
        self.topology: Topology = topology.build(cp_port)
        self.counts = TrafficCounts()
        self.outcome = Outcome()
        # Ctrl-C presses so far: the first stops the demo, a second skips the waiting
        self.interrupts = 0
        self.meshling = _meshling_command()

    # -- paths in the work directory ----------------------------------------------

    @property
    def cp_dir(self) -> Path:
        return self.workdir / "cp"

    @property
    def admin_token_file(self) -> Path:
        return self.cp_dir / "admin.token"

    @property
    def store_url(self) -> str:
        return f"sqlite://{self.cp_dir / 'meshling.db'}"

    def instance_dir(self, instance: Instance) -> Path:
        return self.workdir / instance.name

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
                self._prepare()
                self._print_plan()
                self._start_control_plane(supervisor)
                self._configure_mesh()
                self._start_apps(supervisor)
                self._start_proxies(supervisor)
                self._wait_for_the_mesh(supervisor)
                self._print_where_to_look()
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

    def _cancelled(self) -> bool:
        return self.interrupts > 0

    # -- 1. the work directory ---------------------------------------------------

    def _prepare(self) -> None:
        # a fresh mesh every run: dataplanes registered by an earlier run would still be
        # endpoints, and a proxy's cached snapshot would name the earlier run's ports
        self.cp_dir.mkdir(exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            (self.cp_dir / f"meshling.db{suffix}").unlink(missing_ok=True)
        for instance in self.topology.instances:
            directory = self.instance_dir(instance)
            shutil.rmtree(directory / "data", ignore_errors=True)
            directory.mkdir(exist_ok=True)
            (directory / "token").unlink(missing_ok=True)
            self._write_yaml(
                directory / "dataplane.yaml",
                f"The Dataplane of {instance.name}'s proxy",
                [topology.dataplane(instance)],
            )
        store = self.instance_dir(self.topology.store)
        (store / "tmp").mkdir(exist_ok=True)
        (store / "nginx.conf").write_text(
            topology.nginx_conf(self.topology.store, str(store)), encoding="utf-8"
        )
        self._write_yaml(
            self.workdir / "deny-web.yaml",
            "The demo's policy example: web may no longer call api.\n"
            f"# Apply it with `{self.meshling} apply -f {_shown(self.workdir / 'deny-web.yaml')}`",
            [topology.deny_web()],
        )
        self._write_yaml(
            self.workdir / "retry-api.yaml",
            "A Retry for web -> api: api's occasional 500s are tried again on the other "
            "instance.\n"
            f"# Apply it with `{self.meshling} apply -f {_shown(self.workdir / 'retry-api.yaml')}`",
            [topology.retry_api()],
        )
        self._write_yaml(
            self.workdir / "allow-web.yaml",
            "The permission web -> api as the demo starts with it (undoes deny-web.yaml)",
            [topology.allow_web()],
        )
        self._write_yaml(
            self.workdir / "mesh.yaml",
            "The resources the demo applies at start, through the control plane's API",
            topology.mesh_resources(),
        )
        (self.workdir / "cp.env").write_text(
            "# `source` this file to point meshling's commands at the demo's control plane\n"
            f"export MESHLING_CP={self.topology.cp_url}\n"
            f"export MESHLING_ADMIN_TOKEN_FILE={self.admin_token_file}\n",
            encoding="utf-8",
        )

    @staticmethod
    def _write_yaml(path: Path, comment: str, documents: list[dict[str, Any]]) -> None:
        text = f"# {comment}, written by `meshling demo`.\n"
        text += yaml.safe_dump_all(documents, sort_keys=False)
        path.write_text(text, encoding="utf-8")

    def _print_plan(self) -> None:
        top = self.topology
        print(
            "meshling demo: web -> api (v1, v2) -> store (nginx), each instance behind its own "
            "proxy, configured by a control plane; mTLS strict"
        )
        print(
            f"  control plane  {top.cp_url}  (SQLite {_shown(self.cp_dir / 'meshling.db')}, "
            f"admin token {_shown(self.admin_token_file)})"
        )
        for instance in top.flow:
            app = f"{instance.language} :{instance.app_port}"
            service = f"{instance.service} {instance.version}"
            line = (
                f"  {instance.name:<6} {service:<8}  app {app:<13}  "
                f"proxy inbound :{instance.inbound_port:<5}"
            )
            if instance.outbound_port is not None:
                outbound = f":{instance.outbound_port} -> {instance.calls}"
                line += f"  outbound {outbound:<15}"
            else:
                line += " " * 26
            line += f"  admin :{instance.admin_port}"
            print(line)
        print(f"  files and logs in {_shown(self.workdir)}/", flush=True)

    # -- 2. and 3. the control plane and the mesh's resources --------------------------

    def _start_control_plane(self, supervisor: Supervisor) -> None:
        argv = [
            sys.executable,
            "-m",
            "meshling",
            "control-plane",
            "run",
            "--data-dir",
            str(self.cp_dir),
            "--store",
            self.store_url,
            "--host",
            topology.LOOPBACK,
            "--port",
            str(self.topology.cp_port),
            "--token-file",
            str(self.admin_token_file),
        ]
        child = supervisor.start(CONTROL_PLANE, argv)
        supervisor.wait_for_http(
            child, self.topology.cp_port, "/healthz", START_TIMEOUT, self._cancelled
        )
        print("  control plane ready", flush=True)

    def _configure_mesh(self) -> None:
        from meshling.controlplane.client import ApiError, Client, Unreachable

        try:
            admin_token = self.admin_token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StartError(f"cannot read the control plane's admin token: {exc}") from None
        client = Client(self.topology.cp_url, admin_token)
        try:
            # before the proxies register: their permissions select no dataplane yet
            for document in topology.mesh_resources():
                client.apply(document, allow_unmatched=True)
            for instance in self.topology.instances:
                token = _issue_dataplane_token(
                    self.topology.cp_url, admin_token, topology.MESH, instance.service
                )
                path = self.instance_dir(instance) / "token"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w", encoding="ascii") as f:
                    f.write(token + "\n")
        except (ApiError, Unreachable) as exc:
            raise StartError(f"the control plane refused the demo's set-up: {exc}") from None
        print(
            "  applied the Mesh (mTLS strict) and TrafficPermissions web -> api, api -> store; "
            "issued a dataplane token per proxy",
            flush=True,
        )

    # -- 4. and 5. the apps and their proxies ---------------------------------------

    def _app_argv(self, instance: Instance) -> list[str]:
        if instance.service == "store":
            directory = self.instance_dir(instance)
            conf = directory / "nginx.conf"
            return [self.nginx, "-p", str(directory), "-e", "stderr", "-c", str(conf)]
        argv = [
            sys.executable,
            "-m",
            "meshling.demo.services",
            instance.service,
            "--port",
            str(instance.app_port),
            "--instance",
            instance.name,
        ]
        if instance.outbound_port is not None:
            argv += ["--upstream-port", str(instance.outbound_port)]
        if instance.service == "api" and instance.version != "v1":
            # a slightly slower second version, so the latency columns differ
            argv += ["--latency-ms", "7"]
        return argv

    def _start_apps(self, supervisor: Supervisor) -> None:
        for instance in self.topology.instances:
            child = supervisor.start(_app_name(instance), self._app_argv(instance))
            supervisor.wait_for_port(child, instance.app_port, START_TIMEOUT, self._cancelled)
        print("  apps listening", flush=True)

    def _start_proxies(self, supervisor: Supervisor) -> None:
        # callees first: a proxy's first snapshot then names every instance it calls
        for instance in self.topology.instances:
            directory = self.instance_dir(instance)
            argv = [
                sys.executable,
                "-m",
                "meshling",
                "proxy",
                "run",
                "--cp",
                self.topology.cp_url,
                "--token-file",
                str(directory / "token"),
                "--dataplane",
                str(directory / "dataplane.yaml"),
                "--data-dir",
                str(directory / "data"),
            ]
            child = supervisor.start(_proxy_name(instance), argv)
            supervisor.wait_for_http(
                child, instance.admin_port, "/ready", START_TIMEOUT, self._cancelled
            )
        print("  proxies ready (certificates and snapshots from the control plane)", flush=True)

    def _wait_for_the_mesh(self, supervisor: Supervisor) -> None:
        """Until a request to web comes back 200 through web -> api -> store."""
        web = self.topology.web
        last = ["no answer yet"]

        def through() -> bool:
            url = f"http://{topology.LOOPBACK}:{web.app_port}/"
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return bool(response.status == 200)
            except urllib.error.HTTPError as exc:
                last[0] = f"{exc.code}: {exc.read()[:300].decode('utf-8', 'replace')}"
            except OSError as exc:
                last[0] = str(exc)
            time.sleep(0.2)
            return False

        web_proxy = next(c for c in supervisor.children if c.name == _proxy_name(web))
        try:
            supervisor.wait_until(
                web_proxy,
                "a request to web to come back 200 through api and store",
                through,
                MESH_TIMEOUT,
                self._cancelled,
            )
        except StartError as exc:
            raise StartError(
                exc.args[0], f"web's last answer was {last[0]}\n{exc.detail}"
            ) from None

    def _print_where_to_look(self) -> None:
        top = self.topology
        m = self.meshling
        env = _shown(self.workdir / "cp.env")
        deny = _shown(self.workdir / "deny-web.yaml")
        allow = _shown(self.workdir / "allow-web.yaml")
        until = f"for {self.duration:g}s" if self.duration else "until Ctrl-C"
        lines = [
            "",
            f"web GUI: {self._gui_url()}",
            "  (the address signs in with the demo's admin token; keep it to yourself)",
            "where to look (from another terminal, in this directory):",
            f"  source {env}        # MESHLING_CP={top.cp_url}, "
            f"MESHLING_ADMIN_TOKEN_FILE={_shown(self.admin_token_file)}",
            f"  {m} get dataplanes",
            f"  {m} inspect dataplane api-1",
            f"  {m} get trafficpermissions",
            f"  {m} stat                       # live: requests/s, success, latency per service",
            f"  {m} tap api --max 10           # the requests themselves, as they happen",
            f"  {m} explain web api            # the route, the permission, every policy",
            f'  curl -s -H "Authorization: Bearer $(cat {_shown(self.admin_token_file)})" '
            f"{top.cp_url}/api/v1/Dataplane",
            "  each proxy's metrics (Prometheus text):",
        ]
        lines += [
            f"    {i.name:<6} http://{topology.LOOPBACK}:{i.admin_port}/metrics" for i in top.flow
        ]
        lines += [
            "try a policy change (after the `source` above):",
            f"  {m} apply -f {deny}",
            "  turns the TrafficPermission web -> api to deny. Within a few seconds api's "
            "proxies refuse web's",
            "  calls: the table shows them as 403s (the 4xx column of web's outbound:api "
            "row, `403` in the",
            "  client line) and counts the connections denied. To allow web again:",
            f"  {m} apply -f {allow}",
            "and a reliability policy: api fails 2% of its requests (500, web passes on 502);",
            f"  {m} apply -f {_shown(self.workdir / 'retry-api.yaml')}",
            "  has web's proxy retry them on the other api instance: web's success goes to nearly 100%",
            f"traffic: {self.rps:g} requests/s to web (127.0.0.1:{top.web.app_port}) {until}; "
            "Ctrl-C stops everything",
        ]
        print("\n".join(lines), flush=True)
        print("  all proxies ready; sending traffic", flush=True)

    def _gui_url(self) -> str:
        """The web GUI's address, signed in by the admin token in its fragment (which the
        browser never sends to the server); the plain address if the token is unreadable."""
        url = f"{self.topology.cp_url}/gui/"
        try:
            token = self.admin_token_file.read_text(encoding="utf-8").strip()
        except OSError:
            return url
        return f"{url}#token={token}"

    # -- 6. the traffic phase, on the event loop -----------------------------------

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
            i.name: HttpClient(topology.LOOPBACK, i.admin_port, timeout=2.0, max_idle=1)
            for i in self.topology.flow
        }
        web = HttpClient(topology.LOOPBACK, self.topology.web.app_port, timeout=5.0, max_idle=64)
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
        every = self.report_every
        previous: dict[str, ProxyMetrics | str] = {}
        statuses: dict[int, int] = {}
        for n in range(1, sys.maxsize):
            await asyncio.sleep(max(0.0, began + n * every - loop.time()))
            if stop.is_set():
                return
            metrics = await self._scrape(admins)
            title = f"\n[{n * every:.0f}s] mesh {topology.MESH}, mTLS strict"
            print(
                render(title, metrics, self.counts, previous, every, previous_statuses=statuses),
                flush=True,
            )
            previous, statuses = metrics, dict(self.counts.statuses)

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

    # -- 7. stopping and the final word --------------------------------------------

    def _stop(self, supervisor: Supervisor) -> None:
        def hurry() -> bool:
            return self.interrupts > 1

        # proxies first, so that no request is sent to an app that is going away; the
        # control plane last, so that no proxy loses it while still running
        instances = self.topology.instances
        supervisor.stop([_proxy_name(i) for i in instances], PROXY_STOP_DEADLINE, hurry)
        supervisor.stop([_app_name(i) for i in instances], STOP_DEADLINE, hurry)
        supervisor.stop([CONTROL_PLANE], STOP_DEADLINE, hurry)

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
            print(f"  {child.name} (pid {child.pid}) did not stop after SIGTERM; killed")
        for child in supervisor.children:
            # every child here exits 0 on SIGTERM; anything else is worth a note
            if child.signalled and not child.killed and child.returncode != 0:
                print(f"  note: {child.name} (pid {child.pid}) {child.describe_exit()}")
        stopped = "all stopped" if not problems else "some had to be killed"
        print(
            f"  {len(supervisor.children)} processes started, {stopped} "
            f"(pids in {_shown(supervisor.pids_path)})"
        )
        self._write_summary(supervisor.children)
        sys.stdout.flush()
        if outcome.failed:
            print(f"meshling demo: {outcome.reason}", file=sys.stderr)
            if outcome.detail:
                print(outcome.detail, file=sys.stderr)
            return 1
        return 1 if problems else 0

    def _write_summary(self, children: list[Child]) -> None:
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
                        "mtls_handshakes": (tls.handshakes if (tls := metrics.mtls(row)) else None),
                    }
                    for row in metrics.rows
                ],
                "connections": metrics.connections,
                "tls": {
                    f"{direction}/{name}": asdict(counts)
                    for (direction, name), counts in metrics.tls.items()
                },
                "denied": metrics.denied,
            }
        counts = asdict(self.counts)
        counts.pop("latency")
        counts["p50_seconds"] = self.counts.latency.quantile(0.5)
        counts["p99_seconds"] = self.counts.latency.quantile(0.99)
        services = {
            service: asdict(calls) | {"success_rate": calls.success_rate}
            for service, calls in calls_by_service(self.outcome.final).items()
        }
        document = {
            "reason": self.outcome.reason,
            "failed": self.outcome.failed,
            "control_plane": self.topology.cp_url,
            "proxies": proxies,
            "services": services,
            "client": counts,
            "processes": [
                {"name": c.name, "pid": c.pid, "returncode": c.returncode, "killed": c.killed}
                for c in children
            ],
        }
        path = self.workdir / "summary.json"
        try:
            path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"  could not write {path}: {exc}", file=sys.stderr)


def _issue_dataplane_token(cp_url: str, admin_token: str, mesh: str, service: str) -> str:
    """A dataplane token for `service` from `POST /api/v1/tokens/dataplane`."""
    from meshling.controlplane.client import ApiError, Unreachable

    body = json.dumps({"mesh": mesh, "service": service, "ttl": _DATAPLANE_TOKEN_TTL}).encode()
    request = urllib.request.Request(
        f"{cp_url}/api/v1/tokens/dataplane",
        data=body,
        headers={"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        text = exc.read()[:300].decode("utf-8", "replace")
        raise ApiError(
            exc.code, f"a dataplane token for {service}: HTTP {exc.code}: {text}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(cp_url, str(exc)) from None
    token = answer.get("token") if isinstance(answer, dict) else None
    if not isinstance(token, str) or not token:
        raise ApiError(0, f"a dataplane token for {service}: no token in {answer!r}")
    return token


def run(args: list[str]) -> int:
    """Entry point of `meshling demo [--duration SECONDS] [--rps N] [--workdir DIR] ...`."""
    if args[:1] == ["--"]:
        # `meshling demo -- --rps 5`: the separator is for the outer parser
        args = args[1:]
    options = _parse_args(args)
    nginx = find_nginx(options.nginx)
    if nginx is None:
        where = options.nginx or "nginx on PATH or /usr/sbin/nginx"
        print(f"meshling demo: cannot find {where}: {_NGINX_HINT}", file=sys.stderr)
        return 1
    return Demo(options, nginx).run()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
