"""Serving the API: the admin token file, the store, and uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import stat
import sys
from pathlib import Path
from types import FrameType

import uvicorn
import uvloop

from meshling.controlplane.api.app import create_app
from meshling.controlplane.store import StoreError, open_store


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


def run(store_url: str, host: str, port: int, token_file: str) -> int:
    """Serve the API on `host:port` over the store at `store_url` until SIGTERM or SIGINT.

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
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(store_url, host, port, token))


async def _serve(store_url: str, host: str, port: int, token: str) -> int:
    try:
        store = await open_store(store_url)
    except StoreError as e:
        print(f"error: cannot open the store: {e}", file=sys.stderr)
        return 1
    try:
        config = uvicorn.Config(
            create_app(store, token),
            host=host,
            port=port,
            log_level="info",
            access_log=False,
            lifespan="off",
        )
        server = uvicorn.Server(config)

        def stop(signum: int, frame: FrameType | None) -> None:
            server.should_exit = True

        # uvicorn handles SIGTERM and SIGINT while it serves (stops accepting, finishes
        # the requests in flight, returns), then raises the signal again for the handler
        # it found: this one, so that a signal is a clean stop and not a kill
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
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
        await store.close()
