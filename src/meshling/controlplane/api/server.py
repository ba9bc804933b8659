"""Serving the control plane: the admin token file, the store, the secrets the replicas
share (token signing key, a CA per mesh), the distributor and its streams, and uvicorn
until SIGTERM or SIGINT.

The shutdown sequence: uvicorn stops accepting and closes its connections (streams get
1012 "service restart"), the distributor records its streams disconnected and writes
the status it holds, then the store closes.
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import signal
import ssl
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
import uvloop

from meshling.configstream import STREAM_PATH
from meshling.configstream.messages import MAX_MESSAGE_BYTES
from meshling.controlplane.api.app import create_app
from meshling.controlplane.distributor import Distributor, replica_id
from meshling.controlplane.distributor.stream import PER_MESSAGE_DEFLATE
from meshling.controlplane.resources import MESH_KIND
from meshling.controlplane.status import DEFAULT_OFFLINE_AFTER, StatusWriter
from meshling.controlplane.store import AlreadyExists, Store, StoreError, open_store
from meshling.controlplane.telemetry import DEFAULT_STATS_INTERVAL
from meshling.controlplane.trust import Authorities, TrustError, load_or_create_signer


class TokenFileError(Exception):
    """The admin token file cannot be read or written; the message says why."""


def ensure_admin_token(token_file: str) -> tuple[str, bool]:
    """The admin token in `token_file`, creating it (0600) if there is none yet.

    Returns the token and whether it was just created.
    """
    path = Path(token_file)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_admin_token(path), False
    except OSError as e:
        raise TokenFileError(f"cannot create the admin token file {path}: {e}") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(token + "\n")
    return token, True


def _read_admin_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"cannot read the admin token file {path}: {e}") from None
    if not token:
        raise TokenFileError(
            f"the admin token file {path} is empty: remove it to have a new token made"
        )
    if mode & 0o077:
        print(
            f"warning: the admin token file {path} is readable by others "
            f"(mode {mode:04o}); run: chmod 600 {path}",
            file=sys.stderr,
        )
    return token


def run(
    store_url: str,
    host: str,
    port: int,
    token_file: str,
    *,
    default_mesh: str | None = None,
    mesh_mtls: str = "off",
    replica: str | None = None,
    offline_after: float = DEFAULT_OFFLINE_AFTER,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    stats_interval: float = DEFAULT_STATS_INTERVAL,
) -> int:
    """Serve the control plane on `host:port` over the store at `store_url` until SIGTERM
    or SIGINT.

    `default_mesh`, when given, is created if missing, with mTLS `mesh_mtls` (off,
    permissive or strict). `replica` names this process in dataplane status (default
    hostname:pid); a dataplane is offline once its replica has not refreshed it for
    `offline_after` seconds. With `tls_cert` and `tls_key` (PEM files) the API and the
    config stream are served over TLS (https://, wss://), as they should be whenever
    proxies or operators reach the control plane over a network: tokens and
    certificates travel on these connections.

    Returns the process exit status: 0 after a clean stop, 1 if it could not start.
    """
    try:
        token, created = ensure_admin_token(token_file)
    except TokenFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if created:
        print(f"admin token written to {os.path.abspath(token_file)} (mode 0600)", flush=True)
    else:
        print(f"admin token read from {os.path.abspath(token_file)}", flush=True)
    if (tls_cert is None) != (tls_key is None):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 1
    if tls_cert is not None and tls_key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            print(
                f"error: cannot use --tls-cert {tls_cert} with --tls-key {tls_key}: {reason}",
                file=sys.stderr,
            )
            return 1
    options = _Options(
        default_mesh,
        mesh_mtls,
        replica or replica_id(),
        offline_after,
        tls_cert,
        tls_key,
        stats_interval,
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(store_url, host, port, token, options))


@dataclass(frozen=True)
class _Options:
    default_mesh: str | None
    mesh_mtls: str
    replica: str
    offline_after: float
    tls_cert: str | None = None
    tls_key: str | None = None
    # how often proxies send their golden counters (`meshling stat`)
    stats_interval: float = DEFAULT_STATS_INTERVAL


async def ensure_mesh(store: Store, name: str, mtls: str) -> bool:
    """Create mesh `name` unless it exists; whether it was created."""
    spec: dict[str, Any] = {}
    if mtls != "off":
        spec = {"mtls": {"enabled": True, "mode": mtls}}
    try:
        await store.create(MESH_KIND, name, name, spec)
    except AlreadyExists:
        return False
    return True


async def _serve(store_url: str, host: str, port: int, token: str, options: _Options) -> int:
    try:
        store = await open_store(store_url)
    except StoreError as e:
        print(f"error: cannot open the store: {e}", file=sys.stderr)
        return 1
    distributor: Distributor | None = None
    try:
        try:
            if options.default_mesh is not None and await ensure_mesh(
                store, options.default_mesh, options.mesh_mtls
            ):
                print(f"created mesh {options.default_mesh!r}", flush=True)
            signer = await load_or_create_signer(store)
            distributor = Distributor(
                store,
                StatusWriter(store),
                replica=options.replica,
                offline_after=options.offline_after,
                stats_interval=options.stats_interval,
            )
            await distributor.start()
            # What start-up loaded (modules, the resources' view) stays for the process's
            # life: out of the collector's sight, full collections stay short when a change
            # rebuilds every proxy's snapshot at once.
            gc.freeze()
        except (StoreError, TrustError) as e:
            print(f"error: cannot start the control plane: {e}", file=sys.stderr)
            return 1
        app = create_app(
            store, token, ca=Authorities(store), signer=signer, distributor=distributor
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="info",
            access_log=False,
            lifespan="off",
            ws="websockets-sansio",
            # keepalive: a proxy that stops answering pings is dropped (and so offline)
            # within 20 s, even when its TCP connection lingers
            ws_ping_interval=10.0,
            ws_ping_timeout=10.0,
            ws_max_size=MAX_MESSAGE_BYTES,
            ws_per_message_deflate=PER_MESSAGE_DEFLATE,
            ssl_certfile=options.tls_cert,
            ssl_keyfile=options.tls_key,
        )
        server = uvicorn.Server(config)

        def stop(signum: int, frame: FrameType | None) -> None:
            server.should_exit = True

        # uvicorn handles SIGTERM and SIGINT while it serves (stops accepting, finishes
        # the requests in flight, returns), then raises the signal again for the handler
        # it found: this one, so that a signal is a clean stop and not a kill
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        where = f"[{host}]" if ":" in host else host
        secure = "s" if options.tls_cert else ""
        print(
            f"control plane {options.replica}: API at http{secure}://{where}:{port}, config "
            f"stream at ws{secure}://{where}:{port}{STREAM_PATH}",
            flush=True,
        )
        try:
            await server.serve()
        except SystemExit:
            # uvicorn exits when it cannot start (the port is taken, say); it has logged why
            return 1
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0 if server.started else 1
    finally:
        if distributor is not None:
            await distributor.close()
        await store.close()
