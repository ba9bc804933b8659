"""The demo mesh: its instances and ports, and the documents the control plane is given.

Four instances of three services, each an app next to its own proxy:

    web (Python)  ->  api-1 v1, api-2 v2 (Python)  ->  store (nginx)

Every proxy runs in control-plane mode from a Dataplane document (`dataplane()`): an
inbound that forwards the mesh's calls to its app, and, for an app that calls another
service, an outbound on 127.0.0.1 that its app calls instead of the service itself. The
control plane is given a Mesh with mTLS strict and two TrafficPermissions (web may call
api, api may call store, nothing else may call anything: `mesh_resources()`);
`deny_web()` is the policy change the demo suggests trying. Documents are validated here
with the control plane's own parsers, so a mistake fails before any process starts.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from meshling.controlplane.resources import parse_resource

LOOPBACK = "127.0.0.1"
MESH = "default"
# the permission that lets web call api; deny_web() flips it
WEB_TO_API = "api-from-web"
API_TO_STORE = "store-from-api"


@dataclass(frozen=True, slots=True)
class Instance:
    """One service instance: its app, and its proxy's ports."""

    # the Dataplane's name, e.g. "api-1"; also names its files and its processes
    name: str
    # "web", "api" or "store": the proxy's identity is spiffe://default/<service>
    service: str
    # the instance's version tag, e.g. "v1"
    version: str
    # what the app is written in, for the banner: the mesh does not care
    language: str
    app_port: int
    # the proxy's mesh-side port, where other proxies reach this instance
    inbound_port: int
    admin_port: int
    # the service this app calls, and the port on 127.0.0.1 its proxy takes those calls on
    calls: str | None = None
    outbound_port: int | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    # the control plane's API port on 127.0.0.1
    cp_port: int
    web: Instance
    apis: tuple[Instance, ...]
    store: Instance

    @property
    def instances(self) -> tuple[Instance, ...]:
        """Callees before callers: the order they start in, so that each proxy's first
        snapshot already names the instances it calls."""
        return (self.store, *self.apis, self.web)

    @property
    def flow(self) -> tuple[Instance, ...]:
        """In the order a request passes them: how the demo lists them."""
        return (self.web, *self.apis, self.store)

    @property
    def cp_url(self) -> str:
        return f"http://{LOOPBACK}:{self.cp_port}"


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that were free a moment ago (all held open together, so distinct)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def build(cp_port: int, ports: Iterator[int] | None = None) -> Topology:
    """The demo mesh, with its control plane on `cp_port`, on the given ports or free ones."""
    take = ports if ports is not None else iter(free_ports(15))
    store = Instance(
        name="store",
        service="store",
        version="v1",
        language="nginx",
        app_port=next(take),
        inbound_port=next(take),
        admin_port=next(take),
    )
    apis = tuple(
        Instance(
            name=f"api-{n}",
            service="api",
            version=f"v{n}",
            language="Python",
            app_port=next(take),
            inbound_port=next(take),
            admin_port=next(take),
            calls="store",
            outbound_port=next(take),
        )
        for n in (1, 2)
    )
    web = Instance(
        name="web",
        service="web",
        version="v1",
        language="Python",
        app_port=next(take),
        inbound_port=next(take),
        admin_port=next(take),
        calls="api",
        outbound_port=next(take),
    )
    return Topology(cp_port=cp_port, web=web, apis=apis, store=store)


def dataplane(instance: Instance) -> dict[str, Any]:
    """The Dataplane document one proxy is started with."""
    spec: dict[str, Any] = {
        "service": instance.service,
        "address": LOOPBACK,
        "tags": {"version": instance.version},
        "inbounds": [
            {"port": instance.inbound_port, "service_port": instance.app_port, "protocol": "http"}
        ],
    }
    if instance.calls is not None and instance.outbound_port is not None:
        spec["outbounds"] = [
            {"port": instance.outbound_port, "service": instance.calls, "protocol": "http"}
        ]
    spec["admin"] = {"port": instance.admin_port}
    document = {
        "kind": "Dataplane",
        "metadata": {"name": instance.name, "mesh": MESH},
        "spec": spec,
    }
    parse_resource(document, f"<dataplane {instance.name}>")
    return document


def _permission(name: str, destination: str, source: str, action: str) -> dict[str, Any]:
    return {
        "kind": "TrafficPermission",
        "metadata": {"name": name, "mesh": MESH},
        "spec": {
            "destination": {"service": destination},
            "rules": [{"action": action, "sources": [{"service": source}]}],
        },
    }


def mesh_resources() -> list[dict[str, Any]]:
    """What the demo applies to the control plane before any proxy starts."""
    documents = [
        {
            "kind": "Mesh",
            "metadata": {"name": MESH},
            "spec": {"mtls": {"enabled": True, "mode": "strict"}},
        },
        _permission(WEB_TO_API, "api", "web", "allow"),
        _permission(API_TO_STORE, "store", "api", "allow"),
    ]
    for i, document in enumerate(documents):
        parse_resource(document, f"<demo resource {i + 1}>")
    return documents


def allow_web() -> dict[str, Any]:
    """The permission web -> api as the demo starts with it."""
    return _permission(WEB_TO_API, "api", "web", "allow")


def retry_api() -> dict[str, Any]:
    """A Retry for web -> api: api's simulated failures (a 500 now and then) are tried
    again on the other instance, and web's success rate goes to nearly 100%."""
    document = {
        "kind": "Retry",
        "metadata": {"name": "web-to-api", "mesh": MESH},
        "spec": {
            "sources": [{"service": "web"}],
            "destinations": [{"service": "api"}],
            "conf": {"max_attempts": 3, "retry_on": ["5xx", "connect-failure", "reset"]},
        },
    }
    parse_resource(document, "<retry-api>")
    return document


def deny_web() -> dict[str, Any]:
    """The same permission turned to deny: api's proxies then refuse web's calls (403)."""
    document = _permission(WEB_TO_API, "api", "web", "deny")
    parse_resource(document, "<deny-web>")
    return document


NGINX_CONF = """\
# The store service of `meshling demo`: a stock nginx, which knows nothing of the mesh.
# Its proxy terminates mTLS and passes the caller's verified identity on in a header.
daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {directory}/tmp/body;
    proxy_temp_path {directory}/tmp/proxy;
    fastcgi_temp_path {directory}/tmp/fastcgi;
    uwsgi_temp_path {directory}/tmp/uwsgi;
    scgi_temp_path {directory}/tmp/scgi;
    keepalive_requests 100000;
    server {{
        listen {address}:{port};
        default_type application/json;
        location / {{
            return 200 '{{"service":"store","instance":"{name}","server":"nginx/$nginx_version","caller":"$http_x_meshling_peer_identity"}}\\n';
        }}
    }}
}}
"""


def nginx_conf(instance: Instance, directory: str) -> str:
    """The nginx configuration of the store app; every file it writes is under `directory`."""
    return NGINX_CONF.format(
        directory=directory, address=LOOPBACK, port=instance.app_port, name=instance.name
    )
