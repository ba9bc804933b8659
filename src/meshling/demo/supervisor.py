"""The demo's child processes: started, recorded, watched, waited for and stopped by PID.

Every child writes its output to `<workdir>/logs/<name>.log` and is recorded in
`<workdir>/pids` (one `name pid` line each) as soon as it starts, so that anyone can
check afterwards that none is left. Children run in their own process group, so a
Ctrl-C in the terminal reaches only the demo, which then stops them in order; on Linux
they also get SIGTERM if the demo itself dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

_POLL = 0.05


class StartError(Exception):
    """A child that did not become ready: why (the message), and the end of its log."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes]
    log: IO[bytes]
    # set by stop(): the exit status, and whether it had to be killed
    returncode: int | None = None
    killed: bool = False
    # whether it was still running when stop() came to it
    signalled: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is None:
            return "running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with code {code}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        tail = text.splitlines()[-lines:]
        return "\n".join(f"    | {line}" for line in tail)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux for SIGTERM when the demo process goes away."""
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []
        self.pids_path = workdir / "pids"
        self.pids_path.write_text("", encoding="utf-8")
        self.logs = workdir / "logs"
        self.logs.mkdir(exist_ok=True)

    def start(self, name: str, argv: list[str]) -> Child:
        log_path = self.logs / f"{name}.log"
        log = log_path.open("wb")
        # every setting a child needs is on its command line; meshling's environment
        # variables (a MESHLING_LISTEN, a MESHLING_CP) would override or contradict them
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("MESHLING_") or key == "MESHLING_LOG_LEVEL"
        }
        env["PYTHONUNBUFFERED"] = "1"
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        child = Child(name=name, argv=argv, log_path=log_path, process=process, log=log)
        self.children.append(child)
        with self.pids_path.open("a", encoding="utf-8") as pids:
            pids.write(f"{name} {process.pid}\n")
        return child

    def exited(self) -> list[Child]:
        """Children that have stopped on their own."""
        return [c for c in self.children if c.process.poll() is not None]

    def wait_for_port(
        self, child: Child, port: int, timeout: float, cancelled: Callable[[], bool]
    ) -> None:
        """Until something accepts TCP connections on 127.0.0.1:port."""

        def accepts() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return True
            except OSError:
                return False

        self._wait(child, f"port {port} to accept connections", accepts, timeout, cancelled)

    def wait_for_http(
        self, child: Child, port: int, path: str, timeout: float, cancelled: Callable[[], bool]
    ) -> None:
        """Until `GET <path>` on 127.0.0.1:port answers 200."""

        def ready() -> bool:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
            try:
                conn.request("GET", path)
                return conn.getresponse().status == 200
            except (OSError, http.client.HTTPException):
                return False
            finally:
                conn.close()

        self._wait(child, f"GET 127.0.0.1:{port}{path} to answer 200", ready, timeout, cancelled)

    def wait_until(
        self,
        child: Child,
        what: str,
        done: Callable[[], bool],
        timeout: float,
        cancelled: Callable[[], bool],
    ) -> None:
        """Until `done()`, failing if `child` exits first; `what` names the wait in errors."""
        self._wait(child, what, done, timeout, cancelled)

    def _wait(
        self,
        child: Child,
        what: str,
        done: Callable[[], bool],
        timeout: float,
        cancelled: Callable[[], bool],
    ) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if child.process.poll() is not None:
                raise StartError(
                    f"{child.name} (pid {child.pid}) {child.describe_exit()} while the demo "
                    f"waited for {what}",
                    f"the end of {child.log_path}:\n{child.log_tail()}",
                )
            if cancelled():
                raise KeyboardInterrupt
            if time.monotonic() > deadline:
                raise StartError(
                    f"{child.name} (pid {child.pid}) is running, but after {timeout:g}s "
                    f"the demo is still waiting for {what}",
                    f"the end of {child.log_path}:\n{child.log_tail()}",
                )
            time.sleep(_POLL)

    def stop(self, names: list[str], deadline: float, hurry: Callable[[], bool]) -> None:
        """SIGTERM the named children, wait for them, SIGKILL any left at the deadline.

        `hurry()` turning true (a second Ctrl-C) moves the deadline to now.
        """
        group = [c for c in self.children if c.name in names]
        for child in group:
            if child.process.poll() is None:
                child.signalled = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        end = time.monotonic() + deadline
        while any(c.process.poll() is None for c in group):
            if time.monotonic() > end or hurry():
                break
            time.sleep(_POLL)
        for child in group:
            if child.process.poll() is None:
                child.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                child.process.wait()
            child.returncode = child.process.returncode
            child.log.close()
