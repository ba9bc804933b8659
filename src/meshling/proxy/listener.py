"""Listeners at run time: a compiled filter chain per listener, and open connections.

A connection captures the `ChainRuntime` current when it was accepted and keeps
it to the end, so a reload never changes the rules under an open connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Literal, Protocol

from meshling.proxy.router import Router

if TYPE_CHECKING:
    from meshling.proxy.acceptor import TlsAcceptor
    from meshling.proxy.cluster import ClusterRuntime
    from meshling.proxy.deadlines import Deadlines
    from meshling.proxy.inbound import InboundPolicies
    from meshling.proxy.tls import ServerTls
    from meshling.snapshot.model import (
        ChainProtocol,
        FilterChain,
        HttpFilter,
        Listener,
        ProtocolDetection,
        TcpFilter,
    )
    from meshling.telemetry.accesslog import ChainLogs
    from meshling.telemetry.metrics import ListenerStats, Metrics
    from meshling.tracing.recorder import ProxyTracing
    from meshling.transparent.table import ChainTable


log = logging.getLogger("meshling.proxy")


class Connection(Protocol):
    """What the proxy needs from every downstream connection to sweep and drain it."""

    def tick(self, now: float) -> None: ...
    def is_idle(self) -> bool: ...
    def drain(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


ConnectionSet = set[Connection]


class ChainRuntime:
    """One listener's filter chain, compiled against one snapshot."""

    __slots__ = (
        "access_log",
        "authz",
        "authz_stats",
        "clusters",
        "deadlines",
        "detection",
        "detection_stats",
        "direction",
        "draining",
        "golden",
        "http",
        "inbound",
        "listener",
        "listener_stats",
        "metrics",
        "name",
        "passthrough",
        "retired",
        "router",
        "tcp",
        "tls",
        "tracer",
        "transparent",
        "version",
    )

    def __init__(
        self,
        listener: Listener,
        clusters: dict[str, ClusterRuntime],
        metrics: Metrics,
        access_log: ChainLogs | None,
        version: str,
        deadlines: Deadlines,
        tls: ServerTls | None = None,
        *,
        tracer: ProxyTracing | None = None,
        golden: bool = True,
        chain: FilterChain | None = None,
    ) -> None:
        # a transparent listener has a runtime per chain; the others their one chain
        chain = chain if chain is not None else listener.filter_chains[0]
        self.name = chain.name
        # forwards to the original destination (transparent listeners)
        self.passthrough = chain.passthrough
        # a transparent listener's chains by original destination, on its first chain's
        # runtime (the one its acceptor holds); None elsewhere
        self.transparent: ChainTable[ChainRuntime] | None = None
        self.listener = listener.name
        self.direction = listener.direction
        if listener.direction is not None:
            metrics.directions[listener.name] = listener.direction
        self.http: HttpFilter | None = chain.http
        self.tcp: TcpFilter | None = chain.tcp
        # protocol: auto; None when the chain's one filter serves every connection
        self.detection: ProtocolDetection | None = chain.detection
        self.detection_stats = (
            metrics.detection_stats(listener.name) if chain.detection is not None else None
        )
        self.router = Router(chain.http.route_config) if chain.http is not None else None
        self.clusters = clusters
        self.metrics = metrics
        self.listener_stats: ListenerStats = metrics.listener_stats(listener.name)
        self.access_log = access_log
        self.version = version
        self.deadlines = deadlines
        self.tls = tls
        self.authz = chain.authz
        self.authz_stats = metrics.authz_stats(listener.name) if chain.authz is not None else None
        # RateLimit and FaultInjection, compiled; None (and not imported) without them
        self.inbound: InboundPolicies | None = None
        if chain.rate_limit is not None or chain.fault is not None:
            from meshling.proxy.inbound import InboundPolicies

            self.inbound = InboundPolicies(
                listener.name, chain.rate_limit, chain.fault, deadlines, metrics
            )
        # the snapshot's tracing (meshling.tracing.recorder); None: off, nothing imported
        self.tracer = tracer
        # requests counted in the golden metrics (`metrics: {enabled: false}` turns off)
        self.golden = golden
        self.draining = False
        # replaced by a reload: connections on it close after their current response
        self.retired = False

    def source_of(self, identity: bytes | None) -> str:
        """The calling service of a connection to an inbound listener (the last segment
        of its SPIFFE ID, `spiffe://<mesh>/<service>`); "" elsewhere, or for plaintext."""
        if identity is None or self.direction != "inbound":
            return ""
        return identity.rsplit(b"/", 1)[-1].decode("latin-1")

    def authorize(self, identity: bytes | None) -> bool:
        """May a caller (its verified SPIFFE ID, None for plaintext) use this chain?

        Decided once per connection, since identity is a property of the connection.
        """
        if self.authz is None:
            return True
        from meshling.policies.traffic_permission.decide import decide

        decision = decide(self.authz, identity.decode() if identity is not None else None)
        stats = self.authz_stats
        assert stats is not None
        counts = stats.allowed if decision.allowed else stats.denied
        counts[decision.rule or "default"] = counts.get(decision.rule or "default", 0) + 1
        caller = identity.decode() if identity is not None else "an unauthenticated caller"
        if decision.shadow_denied:
            rule = decision.shadow_rule or "default"
            stats.shadow_denied[rule] = stats.shadow_denied.get(rule, 0) + 1
            log.info("%s: shadow rule %s would deny %s", self.listener, rule, caller)
        if not decision.allowed:
            log.debug("%s: %s denied by %s", self.listener, caller, decision.rule)
        return decision.allowed


class ListenerRuntime:
    """A bound socket whose new connections use whatever chain is current."""

    def __init__(self, config: Listener, chain: ChainRuntime, connections: ConnectionSet) -> None:
        self.config = config
        self.chain = chain
        self.connections = connections
        self.server: asyncio.Server | None = None
        self.acceptor: TlsAcceptor | None = None

    @property
    def kind(self) -> tuple[ChainProtocol | Literal["transparent"], bool]:
        """What the socket is bound for (HTTP, TCP or auto; TLS or not): fixed for its
        lifetime."""
        return chain_kind(self.chain)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        connections = self.connections
        if self.chain.transparent is not None:
            from meshling.proxy.http import HttpDownstream
            from meshling.proxy.tcp import TcpDownstream
            from meshling.transparent.acceptor import TransparentAcceptor

            self.acceptor = TransparentAcceptor(
                self,
                lambda chain: HttpDownstream(chain, connections),
                lambda chain: TcpDownstream(chain, connections),
                connections,
            )
            self.acceptor.start()
            return
        if self.chain.detection is not None:
            from meshling.proxy.acceptor import DetectingAcceptor
            from meshling.proxy.http import HttpDownstream
            from meshling.proxy.tcp import TcpDownstream

            self.acceptor = DetectingAcceptor(
                self,
                lambda chain: HttpDownstream(chain, connections),
                lambda chain: TcpDownstream(chain, connections),
            )
            self.acceptor.start()
            return
        # The protocol is fixed per listener address, so it is chosen once, here.
        if self.chain.http is not None:
            from meshling.proxy.http import HttpDownstream as downstream
        else:
            from meshling.proxy.tcp import TcpDownstream as downstream  # type: ignore[assignment]

        if self.chain.tls is not None:
            from meshling.proxy.acceptor import TlsAcceptor

            self.acceptor = TlsAcceptor(self, lambda chain: downstream(chain, connections))
            self.acceptor.start()
            return
        self.server = await loop.create_server(
            lambda: downstream(self.chain, connections),
            self.config.address,
            self.config.port,
            backlog=1024,
            reuse_address=True,
            # A new proxy process binds the same port while the old one drains, so a
            # restart refuses no connection (the old one stops accepting first).
            reuse_port=True,
        )

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self.acceptor is not None:
            self.acceptor.close()


def every_chain(chain: ChainRuntime) -> list[ChainRuntime]:
    """A listener's chain runtimes: its one, or every chain of a transparent listener."""
    return chain.transparent.values() if chain.transparent is not None else [chain]


def chain_kind(chain: ChainRuntime) -> tuple[ChainProtocol | Literal["transparent"], bool]:
    """The protocol (http, tcp or auto) and whether TLS: what a bound socket serves; a
    transparent listener's socket serves whatever its chains do."""
    if chain.transparent is not None:
        return "transparent", False
    if chain.detection is not None:
        return "auto", chain.tls is not None
    return ("http" if chain.http is not None else "tcp"), chain.tls is not None
