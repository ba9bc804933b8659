"""The processes of `meshling run`: the proxy and the app as children, watched and signalled.

This layer only does I/O; every decision is `lifecycle.Lifecycle`'s. It turns what
happens into events (a child's exit through a pidfd, a readiness probe, a signal, a
passed deadline) and carries out the actions.

Why the proxy is a child process and not an event loop in this one: the app's process
and environment stay free of the proxy's (its uvloop, its threads, its file descriptors),
the proxy can be killed on its own when its drain does not end, a crash of either one is
seen and reported by a process that is still alive, and it runs exactly the `meshling
proxy run` that runs everywhere else.

Process groups: the proxy and the app each run in a session of their own, so a Ctrl-C in
the terminal (SIGINT to the terminal's foreground process group) reaches `meshling run`
alone: the app receives it once, forwarded to its process group, and the proxy not at all
(it keeps serving while the app shuts down). Both children ask Linux for SIGTERM should
`meshling run` die without stopping them (PR_SET_PDEATHSIG), so none is orphaned. The app
keeps stdin, stdout and stderr; the proxy's output (its log, and an access log to stdout)
goes to stderr or to `--proxy-log`, so the app's stdout is the app's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO

from meshling.runner.lifecycle import (
    EXIT_APP_NOT_EXECUTABLE,
    EXIT_APP_NOT_FOUND,
    EXIT_PROXY_EXITED,
    FORWARDED,
    AppExited,
    AppStartFailed,
    Event,
    Exit,
    ExitStatus,
    Lifecycle,
    ProxyExited,
    ProxyNotReady,
    ProxyReady,
    Say,
    SignalApp,
    SignalProxy,
    SignalReceived,
    StartApp,
    State,
    Tick,
)
from meshling.runner.plan import ProxyPlan

log = logging.getLogger("meshling.run")

# how often readiness is asked while the proxy starts, and how long one probe may take
PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 1.0


async def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Ask the admin listener `GET /ready`: whether it said 200, and what it said."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return False, "connect timed out"
    except OSError as exc:
        return False, _reason(exc)
    try:
        writer.write(b"GET /ready HTTP/1.1\r\nhost: meshling\r\nconnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(4096), timeout)
    except TimeoutError:
        return False, "no answer"
    except OSError as exc:
        return False, _reason(exc)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return False, "not an HTTP answer"
    text = body.decode("utf-8", "replace").strip()[:80]
    return parts[1] == b"200", f"{parts[1].decode()} {text}".strip()


def _reason(exc: OSError) -> str:
    """An OSError in a few words ("connection refused"), without asyncio's address dump."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc) or type(exc).__name__


def _pdeathsig() -> Callable[[], None]:
    """A preexec function asking Linux for SIGTERM when this process dies (before exec)."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    import ctypes

    # loaded here, in the parent: the child between fork and exec only makes the call
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def child() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the request was made
            os.kill(os.getpid(), signal.SIGTERM)

    return child


class Supervisor:
    def __init__(
        self,
        plan: ProxyPlan,
        app: list[str],
        *,
        ready_timeout: float,
        drain_timeout: float,
        app_grace: float,
        log_level: str = "info",
        proxy_log: str | None = None,
    ) -> None:
        self.plan = plan
        self.app_argv = app
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.app_grace = app_grace
        self.log_level = log_level
        self.proxy_log = proxy_log
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.proxy: subprocess.Popen[bytes] | None = None
        self.app: subprocess.Popen[bytes] | None = None
        self._preexec = _pdeathsig()
        self._watched: list[int] = []

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if (await probe(self.plan.admin_host, self.plan.admin_port, 0.5))[0]:
            say(
                f"the admin address {self.plan.admin} already answers GET /ready (another "
                "proxy?); nothing was started"
            )
            return EXIT_PROXY_EXITED
        for signum in FORWARDED:
            loop.add_signal_handler(signum, self.events.put_nowait, SignalReceived(signum))
        prober: asyncio.Task[None] | None = None
        try:
            try:
                self.proxy = self._start_proxy()
            except OSError as exc:
                say(f"cannot start the proxy: {exc.strerror or exc}")
                return EXIT_PROXY_EXITED
            started = time.monotonic()
            self._watch(self.proxy, ProxyExited)
            machine = Lifecycle(
                started,
                ready_timeout=self.ready_timeout,
                drain_timeout=self.drain_timeout,
                app_grace=self.app_grace,
                admin=self.plan.admin,
            )
            prober = asyncio.ensure_future(self._probe_until_ready(machine))
            while True:
                event = await self._next_event(machine.deadline)
                now = time.monotonic()
                log.debug("%s: %s", machine.state.value, event)
                for action in machine.handle(event, now):
                    if isinstance(action, Exit):
                        return action.code
                    self._perform(action, now - started)
        finally:
            if prober is not None:
                prober.cancel()
            for signum in FORWARDED:
                loop.remove_signal_handler(signum)
            self._reap_all()

    async def _next_event(self, deadline: float | None) -> Event:
        if deadline is None:
            return await self.events.get()
        try:
            return await asyncio.wait_for(self.events.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return Tick()

    async def _probe_until_ready(self, machine: Lifecycle) -> None:
        said = ""
        while machine.state is State.STARTING:
            ready, answer = await probe(self.plan.admin_host, self.plan.admin_port)
            if ready:
                self.events.put_nowait(ProxyReady())
                return
            if answer != said:
                said = answer
                self.events.put_nowait(ProxyNotReady(answer))
            await asyncio.sleep(PROBE_INTERVAL)

    def _perform(self, action: object, elapsed: float) -> None:
        if isinstance(action, Say):
            say(action.message)
        elif isinstance(action, StartApp):
            log.debug("the proxy is ready after %.2fs; starting %s", elapsed, self.app_argv[0])
            self._start_app()
        elif isinstance(action, SignalApp):
            if self.app is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.app.pid, action.signum)
        elif isinstance(action, SignalProxy) and self.proxy is not None:
            # a no-op once the proxy is reaped, so its PID is never reused by mistake
            self.proxy.send_signal(action.signum)

    # -- children -------------------------------------------------------------------------
    def _start_proxy(self) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "meshling", "--log-level", self.log_level, *self.plan.args]
        output: IO[bytes] | int = sys.stderr.fileno()
        if self.proxy_log:
            output = open(self.proxy_log, "ab")  # noqa: SIM115 - the child holds it open
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                preexec_fn=self._preexec,
            )
        finally:
            if not isinstance(output, int):
                output.close()

    def _start_app(self) -> None:
        assert self.proxy is not None
        env = {**os.environ, **self.plan.env, "MESHLING_PROXY_PID": str(self.proxy.pid)}
        name = self.app_argv[0]
        try:
            self.app = subprocess.Popen(
                self.app_argv, env=env, start_new_session=True, preexec_fn=self._preexec
            )
        except FileNotFoundError:
            self.events.put_nowait(
                AppStartFailed(EXIT_APP_NOT_FOUND, f"cannot run {name}: no such file or command")
            )
            return
        except OSError as exc:
            self.events.put_nowait(
                AppStartFailed(EXIT_APP_NOT_EXECUTABLE, f"cannot run {name}: {exc.strerror}")
            )
            return
        self._watch(self.app, AppExited)

    def _watch(
        self,
        proc: subprocess.Popen[bytes],
        event: Callable[[ExitStatus], ProxyExited | AppExited],
    ) -> None:
        """Queue `event` when `proc` exits, reaping it (a pidfd: no thread, no SIGCHLD)."""
        loop = asyncio.get_running_loop()
        fd = os.pidfd_open(proc.pid)
        self._watched.append(fd)

        def exited() -> None:
            loop.remove_reader(fd)
            self._watched.remove(fd)
            os.close(fd)
            self.events.put_nowait(event(ExitStatus(proc.wait())))

        loop.add_reader(fd, exited)

    def _reap_all(self) -> None:
        """Nothing outlives `meshling run`: normally a no-op, as both children are reaped
        already; after an unexpected error, whatever is left is killed and reaped."""
        loop = asyncio.get_running_loop()
        for fd in self._watched:
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()
        if self.app is not None and self.app.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.app.pid, signal.SIGKILL)
            self.app.wait()
        if self.proxy is not None and self.proxy.poll() is None:
            self.proxy.kill()
            self.proxy.wait()


def say(message: str) -> None:
    print(f"meshling run: {message}", file=sys.stderr, flush=True)


def run(supervisor: Supervisor) -> int:
    """Run the proxy, then the app, until both are gone; the exit code."""
    return asyncio.run(supervisor.run())
