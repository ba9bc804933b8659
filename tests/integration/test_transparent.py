"""Transparent proxying on real namespaced hosts: capture rules installed with
`meshling transparent install`, a proxy that routes captured connections by their
original destination, and unmodified apps (curl, Node.js) that call `http://api.mesh/`.

The proxies run as a uid of their own (`setpriv`, a number no account uses), since the
capture rules leave exactly that uid's traffic alone; their files live in a directory
that uid may read, outside pytest's root-only temporary tree.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshling.dns.vip import allocate

from .hosts import (
    MESH,
    Host,
    MeshHosts,
    Network,
    Process,
    mesh_hosts,  # noqa: F401  (the fixture)
    meshling_argv,
    network,  # noqa: F401  (the fixture)
    wait_until,
)

# a uid no account on the machine uses, different per run
PROXY_UID = 61000 + os.getpid() % 3000
VIP_RANGE = "240.0.0.0/4"

ECHO_APP = """\
import http.server, sys

class Echo(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{sys.argv[3]} saw {self.client_address[0]} host {self.headers['Host']}\\n"
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Echo).serve_forever()
"""

NODE_CLIENT = """\
const http = require('http');
http.get(process.argv[2], (res) => {
  let body = '';
  res.on('data', (chunk) => { body += chunk; });
  res.on('end', () => { console.log(res.statusCode + ' ' + body.trim()); });
}).on('error', (err) => { console.error(err.message); process.exit(1); });
"""

skip_without_tools = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("iptables", "setpriv", "curl")),
    reason="needs iptables, setpriv and curl (scripts/install-peers)",
)


@pytest.fixture(autouse=True)
def _proxy_uid_reaches_the_code(checkout_traversable: None) -> None:
    """Every test here runs a proxy as PROXY_UID (conftest's checkout_traversable)."""


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A directory the proxy's uid owns (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="meshling-transparent-"))
    os.chown(directory, PROXY_UID, PROXY_UID)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def netns_etc() -> Iterator[list[Path]]:
    """/etc/netns/<netns> directories a test made (resolv.conf for one host)."""
    made: list[Path] = []
    yield made
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def give(path: Path) -> Path:
    os.chown(path, PROXY_UID, PROXY_UID)
    return path


def as_proxy_user(argv: Sequence[str]) -> list[str]:
    uid = str(PROXY_UID)
    return ["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups", *argv]


def start_echo(host: Host, directory: Path, address: str, port: int, name: str) -> Process:
    script = directory / "echo.py"
    script.write_text(ECHO_APP)
    script.chmod(0o644)
    process = host.start(f"echo-{name}", ["python3", str(script), address, str(port), name])
    wait_until(
        lambda: host.answers(f"http://{address}:{port}/"), 15, f"{name} app on {address}:{port}"
    )
    return process


def wait_ready(host: Host, process: Process, admin: str) -> None:
    def ready() -> bool:
        if not process.alive:
            raise AssertionError(f"{process.name} exited:\n{process.tail()}")
        return host.answers(f"{admin}/ready")

    wait_until(ready, 30, f"{process.name} ready")


def nat_rules(host: Host) -> list[str]:
    return host.run(["iptables", "-w", "-t", "nat", "-S"]).stdout.splitlines()


def transparent(host: Host, *args: str) -> str:
    return host.run(meshling_argv("transparent", *args)).stdout


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def curl(host: Host, url: str, *, check: bool = True, timeout: float = 5.0) -> str:
    # no proxy settings: the app knows nothing of the mesh
    argv = ["env", "-u", "http_proxy", "-u", "HTTP_PROXY", "-u", "all_proxy", "curl", "-sS",
            "-m", str(timeout), url]  # fmt: skip
    return host.run(argv, check=check, timeout=timeout + 10).stdout


@skip_without_tools
def test_transparent_install_is_idempotent_and_uninstall_leaves_other_rules(
    network: Callable[[Sequence[str]], Network],  # noqa: F811
) -> None:
    (host,) = network(["box"]).hosts.values()
    # someone else's rule, which meshling must leave alone
    host.run(["iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-d", "10.99.0.1", "-j", "ACCEPT"])
    before = nat_rules(host)
    dry = transparent(host, "install", "--proxy-user", str(PROXY_UID), "--dry-run")
    assert "-A MESHLING_OUTPUT -m owner --uid-owner" in dry
    assert nat_rules(host) == before  # a dry run changes nothing

    options = ["--proxy-user", str(PROXY_UID), "--redirect-dns-port", "15053",
               "--exclude-inbound-ports", "22", "--exclude-outbound-cidrs", "10.98.0.0/16"]  # fmt: skip
    transparent(host, "install", *options)
    first = nat_rules(host)
    transparent(host, "install", *options)
    assert nat_rules(host) == first  # installed twice: the same rules, once each
    assert len(first) == len(set(first))
    assert sum("-j MESHLING_OUTPUT" in r and r.startswith("-A OUTPUT") for r in first) == 2
    assert "-A OUTPUT -d 10.99.0.1/32 -j ACCEPT" in first
    assert f"-A MESHLING_OUTPUT -m owner --uid-owner {PROXY_UID} -j RETURN" in first

    # installed again with other settings: replaced, not added to
    transparent(host, "install", "--proxy-user", str(PROXY_UID), "--inbound-ports", "")
    changed = nat_rules(host)
    assert not any("MESHLING_INBOUND" in r or "--dport 53" in r for r in changed)

    dry = transparent(host, "uninstall", "--dry-run")
    assert "-X MESHLING_OUTPUT" in dry and nat_rules(host) == changed
    assert "removed" in transparent(host, "uninstall")
    assert nat_rules(host) == before  # nothing of meshling's left, the rest untouched
    assert "nothing" in transparent(host, "uninstall")


SNAPSHOT_VIP = "240.0.0.10"


def standalone_snapshot(admin_port: int) -> dict[str, Any]:
    route = {
        "route_config": {
            "virtual_hosts": [
                {"name": "api", "domains": ["*"], "routes": [{"name": "api", "cluster": "api"}]}
            ]
        }
    }
    return {
        "version": "1",
        "admin": {"port": admin_port},
        "listeners": [
            {
                "name": "outbound:transparent",
                "port": 15001,
                "direction": "outbound",
                "transparent": True,
                "filter_chains": [
                    {"name": "api", "match": {"destinations": [SNAPSHOT_VIP]}, "http": route},
                    {"name": "passthrough", "passthrough": True},
                ],
            },
            {
                "name": "inbound:transparent",
                "address": "0.0.0.0",
                "port": 15006,
                "direction": "inbound",
                "transparent": True,
                "filter_chains": [
                    {"name": "app", "match": {"ports": [8080]}, "tcp": {"cluster": "app"}}
                ],
            },
        ],
        "clusters": [
            {"name": "api", "endpoints": [{"address": "127.0.0.1", "port": 8080}]},
            {"name": "app", "endpoints": [{"address": "127.0.0.1", "port": 8080}]},
        ],
    }


@skip_without_tools
def test_transparent_proxy_routes_by_original_destination_and_passes_the_rest_through(
    network: Callable[[Sequence[str]], Network],  # noqa: F811
    private_dir: Path,
) -> None:
    net = network(["client", "server"])
    client, server = net["client"], net["server"]
    client.run(["ip", "route", "add", VIP_RANGE, "dev", "eth0"])
    start_echo(client, private_dir, "127.0.0.1", 8080, "local-app")
    start_echo(server, private_dir, server.address, 8081, "outside")
    config = private_dir / "snapshot.yaml"
    config.write_text(yaml.safe_dump(standalone_snapshot(9901)))
    proxy = client.start(
        "proxy", as_proxy_user(meshling_argv("proxy", "run", "--config", str(config)))
    )
    wait_ready(client, proxy, "http://127.0.0.1:9901")
    transparent(client, "install", "--proxy-user", str(PROXY_UID), "--inbound-ports", "8080")

    # the virtual IP: the api chain, HTTP routed to its cluster
    assert curl(client, f"http://{SNAPSHOT_VIP}/").startswith("local-app saw 127.0.0.1")
    # elsewhere: passed through to the original destination by the proxy, as its own
    # uid (captured again, it would come back to the proxy forever)
    assert curl(client, f"http://{server.address}:8081/").startswith(
        f"outside saw {client.address}"
    )
    # inbound: a connection from the network to the app's port reaches the app (which
    # listens on loopback only) through the proxy
    assert curl(server, f"http://{client.address}:8080/").startswith("local-app saw 127.0.0.1")
    # a connection made to the listener itself, not redirected: refused, not looped
    direct = client.call(lambda: _connect_and_read("127.0.0.1", 15001))
    assert direct == b""
    metrics = client.http_get("http://127.0.0.1:9901/metrics")[1].decode()
    assert metric(metrics, "meshling_http_requests_total", listener="outbound:transparent",
                  cluster="api") == 1  # fmt: skip
    assert metric(metrics, "meshling_downstream_connections_total",
                  listener="outbound:transparent") == 2  # fmt: skip
    assert metric(metrics, "meshling_downstream_connections_total",
                  listener="inbound:transparent") == 1  # fmt: skip
    assert proxy.alive


def _connect_and_read(address: str, port: int) -> bytes:
    import socket

    with socket.create_connection((address, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            return sock.recv(100)
        except ConnectionResetError:
            return b""


def _mesh_resources() -> list[dict[str, Any]]:
    return [
        {"kind": "Mesh", "metadata": {"name": MESH}, "spec": {"mtls": {"enabled": True,
                                                                       "mode": "strict"}}},
        {
            "kind": "TrafficPermission",
            "metadata": {"name": "api-from-web", "mesh": MESH},
            "spec": {
                "destination": {"service": "api"},
                "rules": [{"action": "allow", "sources": [{"service": "web"}]}],
            },
        },
    ]  # fmt: skip


@skip_without_tools
@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js")
def test_transparent_unmodified_apps_call_a_mesh_service_by_name_over_mtls(
    mesh_hosts: Callable[..., MeshHosts],  # noqa: F811
    private_dir: Path,
    netns_etc: list[Path],
) -> None:
    mesh = mesh_hosts(["cp", "web", "api"])
    mesh.apply(_mesh_resources())
    cp, web_host, api_host = mesh.network["cp"], mesh.network["web"], mesh.network["api"]

    # api: an app that says who called it, behind its proxy (explicit inbound, mTLS)
    api = mesh.add_instance("api", "api-1", "api")
    start_echo(api_host, private_dir, "127.0.0.1", 8080, "api-1")
    mesh.start_proxy(api)

    # web: no outbound at all; DNS and transparent capture, the proxy as its own uid
    dataplane = {
        "kind": "Dataplane",
        "metadata": {"name": "web", "mesh": MESH},
        "spec": {
            "service": "web",
            "address": web_host.address,
            "admin": {"port": 9901},
            "dns": {"port": 15053},
            "transparent": {"outbound_port": 15001, "inbound_port": 15006},
        },
    }
    dataplane_file = private_dir / "dataplane.yaml"
    dataplane_file.write_text(yaml.safe_dump(dataplane))
    token = give(mesh.token("web", private_dir / "token"))
    data = private_dir / "data"
    data.mkdir()
    give(data)
    argv = meshling_argv("proxy", "run", "--cp", mesh.cp_url, "--token-file", str(token),
                         "--dataplane", str(dataplane_file), "--data-dir", str(data))  # fmt: skip
    proxy = web_host.start("web-proxy", as_proxy_user(argv))
    wait_ready(web_host, proxy, "http://127.0.0.1:9901")

    # the host resolves through any server: the capture hands port 53 to the proxy
    etc = Path("/etc/netns") / web_host.netns
    etc.mkdir(parents=True, exist_ok=True)
    netns_etc.append(etc)
    (etc / "resolv.conf").write_text(f"nameserver {cp.address}\n")
    web_host.run(["ip", "route", "add", VIP_RANGE, "dev", "eth0"])
    transparent(web_host, "install", "--proxy-user", str(PROXY_UID),
                "--redirect-dns-port", "15053")  # fmt: skip

    vip = allocate(["api", "web"], MESH)["api"]
    resolved = web_host.run(["getent", "hosts", "api.mesh"]).stdout.split()
    assert resolved[:1] == [vip]

    # curl, by name: through the mesh, the api app sees its own proxy as the caller
    answer = curl(web_host, "http://api.mesh/hello")
    assert answer.strip() == "api-1 saw 127.0.0.1 host api.mesh"
    # Node.js, by name, no proxy settings either
    script = private_dir / "client.js"
    script.write_text(NODE_CLIENT)
    script.chmod(0o644)
    node = web_host.run(["env", "-u", "http_proxy", "-u", "HTTP_PROXY", "node", str(script),
                         "http://api.mesh:8080/from-node"]).stdout  # fmt: skip
    assert node.strip() == "200 api-1 saw 127.0.0.1 host api.mesh:8080"

    # the mesh carried both: web's outbound chain for api, and api's inbound over mTLS
    # with web's SPIFFE identity
    def counted() -> tuple[float, float]:
        web_metrics = web_host.http_get("http://127.0.0.1:9901/metrics")[1].decode()
        api_metrics = mesh.metrics(api)
        return (
            metric(web_metrics, "meshling_http_requests_total",
                   listener="outbound:transparent", cluster="api"),
            metric(api_metrics, "meshling_service_requests_total", direction="inbound",
                   source_service="web", destination_service="api"),
        )  # fmt: skip

    # metrics are recorded as a response ends: wait for them rather than race them
    wait_until(lambda: counted() == (2, 2), 5, f"2 requests counted by both proxies, {counted()}")
    api_metrics = mesh.metrics(api)
    assert metric(api_metrics, "meshling_tls_handshakes_total", direction="downstream") >= 1
    # strict mTLS: the app's port is not reachable in plaintext from web's host at all
    refused = curl(web_host, f"http://{api_host.address}:15006/", check=False, timeout=3)
    assert "api-1" not in refused

    # a destination outside the mesh: passed through, still counted by web's proxy
    def passed_through() -> float:
        text = web_host.http_get("http://127.0.0.1:9901/metrics")[1].decode()
        return metric(text, "meshling_downstream_connections_total",
                      listener="outbound:transparent")  # fmt: skip

    before = passed_through()
    assert curl(web_host, f"{mesh.cp_url}/healthz", check=False) != ""
    assert passed_through() == before + 1

    # uninstalled: the app's traffic goes straight out again, the proxy no longer sees it
    transparent(web_host, "uninstall")
    assert not any("MESHLING" in rule for rule in nat_rules(web_host))
    assert curl(web_host, f"{mesh.cp_url}/healthz", check=False) != ""
    assert passed_through() == before + 1
    gone = web_host.run(["curl", "-sS", "-m", "2", f"http://{vip}/"], check=False)
    assert gone.returncode != 0
    assert proxy.alive
