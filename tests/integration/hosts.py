"""Test hosts: several machines on one, as network namespaces joined by a switch.

Each host is a network namespace with loopback up and one interface, `eth0`, a veth pair
whose other end sits on a bridge in a "switch" namespace, so the root namespace's network
is never touched and every address exists only inside the namespaces a test made. A run's
names carry its PID (`mshl-<pid>-<n>-<host>`), so engineers' parallel runs never collide
and a later run can tell a dead run's leftovers from a live one's (`cleanup_leftovers`).

On top of the hosts, the network's faults, each one undone by `heal`:

- `loss(host, percent)`: iptables `-m statistic --mode random` drops on the host's eth0,
  both directions;
- `cut(host)` / `restore(host)`: the switch's end of the host's cable goes down and up, so
  the host sees its carrier go away, as with a pulled cable (its addresses stay);
- `limit(host, rate)`: a `tc tbf` qdisc on the host's eth0 (its egress).

`MeshHosts` runs a meshling mesh across them: a control plane on one host (SQLite), and on
the others an app (a stock nginx) with its proxy in control-plane mode, started from a
Dataplane document and a dataplane token. Everything a test starts is stopped by PID and
every namespace deleted when the test ends, pass or fail.

Usage, in a test module::

    from .hosts import network, mesh_hosts  # noqa: F401  (the fixtures)

    def test_x(mesh_hosts):
        mesh = mesh_hosts(["cp", "web", "api-1"])
        ...
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

T = TypeVar("T")

PREFIX = "mshl"
_NAME = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-")
_CLONE_NEWNET = 0x40000000
_counter = itertools.count(1)
_libc = ctypes.CDLL(None, use_errno=True)

CP_PORT = 5681
APP_PORT = 8080
INBOUND_PORT = 15006
OUTBOUND_PORT = 15001
ADMIN_PORT = 9901
MESH = "default"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll until `predicate()` is true, at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


@dataclass
class Process:
    """A process started in a host (by `ip netns exec`, which execs: the PID is the program's)."""

    name: str
    host: Host
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def fds(self) -> int:
        """How many file descriptors it holds open."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss(self) -> int:
        """Its resident set size, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{self.name} (pid {self.pid}) has no VmRSS")

    def signal(self, signum: int) -> None:
        if self.alive:
            os.kill(self.pid, signum)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; its exit status."""
        if self.alive:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def tail(self, size: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError as exc:
            return f"(no log: {exc})"


@dataclass
class Host:
    """One namespace with an address on the switch."""

    name: str
    netns: str
    address: str
    # the switch's end of this host's cable
    port: str
    network: Network
    processes: list[Process] = field(default_factory=list)

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 30.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the host to its end; raise with its output when it fails."""
        result = subprocess.run(
            self.argv(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"on {self.name}: {' '.join(argv)} exited {result.returncode}: "
                f"{result.stderr.strip() or result.stdout.strip()}"
            )
        return result

    def start(
        self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None
    ) -> Process:
        """Start a long-running process in the host; its output goes to <workdir>/<name>.log."""
        log = self.network.workdir / f"{self.name}.{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                self.argv(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
            )
        process = Process(name, self, popen, log)
        self.processes.append(process)
        return process

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on a thread that has entered this host's network namespace: sockets it
        opens live in the host (and stay there when used from other threads later)."""
        box: list[Any] = []

        def enter_and_call() -> None:
            try:
                fd = os.open(f"/run/netns/{self.netns}", os.O_RDONLY)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.netns}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box.append((True, fn()))
            except BaseException as exc:  # handed to the caller's thread
                box.append((False, exc))

        thread = threading.Thread(target=enter_and_call, name=f"in-{self.name}", daemon=True)
        thread.start()
        thread.join()
        ok, value = box[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def http_get(self, url: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """GET from inside the host: (status, body); raises OSError when nothing answers."""

        def get() -> tuple[int, bytes]:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    return response.status, response.read()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read()

        return self.call(get)

    def answers(self, url: str, status: int = 200) -> bool:
        try:
            return self.http_get(url, timeout=1.0)[0] == status
        except OSError:
            return False


class Network:
    """Hosts joined by a switch; `close()` removes all of it (idempotent)."""

    def __init__(self, names: Sequence[str], workdir: Path) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and at least one: {names}")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.run_id = f"{PREFIX}-{os.getpid()}-{next(_counter)}"
        seed = (os.getpid() * 8 + next(_counter)) % 65536
        self.subnet = f"10.{seed >> 8}.{seed & 255}"
        self.hosts: dict[str, Host] = {}
        self.switch = f"{self.run_id}-switch"
        self._namespaces: list[str] = []
        self._faults: dict[str, list[Callable[[], object]]] = {}
        try:
            self._build(names)
        except BaseException:
            self.close()
            raise

    def _build(self, names: Sequence[str]) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(names, start=1):
            netns = f"{self.run_id}-{name}"
            self._add_namespace(netns)
            port = f"p{i}"
            _ip("link", "add", "eth0", "netns", netns, "type", "veth", "peer", "name", port,
                "netns", self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            address = f"{self.subnet}.{i}"
            _ip("-n", netns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", netns, "link", "set", "eth0", "up")
            self.hosts[name] = Host(name, netns, address, port, self)

    def _add_namespace(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._namespaces.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    # -- faults -------------------------------------------------------------------------

    def loss(self, host: Host, percent: float) -> None:
        """Drop `percent` % of the packets in and out of the host's eth0, at random."""
        probability = f"{percent / 100:.4f}"
        rules = [
            ["INPUT", "-i", "eth0", "-m", "statistic", "--mode", "random", "--probability",
             probability, "-j", "DROP"],
            ["OUTPUT", "-o", "eth0", "-m", "statistic", "--mode", "random", "--probability",
             probability, "-j", "DROP"],
        ]  # fmt: skip
        for rule in rules:
            host.run(["iptables", "-w", "-A", *rule])
            delete = ["iptables", "-w", "-D", *rule]
            self._undo(host, lambda delete=delete: host.run(delete))  # type: ignore[misc]

    def cut(self, host: Host) -> None:
        """Pull the host's cable out (at the switch): it keeps its address, loses carrier."""
        _ip("-n", self.switch, "link", "set", host.port, "down")
        self._undo(host, lambda: self.restore(host))

    def restore(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.port, "up")

    def limit(self, host: Host, rate: str, burst: str = "16kb", latency: str = "100ms") -> None:
        """Shape what the host sends to `rate` (tc's units, e.g. "1mbit") with a token bucket."""
        host.run(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate, "burst",
                  burst, "latency", latency])  # fmt: skip
        self._undo(
            host, lambda: host.run(["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
        )

    def heal(self, host: Host | None = None) -> None:
        """Undo the faults put on `host` (every host when None)."""
        names = [host.name] if host is not None else list(self._faults)
        for name in names:
            for undo in reversed(self._faults.pop(name, [])):
                undo()

    def _undo(self, host: Host, undo: Callable[[], object]) -> None:
        self._faults.setdefault(host.name, []).append(undo)

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process (by PID, then whatever is left in the namespaces) and delete
        the namespaces, which takes their interfaces with them."""
        for host in self.hosts.values():
            for process in reversed(host.processes):
                with contextlib.suppress(Exception):
                    process.stop(timeout=5.0)
        for netns in reversed(self._namespaces):
            _remove_namespace(netns)
        self._namespaces.clear()
        self.hosts.clear()


def _remove_namespace(netns: str) -> None:
    pids = _ip("netns", "pids", netns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", netns, check=False)


def cleanup_leftovers() -> list[str]:
    """Delete namespaces (and kill their processes) left by runs whose process is gone."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout
    for line in listing.splitlines():
        netns = line.split()[0] if line.split() else ""
        match = _NAME.match(netns)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        _remove_namespace(netns)
        removed.append(netns)
    return removed


# -- a mesh across the hosts ----------------------------------------------------------------

NGINX_CONF = """\
daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        default_type text/plain;
        location = /healthz {{ return 200 "ok\\n"; }}
        location / {{ return 200 "{name}\\n{padding}"; }}
    }}
}}
"""


def nginx_binary() -> str:
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(found):
        pytest.fail("nginx is not installed: run scripts/install-peers")
    return found


def meshling_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshling", *args]


@dataclass
class Instance:
    """A service instance on a host: its app (maybe none) and its proxy."""

    name: str
    service: str
    host: Host
    dataplane: dict[str, Any]
    directory: Path
    app: Process | None = None
    proxy: Process | None = None

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.dataplane['spec']['admin']['port']}"


class MeshHosts:
    """A meshling mesh on a `Network`: a control plane, and instances with their proxies."""

    def __init__(self, network: Network, cp_host: str) -> None:
        self.network = network
        self.cp_host = network[cp_host]
        self.cp_dir = network.workdir / "cp"
        self.cp_url = f"http://{self.cp_host.address}:{CP_PORT}"
        self.admin_token_file = self.cp_dir / "admin.token"
        self.control_plane: Process | None = None
        self.instances: dict[str, Instance] = {}
        # bytes after the instance's name line in every answer of an app, so that the
        # traffic weighs something on the wire (e.g. for a bandwidth limit to bite)
        self.body_padding = 0

    def start_control_plane(self, timeout: float = 30.0) -> Process:
        """`meshling control-plane run` on SQLite, listening on the cp host's every address."""
        self.cp_dir.mkdir(exist_ok=True)
        argv = meshling_argv(
            "control-plane", "run", "--data-dir", str(self.cp_dir), "--store",
            f"sqlite:///{self.cp_dir / 'meshling.db'}", "--listen", f"0.0.0.0:{CP_PORT}",
            "--token-file", str(self.admin_token_file), "--mesh", "",
        )  # fmt: skip
        process = self.cp_host.start("control-plane", argv)
        self.control_plane = process
        self._wait_ready(process, f"http://127.0.0.1:{CP_PORT}/healthz", timeout)
        return process

    def stop_control_plane(self) -> None:
        if self.control_plane is not None:
            self.control_plane.stop()

    def _cli(self, *args: str) -> str:
        argv = meshling_argv(*args, "--cp", self.cp_url, "--token-file", str(self.admin_token_file))
        return self.cp_host.run(argv).stdout

    def apply(self, documents: Sequence[dict[str, Any]], *, allow_unmatched: bool = True) -> None:
        """`meshling apply` the documents, from the control plane's host."""
        path = self.network.workdir / f"apply-{next(_counter)}.yaml"
        path.write_text(yaml.safe_dump_all(list(documents), sort_keys=False))
        extra = ["--allow-unmatched"] if allow_unmatched else []
        self._cli("apply", "-f", str(path), *extra)

    def token(self, service: str, path: Path) -> Path:
        self._cli("token", "dataplane", "--service", service, "--mesh", MESH, "-o", str(path))
        return path

    def add_instance(
        self,
        host: str,
        name: str,
        service: str,
        *,
        app: bool = True,
        outbounds: Sequence[str] = (),
        tags: dict[str, str] | None = None,
    ) -> Instance:
        """Describe an instance on `host`: an nginx app on 127.0.0.1:8080 behind an http
        inbound on :15006, and one http outbound per called service from :15001 up."""
        spec: dict[str, Any] = {
            "service": service,
            "address": self.network[host].address,
            "tags": {"version": "v1", **(tags or {})},
            "admin": {"port": ADMIN_PORT},
        }
        if app:
            spec["inbounds"] = [
                {"port": INBOUND_PORT, "service_port": APP_PORT, "protocol": "http"}
            ]
        spec["outbounds"] = [
            {"port": OUTBOUND_PORT + i, "service": called, "protocol": "http"}
            for i, called in enumerate(outbounds)
        ]
        document = {"kind": "Dataplane", "metadata": {"name": name, "mesh": MESH}, "spec": spec}
        directory = self.network.workdir / name
        directory.mkdir(exist_ok=True)
        (directory / "dataplane.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        instance = Instance(name, service, self.network[host], document, directory)
        self.instances[name] = instance
        return instance

    def start_app(self, instance: Instance, timeout: float = 15.0) -> Process:
        root = instance.directory / "nginx"
        (root / "tmp").mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        conf = root / "nginx.conf"
        # the name line alone unless padded (nginx reads the two characters \n as a newline)
        padding = "." * self.body_padding + "\\n" if self.body_padding else ""
        conf.write_text(
            NGINX_CONF.format(root=root, port=APP_PORT, name=instance.name, padding=padding)
        )
        process = instance.host.start(
            f"{instance.name}-app", [nginx_binary(), "-p", str(root), "-c", str(conf)]
        )
        instance.app = process
        self._wait_ready(process, f"http://127.0.0.1:{APP_PORT}/healthz", timeout)
        return process

    def start_proxy(
        self, instance: Instance, *, wait: bool = True, timeout: float = 30.0
    ) -> Process:
        """`meshling proxy run --cp` for the instance; waits for its /ready unless told not
        to. A token is issued on the first start; a restart reuses it and the data dir."""
        token = instance.directory / "token"
        if not token.exists():
            self.token(instance.service, token)
        argv = meshling_argv(
            "proxy", "run", "--cp", self.cp_url, "--token-file", str(token), "--dataplane",
            str(instance.directory / "dataplane.yaml"), "--data-dir",
            str(instance.directory / "data"),
        )  # fmt: skip
        process = instance.host.start(f"{instance.name}-proxy", argv)
        instance.proxy = process
        if wait:
            self._wait_ready(process, instance.admin + "/ready", timeout)
        return process

    def start_instance(self, instance: Instance) -> None:
        if "inbounds" in instance.dataplane["spec"]:
            self.start_app(instance)
        self.start_proxy(instance)

    def _wait_ready(self, process: Process, url: str, timeout: float) -> None:
        host = process.host

        def ready() -> bool:
            if not process.alive:
                raise AssertionError(
                    f"{process.name} on {host.name} exited {process.popen.returncode}:\n"
                    f"{process.tail()}"
                )
            return host.answers(url)

        try:
            wait_until(ready, timeout, f"{process.name} on {host.name} to answer {url}", 0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{process.tail()}") from None

    def metrics(self, instance: Instance) -> str:
        return instance.host.http_get(instance.admin + "/metrics")[1].decode()


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Callable[[Sequence[str]], Network]]:
    """A factory of `Network`s; every one is torn down when the test ends, pass or fail."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("test hosts need root and iproute2 (ip netns)")
    cleanup_leftovers()
    made: list[Network] = []

    def make(names: Sequence[str]) -> Network:
        net = Network(names, tmp_path / f"net{len(made) + 1}")
        made.append(net)
        return net

    try:
        yield make
    finally:
        for net in made:
            net.close()


@pytest.fixture
def mesh_hosts(
    network: Callable[[Sequence[str]], Network],
) -> Callable[..., MeshHosts]:
    """`mesh_hosts(["cp", "a", "b"], cp="cp")`: hosts with a control plane running on `cp`
    (the first host by default); add instances with `add_instance` and `start_instance`."""

    def make(names: Sequence[str], cp: str | None = None) -> MeshHosts:
        net = network(names)
        mesh = MeshHosts(net, cp or names[0])
        mesh.start_control_plane()
        return mesh

    return make
