"""The lifecycle of `meshling run`: a proxy and an app, started and stopped in order.

A pure state machine: it is told what happened (`ProxyReady`, `AppExited`, a signal,
`Tick` when time passed) and the time, and answers with what to do (`StartApp`,
`SignalApp`, `SignalProxy`, `Say`, `Exit`). It starts no process and reads no clock, so
every ordering problem can be played out in a unit test with a fake clock. Everything
that decides the order of start-up and shutdown lives in this file:

1. The proxy starts first (before this machine is made). The app starts only once the
   proxy answers `GET /ready` with 200. If the proxy exits first, or is not ready within
   the ready timeout, the app is never started: the proxy is stopped and the exit code is
   `EXIT_PROXY_EXITED` (70) or `EXIT_PROXY_NOT_READY` (71).
2. While the app runs, every forwarded signal goes to the app alone: the app decides how
   to stop, and the proxy keeps serving for as long as the app needs the mesh to finish.
3. When the app exits, the proxy drains (SIGTERM: stop accepting, finish requests); after
   the drain timeout it is killed. SIGTERM rather than `POST /drain`: it drains the same
   in both modes, and a control plane's snapshots give the admin listener no token. The exit code is the app's (128+N when signal N ended
   it, as a shell says).
4. When the proxy exits while the app runs, the app gets SIGTERM, and SIGKILL after the
   app grace; the exit code is `EXIT_PROXY_DIED` (72).
5. `Exit` comes only once no child is left, so nothing outlives `meshling run`.

`SignalApp` is meant for the app's whole process group (the app runs in a session of its
own), so whatever the app started gets the signal too, and what the app leaves running
when it exits is sent SIGTERM.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass
from typing import Final

# Exit codes of `meshling run` itself; any other code is the app's.
EXIT_PROXY_EXITED: Final = 70  # the proxy exited before it was ready; the app never ran
EXIT_PROXY_NOT_READY: Final = 71  # the proxy was not ready in time; the app never ran
EXIT_PROXY_DIED: Final = 72  # the proxy exited while the app ran; the app was stopped
EXIT_APP_NOT_EXECUTABLE: Final = 126  # as a shell says: found, but cannot be executed
EXIT_APP_NOT_FOUND: Final = 127  # as a shell says: no such command

# What a terminal, a supervisor or `kill` sends to stop or poke a process; each one that
# arrives is passed to the app exactly once.
FORWARDED: Final = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Those of them that mean "stop": before the app runs they stop the start-up, and while
# the proxy drains they cut the drain short.
STOPPING: Final = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a child process ended, in `subprocess` terms: a code, or -N for signal N."""

    returncode: int

    @property
    def shell_code(self) -> int:
        """The status as a shell reports it: the code, or 128+N for signal N."""
        return 128 - self.returncode if self.returncode < 0 else self.returncode

    def describe(self) -> str:
        if self.returncode < 0:
            return f"was killed by {signal_name(-self.returncode)}"
        return f"exited with code {self.returncode}"


# -- events: what happened ---------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProxyReady:
    """The proxy's admin listener answered `GET /ready` with 200."""


@dataclass(frozen=True, slots=True)
class ProxyNotReady:
    """A readiness probe that did not say ready: why (kept for the timeout's message)."""

    reason: str


@dataclass(frozen=True, slots=True)
class ProxyExited:
    status: ExitStatus


@dataclass(frozen=True, slots=True)
class AppExited:
    status: ExitStatus


@dataclass(frozen=True, slots=True)
class AppStartFailed:
    """The app could not be executed (`StartApp` failed): the exit code and why."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class SignalReceived:
    signum: int


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: a deadline may have come."""


Event = (
    ProxyReady | ProxyNotReady | ProxyExited | AppExited | AppStartFailed | SignalReceived | Tick
)


# -- actions: what to do -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class StartApp:
    pass


@dataclass(frozen=True, slots=True)
class SignalApp:
    """Send a signal to the app's process group."""

    signum: int


@dataclass(frozen=True, slots=True)
class SignalProxy:
    signum: int


@dataclass(frozen=True, slots=True)
class Say:
    """A line for the user, on stderr."""

    message: str


@dataclass(frozen=True, slots=True)
class Exit:
    code: int


Action = StartApp | SignalApp | SignalProxy | Say | Exit


class State(enum.Enum):
    # the proxy starts; the app waits for its readiness
    STARTING = "starting"
    # both run
    RUNNING = "running"
    # no app (it exited, or never started): the proxy is asked to stop, then killed
    STOPPING_PROXY = "stopping proxy"
    # the proxy died under the app: the app is asked to stop, then killed
    STOPPING_APP = "stopping app"
    # Exit was given
    DONE = "done"


class Lifecycle:
    """The decisions of one `meshling run`; see the module's rules."""

    def __init__(
        self,
        now: float,
        *,
        ready_timeout: float,
        drain_timeout: float,
        app_grace: float,
        admin: str = "the admin listener",
    ) -> None:
        self.ready_timeout = ready_timeout
        self.drain_timeout = drain_timeout
        self.app_grace = app_grace
        # where readiness is asked, for messages
        self.admin = admin
        self.state = State.STARTING
        # the one deadline of the current state: readiness, drain, or the app's grace
        self.deadline: float | None = now + ready_timeout
        self.proxy_alive = True
        self.app_alive = False
        # a child already sent SIGKILL is not killed twice, nor reported twice
        self.proxy_killed = False
        self.app_killed = False
        # what the last readiness probe said, for the timeout's message
        self.last_probe = "no answer yet"
        # the exit code, once known
        self.code: int | None = None

    def handle(self, event: Event, now: float) -> list[Action]:
        if self.state is State.DONE:
            return []
        if isinstance(event, ProxyNotReady):
            self.last_probe = event.reason
            return []
        if self.state is State.STARTING:
            return self._starting(event, now)
        if self.state is State.RUNNING:
            return self._running(event, now)
        if self.state is State.STOPPING_PROXY:
            return self._stopping_proxy(event, now)
        return self._stopping_app(event, now)

    # -- per state ----------------------------------------------------------------------
    def _starting(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, ProxyReady):
            self.state = State.RUNNING
            self.app_alive = True
            self.deadline = None
            return [StartApp()]
        if isinstance(event, ProxyExited):
            self.proxy_alive = False
            return self._finish(
                EXIT_PROXY_EXITED,
                f"the proxy {event.status.describe()} before it was ready; the app was not started",
            )
        if isinstance(event, SignalReceived) and event.signum in STOPPING:
            return self._stop_proxy(
                now,
                128 + event.signum,
                f"{signal_name(event.signum)} before the proxy was ready; the app was not started",
            )
        if isinstance(event, Tick) and self._due(now):
            return self._stop_proxy(
                now,
                EXIT_PROXY_NOT_READY,
                f"the proxy was not ready within {self.ready_timeout:g}s "
                f"(GET http://{self.admin}/ready: {self.last_probe}); the app was not started",
            )
        # other signals have no app to go to yet
        return []

    def _running(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, SignalReceived):
            return [SignalApp(event.signum)]
        if isinstance(event, AppExited):
            self.app_alive = False
            self.state = State.STOPPING_PROXY
            self.code = event.status.shell_code
            self.deadline = now + self.drain_timeout
            # SIGTERM to the app's group: what the app left behind goes with it
            return [SignalApp(signal.SIGTERM), SignalProxy(signal.SIGTERM)]
        if isinstance(event, AppStartFailed):
            self.app_alive = False
            return [Say(event.reason), *self._stop_proxy(now, event.code, None)]
        if isinstance(event, ProxyExited):
            self.proxy_alive = False
            self.state = State.STOPPING_APP
            self.code = EXIT_PROXY_DIED
            self.deadline = now + self.app_grace
            return [
                Say(
                    f"the proxy {event.status.describe()} while the app was running; "
                    "stopping the app (SIGTERM)"
                ),
                SignalApp(signal.SIGTERM),
            ]
        return []

    def _stopping_proxy(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, ProxyExited):
            self.proxy_alive = False
            assert self.code is not None
            # SIGTERM is what it was sent: a proxy that had not yet set up its handlers
            # dies of it, which is a stop like any other
            quiet = (0, -signal.SIGTERM)
            if event.status.returncode not in quiet and not self.proxy_killed:
                return self._finish(self.code, f"the proxy {event.status.describe()} on drain")
            return self._finish(self.code, None)
        if self.proxy_killed:
            return []
        if isinstance(event, Tick) and self._due(now):
            return self._kill_proxy(
                f"the proxy did not stop within the drain timeout ({self.drain_timeout:g}s); "
                "killing it"
            )
        if isinstance(event, SignalReceived) and event.signum in STOPPING:
            return self._kill_proxy(
                f"{signal_name(event.signum)} while the proxy was stopping; killing it"
            )
        return []

    def _stopping_app(self, event: Event, now: float) -> list[Action]:
        if isinstance(event, AppExited):
            self.app_alive = False
            assert self.code is not None
            return self._finish(self.code, None)
        if isinstance(event, SignalReceived):
            return [SignalApp(event.signum)]
        if isinstance(event, Tick) and self._due(now) and not self.app_killed:
            self.app_killed = True
            self.deadline = None
            return [
                Say(f"the app did not stop within {self.app_grace:g}s of SIGTERM; killing it"),
                SignalApp(signal.SIGKILL),
            ]
        return []

    # -- steps shared by states -----------------------------------------------------------
    def _due(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def _stop_proxy(self, now: float, code: int, message: str | None) -> list[Action]:
        """No app runs: the proxy stops (it drains), then `meshling run` exits `code`."""
        self.state = State.STOPPING_PROXY
        self.code = code
        self.deadline = now + self.drain_timeout
        said: list[Action] = [Say(message)] if message else []
        return [*said, SignalProxy(signal.SIGTERM)]

    def _kill_proxy(self, message: str) -> list[Action]:
        self.proxy_killed = True
        self.deadline = None
        return [Say(message), SignalProxy(signal.SIGKILL)]

    def _finish(self, code: int, message: str | None) -> list[Action]:
        assert not self.proxy_alive and not self.app_alive
        self.state = State.DONE
        self.code = code
        self.deadline = None
        said: list[Action] = [Say(message)] if message else []
        return [*said, Exit(code)]
