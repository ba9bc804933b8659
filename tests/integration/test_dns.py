"""Mesh DNS end to end: a proxy with a `dns:` section answers real resolvers.

The clients are independent resolvers: c-ares (Node.js's `dns.Resolver`, which falls
back to TCP on a truncated answer) and glibc (`getent hosts`, through resolv.conf), plus a
raw-socket client for what they do not show (ids, TCP framing, garbage). Names outside the
mesh go to an upstream DNS server the test runs itself, on 127.0.0.1 or inside the test's
namespaces: never the real internet.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.dns import message
from meshling.dns.vip import allocate

from .conftest import ProxyProcess, free_port, http_snapshot, wait_for
from .hosts import MeshHosts, mesh_hosts, meshling_argv, network  # noqa: F401  (the fixtures)

NAMES = {"api": "241.1.2.3", "web": "250.0.0.9"}
# what the test's upstream answers for every name it knows
UPSTREAM_ANSWER = "192.0.2.7"
# answers this long do not fit in 512 bytes: over UDP they come truncated
BIG_NAME = "big.example"
BIG_COUNT = 60
SILENT_NAME = "silent.example"


class FakeUpstream:
    """A small authoritative server for `*.example` (UDP and TCP), standing in for a
    real resolver: A records for any name, many for `big.example` (truncated over UDP as
    a real server does), nothing at all for `silent.example`, NXDOMAIN elsewhere."""

    def __init__(self, bind: Callable[[], tuple[socket.socket, socket.socket]]) -> None:
        self.udp, self.tcp = bind()
        self.port = self.udp.getsockname()[1]
        self.queries: list[tuple[str, int, str]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve_udp, daemon=True),
            threading.Thread(target=self._serve_tcp, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def answer(self, data: bytes, transport: str) -> bytes | None:
        query = message.parse(data)
        question = query.questions[0]
        self.queries.append((question.name, query.id, transport))
        if question.name == SILENT_NAME:
            return None
        if not question.name.endswith("example"):
            return message.response(query, message.NXDOMAIN)
        count = BIG_COUNT if question.name == BIG_NAME else 1
        rdata = message.ipv4_rdata(UPSTREAM_ANSWER)
        answers = tuple((question.name, message.TYPE_A, 60, rdata) for _ in range(count))
        if question.qtype != message.TYPE_A:
            answers = ()
        out = message.response(query, message.NOERROR, answers)
        return message.truncate(out, query.udp_limit()) if transport == "udp" else out

    def _serve_udp(self) -> None:
        self.udp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                data, peer = self.udp.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            out = self.answer(data, "udp")
            if out is not None:
                self.udp.sendto(out, peer)

    def _serve_tcp(self) -> None:
        self.tcp.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(3)
                try:
                    data = _read_framed(conn)
                    out = self.answer(data, "tcp")
                    if out is not None:
                        conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        self.udp.close()
        self.tcp.close()
        for thread in self._threads:
            thread.join(2)


def _bind_pair(address: str, port: int = 0) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on one port (`port`, or a free one: the UDP socket's port may
    be taken for TCP, so a few are tried)."""
    for _ in range(20):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((address, port))
        tcp = socket.socket()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((address, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            if port:
                raise
            continue
        tcp.listen(16)
        return udp, tcp
    raise AssertionError(f"no port free for both UDP and TCP on {address}")


def _read_framed(conn: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = conn.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    return exactly(struct.unpack("!H", exactly(2))[0])


def ask_udp(port: int, data: bytes, timeout: float = 5.0) -> message.Message:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, ("127.0.0.1", port))
        return message.parse(s.recv(65535))


def ask_tcp(port: int, *queries: bytes, timeout: float = 5.0) -> list[message.Message]:
    """Several queries on one TCP connection, answered in turn."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        answers = []
        for data in queries:
            s.sendall(struct.pack("!H", len(data)) + data)
            answers.append(message.parse(_read_framed(s)))
        return answers


NODE_RESOLVE = r"""
const dns = require('dns');
const [server, ...queries] = process.argv.slice(1);
const r = new dns.Resolver({timeout: 3000, tries: 1});
r.setServers([server]);
const run = ([kind, name]) => new Promise((done) => {
  const f = kind === 'AAAA' ? r.resolve6.bind(r) : r.resolve4.bind(r);
  f(name, {ttl: true}, (err, found) => done(err ? {error: err.code} : {found}));
});
Promise.all(queries.map((q) => run(q.split(':')))).then((all) => console.log(JSON.stringify(all)));
"""


def node_resolve(port: int, *queries: str) -> list[dict[str, Any]]:
    """c-ares (Node.js) asking the responder: "A:name" or "AAAA:name" each."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: run scripts/install-peers")
    out = subprocess.run(
        [node, "-e", NODE_RESOLVE, f"127.0.0.1:{port}", *queries],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return list(json.loads(out.stdout))


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream(lambda: _bind_pair("127.0.0.1"))
    yield server
    server.close()


@pytest.fixture
def dns_proxy(
    start_proxy: Callable[[dict[str, Any]], ProxyProcess], upstream: FakeUpstream
) -> tuple[ProxyProcess, int]:
    port = free_port()
    document = http_snapshot(
        free_port(),
        free_port(),
        [free_port()],
        extra={
            "dns": {
                "port": port,
                "ttl": "15s",
                "upstream": [f"127.0.0.1:{upstream.port}"],
                "names": NAMES,
            }
        },
    )
    return start_proxy(document), port


def dns_metrics(proxy: ProxyProcess) -> dict[str, float]:
    found = {}
    for line in proxy.metrics().splitlines():
        if line.startswith("meshling_dns_queries_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            found[result] = float(line.rsplit(" ", 1)[1])
    return found


def test_dns_an_independent_resolver_gets_mesh_names_and_forwarded_ones(
    dns_proxy: tuple[ProxyProcess, int], upstream: FakeUpstream
) -> None:
    proxy, port = dns_proxy
    results = node_resolve(
        port, "A:api.mesh", "A:API.Mesh", "AAAA:api.mesh", "A:nope.mesh", "A:www.example",
        f"A:{BIG_NAME}",
    )  # fmt: skip
    assert results[0] == {"found": [{"address": "241.1.2.3", "ttl": 15}]}
    assert results[1] == {"found": [{"address": "241.1.2.3", "ttl": 15}]}
    # AAAA: an empty answer, no error, so the client uses its IPv4 address at once
    assert results[2] == {"error": "ENODATA"}
    assert results[3] == {"error": "ENOTFOUND"}
    assert results[4] == {"found": [{"address": UPSTREAM_ANSWER, "ttl": 60}]}
    # truncated over UDP, so c-ares asked again over TCP, which the proxy forwarded over TCP
    assert len(results[5]["found"]) == BIG_COUNT
    assert (BIG_NAME, "udp") in [(n, t) for n, _, t in upstream.queries]
    assert (BIG_NAME, "tcp") in [(n, t) for n, _, t in upstream.queries]
    # only names outside the mesh went upstream
    assert {n for n, _, _ in upstream.queries} == {"www.example", BIG_NAME}
    # (at least: c-ares may ask again when an answer is slow on a busy machine)
    counts = dns_metrics(proxy)
    assert counts["mesh"] >= 3 and counts["nxdomain"] >= 1 and counts["error"] == 0
    assert counts["forwarded"] >= 3  # www, big over UDP (truncated), big over TCP


def test_dns_raw_queries_over_udp_and_tcp_keep_the_client_id(
    dns_proxy: tuple[ProxyProcess, int], upstream: FakeUpstream
) -> None:
    proxy, port = dns_proxy
    answer = ask_udp(port, message.query("web.mesh", message.TYPE_A, 0x5151, edns_size=1232))
    assert answer.id == 0x5151 and answer.rcode == message.NOERROR
    assert answer.answers == (message.Record("web.mesh", 1, 15, bytes([250, 0, 0, 9])),)
    assert answer.edns_size == message.EDNS_UDP_SIZE and answer.flags & message.FLAG_AA
    forwarded = ask_udp(port, message.query("www.example", message.TYPE_A, 0x6262))
    assert forwarded.id == 0x6262 and forwarded.answers[0].data == bytes([192, 0, 2, 7])
    # upstream saw another id: the client's is restored on the way back
    assert upstream.queries[-1][0] == "www.example" and upstream.queries[-1][1] != 0x6262
    big_udp = ask_udp(port, message.query(BIG_NAME, message.TYPE_A, 9))
    assert big_udp.flags & message.FLAG_TC and big_udp.answers == ()
    a, nx, big = ask_tcp(
        port,
        message.query("api.mesh", message.TYPE_A, 1),
        message.query("gone.mesh", message.TYPE_A, 2),
        message.query(BIG_NAME, message.TYPE_A, 3),
    )
    assert (a.id, a.answers[0].data) == (1, bytes([241, 1, 2, 3]))
    assert (nx.id, nx.rcode) == (2, message.NXDOMAIN)
    assert big.id == 3 and len(big.answers) == BIG_COUNT and not big.flags & message.FLAG_TC
    # garbage: no answer without a header, FORMERR with one, and the responder lives on
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\x01", ("127.0.0.1", port))
    bad = ask_udp(port, message.with_id(message.query("api.mesh")[:-3], 0x7777))
    assert bad.id == 0x7777 and bad.rcode == message.FORMERR
    assert ask_udp(port, message.query("api.mesh", message.TYPE_A, 4)).answers
    assert dns_metrics(proxy)["error"] == 2


def test_dns_silent_upstream_is_servfail_within_the_timeout(
    dns_proxy: tuple[ProxyProcess, int], upstream: FakeUpstream
) -> None:
    proxy, port = dns_proxy
    started = time.monotonic()
    answer = ask_udp(port, message.query(SILENT_NAME, message.TYPE_A, 0x4444))
    took = time.monotonic() - started
    assert answer.id == 0x4444 and answer.rcode == message.SERVFAIL
    assert 1.5 < took < 8, took
    (tcp_answer,) = ask_tcp(port, message.query(SILENT_NAME, message.TYPE_A, 5))
    assert tcp_answer.rcode == message.SERVFAIL
    # mesh names never wait for upstream
    assert ask_udp(port, message.query("api.mesh")).answers
    assert dns_metrics(proxy)["error"] == 2
    # forwards in flight are bounded: past MAX_IN_FLIGHT (256) the answer is SERVFAIL at
    # once instead of a queue, so of a burst of 300 fewer than 300 reach the upstream
    asked_before = len(upstream.queries)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.settimeout(10.0)
        for i in range(300):
            s.sendto(message.query(SILENT_NAME, message.TYPE_A, i), ("127.0.0.1", port))
            if i % 20 == 19:
                # paced a little, within the 2 s the forwards wait: a socket's receive
                # buffer (rmem_default) holds only about 200 small datagrams
                time.sleep(0.01)
        answers = [message.parse(s.recv(4096)) for _ in range(300)]
    assert all(a.rcode == message.SERVFAIL for a in answers)
    assert sorted(a.id for a in answers) == list(range(300))
    forwarded = len(upstream.queries) - asked_before
    assert 0 < forwarded < 300, forwarded


def test_dns_reload_changes_names_and_a_taken_port_refuses_the_snapshot(
    dns_proxy: tuple[ProxyProcess, int], upstream: FakeUpstream
) -> None:
    proxy, port = dns_proxy
    document = yaml.safe_load(proxy.config.read_text())
    document["version"] = "2"
    document["dns"]["names"] = {**NAMES, "db": "244.0.0.1"}
    proxy.write_config(document)

    def has_db() -> bool:
        return ask_udp(port, message.query("db.mesh")).rcode == message.NOERROR

    wait_for(has_db, 15, "db.mesh after the reload")
    # a port someone else holds: the reload is refused, the old responder keeps answering
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        document["version"] = "3"
        document["dns"]["port"] = taken.getsockname()[1]
        proxy.write_config(document)
        wait_for(lambda: "dns.port: cannot listen" in proxy.logs(), 15, "the refused reload")
    assert has_db()
    # without the section, the responder goes and its port is free again
    del document["dns"]
    document["version"] = "4"
    proxy.write_config(document)

    def port_free() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    wait_for(port_free, 15, "the DNS port to be released")


# -- on test hosts: the control plane fills the table; glibc resolves through resolv.conf


def _resolv_conf(netns: str, text: str) -> Path:
    """`ip netns exec` mounts /etc/netns/<netns>/resolv.conf over /etc/resolv.conf."""
    directory = Path("/etc/netns") / netns
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(text)
    return directory


@pytest.fixture
def netns_configs() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def test_dns_control_plane_names_every_service_and_glibc_resolves_them(
    mesh_hosts: Callable[..., MeshHosts],  # noqa: F811
    netns_configs: list[Path],
) -> None:
    mesh = mesh_hosts(["cp", "web", "api1"])
    net = mesh.network
    mesh.apply([{"kind": "Mesh", "metadata": {"name": "default"}, "spec": {"mtls": {"enabled": True, "mode": "strict"}}}])  # fmt: skip
    # the upstream for other names: a DNS server on the cp host, at port 53
    cp = net["cp"]
    upstream = cp.call(lambda: FakeUpstream(lambda: _bind_pair(cp.address, 53)))
    try:
        web = net["web"]
        # the app's resolver asks the proxy (on port 53 of the host's loopback) first; the
        # proxy leaves itself out of that list and forwards other names to the cp host
        netns_configs.append(
            _resolv_conf(web.netns, f"nameserver 127.0.0.1\nnameserver {cp.address}\n")
        )
        api = mesh.add_instance("api1", "api-1", "api")
        mesh.start_instance(api)
        client = mesh.add_instance("web", "web", "web", app=False, outbounds=["api"])
        client.dataplane["spec"]["dns"] = {"port": 53}
        (client.directory / "dataplane.yaml").write_text(yaml.safe_dump(client.dataplane))
        mesh.start_instance(client)
        vips = allocate(["api", "web"], "default")

        def getent(name: str) -> str:
            result = web.run(["getent", "ahostsv4", name], check=False, timeout=15)
            return result.stdout.split()[0] if result.returncode == 0 else ""

        wait_for(lambda: getent("api.mesh") == vips["api"], 20, "api.mesh from glibc")
        assert getent("web.mesh") == vips["web"]
        assert getent("db.mesh") == ""  # no such service (yet)
        assert getent("www.example") == UPSTREAM_ANSWER  # forwarded to the cp host
        assert ("www.example", "udp") in [(n, t) for n, _, t in upstream.queries]
        # a service added later appears after the push
        db = mesh.add_instance("api1", "db-1", "db")
        db.dataplane["spec"]["inbounds"][0]["port"] = 15007
        db.dataplane["spec"]["admin"]["port"] = 9902
        db.dataplane["spec"]["inbounds"][0]["service_port"] = 8081
        (db.directory / "dataplane.yaml").write_text(yaml.safe_dump(db.dataplane))
        mesh.start_proxy(db)
        vips = allocate(["api", "db", "web"], "default")
        wait_for(lambda: getent("db.mesh") == vips["db"], 20, "db.mesh after the push")
        assert getent("api.mesh") == vips["api"]  # unmoved
        metrics = mesh.metrics(client)
        assert 'meshling_dns_queries_total{result="mesh"}' in metrics
        assert 'meshling_dns_queries_total{result="forwarded"}' in metrics
    finally:
        cp.call(upstream.close)


def test_dns_proxy_snapshot_without_dns_loads_no_dns_code(tmp_path: Path) -> None:
    """The DNS modules are imported only for a snapshot with a `dns:` section."""
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump(http_snapshot(free_port(), free_port(), [free_port()])))
    code = (
        "import asyncio, sys\n"
        "from meshling.snapshot import load\n"
        "from meshling.proxy.server import Proxy\n"
        "async def main():\n"
        f"    proxy = Proxy(load({str(config)!r}))\n"
        "    await proxy.start()\n"
        "    await proxy.drain()\n"
        "asyncio.run(main())\n"
        "print(sorted(m for m in sys.modules if m.startswith('meshling.dns')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "[]"


def dig(port: int, *args: str) -> str:
    found = shutil.which("dig")
    if found is None:
        pytest.skip("dig is not installed: run scripts/install-peers")
    argv = [found, "@127.0.0.1", "-p", str(port), "+tries=1", "+time=5", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout


def test_dns_dig_over_udp_and_tcp(dns_proxy: tuple[ProxyProcess, int]) -> None:
    _, port = dns_proxy
    assert dig(port, "+short", "api.mesh").split() == ["241.1.2.3"]
    assert dig(port, "+short", "+tcp", "web.mesh").split() == ["250.0.0.9"]
    aaaa = dig(port, "api.mesh", "AAAA")
    assert "status: NOERROR" in aaaa and "ANSWER: 0" in aaaa and "flags: qr aa rd ra" in aaaa
    assert "status: NXDOMAIN" in dig(port, "+tcp", "nope.mesh")
    # dig sends EDNS0 and a cookie option: tolerated, and the OPT record is echoed
    assert "EDNS: version: 0" in dig(port, "api.mesh")
    # truncated over UDP, dig retries over TCP by itself
    assert dig(port, "+short", BIG_NAME).split() == [UPSTREAM_ANSWER] * BIG_COUNT


# -- through transparent capture: the app's DNS, to any server, lands in the proxy

# a uid no account uses, the proxy's own: the capture rules leave its traffic alone
PROXY_UID = 64000 + os.getpid() % 1000
VIP_RANGE = "240.0.0.0/4"


@pytest.fixture
def proxy_dir() -> Iterator[Path]:
    """A directory the proxy's uid owns (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="meshling-dns-"))
    os.chown(directory, PROXY_UID, PROXY_UID)
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("iptables", "setpriv", "curl", "dig")),
    reason="needs iptables, setpriv, curl and dig (scripts/install-peers)",
)
def test_dns_through_transparent_capture_mesh_names_here_the_rest_upstream(
    checkout_traversable: None,
    mesh_hosts: Callable[..., MeshHosts],  # noqa: F811
    netns_configs: list[Path],
    proxy_dir: Path,
) -> None:
    mesh = mesh_hosts(["cp", "web", "api1"])
    net = mesh.network
    mesh.apply([
        {"kind": "Mesh", "metadata": {"name": "default"}, "spec": {"mtls": {"enabled": True, "mode": "strict"}}},
        {"kind": "TrafficPermission", "metadata": {"name": "api-from-web", "mesh": "default"},
         "spec": {"destination": {"service": "api"},
                  "rules": [{"action": "allow", "sources": [{"service": "web"}]}]}},
    ])  # fmt: skip
    cp, web = net["cp"], net["web"]
    # the host's resolver: a DNS server on the cp host, port 53, answering *.example
    upstream = cp.call(lambda: FakeUpstream(lambda: _bind_pair(cp.address, 53)))
    try:
        netns_configs.append(_resolv_conf(web.netns, f"nameserver {cp.address}\n"))
        api = mesh.add_instance("api1", "api-1", "api")
        mesh.start_instance(api)
        # web: no outbound; DNS and transparent capture, its proxy running as its own uid
        dataplane = {
            "kind": "Dataplane",
            "metadata": {"name": "web", "mesh": "default"},
            "spec": {
                "service": "web",
                "address": web.address,
                "admin": {"port": 9901},
                "dns": {"port": 15053},
                "transparent": {"outbound_port": 15001, "inbound_port": 15006},
            },
        }
        files = {name: proxy_dir / name for name in ("dataplane.yaml", "token", "data")}
        files["dataplane.yaml"].write_text(yaml.safe_dump(dataplane))
        mesh.token("web", files["token"])
        files["data"].mkdir()
        for path in files.values():
            os.chown(path, PROXY_UID, PROXY_UID)
        uid = str(PROXY_UID)
        argv = ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", *meshling_argv(
            "proxy", "run", "--cp", mesh.cp_url, "--token-file", str(files["token"]),
            "--dataplane", str(files["dataplane.yaml"]), "--data-dir", str(files["data"]),
        )]  # fmt: skip
        proxy = web.start("web-proxy", argv)
        wait_for(lambda: proxy.alive and web.answers("http://127.0.0.1:9901/ready"), 30, "proxy")
        web.run(["ip", "route", "add", VIP_RANGE, "dev", "eth0"])
        web.run(meshling_argv("transparent", "install", "--proxy-user", uid,
                              "--redirect-dns-port", "15053"))  # fmt: skip

        def getent(name: str) -> str:
            result = web.run(["getent", "ahostsv4", name], check=False, timeout=15)
            return result.stdout.split()[0] if result.returncode == 0 else ""

        vip = allocate(["api", "web"], "default")["api"]
        # glibc asks the cp host; the capture hands the query to the proxy, which answers
        assert getent("api.mesh") == vip
        assert getent("nope.mesh") == ""
        # a name outside the mesh: the proxy forwards it (its own query is not captured,
        # or it would loop back into itself) to the server the app asked
        assert getent("www.example") == UPSTREAM_ANSWER
        # over TCP too (dig +tcp), and a long answer (dig offers EDNS0: it fits in UDP)
        dig_tcp = web.run(["dig", "+short", "+tcp", "+time=5", "+tries=1", "www.example"])
        assert dig_tcp.stdout.split() == [UPSTREAM_ANSWER]
        big = web.run(["dig", "+short", "+time=5", "+tries=1", BIG_NAME]).stdout.split()
        assert big == [UPSTREAM_ANSWER] * BIG_COUNT
        asked = [(name, transport) for name, _, transport in upstream.queries]
        assert ("www.example", "udp") in asked and ("www.example", "tcp") in asked
        assert not any(name.endswith("mesh") for name, _ in asked)
        # and the app, unmodified, calls the service by name through the mesh
        body = web.run(["curl", "-sS", "-m", "5", "http://api.mesh/"]).stdout
        assert body.strip() == "api-1"
        metrics = web.http_get("http://127.0.0.1:9901/metrics")[1].decode()
        counts = {
            line.split('result="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("meshling_dns_queries_total{")
        }
        assert counts["mesh"] >= 2 and counts["nxdomain"] >= 1 and counts["forwarded"] >= 3
        # uninstalled: the app's DNS goes to the cp host itself, which knows no mesh names
        web.run(meshling_argv("transparent", "uninstall"))
        assert getent("api.mesh") == ""
        assert ("api.mesh", "udp") in [(n, t) for n, _, t in upstream.queries]
    finally:
        cp.call(upstream.close)
