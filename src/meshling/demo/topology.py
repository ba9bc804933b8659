"""The demo topology: which services run, on which ports, and each proxy's snapshot.

Three instances (`web`, `api-v1`, `api-v2`), each an app plus its own standalone
proxy. Every proxy has an inbound listener that forwards to its app; web's proxy also
has an outbound listener whose `api` cluster balances over both api proxies' inbound
listeners, so a request goes web -> web's proxy -> an api proxy -> that api instance.
The snapshots are plain documents, validated with the same loader the proxy uses.
"""

from __future__ import annotations

import secrets
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from meshling.snapshot import from_dict

LOOPBACK = "127.0.0.1"
# listener and cluster names, shared with the summary that reads the metrics back
INBOUND = "inbound"
OUTBOUND = "outbound"
LOCAL_APP = "local-app"
API_CLUSTER = "api"


@dataclass(frozen=True, slots=True)
class Instance:
    """One service instance and the ports of its app and of its proxy."""

    name: str  # e.g. "api-v1"; also the proxy's node name and snapshot file stem
    service: str  # "api" or "web"
    tag: str  # the instance's version tag, e.g. "v1"
    app_port: int
    inbound_port: int
    admin_port: int
    outbound_port: int | None = None  # only proxies whose app calls another service


@dataclass(frozen=True, slots=True)
class Topology:
    web: Instance
    apis: tuple[Instance, ...]
    # the token that the proxies' state-changing admin endpoints ask for
    admin_token: str

    @property
    def instances(self) -> tuple[Instance, ...]:
        return (*self.apis, self.web)


def free_ports(count: int) -> list[int]:
    """Ports on 127.0.0.1 that were free a moment ago (all held open together, so distinct)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def build(ports: Iterator[int] | None = None) -> Topology:
    """The sample topology, on the given ports or on free ones."""
    take = ports if ports is not None else iter(free_ports(10))
    apis = tuple(
        Instance(
            name=f"api-{tag}",
            service="api",
            tag=tag,
            app_port=next(take),
            inbound_port=next(take),
            admin_port=next(take),
        )
        for tag in ("v1", "v2")
    )
    web = Instance(
        name="web",
        service="web",
        tag="v1",
        app_port=next(take),
        inbound_port=next(take),
        admin_port=next(take),
        outbound_port=next(take),
    )
    return Topology(web=web, apis=apis, admin_token=secrets.token_urlsafe(16))


def _http_listener(name: str, port: int, cluster: str, timeout: str) -> dict[str, Any]:
    return {
        "name": name,
        "address": LOOPBACK,
        "port": port,
        "filter_chains": [
            {
                "name": "http",
                "http": {
                    "idle_timeout": "60s",
                    "route_config": {
                        "name": name,
                        "virtual_hosts": [
                            {
                                "name": "default",
                                "domains": ["*"],
                                "routes": [
                                    {
                                        "name": "default",
                                        "match": {"path": {"prefix": "/"}},
                                        "cluster": cluster,
                                        "timeout": timeout,
                                    }
                                ],
                            }
                        ],
                    },
                },
            }
        ],
    }


def snapshot(topology: Topology, instance: Instance) -> dict[str, Any]:
    """The snapshot document for one instance's proxy."""
    listeners = [_http_listener(INBOUND, instance.inbound_port, LOCAL_APP, "10s")]
    clusters: list[dict[str, Any]] = [
        {
            "name": LOCAL_APP,
            "connect_timeout": "1s",
            "endpoints": [{"address": LOOPBACK, "port": instance.app_port}],
        }
    ]
    if instance.outbound_port is not None:
        listeners.append(_http_listener(OUTBOUND, instance.outbound_port, API_CLUSTER, "5s"))
        clusters.append(
            {
                "name": API_CLUSTER,
                "connect_timeout": "1s",
                "lb_policy": "round_robin",
                "endpoints": [{"address": LOOPBACK, "port": a.inbound_port} for a in topology.apis],
            }
        )
    document = {
        "version": "1",
        "node": instance.name,
        # the demo stops in seconds; nothing in flight needs longer than this
        "drain_timeout": "2s",
        "admin": {"address": LOOPBACK, "port": instance.admin_port, "token": topology.admin_token},
        "listeners": listeners,
        "clusters": clusters,
    }
    # fail here, with the loader's precise message, rather than in a child process
    from_dict(document, f"<snapshot of {instance.name}>")
    return document
