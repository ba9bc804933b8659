"""The proxy process: listeners, reloads, timers and graceful shutdown.

Shutdown is an explicit sequence: stop accepting -> let busy keep-alive clients
leave after their next response (a short grace) -> tell every connection left to
finish its current request and close -> wait until they are gone or the drain
timeout passes -> abort what is left -> close pooled upstream connections.

A reload builds a complete new runtime from the new snapshot first; if that
fails (invalid file, a port that cannot be bound) the old one keeps running
and the reason is logged and counted. Listeners whose address is unchanged
keep their socket, so no connection attempt is refused during a reload, and
open connections finish on the configuration they started with.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from meshling.proxy.balancer import HostRegistry
from meshling.proxy.cluster import ClusterRuntime, PoolSet
from meshling.proxy.deadlines import Deadlines
from meshling.proxy.health import HealthCheckers
from meshling.proxy.listener import (
    ChainRuntime,
    Connection,
    ListenerRuntime,
    chain_kind,
    every_chain,
)
from meshling.snapshot import Snapshot, SnapshotError, load
from meshling.snapshot.model import AccessLog, AccessLogBackend, Listener
from meshling.telemetry.accesslog import AccessLogWriters, ChainLogs
from meshling.telemetry.metrics import Metrics

if TYPE_CHECKING:
    from meshling.dns.server import DnsServer
    from meshling.telemetry.otlp import OtlpExport
    from meshling.tracing.recorder import ProxyTracing

log = logging.getLogger("meshling.proxy")

TICK = 1.0
# how long busy keep-alive clients get to leave on their own when draining
DRAIN_GRACE = 1.0


class Proxy:
    def __init__(
        self,
        snapshot: Snapshot,
        config_path: str | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.snapshot = snapshot
        # the snapshot file of a standalone proxy; None when a control plane pushes them
        self.config_path = config_path
        self.metrics = metrics or Metrics()
        self.pools = PoolSet()
        # every cluster's endpoints' standing (outlier detection, health, load), kept
        # across snapshots, and the running snapshot's active health checks
        self.hosts = HostRegistry()
        self.health = HealthCheckers()
        self.deadlines = Deadlines()
        self.connections: set[Connection] = set()
        self.listeners: dict[tuple[str, int], ListenerRuntime] = {}
        # one access log writer per backend, shared by listeners and kept across reloads
        self.access_logs = AccessLogWriters(self.metrics)
        # the span exporter while the snapshot has tracing on (telemetry.otlp)
        self.trace_export: OtlpExport | None = None
        # the DNS responder while the snapshot has a `dns:` section (meshling.dns)
        self.dns: DnsServer | None = None
        self.admin: asyncio.Server | None = None
        self.ready = False
        self.draining = False
        self.stopped = asyncio.Event()
        self.started_at = time.monotonic()
        # what the running snapshot was built from, and a change seen but not yet settled
        self._files = self._stat_files(snapshot)
        self._changed: dict[str, float] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._drain_task: asyncio.Task[None] | None = None
        # one switch at a time: a push and a certificate renewal may arrive together
        self._switching = asyncio.Lock()

    # -- start ----------------------------------------------------------------------
    async def start(self) -> None:
        from meshling.admin.server import start_admin

        await self._apply(self.snapshot)
        try:
            self.admin = await start_admin(self)
        except OSError as exc:
            for runtime in self.listeners.values():
                runtime.stop_accepting()
            self.listeners.clear()
            self.access_logs.close()
            if self.dns is not None:
                self.dns.close()
            admin = self.snapshot.admin
            raise SnapshotError(
                self.config_path or "<snapshot>",
                "admin",
                f"cannot listen on {admin.address}:{admin.port}: {exc.strerror}",
            ) from None
        self._ticker = asyncio.ensure_future(self._tick())
        self.ready = True
        names = ", ".join(f"{li.name}@{li.address}:{li.port}" for li in self.snapshot.listeners)
        log.info(
            "ready: snapshot %s, listeners %s, admin %s:%d",
            self.snapshot.version,
            names,
            self.snapshot.admin.address,
            self.snapshot.admin.port,
        )

    def _chains(
        self,
        snapshot: Snapshot,
        tracing: ProxyTracing | None = None,
    ) -> dict[tuple[str, int], tuple[Listener, ChainRuntime]]:
        """Compile every listener's chain; TLS files are read and checked here."""
        source = self.config_path or "<snapshot>"
        names = list(snapshot.clusters)
        clusters = {}
        for name, cluster in snapshot.clusters.items():
            client_tls = None
            if cluster.tls is not None:
                from meshling.proxy.tls import ClientTls, TlsConfigError

                field = f"clusters[{names.index(name)}].tls"
                try:
                    client_tls = ClientTls(
                        cluster.tls, field, self.metrics.tls_stats("upstream", name)
                    )
                except TlsConfigError as exc:
                    raise SnapshotError(source, exc.field, exc.reason) from None
            stats = self.metrics.cluster_stats(name)
            clusters[name] = ClusterRuntime(
                cluster,
                self.pools,
                stats,
                client_tls,
                self.hosts.group(name, stats),
                snapshot.zone,
            )
        chains = {}
        for i, li in enumerate(snapshot.listeners):
            # a transparent listener serves every chain, the others their one chain
            runtimes = []
            for j in range(len(li.filter_chains) if li.transparent else 1):
                server_tls = None
                chain_tls = li.filter_chains[j].tls
                if chain_tls is not None:
                    from meshling.proxy.tls import ServerTls, TlsConfigError

                    field = f"listeners[{i}].filter_chains[{j}].tls"
                    try:
                        server_tls = ServerTls(
                            chain_tls, field, self.metrics.tls_stats("downstream", li.name)
                        )
                    except TlsConfigError as exc:
                        raise SnapshotError(source, exc.field, exc.reason) from None
                runtimes.append(
                    ChainRuntime(
                        li,
                        clusters,
                        self.metrics,
                        self._chain_logs(snapshot, i, li, j),
                        snapshot.version,
                        self.deadlines,
                        server_tls,
                        tracer=tracing,
                        golden=snapshot.metrics.enabled,
                        chain=li.filter_chains[j],
                    )
                )
            if li.transparent:
                from meshling.transparent.table import ChainTable

                runtimes[0].transparent = ChainTable(
                    [(c.match, r) for c, r in zip(li.filter_chains, runtimes, strict=True)]
                )
            chains[(li.address, li.port)] = (li, runtimes[0])
        return chains

    def _chain_logs(self, snapshot: Snapshot, i: int, li: Listener, j: int = 0) -> ChainLogs | None:
        """A chain's access log sinks, their writers shared with every other listener's
        (a file that cannot be opened refuses the snapshot)."""
        try:
            return self.access_logs.chain(_access_logs(snapshot, li, j))
        except OSError as exc:
            own = not li.filter_chains[j].access_log
            field = "access_log" if own else f"listeners[{i}].filter_chains[{j}].access_log"
            raise SnapshotError(
                self.config_path or "<snapshot>",
                field,
                f"cannot open {exc.filename or 'the access log'}: {exc.strerror}",
            ) from None

    def _tracing(self, snapshot: Snapshot) -> tuple[ProxyTracing | None, OtlpExport | None]:
        """The snapshot's tracing and its exporter (the running one when it sends to the
        same place as the same service and node); None (nothing imported) when off."""
        config = snapshot.tracing
        if config is None:
            return None, None
        from meshling.telemetry.otlp import OtlpExport
        from meshling.tracing.recorder import ProxyTracing

        export = self.trace_export
        key = (config.endpoint, snapshot.service, snapshot.node)
        if export is None or export.key != key:
            export = OtlpExport(*key, self.metrics)
        return ProxyTracing(config, export), export

    def _retire_export(self, export: OtlpExport | None) -> None:
        """Flush and stop an exporter no longer used, off the event loop (it may wait
        for a slow collector)."""
        if export is not None and export is not self.trace_export:
            asyncio.get_running_loop().run_in_executor(None, export.close)

    async def _bind_dns(self, snapshot: Snapshot) -> DnsServer | None:
        """The DNS responder `snapshot` asks for: the running one if it listens at the
        same address, else a new one, bound here; None (nothing imported) when off."""
        config = snapshot.dns
        if config is None:
            return None
        if self.dns is not None and self.dns.binds(config):
            return self.dns
        from meshling.dns.server import DnsServer

        server = DnsServer(self.metrics)
        try:
            await server.start(config)
        except OSError as exc:
            raise SnapshotError(
                self.config_path or "<snapshot>",
                "dns.port",
                f"cannot listen on {config.address}:{config.port}: {exc.strerror}",
            ) from None
        return server

    async def _apply(self, snapshot: Snapshot) -> None:
        """Switch to a snapshot, all or nothing."""
        tracing, export = self._tracing(snapshot)
        try:
            chains = self._chains(snapshot, tracing)
        except SnapshotError:
            self._retire_export(export)
            # writers opened for the refused snapshot go; the running one's stay
            self.access_logs.retain(_backends(self.snapshot))
            raise
        for key, runtime in list(self.listeners.items()):
            new = chains.get(key)
            if new is not None and chain_kind(new[1]) != runtime.kind:
                # Same address, other protocol or TLS: the socket is rebound for the new one.
                runtime.stop_accepting()
                del self.listeners[key]
        started: list[ListenerRuntime] = []
        try:
            for key, (config, chain) in chains.items():
                if key not in self.listeners:
                    runtime = ListenerRuntime(config, chain, self.connections)
                    await runtime.start()
                    started.append(runtime)
        except OSError as exc:
            for runtime in started:
                runtime.stop_accepting()
            self.access_logs.retain(_backends(self.snapshot))
            self._retire_export(export)
            raise SnapshotError(
                self.config_path or "<snapshot>",
                f"listeners[{runtime_index(snapshot, key)}]",
                f"cannot listen on {key[0]}:{key[1]}: {exc.strerror}",
            ) from None
        try:
            dns = await self._bind_dns(snapshot)
        except SnapshotError:
            for runtime in started:
                runtime.stop_accepting()
            self.access_logs.retain(_backends(self.snapshot))
            self._retire_export(export)
            raise
        for runtime in started:
            self.listeners[(runtime.config.address, runtime.config.port)] = runtime
        for key, runtime in list(self.listeners.items()):
            # Keep-alive clients of the old chain reconnect after their next response,
            # so that every connection soon runs on the new snapshot.
            if key not in chains or runtime.chain is not chains[key][1]:
                for chain in every_chain(runtime.chain):
                    chain.retired = True
            if key in chains:
                runtime.config, runtime.chain = chains[key]
            else:
                runtime.stop_accepting()
                del self.listeners[key]
        # writers of backends the new snapshot dropped write what they hold and close
        self.access_logs.retain(_backends(snapshot))
        old_export, self.trace_export = self.trace_export, export
        self._retire_export(old_export)
        if self.dns is not None and self.dns is not dns:
            self.dns.close()
        self.dns = dns
        if dns is not None and snapshot.dns is not None:
            dns.configure(snapshot.dns)
        self.snapshot = snapshot
        self.metrics.snapshot_version = snapshot.version
        self.metrics.service = snapshot.service
        # The new snapshot's health checks replace the old one's; endpoints it dropped
        # are forgotten.
        self.health.start(next(iter(chains.values()))[1].clusters.values() if chains else ())
        self.hosts.retain(snapshot.clusters)

    # -- reload ---------------------------------------------------------------------
    def _stat_files(self, snapshot: Snapshot) -> dict[str, float]:
        """Modification times of the config file and every TLS file the snapshot uses."""
        paths = [self.config_path] if self.config_path else []
        for li in snapshot.listeners:
            for chain in li.filter_chains:
                tls = chain.tls
                if tls is not None:
                    paths += [tls.files.certificate, tls.files.key, tls.files.trust_bundle]
        for cluster in snapshot.clusters.values():
            if cluster.tls is not None:
                files = cluster.tls.files
                paths += [files.certificate, files.key, files.trust_bundle]
        times = {}
        for path in paths:
            try:
                times[path] = os.stat(path).st_mtime
            except OSError:
                times[path] = 0.0
        return times

    async def _reload_if_changed(self) -> None:
        if self.config_path is None:
            return  # files pushed by a control plane come with an explicit reload_tls()
        # A certificate and its key are two files written one after the other: reload
        # only once the files have stayed the same for a whole tick, so a rotation is
        # picked up as one change instead of a mismatched pair.
        current = self._stat_files(self.snapshot)
        if current == self._files:
            self._changed = None
        elif current == self._changed:
            self._changed = None
            await self.reload()
        else:
            self._changed = current

    async def reload(self) -> bool:
        """Load the config file again; keep the running snapshot if it is invalid."""
        if self.config_path is None or self.draining:
            return False
        # Whatever the outcome, these files have been looked at: no retry until they change.
        self._files = self._stat_files(self.snapshot)
        try:
            snapshot = load(self.config_path)
            if snapshot.admin != self.snapshot.admin:
                raise SnapshotError(
                    self.config_path, "admin", "the admin listener cannot change on reload"
                )
            async with self._switching:
                await self._apply(snapshot)
        except SnapshotError as exc:
            self.metrics.reloads["rejected"] += 1
            log.error("reload rejected, still running snapshot %s: %s", self.snapshot.version, exc)
            return False
        self._files = self._stat_files(snapshot)
        self.metrics.reloads["ok"] += 1
        log.info("reloaded: snapshot %s", snapshot.version)
        return True

    async def apply_snapshot(self, snapshot: Snapshot, source: str = "<snapshot>") -> None:
        """Switch to a snapshot pushed by a control plane, all or nothing.

        Raises SnapshotError (the running snapshot stays) for a snapshot that cannot run:
        unusable TLS files, a port that cannot be bound, or another admin listener.
        """
        if self.draining:
            raise SnapshotError(source, "", "the proxy is draining")
        if snapshot.admin != self.snapshot.admin:
            raise SnapshotError(
                source, "admin", "the admin listener cannot change while the proxy runs"
            )
        async with self._switching:
            await self._apply(snapshot)
            self._files = self._stat_files(snapshot)

    async def reload_tls(self) -> bool:
        """Read the running snapshot's TLS files again, after they were replaced.

        New handshakes use the new certificate and trust bundle; open connections keep
        the ones they started with, and keep-alive ones move over after their current
        response, as on any reload. False (and logged) if the new files cannot be used.
        """
        if self.draining:
            return False
        async with self._switching:
            try:
                await self._apply(self.snapshot)
            except SnapshotError as exc:
                self.metrics.reloads["rejected"] += 1
                log.error("TLS reload rejected, still using the previous files: %s", exc)
                return False
            self._files = self._stat_files(self.snapshot)
        self.metrics.reloads["ok"] += 1
        log.info("TLS files reloaded")
        return True

    # -- timers ---------------------------------------------------------------------
    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.tick(now)
            self.pools.sweep()
            self.hosts.tick(now)  # ejections that ended come back without waiting for traffic
            await self._reload_if_changed()

    # -- shutdown -------------------------------------------------------------------
    def begin_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        self.ready = False
        timeout = self.snapshot.drain_timeout
        log.info("draining: %d connections, up to %.1fs", len(self.connections), timeout)
        deadline = time.monotonic() + timeout
        # 1. stop accepting; every response from now on says `Connection: close`
        for runtime in self.listeners.values():
            runtime.stop_accepting()
            for chain in every_chain(runtime.chain):
                chain.draining = True
                chain.retired = True
        # 2. a busy keep-alive client leaves after its next response, between two
        #    requests; closing its connection now could cross a request on its way (the
        #    client would see the connection drop, unanswered). Give them a moment.
        grace = time.monotonic() + min(DRAIN_GRACE, timeout)
        while self.connections and time.monotonic() < grace:
            await asyncio.sleep(0.05)
        # 3. ask the rest to finish their current request and close
        for conn in list(self.connections):
            conn.drain()
        # 4. wait for them, up to the drain timeout
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # 5. abort whatever is left
        left = len(self.connections)
        for conn in list(self.connections):
            conn.abort()
        if left:
            log.warning("drain timeout: aborted %d connections", left)
        # 6. close pooled upstream connections and the rest
        self.pools.close_all()
        self.health.stop()
        if self.dns is not None:
            self.dns.close()
        self.deadlines.close()
        if self._ticker is not None:
            self._ticker.cancel()
        self.access_logs.close()
        if self.trace_export is not None:
            # the spans of the last requests are exported before the process ends
            await asyncio.get_running_loop().run_in_executor(None, self.trace_export.close)
        if self.admin is not None:
            self.admin.close()
        log.info("stopped")
        self.stopped.set()


def _access_logs(snapshot: Snapshot, listener: Listener, j: int = 0) -> tuple[AccessLog, ...]:
    """A listener's access log sinks: the snapshot's own, then its chain's (chain `j`)."""
    own = (snapshot.access_log,) if snapshot.access_log is not None else ()
    return own + listener.filter_chains[j].access_log


def _backends(snapshot: Snapshot) -> set[AccessLogBackend]:
    """Every access log backend a snapshot writes to."""
    return {
        s.backend
        for li in snapshot.listeners
        for j in range(len(li.filter_chains))
        for s in _access_logs(snapshot, li, j)
    }


def runtime_index(snapshot: Snapshot, key: tuple[str, int]) -> int:
    for i, li in enumerate(snapshot.listeners):
        if (li.address, li.port) == key:
            return i
    return 0


async def serve(config_path: str) -> int:
    try:
        proxy = Proxy(load(config_path), config_path)
        await proxy.start()
    except SnapshotError as exc:
        log.error("%s", exc)
        return 1
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, proxy.begin_drain)
    loop.add_signal_handler(signal.SIGINT, proxy.begin_drain)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(proxy.reload()))
    await proxy.stopped.wait()
    return 0


def run(config_path: str) -> int:
    """Run a standalone proxy from a snapshot file until SIGTERM; the process exit code."""
    import uvloop

    return int(uvloop.run(serve(config_path)))
