"""The proxy in control-plane mode: certificate, config stream, cache, and a `Proxy`.

Two loops share one `Agent`:

* the **stream loop** keeps a config stream open to one of the control planes: it gets
  a certificate first if the proxy has no usable one, says `Hello` (the running
  snapshot's version, where the TLS files are), then applies every `Push` through the
  `Proxy` and answers `Ack` or `Nack`. A lost stream is retried with backoff on the next
  address; a `Refusal` waits long;
* the **renewal loop** renews the certificate at half its life, retrying with backoff
  (and failover) while no control plane answers, then has the proxy reload its TLS files.

The first snapshot starts the `Proxy` (its admin listener too, so `/ready` answers only
from then on). The last applied snapshot and the credentials are cached in the data
directory; at start-up a cached snapshot runs at once, whether or not a control plane
answers, and is replaced by the first push. Throughout, the proxy serves what it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit, urlunsplit

from meshling import __version__
from meshling.agent.backoff import Addresses, Backoff
from meshling.agent.datadir import Credentials, DataDir, DataDirError, check_pair
from meshling.agent.renewal import CertificateTimes
from meshling.agent.settings import (
    AgentSettings,
    SettingsError,
    client_tls,
    read_dataplane,
    read_token,
)
from meshling.agent.sign import SignError, request_certificate
from meshling.configstream import (
    STREAM_PATH,
    Ack,
    Hello,
    Nack,
    ProtocolError,
    Push,
    Refusal,
    TlsPaths,
    decode_server,
    encode,
)
from meshling.configstream.messages import (
    MAX_MESSAGE_BYTES,
    TELEMETRY_FEATURE,
    Stats,
    StatsRow,
    Tap,
    TelemetryOffer,
    Untap,
)
from meshling.snapshot import SnapshotError, from_dict
from meshling.telemetry.metrics import BUCKETS, ControlPlaneStats, Metrics

if TYPE_CHECKING:
    from meshling.proxy.server import Proxy

log = logging.getLogger("meshling.agent")

OPEN_TIMEOUT: Final = 10.0
# a silent control plane is found out within a ping interval plus timeout
PING_INTERVAL: Final = 15.0
PING_TIMEOUT: Final = 15.0
# long sleeps are cut into these, so a wall-clock jump is noticed
MAX_SLEEP: Final = 60.0
# how often a proxy waiting to reconnect looks for a replaced token file
TOKEN_POLL: Final = 1.0
# how often matched tap events go to the control plane: small batches, soon after
TAP_FLUSH: Final = 0.25
# the shortest stats interval a control plane may ask for
MIN_STATS_INTERVAL: Final = 1.0


class Refused(Exception):
    """The control plane refused the stream (a Refusal, or 401/403 on the upgrade)."""


# Refusals about the moment, not the proxy: another stream of this dataplane took over
# (a restart racing its predecessor), or the control plane's store is away. Retried on
# the normal schedule, where every other refusal (a bad or revoked token, an invalid
# dataplane) waits long, since retrying soon cannot help.
TRANSIENT_REFUSALS: Final = frozenset({"superseded", "unavailable"})


def stream_url(base_url: str) -> str:
    """The config stream's WebSocket URL at a control plane's base URL."""
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + STREAM_PATH, "", ""))


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.addresses = Addresses(settings.control_planes)
        self.backoff = Backoff(random=rand)
        self.renew_backoff = Backoff(random=rand)
        self.data = DataDir(settings.data_dir)
        self.metrics = Metrics()
        self.stats = ControlPlaneStats()
        self.metrics.control_plane = self.stats
        # verifies https:// control planes; made by prepare()
        self.cp_tls: ssl.SSLContext | None = None
        # set by prepare()
        self.document: dict[str, Any] = {}
        self.dataplane: Any = None
        # what runs
        self.proxy: Proxy | None = None
        self.applied: str | None = None
        self.credentials: Credentials | None = None
        self.stopping = asyncio.Event()
        # when this process started counting: the golden counters sent as `stats` are
        # cumulative since then, and a new value tells the control plane they restarted
        self.started = time.time()
        self._renewing = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- start-up -------------------------------------------------------------------
    def prepare(self) -> None:
        """Check the inputs before anything starts.

        Raises SettingsError, SnapshotError (the Dataplane, with its field path) or
        DataDirError.
        """
        read_token(self.settings.token_file)
        self.document, self.dataplane = read_dataplane(self.settings.dataplane_file)
        if any(url.startswith("https://") for url in self.settings.control_planes):
            self.cp_tls = client_tls(self.settings.cp_ca_file)
        self.data.prepare()

    async def start_from_cache(self) -> bool:
        """Run the cached snapshot, if there is one that still runs (its TLS files too)."""
        credentials = self.data.load_credentials()
        if credentials is not None and credentials.times.usable(self.clock()):
            self.credentials = credentials
            self.stats.certificate_expiry = credentials.times.not_after
        cached = self.data.load_snapshot()
        if cached is None:
            return False
        try:
            await self._run(from_dict(cached.document, self.data.snapshot), self.data.snapshot)
        except SnapshotError as exc:
            log.warning("cannot run the cached snapshot %s: %s", cached.version, exc)
            return False
        self.applied = cached.version
        log.info("running the cached snapshot %s from %s", cached.version, self.data.path)
        return True

    async def run(self) -> int:
        """Serve until stop(); the process exit code."""
        await self.start_from_cache()
        self._tasks = [
            asyncio.ensure_future(self._stream_loop()),
            asyncio.ensure_future(self._renewal_loop()),
        ]
        await self.stopping.wait()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.stats.connected = 0
        if self.proxy is not None:
            await self.proxy.drain()
        return 0

    def stop(self) -> None:
        self.stopping.set()

    async def _run(self, snapshot: Any, source: str) -> None:
        """Start the proxy on its first snapshot, or switch it to the next one."""
        if self.proxy is not None:
            await self.proxy.apply_snapshot(snapshot, source)
            return
        from meshling.proxy.server import Proxy

        proxy = Proxy(snapshot, metrics=self.metrics)
        await proxy.start()
        self.proxy = proxy
        # POST /drain on the admin listener stops the whole process, as standalone
        proxy_stopped = asyncio.ensure_future(proxy.stopped.wait())
        proxy_stopped.add_done_callback(lambda _: self.stop())

    # -- the config stream ------------------------------------------------------------
    async def _stream_loop(self) -> None:
        while True:
            url = self.addresses.current
            try:
                await self._session(url)
                reason = "the stream closed"
                delay = self.backoff.failure()
            except Refused as exc:
                reason = f"refused: {exc}"
                delay = self.backoff.refusal()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is retried, none may end the loop
                reason = describe(exc)
                delay = self.backoff.failure()
            self.stats.connected = 0
            self.addresses.failed()
            if self.proxy is None:
                log.error(
                    "no control plane reachable at %s and no cached snapshot in %s: %s; "
                    "retrying in %.1fs (not ready until a snapshot arrives)",
                    url,
                    self.data.path,
                    reason,
                    delay,
                )
            else:
                log.warning(
                    "control plane %s: %s; still serving snapshot %s, retrying in %.1fs",
                    url,
                    reason,
                    self.applied,
                    delay,
                )
            await self._wait_or_new_token(delay)

    async def _wait_or_new_token(self, delay: float) -> None:
        """Sleep `delay` seconds, cut short when the token file is replaced: after a
        refusal (an expired or revoked token) a new token is what the proxy waits for."""
        before = _mtime(self.settings.token_file)
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(left, TOKEN_POLL))
            if _mtime(self.settings.token_file) != before:
                log.info("the token file %s changed: reconnecting now", self.settings.token_file)
                return

    async def _session(self, url: str) -> None:
        """One config stream, from connecting to its end."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        token = read_token(self.settings.token_file)
        if self.credentials is None or not self.credentials.times.usable(self.clock()):
            await self.renew(url, token)
        try:
            websocket = await connect(
                stream_url(url),
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=OPEN_TIMEOUT,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                max_size=MAX_MESSAGE_BYTES,
                proxy=None,
                ssl=self.cp_tls if url.startswith("https://") else None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                body = exc.response.body.decode("utf-8", "replace").strip()
                raise Refused(f"{status} {body[:200]}") from None
            raise
        async with websocket:
            hello = Hello(
                self.document,
                self.applied,
                TlsPaths(self.data.certificate, self.data.key, self.data.trust_bundle),
                {"version": __version__, "features": [TELEMETRY_FEATURE]},
            )
            await websocket.send(encode(hello))
            log.info("config stream open to %s (running %s)", url, self.applied or "nothing")
            self.stats.connected = 1
            from meshling.proxy.tap import Taps

            taps = Taps(self.metrics)
            telemetry: asyncio.Task[None] | None = None
            try:
                async for text in websocket:
                    message = decode_server(text)
                    if isinstance(message, Refusal):
                        if message.reason in TRANSIENT_REFUSALS:
                            raise ConnectionError(f"{message.reason}: {message.message}")
                        raise Refused(f"{message.reason}: {message.message}")
                    if isinstance(message, TelemetryOffer):
                        if telemetry is None:
                            interval = max(MIN_STATS_INTERVAL, message.stats_interval)
                            telemetry = asyncio.ensure_future(
                                self._telemetry(websocket, taps, interval)
                            )
                    elif isinstance(message, Tap):
                        if taps.add(message):
                            log.info(
                                "tap %s: sending requests matching %s for up to %.0fs",
                                message.id,
                                {k: v for k, v in message.filter.to_dict().items() if v},
                                message.duration,
                            )
                        else:
                            log.warning("tap %s refused: too many taps running", message.id)
                    elif isinstance(message, Untap):
                        if message.id in taps.sessions:
                            log.info("tap %s: ended by the control plane", message.id)
                        taps.remove(message.id)
                    else:
                        self.backoff.success()
                        reply = await self.on_push(message)
                        await websocket.send(encode(reply))
            finally:
                # taps live only as long as the stream that asked for them
                taps.clear()
                if telemetry is not None:
                    telemetry.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await telemetry

    def golden_stats(self) -> Stats:
        """The proxy's golden counters as a `stats` message, cumulative since start-up."""
        rows = tuple(
            StatsRow(
                direction,
                source,
                destination,
                route,
                tuple(s.by_class),
                tuple(s.buckets),
                s.sum,
                dict(s.grpc_statuses) if s.grpc_statuses is not None else None,
            )
            for (direction, source, destination, route), s in self.metrics.golden().items()
        )
        return Stats(self.started, BUCKETS, rows)

    async def _telemetry(self, websocket: Any, taps: Any, interval: float) -> None:
        """Send the golden counters now and every `interval`, and tap events as they
        match, in batches every TAP_FLUSH seconds. Ends with the stream."""
        from websockets.exceptions import ConnectionClosed

        next_stats = 0.0
        try:
            while True:
                now = time.monotonic()
                if now >= next_stats:
                    await websocket.send(encode(self.golden_stats()))
                    next_stats = now + interval
                for batch in taps.take():
                    await websocket.send(encode(batch))
                await asyncio.sleep(TAP_FLUSH)
        except ConnectionClosed:
            pass  # the stream loop sees the close too, and reconnects
        except Exception:
            # never the proxy's traffic: only what the control plane sees of it stops
            log.exception("stats and taps to the control plane stopped")

    async def on_push(self, push: Push) -> Ack | Nack:
        """Apply a pushed snapshot, or say why not; the running one stays on failure."""
        if push.version == self.applied and self.proxy is not None:
            return Ack(push.version)
        source = f"snapshot {push.version}"
        try:
            await self._run(from_dict(push.snapshot, source), source)
        except SnapshotError as exc:
            self.stats.snapshots["rejected"] += 1
            running = f"still running {self.applied}" if self.proxy else "not serving yet"
            log.error("rejected %s (%s): %s", source, running, exc)
            return Nack(push.version, str(exc))
        self.applied = push.version
        self.stats.snapshots["applied"] += 1
        log.info("applied snapshot %s", push.version)
        try:
            self.data.save_snapshot(push.version, push.snapshot)
        except DataDirError as exc:
            # it runs; only a restart without a control plane would miss it
            log.warning("snapshot %s not cached: %s", push.version, exc)
        return Ack(push.version)

    # -- the certificate --------------------------------------------------------------
    async def renew(self, url: str, token: str) -> None:
        """Get a new certificate on a new key; write it and reload the proxy's TLS.

        Raises SignError (counted as a failed request) or DataDirError.
        """
        async with self._renewing:
            try:
                await self._renew(url, token)
            except SignError:
                self.stats.certificates["failed"] += 1
                raise
            self.stats.certificates["ok"] += 1
        if self.proxy is not None:
            await self.proxy.reload_tls()

    async def _renew(self, url: str, token: str) -> None:
        from meshling.identity import SpiffeId, make_key_and_csr

        # a new key per certificate: a key that leaked stops working at the next renewal
        identity = SpiffeId.for_service(self.dataplane.mesh, self.dataplane.service)
        key, csr = make_key_and_csr(identity)
        signed = await request_certificate(url, token, self.dataplane.name, csr, tls=self.cp_tls)
        now = self.clock()
        try:
            times = CertificateTimes.from_pem(signed.certificate, obtained=now)
            check_pair(signed.certificate, key)
        except ValueError as exc:
            raise SignError(f"{url} issued an unusable certificate: {exc}") from None
        if not times.usable(now):
            raise SignError(f"{url} issued a certificate that is not valid now")
        self.data.save_credentials(signed.certificate, key, signed.bundle)
        self.credentials = Credentials(signed.certificate, key, signed.bundle, times)
        self.stats.certificate_expiry = times.not_after
        log.info(
            "certificate for %s from %s, expires %s, renewal in %.0fs",
            signed.identity,
            url,
            signed.expires,
            times.renewal_delay(now),
        )

    async def _renewal_loop(self) -> None:
        while True:
            credentials = self.credentials
            if credentials is None:
                # the stream loop gets the first certificate
                await asyncio.sleep(1.0)
                continue
            delay = credentials.times.renewal_delay(self.clock())
            if delay > 0:
                await asyncio.sleep(min(delay, MAX_SLEEP))
                continue
            url = self.addresses.current
            try:
                await self.renew(url, read_token(self.settings.token_file))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                wait = (
                    self.renew_backoff.refusal()
                    if isinstance(exc, SignError) and exc.refused
                    else self.renew_backoff.failure()
                )
                self.addresses.failed()
                left = credentials.times.not_after - self.clock()
                log.warning(
                    "certificate renewal at %s failed: %s; the current one expires in %.0fs, "
                    "retrying in %.1fs",
                    url,
                    describe(exc),
                    left,
                    wait,
                )
                await asyncio.sleep(wait)
            else:
                self.renew_backoff.success()


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def describe(exc: BaseException) -> str:
    """A failure in words, for the log."""
    if isinstance(exc, SignError | SettingsError | DataDirError | ProtocolError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


async def serve(settings: AgentSettings) -> int:
    agent = Agent(settings)
    try:
        agent.prepare()
    except (SettingsError, SnapshotError, DataDirError) as exc:
        log.error("%s", exc)
        return 2
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, agent.stop)
    loop.add_signal_handler(signal.SIGINT, agent.stop)

    reloads: set[asyncio.Future[bool]] = set()

    def reload_tls() -> None:
        if agent.proxy is not None:
            reload = asyncio.ensure_future(agent.proxy.reload_tls())
            reloads.add(reload)
            reload.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload_tls)
    return await agent.run()


def run(settings: AgentSettings) -> int:
    """Run a proxy configured by a control plane until SIGTERM; the process exit code."""
    import uvloop

    return int(uvloop.run(serve(settings)))
